"""Quantization and pruning."""
