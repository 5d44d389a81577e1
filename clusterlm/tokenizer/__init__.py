"""Tokenizers (byte, char, BPE) behind one small protocol; see base.py."""

from clusterlm.tokenizer.base import Tokenizer
from clusterlm.tokenizer.kinds import load_tokenizer

__all__ = ["Tokenizer", "load_tokenizer"]
