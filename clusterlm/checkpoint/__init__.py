"""Checkpoints: atomic, hashed, resumable."""
