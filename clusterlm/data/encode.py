"""Tokenize a chunk of documents into per-split token arrays: the work prepare's pass 3 shares out.

    from clusterlm.data.encode import encode_chunk
    train, val = encode_chunk(tok, ["doc one", "doc two"], bytes([0, 1]), "uint16")

`encode_chunk` runs in the preparing process and in its helpers (workers.py); a helper gets the
tokenizer's file, not the tokenizer, through `encode_chunk_from_file` and loads it once.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_loaded: tuple[str, Any] | None = None  # (path, tokenizer) loaded once per helper process


def encode_chunk(tok: Any, texts: list[str], val_mask: bytes, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of `texts`, each followed by EOS, concatenated per split: (train tokens, val tokens).

    `val_mask[i]` is 1 when texts[i] belongs to val. Texts are already cleaned (no lone surrogates).
    Each document's tokens are written straight into its split's output array (no per-document
    arrays then a concatenation), so a huge document costs its text plus its tokens, once.
    """
    # one id per character, unless added tokens (chat roles) in the text encode to one id each
    char = tok.kind == "char" and hasattr(tok, "encode_array") and not getattr(tok, "added_tokens", ())
    if tok.kind == "byte" and tok.vocab_size == 259:  # fast path: the ids are the UTF-8 bytes
        ids: list[Any] = [t.encode("utf-8") for t in texts]
        sizes = [len(b) for b in ids]
    elif char:
        ids, sizes = [], [len(t) for t in texts]  # one id per str element
    elif hasattr(tok, "encode_arrays"):  # BPE: long documents in slices, bounded batches (bpe.py)
        ids = tok.encode_arrays(texts, dtype)
        sizes = [a.size for a in ids]
    else:
        ids = tok.encode_batch(texts)  # Rust, parallel unless TOKENIZERS_PARALLELISM=false, for BPE
        sizes = [len(x) for x in ids]
    outs = tuple(np.empty(sum(n + 1 for n, m in zip(sizes, val_mask) if m == v), dtype=dtype) for v in (0, 1))
    starts, ends = [], [[], []]  # start of each document in its split's output; EOS positions
    at = [0, 0]
    for n, v in zip(sizes, val_mask):
        starts.append(at[v])
        ends[v].append(at[v] + n)
        at[v] += n + 1
    if char:
        _encode_char_into(tok, texts, val_mask, sizes, starts, outs)
    for i, (doc, v) in enumerate(zip(ids, val_mask)):
        dst = outs[v][starts[i]:starts[i] + sizes[i]]
        dst[:] = np.frombuffer(doc, dtype=np.uint8) if isinstance(doc, bytes) else doc
    for v in (0, 1):
        outs[v][ends[v]] = tok.eos_id
    return outs  # type: ignore[return-value]


def _encode_char_into(tok: Any, texts: list[str], val_mask: bytes, sizes: list[int], starts: list[int],
                      outs: tuple[np.ndarray, np.ndarray]) -> None:
    """Char ids of `texts` into `outs` at `starts`. Consecutive short documents of a split are joined,
    one separator character after each where its EOS goes (overwritten by the caller), and encoded in
    one numpy pass: one pass per document would cost ~10 us each. Long ones are encoded in place."""
    from clusterlm.tokenizer.char import BLOCK_CHARS

    group: list[list[int]] = [[], []]  # per split: indices of short documents waiting

    def flush(v: int) -> None:
        if group[v]:
            first, last = group[v][0], group[v][-1]
            joined = "\n".join(texts[i] for i in group[v]) + "\n"
            tok.encode_array(joined, out=outs[v][starts[first]:starts[last] + sizes[last] + 1])
            group[v] = []

    size = [0, 0]
    for i, (text, v) in enumerate(zip(texts, val_mask)):
        if sizes[i] >= BLOCK_CHARS:
            flush(v)
            tok.encode_array(text, out=outs[v][starts[i]:starts[i] + sizes[i]])
            continue
        group[v].append(i)
        size[v] += sizes[i] + 1
        if size[v] >= BLOCK_CHARS:
            flush(v)
            size[v] = 0
    flush(0)
    flush(1)


def encode_chunk_from_file(tokenizer_path: str, texts: list[str], val_mask: bytes,
                           dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """`encode_chunk` with the tokenizer saved at `tokenizer_path` (what a helper process is sent)."""
    global _loaded
    if _loaded is None or _loaded[0] != tokenizer_path:
        from clusterlm.tokenizer.kinds import load_tokenizer

        _loaded = (tokenizer_path, load_tokenizer(tokenizer_path))
    return encode_chunk(_loaded[1], texts, val_mask, dtype)
