"""`clusterlm tokenizer`: train a tokenizer on text files, or inspect one.

    clusterlm tokenizer train corpus/ --kind bpe --vocab-size 8192 --out tokenizer.json
    clusterlm tokenizer train --builtin shakespeare --kind char --out char.json
    clusterlm tokenizer show tokenizer.json           # kind, vocab size, special ids
    clusterlm tokenizer encode tokenizer.json "To be, or not to be"
    clusterlm tokenizer decode tokenizer.json 464 318 11

Inputs are read exactly as `clusterlm prepare` reads them (data/sources.py: same file kinds and
the same hostile-text policy), but all documents are used: there is no train/val split here.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from clusterlm.errors import ConfigError

log = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clusterlm tokenizer", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="action", required=True, metavar="{train,show,encode,decode}")

    t = sub.add_parser("train", help="learn a byte, char or bpe tokenizer from files")
    t.add_argument("inputs", nargs="*", metavar="INPUT", help="files, directories, globs or builtin:NAME")
    t.add_argument("--kind", required=True, help="byte, char or bpe")
    t.add_argument("--vocab-size", type=int, default=None, help="bpe only: tokens incl. specials (default 8192)")
    t.add_argument("--out", required=True, help="tokenizer file to write (JSON)")
    t.add_argument("--text-field", default="text", help="JSONL field holding the text (default: text)")
    t.add_argument("--builtin", action="append", default=[], metavar="NAME", help="add a bundled corpus (shakespeare)")
    t.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    s = sub.add_parser("show", help="kind, vocabulary size and special ids of a tokenizer file")
    s.add_argument("file")
    s.add_argument("--json", action="store_true", help="print JSON")

    e = sub.add_parser("encode", help="token ids of a text (no BOS/EOS added)")
    e.add_argument("file")
    e.add_argument("text")

    d = sub.add_parser("decode", help="text of token ids")
    d.add_argument("file")
    d.add_argument("ids", nargs="+", type=int)
    return p


def _train(args: argparse.Namespace) -> int:
    from clusterlm.data.sources import DocumentReader, discover
    from clusterlm.tokenizer.kinds import train_tokenizer

    from clusterlm.fsutil import check_output_path

    out = Path(args.out)
    if out.is_dir():  # before the exists check: --overwrite would not help
        raise ConfigError(f"--out {out} is a directory; give the path of a .json file")
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    check_output_path(out, "--out")  # a file where a folder should be: before training, not after ("File exists")
    inputs = list(args.inputs) + [f"builtin:{n}" for n in args.builtin]
    # the byte tokenizer is fixed (every UTF-8 byte + the specials): it needs no text to learn from
    sources = discover(inputs) if inputs or args.kind != "byte" else []
    reader = DocumentReader(args.text_field)
    tok = train_tokenizer(args.kind, (doc.text for doc in reader.read(sources)), args.vocab_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(out)
    st = reader.stats
    for p in st.problems[:10]:
        log.warning("%s", p)
    if tok.kind == "byte":  # the 256 bytes and the specials: the inputs are not read
        print(f"{out}: byte tokenizer, vocab {tok.vocab_size} (fixed: every UTF-8 byte and the special "
              f"tokens; it needs no training" + (f", so the {len(sources)} input file(s) were not read)" if sources
                                                 else " and no inputs)"))
        return 0
    print(f"{out}: {tok.kind} tokenizer, vocab {tok.vocab_size}, trained on "
          f"{st.documents_read - st.skipped_empty} documents from {len(sources)} files "
          f"({st.skipped_empty} empty, {st.skipped_bad_record} bad records skipped)")
    return 0


def describe(tok: object) -> dict[str, object]:
    """The facts `show` prints."""
    info: dict[str, object] = {"kind": tok.kind, "vocab_size": tok.vocab_size,  # type: ignore[attr-defined]
                               "bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id}  # type: ignore[attr-defined]
    if hasattr(tok, "unk_id"):
        info["unk_id"] = tok.unk_id  # type: ignore[attr-defined]
    return info


def _warn_unknown(tok: object, text: str) -> None:
    """One warning line when characters of `text` are not in the vocabulary (a char tokenizer, a foreign
    tokenizer.json): how many, a few of them, and whether they became the unknown token or were dropped."""
    from clusterlm.tokenizer.base import unknown_chars

    chars, unk = unknown_chars(tok, text)
    if chars:
        distinct = list(dict.fromkeys(chars))
        shown = ", ".join(map(repr, distinct[:5])) + (", ..." if len(distinct) > 5 else "")
        fate = f"became {unk}" if unk else "were dropped (the tokenizer has no unknown token)"
        log.warning("%d character(s) not in the tokenizer's vocabulary %s: %s", len(chars), fate, shown)


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.action == "train":
        return _train(args)
    from clusterlm.tokenizer.kinds import load_tokenizer

    tok = load_tokenizer(args.file)
    if args.action == "show":
        info = describe(tok)
        if args.json:
            print(json.dumps(info))
        else:
            width = max(map(len, info))
            print("\n".join(f"{k:<{width}}  {v}" for k, v in info.items()))
    elif args.action == "encode":
        print(json.dumps(tok.encode(args.text)))
        _warn_unknown(tok, args.text)
    else:
        print(tok.decode(args.ids))
    return 0
