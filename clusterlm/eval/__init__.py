"""Evaluation: loss, perplexity, bits per byte."""
