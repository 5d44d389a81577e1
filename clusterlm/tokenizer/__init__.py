"""Tokenizers (byte, char, BPE) behind one small protocol; see base.py."""

from clusterlm.tokenizer.base import Tokenizer, load_tokenizer

__all__ = ["Tokenizer", "load_tokenizer"]
