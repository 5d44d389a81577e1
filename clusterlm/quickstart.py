"""`clusterlm quickstart`: the whole path on the bundled corpus, on a CPU, in a few minutes.

    clusterlm quickstart                    # -> runs/quickstart
    clusterlm quickstart --out /tmp/qs --minutes 2

Prepares the bundled Shakespeare corpus at character level, trains the
`shakespeare_char_cpu` recipe (4-layer GPT, 2000 steps or --minutes, whichever comes first),
evaluates it on the held-out plays (loss, and the bundled next-line choice task), prints samples,
and writes plots and a summary with both. Running it again resumes
the same run instead of starting over.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

RECIPE = "shakespeare_char_cpu"
TASKS = {"shakespeare_word_order": "the line as written among 3 shuffles of its words",
         "shakespeare_next_line": "the true next line among 3 lines from other plays"}  # docs/tasks.md


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="clusterlm quickstart", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/quickstart", help="run directory (default: runs/quickstart)")
    p.add_argument("--minutes", type=float, default=5.0, help="training time limit in minutes (default: 5)")
    p.add_argument("--steps", type=int, default=2000, help="training steps (default: 2000)")
    p.add_argument("--samples", type=int, default=2, help="samples to print at the end (default: 2)")
    args = p.parse_args(argv)
    for flag, value, ok, valid in (("--minutes", args.minutes, math.isfinite(args.minutes) and args.minutes > 0, "> 0"),
                                   ("--steps", args.steps, args.steps >= 1, ">= 1"),
                                   ("--samples", args.samples, args.samples >= 0, ">= 0 (0: print none)")):
        if not ok:  # before minutes of training, not after
            raise ValueError(f"{flag}={value} must be {valid}")

    from clusterlm.config import bundled_recipes, load_run_config
    from clusterlm.eval.evaluate import evaluate_checkpoint
    from clusterlm.generate.text import sample_texts
    from clusterlm.train.loop import train
    from clusterlm.train.report import write_report

    out = Path(args.out)
    # a TOML basic string; ensure_ascii=False: JSON's surrogate pairs (\ud83d\ude80 for an emoji) are not TOML
    cfg = load_run_config(bundled_recipes()[RECIPE], [
        f"--train.out_dir={json.dumps(str(out), ensure_ascii=False)}",
        f"--data.dir={json.dumps(str(out / 'data'), ensure_ascii=False)}",
        f"--train.max_minutes={args.minutes}",
        f"--train.max_steps={args.steps}",
        "--train.resume=auto",
    ])
    say = print
    say(f"[1/5] data: bundled Shakespeare (42 works), character level -> {cfg.data.dir}")
    say(f"[2/5] training {RECIPE}: {cfg.model.n_layers} layers, dim {cfg.model.dim}, context {cfg.train.seq_len}, "
        f"up to {cfg.train.max_steps} steps or {args.minutes:g} min on {cfg.train.device}")
    result = train(cfg)
    if result.exit_code != 0:
        say(f"training stopped: {result.reason} (exit code {result.exit_code}); "
            f"run `clusterlm quickstart --out {out}` again to resume")
        return result.exit_code

    say("[3/5] evaluating on the held-out plays")
    ev = evaluate_checkpoint(str(out), device="cpu")
    say(f"      val loss {ev['loss']:.4f}  perplexity {ev['perplexity']:.2f}  bits/byte {ev['bits_per_byte']:.3f} "
        f"over {ev['tokens']:,} tokens")
    say("[4/5] choice tasks on held-out plays (4 options each, chance 0.25)")
    from clusterlm.eval.evaluate import evaluate_tasks
    from clusterlm.fsutil import atomic_write_text
    from clusterlm.train.report import TASK_SCORES_FILE

    scores = evaluate_tasks(str(out), list(TASKS), device="cpu")
    atomic_write_text(out / TASK_SCORES_FILE, json.dumps(scores, indent=2) + "\n")
    for name, what in TASKS.items():
        t = scores["tasks"][name]
        say(f"      {name:<22} accuracy {t['acc']:.3f} over {t['n']} examples: {what}")
    say("[5/5] samples (temperature 0.8, top-k 50):" if args.samples else "[5/5] samples: none (--samples 0)")
    texts = sample_texts(str(out), prompt="\n", num_samples=args.samples, max_new_tokens=300, temperature=0.8,
                         top_k=50, seed=1337) if args.samples else []
    for i, text in enumerate(texts):
        say(f"----- sample {i + 1} -----\n{text.strip()}\n")
    paths = write_report(out)
    say("done.")
    say(f"  checkpoint : {result.checkpoint}")
    say(f"  metrics    : {out / 'metrics.jsonl'} (TensorBoard: tensorboard --logdir {out / 'tb'})")
    say(f"  report     : {paths.get('summary', out / 'summary.md')}")
    say(f"  next       : clusterlm generate {out} --prompt 'ROMEO.' ; clusterlm chat {out}")
    sys.stdout.flush()
    return 0
