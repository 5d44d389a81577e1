"""A deterministic synthetic instruction set for supervised fine-tuning (issue 15, "instructions"):
chat `messages` records written as train.jsonl and heldout.jsonl. No downloads; the same seed and
sizes give byte-identical files.

    .venv/bin/python scripts/make_instructions.py --out data/instructions            # 200000 / 300
    .venv/bin/python scripts/make_instructions.py --out /tmp/ins --train 2000 --heldout 100 --seed 1

Each line is {"messages": [{"role", "content"}, ...], "task": NAME, "family": FAMILY}: an optional
system message (SYSTEM, in about a quarter of the records), one user message, one assistant message
holding the exact answer. `task` and `family` are for scoring; the SFT reader ignores them.

Task families and the exact answer (what exact match compares against, after stripping whitespace):

arithmetic (a, b integers; the answer is the decimal integer, no sign for non-negative results,
no spaces, no trailing period):
- add: a, b in [0, 99]; "What is 37 + 45?" -> "82"
- sub: a, b in [0, 99], a >= b; "What is 83 - 27?" -> "56"
- mul: a, b in [0, 12]; "What is 7 * 8?" -> "56"
  each asked in one of ARITH_PHRASINGS ("What is a OP b?", "Calculate a OP b.", "a OP b = ?").

string edits on a word of 3-6 random lowercase letters w (quoted with single quotes in the prompt):
- reverse: "Reverse the word 'kobat'." -> "tabok"
- upper: "Write 'kobat' in upper case." -> "KOBAT"
- count: "How many letters are in 'kobat'?" -> "5" (the length, in decimal)
- first: "What is the first letter of 'kobat'?" -> "k"
- last: "What is the last letter of 'kobat'?" -> "t"
- sort: "Sort the letters of 'kobat' alphabetically." -> "abkot" (sorted(w) joined; repeats kept)

lookup in a table given in the prompt:
- lookup: 3-4 distinct names from NAMES with values in [0, 99], one "name: value" line each, then a
  question about one of them:
  "Table:\\nalice: 42\\nbob: 17\\ncarol: 88\\nWhat is the value of bob?" -> "17"

Tasks are drawn uniformly. Held-out prompts are drawn first, stratified (heldout // 10 per task,
the remainder to the first tasks), with distinct user texts; train records are then drawn from
the same distribution, skipping any whose user text is a held-out one, so no held-out prompt (user
message) appears in train. Train may repeat its own prompts. A held-out arithmetic problem can
appear in train in another phrasing (mul has only 169 problems); benchmarks/instructions.py reports
how many held-out problems are new.
"""

from __future__ import annotations

import argparse
import json
import random
import string
from collections.abc import Callable
from pathlib import Path

SYSTEM = "Answer with the result only."
SYSTEM_FRACTION = 0.25
ARITH_PHRASINGS = ("What is {a} {op} {b}?", "Calculate {a} {op} {b}.", "{a} {op} {b} = ?")
NAMES = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "mallory", "nina",
         "oscar", "peggy", "quinn", "rupert", "sybil", "trent", "ursula", "victor", "wendy", "xavier", "yara",
         "zack")
FAMILIES = {"add": "arithmetic", "sub": "arithmetic", "mul": "arithmetic", "reverse": "string",
            "upper": "string", "count": "string", "first": "string", "last": "string", "sort": "string",
            "lookup": "lookup"}
TASKS = tuple(FAMILIES)


def _arith(rng: random.Random, op: str) -> tuple[str, str, tuple]:
    if op == "*":
        a, b = rng.randint(0, 12), rng.randint(0, 12)
        ans = a * b
    else:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        if op == "-":
            a, b = max(a, b), min(a, b)
        ans = a + b if op == "+" else a - b
    return rng.choice(ARITH_PHRASINGS).format(a=a, op=op, b=b), str(ans), (op, a, b)


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))


def _string(rng: random.Random, task: str) -> tuple[str, str, tuple]:
    w = _word(rng)
    question, answer = {
        "reverse": (f"Reverse the word '{w}'.", w[::-1]),
        "upper": (f"Write '{w}' in upper case.", w.upper()),
        "count": (f"How many letters are in '{w}'?", str(len(w))),
        "first": (f"What is the first letter of '{w}'?", w[0]),
        "last": (f"What is the last letter of '{w}'?", w[-1]),
        "sort": (f"Sort the letters of '{w}' alphabetically.", "".join(sorted(w))),
    }[task]
    return question, answer, (task, w)


def _lookup(rng: random.Random) -> tuple[str, str, tuple]:
    names = rng.sample(NAMES, rng.randint(3, 4))
    values = [rng.randint(0, 99) for _ in names]
    i = rng.randrange(len(names))
    table = "\n".join(f"{n}: {v}" for n, v in zip(names, values))
    return f"Table:\n{table}\nWhat is the value of {names[i]}?", str(values[i]), ("lookup", *names, *values, i)


MAKERS: dict[str, Callable[[random.Random], tuple[str, str, tuple]]] = {
    "add": lambda r: _arith(r, "+"), "sub": lambda r: _arith(r, "-"), "mul": lambda r: _arith(r, "*"),
    **{t: (lambda r, t=t: _string(r, t)) for t in ("reverse", "upper", "count", "first", "last", "sort")},
    "lookup": _lookup,
}


def make_record(rng: random.Random, task: str) -> dict:
    """One chat record of `task`: {"messages", "task", "family", "problem"} (problem: the canonical
    question, the same for every phrasing)."""
    question, answer, problem = MAKERS[task](rng)
    messages = [{"role": "system", "content": SYSTEM}] if rng.random() < SYSTEM_FRACTION else []
    messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages, "task": task, "family": FAMILIES[task], "problem": "|".join(map(str, problem))}


def user_text(record: dict) -> str:
    return next(m["content"] for m in record["messages"] if m["role"] == "user")


def make_sets(n_train: int, n_heldout: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, heldout) records; see the module docstring for the distribution and the split rule."""
    if n_train < 0 or n_heldout < 0:
        raise ValueError(f"sizes must be >= 0: train={n_train}, heldout={n_heldout}")
    rng = random.Random(seed)
    heldout: list[dict] = []
    seen: set[str] = set()
    for k, task in enumerate(TASKS):
        want = n_heldout // len(TASKS) + (k < n_heldout % len(TASKS))
        tries = 0
        while want:
            rec = make_record(rng, task)
            tries += 1
            if tries > 1000 * (want + 10):
                raise ValueError(f"cannot draw {n_heldout} distinct held-out prompts ({task} runs out)")
            if user_text(rec) in seen:
                continue
            seen.add(user_text(rec))
            heldout.append(rec)
            want -= 1
    train: list[dict] = []
    while len(train) < n_train:
        rec = make_record(rng, rng.choice(TASKS))
        if user_text(rec) not in seen:
            train.append(rec)
    return train, heldout


def write_jsonl(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)


def write_sets(out: str | Path, n_train: int = 200000, n_heldout: int = 300, seed: int = 0) -> tuple[Path, Path]:
    """Write OUT/train.jsonl and OUT/heldout.jsonl; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train, heldout = make_sets(n_train, n_heldout, seed)
    paths = out / "train.jsonl", out / "heldout.jsonl"
    write_jsonl(paths[0], train)
    write_jsonl(paths[1], heldout)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for train.jsonl and heldout.jsonl")
    p.add_argument("--train", type=int, default=200000, help="train records (default 200000: fresh problems for a "
                   "45-minute run, rather than many passes over few)")
    p.add_argument("--heldout", type=int, default=300, help="held-out records, stratified by task (default 300)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    tr, ho = write_sets(args.out, args.train, args.heldout, args.seed)
    print(f"wrote {tr} ({args.train} records) and {ho} ({args.heldout} records)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
