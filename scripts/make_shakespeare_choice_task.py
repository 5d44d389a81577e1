"""Make the bundled choice tasks from the public-domain Shakespeare corpus the package ships
(data/builtin.py): clusterlm/data/tasks/shakespeare_next_line.jsonl ("pick the true next line among
4") and shakespeare_word_order.jsonl ("pick the line as written among 4 orders of its words").

    .venv/bin/python scripts/make_shakespeare_choice_task.py            # rewrites the bundled files
    .venv/bin/python scripts/make_shakespeare_choice_task.py --check    # exit 1 if one would differ

The two measure different things. next_line needs the sense of a speech across lines: a character
model with a 64-character context (the quickstart's) scores near chance on it (0.26 after the full
quickstart, docs/tasks.md). word_order needs only the grammar of one line: the same context, and as
choices the gold line and 3 shuffles of its words (the same characters, so length normalisation
changes nothing); a model that learned English word order picks the original.

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

TASKS = Path(__file__).resolve().parents[1] / "clusterlm" / "data" / "tasks"
OUT = TASKS / "shakespeare_next_line.jsonl"
OUT_WORD_ORDER = TASKS / "shakespeare_word_order.jsonl"
MIN_WORDS = 5  # word_order: lines of at least this many words (enough distinct shuffles)
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


def _candidates(docs: list[tuple[str, str]]) -> tuple[list[tuple[int, str, str]], list[tuple[int, list[str]]]]:
    """(document, context, gold line) of every usable position, and the speech runs."""
    runs = [(d, run) for d, (_, text) in enumerate(docs) for run in speech_runs(text)]
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
    return candidates, runs


def build_records(seed: int = SEED, n: int = N_EXAMPLES) -> list[dict]:
    """next_line: the gold line among 3 lines of about its length from other plays."""
    candidates, runs = _candidates(held_out_documents())
    by_length: dict[int, list[tuple[int, str]]] = {}  # line length -> (document, line)
    for d, run in runs:
        for line in run:
            by_length.setdefault(len(line), []).append((d, line))
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


def build_word_order_records(seed: int = SEED, n: int = N_EXAMPLES) -> list[dict]:
    """word_order: the gold line among 3 distinct shuffles of its words (joined by single spaces, as
    the line is), after the same kind of context."""
    candidates, _ = _candidates(held_out_documents())
    usable = [(d, c, g) for d, c, g in candidates if len(g.split(" ")) >= MIN_WORDS and "  " not in g]
    rng = random.Random(seed + 1)
    records = []
    for _, context, gold in rng.sample(usable, min(n, len(usable))):
        words = gold.split(" ")
        picked: list[str] = []
        while len(picked) < N_CHOICES - 1:
            shuffled = " ".join(rng.sample(words, len(words)))
            if shuffled != gold and shuffled not in picked:
                picked.append(shuffled)
        at = rng.randrange(N_CHOICES)
        choices = picked[:at] + [gold] + picked[at:]
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
    p.add_argument("--out-word-order", type=Path, default=OUT_WORD_ORDER)
    args = p.parse_args(argv)
    outputs = [(args.out, render(build_records(args.seed, args.n))),
               (args.out_word_order, render(build_word_order_records(args.seed, args.n)))]
    if args.check:
        stale = [path for path, data in outputs if not (path.is_file() and path.read_bytes() == data)]
        for path, _ in outputs:
            print(f"{path}: {'differs' if path in stale else 'up to date'}")
        return 1 if stale else 0
    for path, data in outputs:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
        print(f"wrote {path}: {len(data.splitlines())} examples, {len(data)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
