"""Does a change leave training bit-identical? The quickstart recipe trained side by side at two commits.

    .venv/bin/python benchmarks/losses_unchanged.py                 # HEAD's tree vs --ref (default below)
    .venv/bin/python benchmarks/losses_unchanged.py --ref main~5 --steps 200

A refactor must not change behaviour (issue 13): the per-step training losses of
`recipes/shakespeare_char_cpu.toml` for 200 steps must be identical, bit for bit, to the ones of the
reference commit. Both sides run here, in this one invocation, on this machine, with the same
thread count (float sums depend on the CPU and the threads, so a figure recorded elsewhere
proves nothing). The reference is checked out with `git worktree` into a temporary folder; each
side prepares its own data (so a tokenizer change that alters ids shows up too) and trains in
its own subprocess. Exit status 0 when identical, 1 when not.
Writes benchmarks/results/losses_unchanged.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import cpu_model, positive_int, write_result  # benchmarks/common.py

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_REF = "40ea07c"  # main before the hardening (issue 12) and refactor (issue 13) work

# Runs inside each tree's own interpreter with that tree first on sys.path.
TRAIN = """
import json, sys, torch
torch.set_num_threads(int(sys.argv[4]))
from clusterlm.config import bundled_recipes, load_run_config
from clusterlm.train.loop import train
out, data, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
cfg = load_run_config(bundled_recipes()["shakespeare_char_cpu"], [
    f"--train.out_dir={json.dumps(out)}", f"--data.dir={json.dumps(data)}", f"--train.max_steps={steps}",
    "--train.log_interval=1", f"--train.eval_interval={steps}", f"--checkpoint.interval={steps}",
    "--train.tensorboard=false", f"--train.threads={sys.argv[4]}"])
sys.exit(train(cfg).exit_code)
"""


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], check=True, capture_output=True, text=True).stdout.strip()


def losses(tree: Path, work: Path, steps: int, threads: int) -> dict[int, str]:
    """Per-step train loss of a run in `tree`, as repr strings so equality is bit equality."""
    out, data = work / "run", work / "data"
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", TRAIN, str(out), str(data), str(steps), str(threads)],
                         cwd=tree, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"training in {tree} failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
    print(f"  {tree}: {steps} steps in {time.perf_counter() - t0:.1f} s")
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: repr(float(r["loss"])) for r in recs if r.get("kind") == "train"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ref", default=DEFAULT_REF, help=f"reference commit (default {DEFAULT_REF})")
    p.add_argument("--steps", type=positive_int, default=200)
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads on both sides (default 1)")
    args = p.parse_args()
    ref = git("rev-parse", args.ref)
    head = git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        ref_tree = tmp_path / "ref-tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(ref_tree), ref],
                       check=True, capture_output=True)
        try:
            print(f"reference {ref[:10]} vs working tree (HEAD {head[:10]}{', modified' if dirty else ''})")
            (tmp_path / "a").mkdir()
            (tmp_path / "b").mkdir()
            ref_losses = losses(ref_tree, tmp_path / "a", args.steps, args.threads)
            new_losses = losses(ROOT, tmp_path / "b", args.steps, args.threads)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(ref_tree)],
                           capture_output=True)
    differ = [s for s in sorted(ref_losses) if ref_losses[s] != new_losses.get(s)]
    same = not differ and len(ref_losses) == len(new_losses) == args.steps
    result = {
        "what": "per-step train losses of shakespeare_char_cpu, reference commit vs working tree, same machine",
        "reference": ref, "head": head, "working_tree_modified": dirty, "steps": args.steps,
        "threads": args.threads, "cpu": platform.processor() or platform.machine(),
        "cpu_model": cpu_model(), "identical": same, "first_differing_step": differ[0] if differ else None,
        "reference_losses": [ref_losses[s] for s in sorted(ref_losses)],
        "head_losses": [new_losses[s] for s in sorted(new_losses)],
        "date": time.strftime("%Y-%m-%d"),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_result(RESULTS / "losses_unchanged.json", json.dumps(result, indent=1) + "\n")
    if same:
        print(f"identical: {args.steps} of {args.steps} losses equal bit for bit "
              f"(last {new_losses[args.steps]})")
        return 0
    first = differ[0] if differ else None
    print(f"DIFFERENT: first at step {first}: {ref_losses.get(first)} vs {new_losses.get(first)}"
          if first else f"DIFFERENT: {len(ref_losses)} vs {len(new_losses)} steps logged")
    return 1


if __name__ == "__main__":
    sys.exit(main())
