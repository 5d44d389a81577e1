"""scripts/make_instructions.py: the synthetic instruction set is deterministic, its held-out
prompts never appear in train, and every answer is right. The reference for "right" is an
independent solver here that reads only the user text (regular expressions + Python arithmetic and
string methods), not the generator's own code path."""

from __future__ import annotations

import importlib.util
import json
import re
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def mi():
    spec = importlib.util.spec_from_file_location("make_instructions", ROOT / "scripts" / "make_instructions.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def solve(user: str) -> str:
    """The answer the docstring of make_instructions.py promises, from the question alone."""
    m = re.fullmatch(r"(?:What is |Calculate )?(\d+) ([-+*]) (\d+)(?:\?|\.| = \?)", user)
    if m:
        a, op, b = int(m[1]), m[2], int(m[3])
        return str({"+": a + b, "-": a - b, "*": a * b}[op])
    m = re.search(r"'([a-z]+)'", user)
    if m:
        w = m[1]
        for prefix, f in (("Reverse", lambda: w[::-1]), ("Write", w.upper), ("How many", lambda: str(len(w))),
                          ("What is the first", lambda: w[0]), ("What is the last", lambda: w[-1]),
                          ("Sort", lambda: "".join(sorted(w)))):
            if user.startswith(prefix):
                return f()
    lines = user.split("\n")
    assert lines[0] == "Table:", user
    table = dict(line.split(": ") for line in lines[1:-1])
    name = re.fullmatch(r"What is the value of (\w+)\?", lines[-1])[1]
    return table[name]


def test_deterministic_and_seeded(mi, tmp_path):
    """The same seed writes byte-identical files; another seed gives other records."""
    a = mi.write_sets(tmp_path / "a", 500, 40, seed=3)
    b = mi.write_sets(tmp_path / "b", 500, 40, seed=3)
    c = mi.write_sets(tmp_path / "c", 500, 40, seed=4)
    for x, y, z in zip(a, b, c):
        assert x.read_bytes() == y.read_bytes()
        assert x.read_bytes() != z.read_bytes()
    assert len(a[0].read_text().splitlines()) == 500 and len(a[1].read_text().splitlines()) == 40


def test_heldout_disjoint_stratified_and_correct(mi):
    """No held-out user text in train; held-out prompts distinct and stratified by task (301 over 10
    tasks: 31 for the first, 30 for the rest); every answer (train and held-out) equals the
    independent solver's; every record is system? + user + assistant."""
    train, heldout = mi.make_sets(3000, 301, seed=0)
    users = [mi.user_text(r) for r in heldout]
    assert len(set(users)) == len(users) == 301
    assert not set(users) & {mi.user_text(r) for r in train}
    counts = Counter(r["task"] for r in heldout)
    assert counts[mi.TASKS[0]] == 31 and all(counts[t] == 30 for t in mi.TASKS[1:])
    assert set(Counter(r["task"] for r in train)) == set(mi.TASKS)
    for r in train + heldout:
        roles = [m["role"] for m in r["messages"]]
        assert roles in (["user", "assistant"], ["system", "user", "assistant"])
        assert r["family"] == mi.FAMILIES[r["task"]]
        assert r["messages"][-1]["content"] == solve(mi.user_text(r)), r


def test_examples_fit_the_recipe_context(mi):
    """Every rendered example ([EOS] + template text + [EOS], chat tokens one id each) fits in one
    packed row of the recipe's seq_len + 1 tokens, so packing never cuts an answer."""
    from clusterlm.config import bundled_recipes, load_run_config
    from clusterlm.generate.template import load_template

    cfg = load_run_config(bundled_recipes()["instructions_cpu"], [])
    assert cfg.finetune.task == "sft" and cfg.finetune.pack and cfg.data.tokenizer == "char"
    t = load_template("clusterlm")
    train, heldout = mi.make_sets(4000, 100, seed=0)
    longest = max(len(re.sub(r"<\|[a-z]+\|>", "#", t.render(r["messages"]))) + 2 for r in train + heldout)
    assert longest <= cfg.train.seq_len + 1


def test_records_read_as_sft_chat(mi, tmp_path):
    """clusterlm's SFT reader takes the files as chat records (the extra keys are ignored)."""
    from clusterlm.data.sft import read_records

    tr, _ = mi.write_sets(tmp_path, 50, 10, seed=0)
    recs = read_records(str(tr), "sft")
    first = json.loads(tr.read_text().splitlines()[0])
    assert len(recs) == 50 and recs[0].messages == tuple((m["role"], m["content"]) for m in first["messages"])


def test_bad_sizes(mi):
    with pytest.raises(ValueError, match="sizes must be >= 0"):
        mi.make_sets(-1, 10)
