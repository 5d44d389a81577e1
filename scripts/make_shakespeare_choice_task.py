"""Make the bundled choice task clusterlm/data/tasks/shakespeare_next_line.jsonl: "pick the true next
line among 4", from the public-domain Shakespeare corpus the package ships (data/builtin.py).

    .venv/bin/python scripts/make_shakespeare_choice_task.py            # rewrites the bundled file
    .venv/bin/python scripts/make_shakespeare_choice_task.py --check    # exit 1 if it would differ

Each record is {"kind": "choice", "context": ..., "choices": [4 lines], "gold": i}: the context is
the text of up to 3 consecutive lines of one speech (each ending in "\\n"; when they do not fit,
their last characters from the start of a word, at least MIN_CONTEXT), the gold choice the line
that follows them, the 3 others lines of about the same length (+-3 characters, same capitalisation of the first
letter, so neither length nor case gives the answer away) drawn from the other documents. Only
documents of the validation split of `clusterlm prepare --builtin shakespeare` at the recipes'
val_fraction 0.1 are used (Othello, Pericles, The Winter's Tale, The Passionate Pilgrim, The Phoenix
and the Turtle; data.prepare.is_val over the SHA-256 of each document), so a model trained by the
quickstart has seen none of it.

Sized for the quickstart model (a character model with a 64-token context): for every choice,
len(context) + len(choice) <= 64 characters, so the EOS separator, the context and the choice
minus its last character fit in 64 inputs and no record needs truncation. Deterministic: a seeded
random.Random over the corpus in sorted order; the same seed writes the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "clusterlm" / "data" / "tasks" / "shakespeare_next_line.jsonl"
N_EXAMPLES = 400
N_CHOICES = 4
MAX_CHARS = 64  # the quickstart model's context (recipes/shakespeare_char_cpu.toml max_seq_len)
MIN_LINE = 12  # characters: shorter lines ("Ay, my lord.") are too easy to place anywhere
MAX_CONTEXT_LINES = 3
MIN_CONTEXT = 16  # characters of context at least
LENGTH_SLACK = 3  # a distractor's length is within this many characters of the gold line's
VAL_FRACTION = 0.1
SEED = 1234

SPEAKER = re.compile(r"^[A-Z][A-Z' ,&-]*\.$")  # "COUNTESS.", "FIRST LADY."


def held_out_documents() -> list[tuple[str, str]]:
    """(name, text) of the corpus documents prepare puts in val at VAL_FRACTION, sorted by name."""
    from clusterlm.data.builtin import builtin_files
    from clusterlm.data.prepare import is_val

    return [(name, raw.decode("utf-8").replace("\r\n", "\n")) for name, raw in builtin_files("shakespeare")
            if is_val(hashlib.sha256(raw).digest(), VAL_FRACTION)]


def _usable(line: str) -> bool:
    """A line of dialogue: no indentation, no stage direction, not a heading in capitals."""
    return (len(line) >= MIN_LINE and line == line.strip() and "[" not in line and "]" not in line
            and line.upper() != line)


def speech_runs(text: str) -> list[list[str]]:
    """Runs of consecutive usable lines inside speeches (a block that starts with a speaker's name)."""
    runs = []
    for block in text.split("\n\n"):
        lines = block.strip("\n").split("\n")
        if len(lines) < 3 or not SPEAKER.match(lines[0]) or lines[0] in ("PERSONS REPRESENTED.", "DRAMATIS PERSONAE."):
            continue
        run: list[str] = []
        for line in lines[1:] + [""]:  # the "" ends the last run
            if _usable(line):
                run.append(line)
            else:
                if len(run) >= 2:
                    runs.append(run)
                run = []
    return runs


def build_records(seed: int = SEED, n: int = N_EXAMPLES) -> list[dict]:
    docs = held_out_documents()
    runs = [(d, run) for d, (_, text) in enumerate(docs) for run in speech_runs(text)]
    by_length: dict[int, list[tuple[int, str]]] = {}  # line length -> (document, line)
    for d, run in runs:
        for line in run:
            by_length.setdefault(len(line), []).append((d, line))
    candidates = []  # (document, context, gold line)
    for d, run in runs:
        for j in range(1, len(run)):
            gold = run[j]
            before = "".join(x + "\n" for x in run[max(0, j - MAX_CONTEXT_LINES):j])
            start = max(0, len(before) - (MAX_CHARS - len(gold) - LENGTH_SLACK))
            while 0 < start < len(before) and not before[start - 1].isspace():
                start += 1  # begin at the start of a word
            if len(before) - start >= MIN_CONTEXT:
                candidates.append((d, before[start:], gold))
    rng = random.Random(seed)
    records = []
    for d, context, gold in rng.sample(candidates, min(n, len(candidates))):
        pool = [x for L in range(len(gold) - LENGTH_SLACK, len(gold) + LENGTH_SLACK + 1)
                for x in by_length.get(L, [])]
        picked: list[str] = []
        while len(picked) < N_CHOICES - 1:
            od, line = rng.choice(pool)
            if od != d and line != gold and line not in picked and line[0].isupper() == gold[0].isupper():
                picked.append(line)
        at = rng.randrange(N_CHOICES)
        choices = picked[:at] + [gold] + picked[at:]
        assert all(len(context) + len(c) <= MAX_CHARS for c in choices)
        records.append({"kind": "choice", "context": context, "choices": choices, "gold": at})
    return records


def render(records: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("-n", type=int, default=N_EXAMPLES, help="number of examples")
    p.add_argument("--check", action="store_true", help="exit 1 if the file differs from what would be written")
    args = p.parse_args(argv)
    data = render(build_records(args.seed, args.n))
    if args.check:
        same = args.out.is_file() and args.out.read_bytes() == data
        print(f"{args.out}: {'up to date' if same else 'differs'}")
        return 0 if same else 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(args.out)
    print(f"wrote {args.out}: {len(data.splitlines())} examples, {len(data)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
