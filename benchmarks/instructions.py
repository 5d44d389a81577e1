"""Instructions (issue 15): SFT from scratch on the synthetic instruction set, served, scored.

    .venv/bin/python benchmarks/instructions.py                    # generate, train, serve, score
    .venv/bin/python benchmarks/instructions.py --steps 1000       # a shorter run
    .venv/bin/python benchmarks/instructions.py --data DIR         # DIR/train.jsonl + DIR/heldout.jsonl
    .venv/bin/python benchmarks/instructions.py --run runs/x       # score an existing run, no training

1. the set: scripts/make_instructions.py (200,000 train / 300 held-out chat records, seed 0), unless
   --data gives a folder with train.jsonl and heldout.jsonl;
2. `clusterlm finetune recipes/instructions_cpu.toml` as a subprocess (--steps sets
   train.max_steps; --minutes sets train.max_minutes, a cap that stops the run early);
3. `clusterlm serve RUN` as a subprocess on 127.0.0.1 with an API key file;
4. every held-out prompt (its system and user messages) through the official `openai` client,
   `chat.completions.create(temperature=0)`, one at a time. A reply is right when it equals the
   reference answer after stripping whitespace. Each response's usage.prompt_tokens is checked
   against 1 + the token count of the prompt rendered with the checkpoint's chat_template.jinja
   (EOS, then the rendered text): the server used the model's own template.

Goal (issue 15): exact match >= 0.90 on the held-out prompts. Writes
benchmarks/results/instructions.json and applications_instructions.json (a row for
applications.md) and prints a per-task table. The machine is shared: the load average is sampled
every 5 s during training and recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from pathlib import Path

from common import check_checkpoint, cpu_model, positive_float, positive_int, refuse, write_result  # benchmarks/common.py

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
RECIPE = "instructions_cpu"
GOAL = 0.90
sys.path.insert(0, str(ROOT / "scripts"))
import make_instructions  # noqa: E402  (scripts/make_instructions.py)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoadSampler:
    """os.getloadavg()[0] every `period` seconds in a thread, while in the `with` block."""

    def __init__(self, period: float = 5.0) -> None:
        self.period, self.samples, self._stop = period, [os.getloadavg()[0]], threading.Event()

    def __enter__(self) -> LoadSampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.samples.append(os.getloadavg()[0])

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        return {"mean_1min": round(statistics.mean(self.samples), 2), "max_1min": round(max(self.samples), 2),
                "samples": len(self.samples)}


def train(data: Path, work: Path, steps: int | None, minutes: float | None, extra: list[str]) -> tuple[Path, dict]:
    run = work / "run"
    args = [sys.executable, "-m", "clusterlm", "finetune", RECIPE, f"--data.source={json.dumps(str(data / 'train.jsonl'))}",
            f"--data.dir={json.dumps(str(work / 'examples'))}", f"--train.out_dir={json.dumps(str(run))}",
            "--train.tensorboard=false"]
    if steps:
        args.append(f"--train.max_steps={steps}")
    if minutes:
        args.append(f"--train.max_minutes={minutes}")
    args += extra
    print("$", " ".join(args[1:]), flush=True)
    log_path = work / "train.log"
    t0 = time.perf_counter()
    with LoadSampler() as load, open(log_path, "w") as log_file:
        rc = subprocess.run(args, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"clusterlm finetune failed (exit {rc}); see {log_path}:\n" + log_path.read_text()[-3000:])
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    trains = [r for r in recs if r.get("kind") == "train"]
    evals = [r for r in recs if r.get("kind") == "eval"]
    return run, {"train_wall_s": round(wall, 1), "train_minutes": round(wall / 60, 2),
                 "step_time_ms_median": round(1e3 * statistics.median(r["step_time_s"] for r in trains), 1),
                 "final_train_loss": round(trains[-1]["loss"], 4), "val_loss": round(evals[-1]["val_loss"], 4)
                 if evals else None, "load_average_during_training": load.summary(), "command": args[1:]}


class Server:
    """`clusterlm serve RUN` in a subprocess on 127.0.0.1, with an API key file."""

    def __init__(self, run: Path, work: Path) -> None:
        self.key = "instructions-benchmark-key"
        key_file = work / "key.txt"
        key_file.write_text(self.key + "\n")
        key_file.chmod(0o600)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(work / "serve.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "clusterlm", "serve", str(run), "--host", "127.0.0.1",
                                      "--port", str(self.port), "--api-key-file", str(key_file),
                                      "--model-name", "instructions"], cwd=ROOT, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"clusterlm serve exited with {self.proc.returncode}; see {work / 'serve.log'}")
            try:
                with urllib.request.urlopen(self.url + "/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"clusterlm serve was not ready in 120 s; see {work / 'serve.log'}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def score(run: Path, heldout: list[dict], train_problems: set[str], max_tokens: int, work: Path) -> dict:
    import openai

    from clusterlm.checkpoint.store import resolve_checkpoint
    from clusterlm.generate.template import read_template
    from clusterlm.tokenizer import load_tokenizer

    ckpt = resolve_checkpoint(str(run))
    template, tok = read_template(ckpt), load_tokenizer(ckpt / "tokenizer.json")
    if template is None:
        raise SystemExit(f"{ckpt} has no chat_template.jinja: the fine-tuned run should carry its template")
    server = Server(run, work)
    rows = []
    t0 = time.perf_counter()
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=server.key, timeout=60, max_retries=0)
        for rec in heldout:
            messages = [m for m in rec["messages"] if m["role"] != "assistant"]
            answer = next(m["content"] for m in rec["messages"] if m["role"] == "assistant")
            row = {"task": rec["task"], "family": rec["family"], "user": messages[-1]["content"], "answer": answer,
                   "novel_problem": rec["problem"] not in train_problems}
            try:
                r = client.chat.completions.create(model="instructions", messages=messages, temperature=0,
                                                   max_tokens=max_tokens)
            except openai.APIError as e:  # counted as wrong, and reported
                rows.append({**row, "reply": None, "correct": False, "finish_reason": f"error: {e}"[:200],
                             "template_tokens_match": False})
                continue
            reply = r.choices[0].message.content or ""
            expected_prompt = 1 + len(tok.encode(template.render(messages, add_generation_prompt=True)))
            rows.append({**row, "reply": reply, "correct": reply.strip() == answer.strip(),
                         "finish_reason": r.choices[0].finish_reason,
                         "template_tokens_match": r.usage.prompt_tokens == expected_prompt})
    finally:
        server.stop()
    wall = time.perf_counter() - t0

    def group(key: str) -> dict:
        out: dict[str, dict] = {}
        by = defaultdict(list)
        for x in rows:
            by[x[key]].append(x)
        for name, xs in by.items():
            novel = [x for x in xs if x["novel_problem"]]
            out[name] = {"n": len(xs), "correct": sum(x["correct"] for x in xs),
                         "exact_match": round(sum(x["correct"] for x in xs) / len(xs), 4),
                         "novel_problems": len(novel),
                         "exact_match_novel": round(sum(x["correct"] for x in novel) / len(novel), 4) if novel else None}
        return out

    novel = [x for x in rows if x["novel_problem"]]
    return {"exact_match": round(sum(x["correct"] for x in rows) / len(rows), 4), "n": len(rows),
            "exact_match_novel_problems": round(sum(x["correct"] for x in novel) / len(novel), 4) if novel else None,
            "novel_problems": len(novel), "by_family": group("family"), "by_task": group("task"),
            "served_with_model_template": all(x["template_tokens_match"] for x in rows),
            "finish_reasons": dict(sorted({f: sum(x["finish_reason"] == f for x in rows)
                                           for f in {x["finish_reason"] for x in rows}}.items())),
            "eval_wall_s": round(wall, 1), "max_tokens": max_tokens,
            "wrong_examples": wrong_examples(rows)}


def wrong_examples(rows: list[dict], per_task: int = 3) -> list[dict]:
    """Up to `per_task` wrong replies of every task, in held-out order: what each task gets wrong."""
    out: list[dict] = []
    for task in dict.fromkeys(x["task"] for x in rows):
        out += [{k: x[k] for k in ("task", "user", "answer", "reply")}
                for x in rows if x["task"] == task and not x["correct"]][:per_task]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="folder with train.jsonl and heldout.jsonl (default: generate)")
    p.add_argument("--train-records", type=positive_int, default=200000)
    p.add_argument("--heldout-records", type=positive_int, default=300)
    p.add_argument("--seed", type=int, default=0, help="generator seed (with no --data)")
    p.add_argument("--steps", type=positive_int, default=None, help="train.max_steps (default: the recipe's)")
    p.add_argument("--minutes", type=positive_float, default=None, help="train.max_minutes: stop training after this long")
    p.add_argument("--run", default=None, help="score this existing run instead of training")
    p.add_argument("--work", default=None, help="folder for the data, run and logs (default: a temporary one)")
    p.add_argument("--max-tokens", type=positive_int, default=16)
    p.add_argument("--results", default=str(RESULTS), help="folder for the JSON results")
    p.add_argument("overrides", nargs="*", help="extra --section.key=value overrides for clusterlm finetune")
    args, unknown = p.parse_known_args()
    overrides = args.overrides + unknown
    check_checkpoint("--run", args.run)
    for name in ("train.jsonl", "heldout.jsonl") if args.data else ():  # before any folder is made
        if not (Path(args.data) / name).is_file():
            refuse(f"--data {args.data}: no {name} (make one with scripts/make_instructions.py --out {args.data})")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="instructions-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.data:
        data = Path(args.data)
    else:
        data = work / "set"
        make_instructions.write_sets(data, args.train_records, args.heldout_records, args.seed)
    heldout = [json.loads(x) for x in (data / "heldout.jsonl").read_text().splitlines() if x.strip()]
    train_recs = [json.loads(x) for x in (data / "train.jsonl").read_text().splitlines() if x.strip()]
    train_users = {make_instructions.user_text(r) for r in train_recs}
    leaked = sum(make_instructions.user_text(r) in train_users for r in heldout)
    if leaked:
        raise SystemExit(f"{data}: {leaked} held-out prompts appear in train.jsonl")
    train_problems = {r.get("problem") for r in train_recs}

    load_before = os.getloadavg()
    if args.run:
        run, info = Path(args.run), {"train_wall_s": None, "train_minutes": None, "note": "scored an existing run"}
    else:
        run, info = train(data, work, args.steps, args.minutes, overrides)

    from clusterlm.checkpoint.model_io import read_checkpoint_config
    from clusterlm.checkpoint.store import resolve_checkpoint

    ckpt = resolve_checkpoint(str(run))
    cfg = read_checkpoint_config(ckpt)
    steps = json.loads((ckpt / "train_state.json").read_text())["run"]["step"]
    res = score(run, heldout, train_problems, args.max_tokens, work)
    out = {"benchmark": "instructions", "goal": f"exact match >= {GOAL} on held-out prompts via clusterlm serve + "
                                                 "the openai client, with the model's own chat template",
           "cpu": cpu_model(), "cpus": os.cpu_count(), "load_average_before": [round(x, 2) for x in load_before],
           "recipe": f"recipes/{RECIPE}.toml", "overrides": overrides, "data": str(data) if args.data else
           f"scripts/make_instructions.py --train {args.train_records} --heldout {args.heldout_records} --seed {args.seed}",
           "train_records": len(train_recs), "heldout_records": len(heldout), "steps": steps,
           "params": cfg.model.num_params(), "model": {k: getattr(cfg.model, k) for k in
                                                        ("n_layers", "dim", "n_heads", "max_seq_len", "vocab_size")},
           "seq_len": cfg.train.seq_len, "micro_batch_size": cfg.train.micro_batch_size, "lr": cfg.optim.lr,
           **info, **res}
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    write_result(results / "instructions.json", json.dumps(out, indent=2) + "\n")
    row = {"application": "instructions (synthetic)", "metric": "exact match, held-out, via serve + openai client",
           "value": res["exact_match"], "goal": f">= {GOAL:.2f}", "train_minutes": info["train_minutes"],
           "notes": f"char Transformer from scratch, {out['params']:,} params, {steps} SFT steps on "
                    f"{len(train_recs):,} records ({cpu_model()}, {os.cpu_count()} cores, shared: load "
                    f"{info.get('load_average_during_training', {}).get('mean_1min', '?')}); "
                    f"{res['n']} held-out prompts, {res['novel_problems']} of them problems never in train "
                    f"(EM {res['exact_match_novel_problems']}); per family: "
                    + ", ".join(f"{k} {v['exact_match']:.3f}" for k, v in sorted(res["by_family"].items()))
                    + f"; served with the model's template: {res['served_with_model_template']}"}
    write_result(results / "applications_instructions.json", json.dumps({"rows": [row]}, indent=2) + "\n")

    print(f"\n{'task':<10} {'family':<11} {'n':>4} {'right':>6} {'EM':>6} {'EM new':>7}")
    fam = {t: f for t, f in make_instructions.FAMILIES.items()}
    for task, v in res["by_task"].items():
        em_new = "-" if v["exact_match_novel"] is None else f"{v['exact_match_novel']:.3f}"
        print(f"{task:<10} {fam.get(task, '?'):<11} {v['n']:>4} {v['correct']:>6} {v['exact_match']:>6.3f} {em_new:>7}")
    for family, v in sorted(res["by_family"].items()):
        print(f"{'(all)':<10} {family:<11} {v['n']:>4} {v['correct']:>6} {v['exact_match']:>6.3f}")
    print(f"{'overall':<22} {res['n']:>4} {sum(v['correct'] for v in res['by_task'].values()):>6} "
          f"{res['exact_match']:>6.3f}   (goal >= {GOAL}; served with the model's template: "
          f"{res['served_with_model_template']})")
    print(f"train: {steps} steps, {info['train_minutes']} min; params {out['params']:,}; "
          f"wrote {results / 'instructions.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
