"""Streaming detokenization of a 4,096-token reply: the old way (each token re-decodes the whole
reply) against generate.text.TextStream (O(1) per token), for the BPE, char and byte tokenizers.

    .venv/bin/python benchmarks/detokenize_stream.py             # -> benchmarks/results/detokenize_stream.json
    .venv/bin/python benchmarks/detokenize_stream.py --tokens 4096 --repeats 5

The reply is the first N tokens of the bundled Shakespeare corpus (plus non-ASCII text, so multi-byte
characters split across tokens are in it), pushed one id at a time as the server and the CLI do;
the figure is the total time spent in push/flush, the median of --repeats runs. Target (issue 13):
under 50 ms for 4,096 tokens. Both ways must produce the same text (checked).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import tokenizers

from clusterlm.data.builtin import builtin_files
from clusterlm.generate.text import TextStream
from clusterlm.tokenizer.bpe import BPETokenizer
from clusterlm.tokenizer.byte import ByteTokenizer
from clusterlm.tokenizer.char import CharTokenizer
from common import cpu_model, positive_int, write_result  # benchmarks/common.py

RESULTS = Path(__file__).resolve().parent / "results"
EXTRA = "héllo wörld, 日本語のテキスト 😀🎉 naïve café — “quotes”\n"


class OldTextStream:
    """The detokenizer before issue 13 (generate/cli.py): decode every id so far on each push."""

    def __init__(self, tokenizer) -> None:  # noqa: ANN001
        self.tokenizer, self.ids, self.emitted = tokenizer, [], 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new, self.emitted = text[self.emitted:], len(text)
        return new

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        new, self.emitted = text[self.emitted:], len(text)
        return new


def _run(cls, tok, ids: list[int]) -> tuple[float, str]:  # noqa: ANN001
    t0 = time.perf_counter()
    s = cls(tok)
    text = "".join(s.push(i) for i in ids) + s.flush()
    return time.perf_counter() - t0, text


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=positive_int, default=4096)
    p.add_argument("--repeats", type=positive_int, default=5)
    p.add_argument("--out", default=str(RESULTS / "detokenize_stream.json"))
    args = p.parse_args()
    corpus = "".join(b.decode("utf-8") for _, b in builtin_files("shakespeare")[:3])
    text = EXTRA + corpus[:200_000] + EXTRA
    toks = {"bpe": BPETokenizer.train([text[:100_000]], vocab_size=4096), "char": CharTokenizer.train([text]),
            "byte": ByteTokenizer()}
    rows = []
    for kind, tok in toks.items():
        ids = tok.encode(text)[: args.tokens]
        if len(ids) < args.tokens:
            raise ValueError(f"{kind}: the text gives only {len(ids)} tokens")
        want = tok.decode(ids)
        row: dict = {"tokenizer": kind, "vocab_size": tok.vocab_size, "tokens": len(ids), "chars": len(want)}
        for name, cls in (("old_redecode_ms", OldTextStream), ("new_textstream_ms", TextStream)):
            times = []
            for _ in range(args.repeats):
                dt, got = _run(cls, tok, ids)
                if got != want:
                    raise AssertionError(f"{kind} {name}: streamed text differs from decode(ids)")
                times.append(dt * 1e3)
            row[name] = round(statistics.median(times), 3)
        row["speedup"] = round(row["old_redecode_ms"] / row["new_textstream_ms"], 1)
        row["under_50_ms"] = row["new_textstream_ms"] < 50
        rows.append(row)
        print(f"{kind:5s} {len(ids)} tokens: old {row['old_redecode_ms']:9.1f} ms  "
              f"new {row['new_textstream_ms']:7.2f} ms  ({row['speedup']}x)")
    cmd = f".venv/bin/python benchmarks/detokenize_stream.py --tokens {args.tokens} --repeats {args.repeats}"
    out = {"command": cmd,
           "cpu": cpu_model(), "python": platform.python_version(), "tokenizers": tokenizers.__version__,
           "method": f"median of {args.repeats} runs: total seconds in push() for every id plus flush()",
           "results": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_result(args.out, json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if all(r["under_50_ms"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
