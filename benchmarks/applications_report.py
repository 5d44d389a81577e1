"""Assemble benchmarks/results/applications.md from every benchmarks/results/applications_*.json.

    .venv/bin/python benchmarks/applications_report.py
    .venv/bin/python benchmarks/applications_report.py --results DIR --out DIR/applications.md

Each input is {"rows": [{"application", "metric", "value", "goal", "train_minutes", "notes"}]}
(written by benchmarks/applications.py and by the instructions benchmark); files are read in name
order and rows kept in their order. A file that is not in that shape is named and skipped, with the
reason, so one broken input does not hide the others. The curves (*.png beside the inputs) are
linked below the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
FIELDS = ("application", "metric", "value", "goal", "train_minutes", "notes")


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of one applications_*.json; ValueError naming the file and what is wrong."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not readable JSON ({e})") from None
    rows = data.get("rows") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected an object with a 'rows' list")
    for i, r in enumerate(rows):
        missing = [f for f in FIELDS if not isinstance(r, dict) or f not in r]
        if missing:
            raise ValueError(f"{path}: rows[{i}] lacks {', '.join(missing)}")
    return rows


def cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        value = f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def render(results: Path) -> tuple[str, list[str], int]:
    """The markdown, the problems with inputs that were skipped, and the number of rows."""
    rows, problems, sources = [], [], []
    for path in sorted(results.glob("applications_*.json")):
        try:
            got = read_rows(path)
        except ValueError as e:
            problems.append(str(e))
            continue
        rows += got
        sources.append(path.name)
    lines = ["# Applications: fine-tuning results", "",
             f"Assembled by `benchmarks/applications_report.py` on {time.strftime('%Y-%m-%d')} from "
             f"{', '.join(f'`{s}`' for s in sources) or 'no input files'}. Train minutes are wall time on the "
             "machine named in each benchmark's JSON (a shared 2-core CPU unless said otherwise); the notes give "
             "the budget used, which may be below the goal's.", "",
             "| application | metric | value | goal | train min | notes |", "|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(cell(r[f]) for f in FIELDS) + " |" for r in rows]
    pngs = sorted(p.name for p in results.glob("*.png") if p.name.startswith(("translation", "sentiment",
                                                                              "applications", "instructions")))
    if pngs:
        lines += ["", "Curves: " + ", ".join(f"[{n}]({n})" for n in pngs)]
    if problems:
        lines += ["", "Skipped inputs:", *[f"- {p}" for p in problems]]
    return "\n".join(lines) + "\n", problems, len(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", default=str(RESULTS), help="folder with applications_*.json")
    p.add_argument("--out", default=None, help="markdown file (default: RESULTS/applications.md)")
    args = p.parse_args(argv)
    results = Path(args.results)
    text, problems, n = render(results)
    out = Path(args.out) if args.out else results / "applications.md"
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py, also when imported
    from common import write_result

    write_result(out, text)
    for msg in problems:
        print(f"skipped: {msg}", file=sys.stderr)
    print(f"wrote {out}: {n} rows" + (f", {len(problems)} input(s) skipped" if problems else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
