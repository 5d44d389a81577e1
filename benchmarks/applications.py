"""Applications of fine-tuning on this CPU (issue 15): Multi30k translation and SST-2 sentiment.

Full-budget runs (the issue's goals; each takes its --minutes plus a few minutes of calibration
and scoring; run one at a time on an otherwise idle machine):

    .venv/bin/python benchmarks/applications.py translate --pair fr --minutes 30
    .venv/bin/python benchmarks/applications.py translate --pair de --minutes 30
    .venv/bin/python benchmarks/applications.py sentiment --minutes 20 --arch transformer --lora
    .venv/bin/python benchmarks/applications.py sentiment --minutes 20 --arch lstm
    .venv/bin/python benchmarks/applications.py translate-lora --pair fr --pretrain-minutes 10 --minutes 10
    .venv/bin/python benchmarks/applications_report.py                # -> results/applications.md

The short runs whose figures are in benchmarks/results (a 2-core CPU shared with other jobs, load
average 5-8, where one torch thread per process ran about 3x faster than two; --threads 1 also
sets it for the scoring after training, which --override=--train.threads=1 does not):

    .venv/bin/python benchmarks/applications.py translate --pair fr --minutes 8 --points 5 \
        --curve-limit 100 --override=--train.threads=1
    .venv/bin/python benchmarks/applications.py translate --pair de --minutes 8 --points 6 \
        --curve-limit 1000 --threads 1
    .venv/bin/python benchmarks/applications.py translate --pair fr --minutes 15 --points 6 \
        --curve-limit 1000 --threads 1
    .venv/bin/python benchmarks/applications.py sentiment --minutes 4 --arch transformer --lora \
        --override=--train.threads=1
    .venv/bin/python benchmarks/applications.py sentiment --minutes 4 --arch lstm --override=--train.threads=1
    .venv/bin/python benchmarks/applications.py sentiment --minutes 8 --arch lstm --threads 1

translate: trains recipes/multi30k_en{fr,de}_cpu.toml (decoder-only SFT on the pairs, from scratch)
for --minutes of wall time, scores greedy BLEU (sacrebleu, through the task harness as `clusterlm
eval RUN --task SRC,TGT`) on the first --curve-limit sentences of test_2016_flickr every ~1/--points
of the run (the curve) and on all 1,000 at the end (the figure reported). Goals: en->fr >= 35, en->de
>= 20 within 30 minutes; published GPU systems reach 55-60 / 35-40.

translate-lora: a decoder LM (the translation recipe's model) pre-trained for --pretrain-minutes on
the training sentences of both languages as separate documents (with --base-pairs de also German and
the en->de pairs: a base that translates, into another language), then fine-tuned on the pairs for
--minutes twice from that base: full fine-tuning and LoRA rank 8 (lr x --lora-lr-scale); greedy BLEU
on test_2016_flickr for both. Goal: LoRA within 2 BLEU of full, < 5% of the parameters trainable.

sentiment: for each --arch, at equal total training wall time --minutes: (a) the classifier from
scratch; (b) ULMFiT-style, an LM pre-trained on the unlabelled training sentences (`clusterlm
prepare` of the sentences as JSONL, then `clusterlm train`) for --pretrain-share of the time, then
the classifier fine-tuned from it (finetune.init_from) for the rest; with --lora also (c) the same
fine-tuning with LoRA rank 8 (Transformer only). Accuracy / precision / recall / F1 on SST-2 dev
(872 sentences) through the harness. Goals: >= 83% within 20 minutes, pre-trained >= scratch + 2
points, LoRA within 1 point of full fine-tuning with < 5% trainable parameters.

Each training run's max_steps (and so its lr schedule) is set from the measured step time of a
short calibration run, so the schedule ends near the time budget; train.max_minutes stops it
regardless. `--classifier-steps N` caps every classifier arm at N steps (a from-scratch SST-2
classifier peaks near one epoch, ~2,100 steps of 32, and overfits after: a budget it cannot use is
still its budget), and the LM pre-trains for the rest of the budget. Wall times are the training calls' own (data preparation is timed separately). The
machine is shared: each result records the load average before and after.

Data (research use only; read in place, never copied into the repo): --data, default
../shared/data/multi30k and ../shared/data/sst2. Writes benchmarks/results/translation_multi30k_enXX_Nmin.json/png,
sentiment_sst2_ARCH_Nmin.json and applications_{translation,sentiment}.json (rows for applications_report.py).
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import logging
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clusterlm.config import bundled_recipes, load_run_config
from common import cpu_model, positive_float, positive_int, refuse, save_figure, write_result  # benchmarks/common.py

RESULTS = Path(__file__).parent / "results"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared/data beside the repo
GOAL_BLEU = {"fr": 35.0, "de": 20.0}
GOAL_ENCDEC_BLEU = 40.0  # issue 16: the encoder-decoder, en->fr
PUBLISHED_BLEU = {"fr": "55-60", "de": "35-40"}
log = logging.getLogger("applications")


# ---- helpers ------------------------------------------------------------------------------------
def env_info() -> dict[str, Any]:
    import torch

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "loadavg": [round(x, 2) for x in os.getloadavg()],
            "date": time.strftime("%Y-%m-%d %H:%M")}


def need(paths: list[Path], what: str, flag: str) -> None:
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        refuse(f"{what} not found: {', '.join(missing)}; pass {flag} DIR (research-use data, not bundled)")


def q(value: Any) -> str:
    """An override value as TOML (JSON strings and lists are valid TOML here)."""
    return json.dumps(value)


def records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def train_run(recipe: str, overrides: list[str]) -> tuple[Any, Any, float]:
    from clusterlm.train.loop import train

    cfg = load_run_config(bundled_recipes()[recipe], overrides)
    if cfg.finetune.task != "lm":  # data preparation is timed apart from training (module docstring)
        from clusterlm.finetune.data import ensure_finetune_data

        ensure_finetune_data(cfg)
    t0 = time.perf_counter()
    res = train(cfg)
    if res.exit_code != 0:
        sys.exit(f"{recipe}: training ended with exit code {res.exit_code} ({res.reason})")
    return cfg, res, time.perf_counter() - t0


def calibrate(recipe: str, overrides: list[str], out: Path, steps: int = 12) -> float:
    """Median seconds per optimizer step over a short run into `out` (its first 3 steps are warm-up).
    `out` is emptied first: an earlier calibration's metrics.jsonl would be appended to and read back."""
    shutil.rmtree(out, ignore_errors=True)
    train_run(recipe, [*overrides, f"--train.out_dir={q(str(out))}", f"--train.max_steps={steps}",
                       "--train.max_minutes=0", "--train.eval_interval=0", "--eval.every=0", "--eval.tasks=[]",
                       "--checkpoint.interval=0", "--checkpoint.keep_best=false"])
    times = [r["step_time_s"] for r in records(out) if r.get("kind") == "train"][3:]
    return statistics.median(times)


def budget_overrides(step_s: float, minutes: float, warmup: int, share: float = 0.9,
                     cap: int = 0) -> tuple[int, list[str]]:
    """max_steps that fill `share` of the budget at `step_s` (evaluations and start-up take the rest),
    at most `cap` when it is set."""
    steps = max(20, int(share * minutes * 60 / step_s))
    if cap:
        steps = min(steps, cap)
    return steps, [f"--train.max_steps={steps}", f"--train.max_minutes={minutes}",
                   f"--optim.warmup_steps={min(warmup, steps // 10)}"]


def lm_corpus(lm_data: Path, write_jsonl: Callable[[Path], int]) -> tuple[Path, int | None, float]:
    """The unlabelled text for LM pre-training, prepared into `lm_data` (BPE, 4096 tokens) unless it is
    there already: (lm_data, documents written or None when reused, seconds taken)."""
    from clusterlm.data.prepare import prepare

    t0, n = time.perf_counter(), None
    if not (lm_data / "meta.json").is_file():
        docs = lm_data.with_name(lm_data.name + ".jsonl")
        n = write_jsonl(docs)
        prepare([str(docs)], str(lm_data), tokenizer="bpe", vocab_size=4096, val_fraction=0.02)
    return lm_data, n, time.perf_counter() - t0


def write_rows(name: str, rows: list[dict]) -> Path:
    """Merge rows into results/applications_NAME.json, replacing rows of the same application+metric."""
    path = RESULTS / f"applications_{name}.json"
    old = json.loads(path.read_text())["rows"] if path.is_file() else []
    keys = {(r["application"], r["metric"]) for r in rows}
    merged = [r for r in old if (r["application"], r["metric"]) not in keys] + rows
    write_result(path, json.dumps({"rows": merged}, indent=2) + "\n")
    return path


def row(application: str, metric: str, value: Any, goal: str, minutes: float, notes: str) -> dict:
    return {"application": application, "metric": metric, "value": value, "goal": goal,
            "train_minutes": round(minutes, 2), "notes": notes}


# ---- translation --------------------------------------------------------------------------------
def translate(args: argparse.Namespace) -> None:
    from clusterlm.eval.evaluate import evaluate_tasks
    from clusterlm.eval.harness import DecodeOptions

    data, work = Path(args.data), Path(args.work)
    tgt = args.pair
    train_files = [data / "train.en.gz", data / f"train.{tgt}.gz"]
    test_files = [data / "test_2016_flickr.en.gz", data / f"test_2016_flickr.{tgt}.gz"]
    need(train_files + test_files, "Multi30k", "--data")
    encdec = args.arch == "encdec"
    recipe, test = f"multi30k_en{tgt}_{'encdec_' if encdec else ''}cpu", ",".join(map(str, test_files))
    tag = f"en{tgt}_encdec" if encdec else f"en{tgt}"
    env = env_info()
    base = [f"--data.source={q(','.join(map(str, train_files)))}", f"--data.dir={q(str(work / f'data_{tag}'))}",
            f"--eval.tasks={q([test])}", f"--eval.limit={args.curve_limit}", "--train.tensorboard=false",
            "--checkpoint.interval=0", *args.override]
    t0 = time.perf_counter()
    step_s = calibrate(recipe, base, work / f"calib_{tag}")  # prepares data.dir too (timed apart)
    prep_and_calib_s = time.perf_counter() - t0
    steps, budget = budget_overrides(step_s, args.minutes, 100, share=0.85)
    run = work / f"run_{tag}"
    cfg, res, wall = train_run(recipe, [*base, *budget, f"--train.out_dir={q(str(run))}",
                                        f"--eval.every={max(1, steps // args.points)}"])
    recs = records(run)
    curve, spent = [], 0.0
    for r in (r for r in recs if r.get("kind") == "task"):
        curve.append({"step": r["step"], "train_minutes": round((r["wall_s"] - spent) / 60, 3),
                      "bleu": round(r["metrics"]["bleu"], 2), "chrf": round(r["metrics"]["chrf"], 2),
                      "n": r["n"]})
        spent += r["eval_s"]  # the curve's time axis leaves out the time spent scoring
    t1 = time.perf_counter()
    final = evaluate_tasks(str(run), [test], batch_size=64, decode=DecodeOptions(max_new_tokens=64),
                           device="cpu", limit=args.test_limit or None)["tasks"]
    (metrics,) = final.values()
    final_eval_s = time.perf_counter() - t1
    beam = None
    if args.num_beams > 1:  # the same weights decoded by beam search (generate/beam.py)
        t2 = time.perf_counter()
        (bm,) = evaluate_tasks(str(run), [test], batch_size=64, device="cpu", limit=args.test_limit or None,
                               decode=DecodeOptions(max_new_tokens=64, num_beams=args.num_beams,
                                                    length_penalty=args.length_penalty))["tasks"].values()
        beam = {"num_beams": args.num_beams, "length_penalty": args.length_penalty, "bleu": round(bm["bleu"], 2),
                "chrf": round(bm["chrf"], 2), "eval_s": round(time.perf_counter() - t2, 1)}
    train_min = (wall - spent) / 60
    tokens = cfg.train.micro_batch_size * cfg.train.seq_len * res.step
    meta = json.loads((work / f"data_{tag}" / "meta.json").read_text())
    epochs = tokens / meta["splits"]["train"]["tokens"]
    params = cfg.model.with_vocab(meta["tokenizer"]["vocab_size"]).num_params() \
        if cfg.model.vocab_size is None else cfg.model.num_params()
    bleu = round(metrics["bleu"], 2)
    if encdec:  # one pair per row: count the pairs seen (seq_len is the decoder's cap, not a row's length)
        pairs = meta["splits"]["train"]["examples"]
        seen = cfg.train.micro_batch_size * res.step
        tokens = round(seen * meta["splits"]["train"]["tokens"] / pairs)
        epochs = seen / pairs
    kind = "encoder-decoder" if encdec else "decoder-only"
    gap = (f"{bleu} BLEU after {train_min:.1f} min ({res.step} steps, {tokens / 1e6:.2f}M tokens = {epochs:.2f} "
           f"epochs) of a {params / 1e6:.2f}M-parameter {kind} model on {env['cores']} cores ({env['cpu']}, "
           f"{env['threads']} torch thread(s), load {env['loadavg'][0]} at the start), greedy decoding"
           + (f" (beam {beam['num_beams']}: {beam['bleu']})" if beam else "") + ". "
           f"Published systems ({PUBLISHED_BLEU[tgt]}) are 30-200M-parameter encoder-decoders trained for hours "
           "to days on GPUs (tens of epochs), with beam search, checkpoint averaging/ensembles and tuned BPE; here "
           f"the budget buys about {epochs:.1f} epoch(s) and BLEU is still rising (curve), so the gap is compute "
           "first, then model size and decoding.")
    out = {"benchmark": "translation", "pair": f"en-{tgt}", "arch": args.arch, "recipe": recipe, "beam": beam, "overrides": args.override, "env": env,
           "env_after": {"loadavg": [round(x, 2) for x in os.getloadavg()]},
           "budget_minutes": args.minutes, "calibrated_step_s": round(step_s, 3), "max_steps": steps,
           "steps": res.step, "stop_reason": res.reason, "train_wall_s": round(wall, 1),
           "train_minutes_without_scoring": round(train_min, 2), "scoring_during_training_s": round(spent, 1),
           "prepare_and_calibrate_s": round(prep_and_calib_s, 1), "tokens": tokens, "epochs": round(epochs, 3),
           "params": params, "vocab_size": meta["tokenizer"]["vocab_size"],
           "curve_sentences": args.curve_limit, "curve": curve,
           "final_test": {k: metrics[k] for k in ("bleu", "chrf", "rougeL", "exact_match", "n") if k in metrics},
           "final_eval_s": round(final_eval_s, 1), "goal_bleu": GOAL_BLEU[tgt], "published_bleu": PUBLISHED_BLEU[tgt],
           "meets_goal": bleu >= GOAL_BLEU[tgt], "how_far": gap,
           "final_train_loss": res.final_train_loss, "final_val_loss": res.final_val_loss}
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"translation_multi30k_{tag}_{args.minutes:g}min"
    write_result(stem.with_suffix(".json"), json.dumps(out, indent=2) + "\n")
    plot_curve(curve, train_min, bleu, tgt, args, stem.with_suffix(".png"),
               goal=GOAL_ENCDEC_BLEU if encdec and tgt == "fr" else GOAL_BLEU[tgt])
    app = f"translation en->{tgt} (Multi30k{', encdec' if encdec else ''})"
    goal = GOAL_ENCDEC_BLEU if encdec and tgt == "fr" else GOAL_BLEU[tgt]
    rows = [row(app, "BLEU test_2016_flickr (greedy, sacrebleu)", bleu,
                f">= {goal:g} in 30 min (GPU systems {PUBLISHED_BLEU[tgt]})", train_min,
                f"budget {args.minutes:g} min, load {env['loadavg'][0]}; curve {stem.name}.png; " + gap)]
    if beam:
        rows.append(row(app, f"BLEU test_2016_flickr (beam {beam['num_beams']}, length_penalty "
                             f"{beam['length_penalty']:g})", beam["bleu"], f">= {goal:g} in 30 min", train_min,
                        f"the same weights; decoding {beam['eval_s']:.0f} s for the test set"))
    if encdec:
        rows += compare_translation(tgt, args.minutes, out)
    write_rows("translation", rows)
    print(json.dumps({k: out[k] for k in ("pair", "steps", "train_minutes_without_scoring", "final_test", "curve")},
                     indent=1))


def base_directions(specs: list[str], tgt: str, task_in_base: bool = False) -> list[tuple[str, str]]:
    """--base-pairs as (source, target) languages: "de" is en->de, "fr-en" is fr->en. The
    fine-tuning direction itself (en->tgt) is refused (the base must not have seen the task) unless
    `task_in_base` (--task-in-base: the base translates en->tgt on its own share of the sentences,
    fine-tuning gets the rest), which needs at least one other direction to share them with."""
    out = []
    for spec in specs:
        a, b = spec.split("-") if "-" in spec else ("en", spec)
        if a == b or {a, b} - {"en", "fr", "de"}:
            sys.exit(f"--base-pairs {spec}: give X (en->X) or X-Y with X, Y two of en, fr, de")
        if (a, b) == ("en", tgt) and not task_in_base:
            sys.exit(f"--base-pairs {spec} is the fine-tuning direction en->{tgt} itself; give another one "
                     "(or --task-in-base with --disjoint: a base that already translates it on other sentences)")
        out.append((a, b))
    if task_in_base and (("en", tgt) not in out or len(out) < 2):
        sys.exit(f"--task-in-base: --base-pairs must name en->{tgt} ({tgt}) and at least one other direction, "
                 f"so that fine-tuning keeps sentences the base never saw in en->{tgt}; got {specs}")
    return out


def held_out_pairs(src: Path, dst: Path, out_dir: Path, k: int, n: int) -> list[Path]:
    """The pairs of (src, dst) that --disjoint did not give to base direction k of n (line i with
    i % n != k), written as out_dir/train.LANG.gz (the harness reads the language from the name)."""
    return pick_pairs(src, dst, out_dir, lambda i: i % n != k)


def first_pairs(src: Path, dst: Path, out_dir: Path, n: int) -> list[Path]:
    """The first n pairs of (src, dst) (--ft-pairs), written as held_out_pairs writes them."""
    return pick_pairs(src, dst, out_dir, lambda i: i < n)


def pick_pairs(src: Path, dst: Path, out_dir: Path, keep: Callable[[int], bool]) -> list[Path]:
    """Lines i of src and dst with keep(i), written as out_dir/SAME_NAME (gzip, byte-for-byte
    repeatable) through a temporary file."""
    out_dir.mkdir(parents=True, exist_ok=True)
    outs = []
    for path in (src, dst):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            kept = [x for i, x in enumerate(f) if keep(i)]
        tmp = out_dir / f".{path.name}.tmp"
        # mtime=0 and no name in the header: the same lines give the same bytes, so a --reuse run's
        # rewrite matches the SHA-256 that the prepared data.dir recorded
        with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
            gz.write("".join(kept).encode("utf-8"))
        tmp.replace(out_dir / path.name)
        outs.append(out_dir / path.name)
    return outs


def base_corpus_jsonl(files: list[Path], out: Path, pairs: list[tuple[Path, Path]] = (), *,
                      layout: str = "plain", disjoint: bool = False) -> int:
    """The base LM's documents: every line of the gzipped text files as its own JSONL document (each
    language, never a pair), and for each of `pairs` (source, target files) each pair as one document.
    layout "plain": "source target" ([EOS] prompt, a space, completion [EOS]: an SFT example without
    the harness's prompt, so the base learns "after English comes German"); "prompt": the harness's
    parallel-text prompt and its completion, "en: source\nde: target" (files named train.LANG.gz),
    the layout fine-tuning uses, so the target language is named as multilingual translators
    (Johnson et al. 2017) name it. `disjoint`: Multi30k is one set of sentences in three languages, so
    direction k of n takes only sentences i with i % n == k: no sentence is seen in two directions, and
    a base trained on en->de and de->fr never saw an English sentence beside its French translation."""
    def lines(path: Path) -> list[str]:
        with gzip.open(path, "rt", encoding="utf-8") as src:
            return [x.strip() for x in src]

    from clusterlm.eval.tasks import PARALLEL_TEMPLATE, _lang

    docs = [x for path in files for x in lines(path) if x]
    for k, (src, dst) in enumerate(pairs):
        both = list(zip(lines(src), lines(dst)))
        if disjoint:
            both = both[k::len(pairs)]
        if layout == "prompt":
            docs += [f"{PARALLEL_TEMPLATE.format(src_lang=_lang(src), source=a, tgt_lang=_lang(dst))} {b}"
                     for a, b in both if a and b]
        else:
            docs += [f"{a} {b}" for a, b in both if a and b]
    out.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return len(docs)


def translate_lora(args: argparse.Namespace) -> None:
    """LoRA against full fine-tuning for translation (issue 15): a decoder LM pre-trained on the
    training sentences of both languages as separate documents (no pairs; --base-pairs adds a third
    language and its pairs with English), then fine-tuned on the
    pairs for the same --minutes twice from that base, full and LoRA rank 8; greedy BLEU on
    test_2016_flickr for both. Goal: LoRA within 2 BLEU of full with < 5% trainable parameters."""
    from clusterlm.checkpoint.store import resolve_checkpoint
    from clusterlm.eval.evaluate import evaluate_tasks
    from clusterlm.eval.harness import DecodeOptions

    data, work = Path(args.data), Path(args.work)
    tgt = args.pair
    train_files = [data / "train.en.gz", data / f"train.{tgt}.gz"]
    test_files = [data / "test_2016_flickr.en.gz", data / f"test_2016_flickr.{tgt}.gz"]
    need(train_files + test_files, "Multi30k", "--data")
    work.mkdir(parents=True, exist_ok=True)
    recipe, test, env = f"multi30k_en{tgt}_cpu", ",".join(map(str, test_files)), env_info()
    if args.task_in_base and not args.disjoint:
        sys.exit("--task-in-base needs --disjoint: otherwise the base sees every fine-tuning pair")
    directions = base_directions(args.base_pairs, tgt, args.task_in_base)
    if args.task_in_base:  # fine-tune on the en->tgt pairs the base did not see
        k = directions.index(("en", tgt))
        train_files = held_out_pairs(*train_files, work / "pairs_held_out", k, len(directions))
    pairs_dir = work / "pairs"
    if args.ft_pairs:  # the first N of them: LoRA's gap against the amount of task data
        with gzip.open(train_files[0], "rt", encoding="utf-8") as f:
            n_avail = sum(1 for _ in f)
        if args.ft_pairs > n_avail:
            sys.exit(f"--ft-pairs {args.ft_pairs}: only {n_avail} fine-tuning pairs ({train_files[0]})")
        train_files = first_pairs(*train_files, work / f"pairs_first{args.ft_pairs}", args.ft_pairs)
        pairs_dir = work / f"pairs_{args.ft_pairs}"
    langs_in_base = ["en", tgt] + sorted({x for d in directions for x in d} - {"en", tgt})
    base_files = [data / f"train.{x}.gz" for x in langs_in_base]
    base_pairs = [(data / f"train.{a}.gz", data / f"train.{b}.gz") for a, b in directions]
    other = "_".join(f"{a}{b}" if a != "en" else b for a, b in directions)  # names: "de", "de_fren"
    need(base_files, "Multi30k", "--data")
    if args.base_layout != "plain" or args.disjoint:
        other += f"_{args.base_layout}" + ("_disjoint" if args.disjoint else "")
    if args.pairs_only:
        if not directions:
            sys.exit("--pairs-only needs --base-pairs: a base of no documents")
        other += "_pairsonly"
    lm_data, n_docs, lm_prep_s = lm_corpus(work / "lm_data", lambda out: base_corpus_jsonl(
        [] if args.pairs_only else base_files, out, base_pairs, layout=args.base_layout, disjoint=args.disjoint))
    common = ["--train.tensorboard=false", "--checkpoint.interval=0", "--eval.every=0", "--eval.tasks=[]",
              *args.override]
    lm_over = [*common, "--finetune.task=lm", f"--data.dir={q(str(lm_data))}", '--data.source=""', *args.base_override]
    base = work / "lm"
    if args.base_best:  # the base's checkpoint at its lowest held-out loss (saved every 500 steps, evaluated every 250)
        lm_over += ["--checkpoint.interval=500", "--checkpoint.keep_last=1", "--checkpoint.keep_best=true"]
        base = work / "lm" / "checkpoints" / "best"
    init = [f"--finetune.init_from={q(str(base))}"]
    ft_over = [*common, *init, f"--data.source={q(','.join(map(str, train_files)))}",
               f"--data.dir={q(str(pairs_dir))}", *args.ft_override]  # prepared with the base's tokenizer
    if args.ft_best:  # each arm scored at its lowest held-out loss: a small --ft-pairs set overfits
        e = args.ft_eval_interval
        ft_over += [f"--train.eval_interval={e}", f"--checkpoint.interval={e}", "--checkpoint.keep_last=1",
                    "--checkpoint.keep_best=true"]
    # arms on a subset live beside the full-data ones (full_ft1000, ...), so --reuse keeps both
    arm_tag = f"_ft{args.ft_pairs}" if args.ft_pairs else ""
    ft_settings = {"ft_overrides": args.ft_override, "ft_pairs": args.ft_pairs,
                   "ft_best": args.ft_eval_interval if args.ft_best else 0}
    def reused(name: str) -> dict[str, Any] | None:
        return reused_arm(work, name, args.reuse)

    lm = reused("lm")
    if lm is None:
        lm = run_arm(recipe, work / "lm", lm_over, args.pretrain_minutes, calibrate(recipe, lm_over, work / "calib_lm"))
    base_ckpt = resolve_checkpoint(base).name
    if "test" not in lm or lm.get("test_checkpoint", base_ckpt) != base_ckpt:
        # the base as it is, prompted "en: ...\nfr:" (zero-shot when it never saw en->fr)
        t1 = time.perf_counter()
        (m,) = evaluate_tasks(str(base), [test], batch_size=64, decode=DecodeOptions(max_new_tokens=64),
                              device="cpu", limit=args.test_limit or None)["tasks"].values()
        lm["test"] = {k: m[k] for k in ("bleu", "chrf", "n") if k in m}
        lm["test_checkpoint"] = base_ckpt
        lm["eval_s"] = round(time.perf_counter() - t1, 1)
        (work / "lm" / "arm.json").write_text(json.dumps(lm, indent=1))
    arms: dict[str, Any] = {"lm": lm}
    lr = load_run_config(bundled_recipes()[recipe], []).optim.lr
    r = args.lora_rank
    for name, over in (("full", ft_over),
                       (f"lora{r}", [*ft_over, f"--finetune.lora_rank={r}", f"--optim.lr={args.lora_lr_scale * lr}",
                                  f"--finetune.lora_plus_ratio={args.lora_plus_ratio}",
                                  *(["--finetune.lora_dora=true"] if args.dora else []),
                                  *([f"--finetune.lora_targets={q(args.lora_targets)}"] if args.lora_targets else [])])):
        run_dir = work / (name + arm_tag)
        a = reused(run_dir.name) if name == "full" else None  # LoRA's settings are what a --reuse run varies
        if a is not None and {k: a.get(k, type(v)()) for k, v in ft_settings.items()} != ft_settings:
            a = None  # a full arm fine-tuned with other --ft-override, --ft-pairs or --ft-best settings
        if a is None:
            calib_dir = work / f"calib_{run_dir.name}"
            for old in (run_dir, calib_dir):  # a LoRA run from before, with other settings
                if old.exists():
                    shutil.rmtree(old)
            a = run_arm(recipe, run_dir, over, args.minutes, calibrate(recipe, over, calib_dir), warmup=50)
            t1 = time.perf_counter()
            scored = run_dir / ("checkpoints/best" if args.ft_best else "")
            (m,) = evaluate_tasks(str(scored), [test], batch_size=64, decode=DecodeOptions(max_new_tokens=64),
                                  device="cpu", limit=args.test_limit or None)["tasks"].values()
            a["test"] = {k: m[k] for k in ("bleu", "chrf", "n") if k in m}
            a["test_checkpoint"] = resolve_checkpoint(scored).name
            a["eval_s"] = round(time.perf_counter() - t1, 1)
            a.update(ft_settings)
            (run_dir / "arm.json").write_text(json.dumps(a, indent=1))
        arms[name] = a
    full, lo = arms["full"], arms[f"lora{r}"]
    model_file = next((work / f"full{arm_tag}" / "checkpoints").glob("step-*/model.safetensors"))
    lo["model_bytes"] = model_file.stat().st_size
    out = {"benchmark": "translation LoRA vs full", "pair": f"en-{tgt}",
           "base_pairs": ", ".join(f"{a}-{b}" for a, b in directions) or None,
           "base_layout": args.base_layout, "base_disjoint": args.disjoint, "base_pairs_only": args.pairs_only,
           "task_in_base": args.task_in_base,
           "recipe": recipe, "env": env,
           "env_after": {"loadavg": [round(x, 2) for x in os.getloadavg()]}, "overrides": args.override,
           "base_overrides": args.base_override, "ft_overrides": args.ft_override,
           "base_checkpoint": base_ckpt + (" (lowest held-out loss, --base-best)" if args.base_best else " (last)"),
           "pretrain_minutes": args.pretrain_minutes, "finetune_minutes": args.minutes,
           "lm_documents": n_docs, "lm_prepare_s": round(lm_prep_s, 1), "arms": arms,
           "test_sentences": args.test_limit or 1000, "decoding": "greedy, max_new_tokens 64"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    emb_adapter = bool(args.lora_targets) and "tok_embeddings" in args.lora_targets
    lr_tag = f"_lr{args.lora_lr_scale:g}x" if args.lora_lr_scale != 2.0 else ""  # 2x: the first runs' names
    lr_tag += f"_r{r}" if r != 8 else ""
    lr_tag += f"_plus{args.lora_plus_ratio:g}" if args.lora_plus_ratio != 1.0 else ""
    lr_tag += "_dora" if args.dora else ""
    lr_tag += f"_base{args.pretrain_minutes:g}min" if args.pretrain_minutes != 10 else ""  # 10: the earlier runs
    lr_tag += "_" + args.base_tag if args.base_tag else ""
    lr_tag += f"_ft{args.ft_pairs}" if args.ft_pairs else ""
    lr_tag += "_ftbest" if args.ft_best else ""
    path = RESULTS / (f"translation_multi30k_en{tgt}_lora{'_emb' if emb_adapter else ''}"
                      f"{f'_from_en{other}' if other else ''}{lr_tag}_{args.minutes:g}min.json")
    write_result(path, json.dumps(out, indent=2) + "\n")
    b_full, b_lo = full["test"]["bleu"], lo["test"]["bleu"]
    frac = 100 * lo["trainable"] / lo["total"]
    dirs = " and ".join(f"{a}->{b}" for a, b in directions)
    base_name = (f"base: {dirs} translator" if directions else f"base: en+{tgt} LM") + \
        (f", fine-tuned on the en->{tgt} pairs it did not see" if args.task_in_base else "") + \
        (", pairs only" if args.pairs_only else "") + \
        (", tagged 'X: ...\\nY:'" if args.base_layout == "prompt" else "") + \
        (", disjoint sentences" if args.disjoint else "") + \
        (" + embedding adapter" if emb_adapter else "") + \
        (f", LoRA lr {args.lora_lr_scale:g}x" if args.lora_lr_scale != 2.0 else "") + \
        (f", LoRA+ B lr x{args.lora_plus_ratio:g}" if args.lora_plus_ratio != 1.0 else "") + \
        (", DoRA" if args.dora else "") + \
        "".join(f", base {o.lstrip('-')}" for o in args.base_override) + \
        "".join(f", fine-tuning {o.lstrip('-')}" for o in args.ft_override) + \
        (", base at its lowest held-out loss" if args.base_best else "") + \
        (f", fine-tuned on {args.ft_pairs:,} pairs" if args.ft_pairs else "") + \
        (", each arm at its lowest held-out loss" if args.ft_best else "") + \
        (f", LoRA on {' '.join(args.lora_targets)}" if args.lora_targets and set(args.lora_targets) - {
            "wq", "wv", "w1", "w2", "tok_embeddings"} else "")  # other settings keep their own rows
    langs = ", ".join(langs_in_base)
    how = (f"base: decoder LM pre-trained {lm['steps']} steps ({lm['wall_s'] / 60:.1f} min" +
           (f"; fine-tuned from its lowest held-out loss, {base_ckpt}" if args.base_best else "") + ") on " +
           (f"the {dirs} pairs alone" if args.pairs_only else f"the {langs} training sentences as separate documents"
            + (f" and the {dirs} pairs (a base that translates {dirs})" if directions else "")) +
           (f"; the base itself, prompted en->{tgt}: {lm['test']['bleu']:.2f} BLEU" if "test" in lm else "") +
           f"; then {args.minutes:g} min of fine-tuning on the " +
           (f"first {args.ft_pairs:,} of the " if args.ft_pairs else "") + f"en->{tgt} pairs each" +
           (f", scored at the lowest held-out loss (evaluated every {args.ft_eval_interval} steps): full "
            f"{full.get('test_checkpoint')}, LoRA {lo.get('test_checkpoint')}" if args.ft_best else "") + "; "
           f"{env['cpu']}, load {env['loadavg'][0]}; {path.name}")
    rows = [
        row(f"translation en->{tgt} (Multi30k, LoRA)", f"LoRA r={r} minus full fine-tuning, BLEU ({base_name})",
            round(b_lo - b_full, 2), ">= -2" if not args.ft_pairs else "(>= -2 is the goal on all the pairs)",
            lo["wall_s"] / 60,
            f"LoRA {b_lo:.2f} ({lo['steps']} steps, lr {lo['lr']:g}) vs full {b_full:.2f} ({full['steps']} steps, "
            f"lr {full['lr']:g}), greedy, {out['test_sentences']} test sentences; " +
            ("BOTH ARMS BELOW THE BASE'S BLEU: fine-tuning did not help, so the gap says nothing about LoRA; "
             if "test" in lm and max(b_lo, b_full) < lm["test"]["bleu"] else "") + how),
        row(f"translation en->{tgt} (Multi30k, LoRA)", f"LoRA r={r} trainable parameters % ({base_name})",
            round(frac, 2), "< 5",
            lo["wall_s"] / 60, f"{lo['trainable']:,} of {lo['total']:,} (adapters on {lo['lora_targets']}); adapter file "
            f"{lo.get('adapter_bytes', 0) / 1e3:.0f} kB = {100 * lo.get('adapter_bytes', 0) / lo['model_bytes']:.1f}% of the "
            f"model's {lo['model_bytes'] / 1e6:.1f} MB"),
    ]
    write_rows("translation", rows)
    print(json.dumps({k: {kk: v.get(kk) for kk in ("steps", "wall_s", "test")} for k, v in arms.items()}, indent=1))


def compare_translation(tgt: str, minutes: float, enc: dict) -> list[dict]:
    """The side-by-side of issue 16: the encoder-decoder against the decoder-only model of the same
    parameter count at the same wall-time budget (its results/translation_multi30k_enXX_Nmin.json)."""
    path = RESULTS / f"translation_multi30k_en{tgt}_{minutes:g}min.json"
    if not path.is_file():
        log.info("no decoder-only run at %g min (%s): no side-by-side row", minutes, path.name)
        return []
    dec = json.loads(path.read_text())
    b_enc, b_dec = enc["final_test"]["bleu"], dec["final_test"]["bleu"]
    return [row(f"translation en->{tgt} (Multi30k)", f"encdec minus decoder-only BLEU, equal params and {minutes:g}-min "
                "budget", round(b_enc - b_dec, 2), "encdec ahead", enc["train_minutes_without_scoring"],
                f"encdec {b_enc:.2f} ({enc['params']:,} params, {enc['steps']} steps, {enc['epochs']:.2f} epochs, "
                f"load {enc['env']['loadavg'][0]}) vs decoder-only {b_dec:.2f} ({dec['params']:,} params, "
                f"{dec['steps']} steps, {dec['epochs']:.2f} epochs, load {dec['env']['loadavg'][0]}, run "
                f"{dec['env']['date']}); greedy, all 1,000 test sentences; curves {path.stem}.png and "
                f"translation_multi30k_en{tgt}_encdec_{minutes:g}min.png")]


def compare_sentiment(minutes: float) -> list[dict]:
    """Issue 16: dev accuracy of every SST-2 classifier run at the same budget (results/
    sentiment_sst2_ARCH_Nmin.json), scratch and pre-trained, in one row."""
    parts = []
    for arch in ("encoder", "transformer", "lstm"):
        path = RESULTS / f"sentiment_sst2_{arch}_{minutes:g}min.json"
        if path.is_file():
            d = json.loads(path.read_text())
            for a in d["arms"].values():
                parts.append(f"{arch}: scratch {a['scratch']['dev']['accuracy']}%, pre-trained + fine-tuned "
                             f"{a['pretrained']['dev']['accuracy']}% ({d['env'].get('cpu', 'CPU not recorded')}, load "
                             f"{d['env']['loadavg'][0]})")
    if len(parts) < 2:
        return []
    best = max((float(p.split('scratch ')[1].split('%')[0]), p.split(':')[0]) for p in parts)
    return [row("sentiment SST-2 (encoder vs decoder-only vs LSTM)", f"best from-scratch dev accuracy %, {minutes:g} min",
                best[0], "equal wall time", minutes, f"{best[1]} best; " + "; ".join(parts))]


def plot_curve(curve: list[dict], minutes: float, bleu: float, tgt: str, args: argparse.Namespace, path: Path,
               goal: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([c["train_minutes"] for c in curve], [c["bleu"] for c in curve], "o-",
            label=f"first {args.curve_limit} test sentences (during training)")
    ax.plot([minutes], [bleu], "s", color="C3", label=f"{args.test_limit or 'all 1,000'} test sentences (final): {bleu:.1f}")
    goal = GOAL_BLEU[tgt] if goal is None else goal
    ax.axhline(goal, color="grey", ls="--", label=f"goal {goal:g} (30 min)")
    ax.set_xlabel("training wall time (min, scoring excluded)")
    ax.set_ylabel("BLEU (greedy)")
    ax.set_title(f"Multi30k en->{tgt} ({getattr(args, 'arch', 'decoder')}), test_2016_flickr, {args.minutes:g}-min budget on a 2-core CPU",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


# ---- sentiment ----------------------------------------------------------------------------------
def sentences_jsonl(train_tsv: Path, out: Path, extra: list[Path] = ()) -> int:
    """The unlabelled training sentences (unique, in file order) as JSONL documents for `prepare`,
    then the lines of each `extra` text file (plain or .gz, a sentence a line; lowercased, as SST-2
    is), e.g. other English for a more general LM (ULMFiT's first stage)."""
    seen: dict[str, None] = {}
    with gzip.open(train_tsv, "rt", encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        col = next(i for i, c in enumerate(header) if c in ("sentence", "text", "content"))
        for line in f:
            seen.setdefault(line.rstrip("\n").split("\t")[col].strip(), None)
    for path in extra:
        with (gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")) as f:
            for line in f:
                seen.setdefault(line.strip().lower(), None)
    texts = [s for s in seen if s]
    out.write_text("".join(json.dumps({"text": s}) + "\n" for s in texts))
    return len(texts)


def dev_scores(run: Path, dev: Path) -> dict[str, Any]:
    from clusterlm.eval.evaluate import evaluate_tasks

    (m,) = evaluate_tasks(str(run), [str(dev)], batch_size=64, device="cpu")["tasks"].values()
    pos = m["per_class"]["1"]
    return {"accuracy": round(100 * m["accuracy"], 2), "precision": round(100 * pos["precision"], 2),
            "recall": round(100 * pos["recall"], 2), "f1": round(100 * pos["f1"], 2),
            "macro_f1": round(100 * m["macro_f1"], 2), "n": m["n"]}


def trainable(run: Path) -> tuple[int, int]:
    """(trainable, total) parameters of a run's model as the trainer built it (meta device; the
    resolved config is the run's config.toml)."""
    import torch

    from clusterlm.finetune.lora import count_parameters

    cfg = load_run_config(run / "config.toml")
    from clusterlm.finetune.setup import model_transform
    from clusterlm.models.build import build_model

    with torch.device("meta"):
        model = build_model(cfg.model)
    transform, _ = model_transform(cfg.finetune)
    if transform is not None:
        model = transform(model)
    return count_parameters(model)


def reused_arm(work: Path, name: str, reuse: bool) -> dict[str, Any] | None:
    """--reuse: the arm a run in this --work wrote before (NAME/arm.json), or None."""
    path = work / name / "arm.json"
    if reuse and path.is_file():
        log.info("--reuse: %s from %s", name, path)
        return json.loads(path.read_text())
    return None


def run_arm(recipe: str, run: Path, over: list[str], minutes: float, step_s: float, warmup: int = 100,
            max_steps: int = 0) -> dict[str, Any]:
    """Train one arm into `run` for `minutes` (max_steps from the calibrated `step_s`, at most
    `max_steps` when that is set): steps, wall time, lr, trainable/total parameters and, for LoRA, the
    adapter targets and file size."""
    steps, b = budget_overrides(step_s, minutes, warmup, cap=max_steps)
    cfg, res, wall = train_run(recipe, [*over, *b, f"--train.out_dir={q(str(run))}"])
    a = {"steps": res.step, "max_steps": steps, "wall_s": round(wall, 1), "stop_reason": res.reason,
         "calibrated_step_s": round(step_s, 4), "lr": cfg.optim.lr, "task": cfg.finetune.task}
    if cfg.finetune.lora_rank:
        a["lora_targets"] = list(cfg.finetune.lora_targets) or "every attention and MLP projection (the default)"
        a["dora"] = cfg.finetune.lora_dora
        adapter = run / "adapter" / "adapter.safetensors"
        if adapter.is_file():
            a["adapter_bytes"] = adapter.stat().st_size
    a["trainable"], a["total"] = trainable(run)
    log.info("%s: %s", run.name, a)
    return a


def sentiment(args: argparse.Namespace) -> None:
    data, work = Path(args.data), Path(args.work)
    train_tsv, dev = data / "train.tsv.gz", data / "dev.tsv"
    need([train_tsv, dev], "SST-2", "--data")
    work.mkdir(parents=True, exist_ok=True)
    env, budget_s = env_info(), args.minutes * 60
    common = [f"--data.source={q(str(train_tsv))}", f"--finetune.val_source={q(str(dev))}", "--train.tensorboard=false",
              *args.override]
    extra = [Path(x) for x in args.lm_extra]
    if missing := [str(x) for x in extra if not x.is_file()]:
        sys.exit(f"--lm-extra: no such file {', '.join(missing)}; give text files, a sentence a line (.gz ok)")
    lm_name = "sst2_lm" + "".join(f"_{x.parent.name}_{x.name.split('.')[0]}" for x in extra)  # another corpus, another folder
    lm_data, n_sent, lm_prep_s = lm_corpus(work / lm_name, lambda out: sentences_jsonl(train_tsv, out, extra))
    out: dict[str, Any] = {"benchmark": "sentiment", "overrides": args.override, "env": env, "budget_minutes": args.minutes,
                           "finetune_overrides": args.finetune_override, "lm_overrides": args.lm_override,
                           "tag": args.tag,
                           "pretrain_share": args.pretrain_share, "classifier_steps": args.classifier_steps,
                           "lm_prepare_s": round(lm_prep_s, 1),
                           "lm_sentences": n_sent, "lm_extra": [str(x) for x in extra], "reuse": args.reuse, "arms": {}}
    rows = []
    for arch in args.arch:
        recipe = f"sst2_{arch}_cpu"
        objective = "mlm" if arch == "encoder" else "lm"  # an encoder pre-trains by masked LM (data/mlm.py)
        lm_over = [*common, f"--finetune.task={objective}", '--finetune.val_source=""', f"--data.dir={q(str(lm_data))}",
                   '--data.source=""', "--train.micro_batch_size=32", "--train.eval_interval=0", *args.lm_override]
        cls_over = [*common, f"--data.dir={q(str(work / f'records_{arch}'))}"]
        ft_over = [*common, f"--data.dir={q(str(work / f'records_{arch}_ft'))}"]
        arms: dict[str, Any] = {}

        def arm(name: str, over: list[str], minutes: float, step_s: float, warmup: int = 100,
                max_steps: int = 0, **note: Any) -> dict[str, Any]:
            if (work / name).exists():  # an arm from an earlier run in this --work: trained again
                shutil.rmtree(work / name)
            a = {**run_arm(recipe, work / name, over, minutes, step_s, warmup, max_steps), **note}
            if a["task"] == "classify":
                a["dev"] = dev_scores(work / name, dev)
            (work / name / "arm.json").write_text(json.dumps(a, indent=1))
            return a

        cap = args.classifier_steps
        # --reuse: the scratch arm and the LM from an earlier run in this --work; the arms that start from
        # the LM train again (they are what --finetune-override varies)
        scratch = reused_arm(work, f"{arch}_scratch", args.reuse)
        cls_step = scratch["calibrated_step_s"] if scratch else calibrate(recipe, cls_over, work / f"calib_{arch}_cls")
        arms["scratch"] = scratch or arm(f"{arch}_scratch", cls_over, args.minutes, cls_step, max_steps=cap)
        # with a capped classifier the LM takes the time the classifier will not (at the calibrated step time)
        lm_minutes = (args.minutes - cap * cls_step / (0.9 * 60)) if cap else args.minutes * args.pretrain_share
        lm = reused_arm(work, f"{arch}_lm", args.reuse)
        if lm is not None and lm.get("overrides", []) != args.lm_override:  # another LM asked for: train it
            log.info("--reuse: %s_lm was trained with --lm-override %s, not %s: training it again",
                     arch, lm.get("overrides", []), args.lm_override)
            lm = None
        if lm is None:
            lm = arm(f"{arch}_lm", lm_over, max(0.5, lm_minutes), calibrate(recipe, lm_over, work / f"calib_{arch}_lm"),
                     overrides=args.lm_override)
        left = max(0.5, (budget_s - lm["wall_s"]) / 60)
        init = [f"--finetune.init_from={q(str(work / f'{arch}_lm'))}"]
        ft_extra = args.finetune_override  # e.g. ULMFiT's discriminative lr for the arms that start from the LM
        ft = arm(f"{arch}_pretrained", [*ft_over, *init, *ft_extra], left, cls_step, warmup=50, max_steps=cap)
        ft["pretrain"] = lm
        ft["total_wall_s"] = round(lm["wall_s"] + ft["wall_s"], 1)
        arms["pretrained"] = ft
        if args.lora and arch == "transformer":
            lo = arm(f"{arch}_lora8", [*ft_over, *init, *ft_extra, "--finetune.lora_rank=8", f"--optim.lr={2 * ft['lr']}"],
                     left, cls_step, warmup=50, max_steps=cap)
            model_file = next((work / f"{arch}_pretrained" / "checkpoints").glob("step-*/model.safetensors"))
            lo["model_bytes"] = model_file.stat().st_size
            arms["lora8"] = lo
        out["arms"][arch] = arms
        rows += sentiment_rows(arch, arms, args, env)
    out["env_after"] = {"loadavg": [round(x, 2) for x in os.getloadavg()]}
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "_".join(args.arch)
    tag = f"_{args.tag}" if args.tag else ""
    write_result(RESULTS / f"sentiment_sst2_{name}_{args.minutes:g}min{tag}.json", json.dumps(out, indent=2) + "\n")
    rows += compare_sentiment(args.minutes)
    write_rows("sentiment", rows)
    print(json.dumps({arch: {k: v["dev"] for k, v in arms.items()} for arch, arms in out["arms"].items()}, indent=1))


def sentiment_rows(arch: str, arms: dict[str, Any], args: argparse.Namespace, env: dict) -> list[dict]:
    s, p = arms["scratch"], arms["pretrained"]
    m = args.minutes
    cap = f", classifier at most {args.classifier_steps} steps" if args.classifier_steps else ""
    load = f"budget {m:g} min per arm{cap}, load {env['loadavg'][0]}"
    app = f"sentiment SST-2 ({arch}{', ' + args.tag if args.tag else ''})"
    lm = "masked LM" if arch == "encoder" else "LM"

    def prf(d: dict) -> str:
        return f"P {d['precision']} / R {d['recall']} / F1 {d['f1']} (positive class), macro F1 {d['macro_f1']}"

    out = [
        row(app, "dev accuracy %, from scratch", s["dev"]["accuracy"], ">= 83 in 20 min", s["wall_s"] / 60,
            f"{s['steps']} steps; {prf(s['dev'])}; {load}"),
        row(app, f"dev accuracy %, {lm} pre-trained + fine-tuned", p["dev"]["accuracy"], ">= 83 in 20 min",
            p["total_wall_s"] / 60, f"{lm} {p['pretrain']['steps']} steps ({p['pretrain']['wall_s'] / 60:.1f} min"
            f"{''.join(' ' + o for o in p['pretrain'].get('overrides', []))}) + "
            f"classifier {p['steps']} steps ({p['wall_s'] / 60:.1f} min); {prf(p['dev'])}; {load}"),
        row(app, "pre-trained minus scratch, points", round(p["dev"]["accuracy"] - s["dev"]["accuracy"], 2),
            ">= +2 at equal total wall time", p["total_wall_s"] / 60,
            f"total wall {p['total_wall_s'] / 60:.2f} min vs {s['wall_s'] / 60:.2f} min; {load}"),
    ]
    if "lora8" in arms:
        lo = arms["lora8"]
        frac = 100 * lo["trainable"] / lo["total"]
        out += [
            row(app, "LoRA r=8 minus full fine-tuning, points", round(lo["dev"]["accuracy"] - p["dev"]["accuracy"], 2),
                ">= -1", lo["wall_s"] / 60, f"LoRA {lo['dev']['accuracy']}% vs full {p['dev']['accuracy']}%, both "
                f"from the same LM for the same {lo['wall_s'] / 60:.1f} min; LoRA lr {lo['lr']:g}; {load}"),
            row(app, "LoRA r=8 trainable parameters %", round(frac, 2), "< 5", lo["wall_s"] / 60,
                f"{lo['trainable']:,} of {lo['total']:,} (adapters on {' '.join(lo['lora_targets'])} + the 2-class head); "
                f"adapter file {lo['adapter_bytes'] / 1e3:.0f} kB = {100 * lo['adapter_bytes'] / lo['model_bytes']:.1f}% "
                f"of the model's {lo['model_bytes'] / 1e6:.1f} MB"),
        ]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("translate", help="Multi30k en->fr / en->de: BLEU vs wall time")
    tl = sub.add_parser("translate-lora", help="Multi30k: LoRA r=8 vs full fine-tuning from one pre-trained LM")
    for x in (t, tl):
        x.add_argument("--pair", choices=["fr", "de"], default="fr", help="target language (source: en)")
        x.add_argument("--data", default=str(SHARED / "multi30k"), help="folder with train.*.gz and test_2016_flickr.*.gz")
        x.add_argument("--test-limit", type=int, default=0, help="test sentences scored at the end (0 = all 1,000)")
    t.add_argument("--minutes", type=positive_float, default=30.0, help="training wall-time budget")
    t.add_argument("--points", type=positive_int, default=6, help="BLEU measurements during training")
    t.add_argument("--curve-limit", type=positive_int, default=200, help="test sentences scored for each curve point")
    t.add_argument("--arch", choices=["decoder", "encdec"], default="decoder",
                   help="decoder: multi30k_enXX_cpu (decoder-only SFT); encdec: multi30k_enXX_encdec_cpu (issue 16)")
    t.add_argument("--num-beams", type=positive_int, default=1, help="also score the final weights with beam search")
    t.add_argument("--length-penalty", type=float, default=1.0, help="beam search length penalty")
    tl.add_argument("--pretrain-minutes", type=positive_float, default=10.0, help="LM pre-training wall time")
    tl.add_argument("--minutes", type=positive_float, default=10.0, help="fine-tuning wall time, each of full and LoRA")
    tl.add_argument("--base-pairs", nargs="*", default=[], metavar="DIR",
                    help="also pre-train the base on these translation directions' pairs (and their languages' "
                         "sentences): X for en->X, X-Y for X->Y, e.g. de (LoRA then adapts a translator into German "
                         "to the --pair language) or de fr-en (one that also reads French)")
    tl.add_argument("--base-layout", choices=["plain", "prompt"], default="plain",
                    help="how the base's pairs are written: plain 'source target', or prompt 'en: source\\nde: "
                         "target' (the harness's prompt, naming the target language, as fine-tuning does)")
    tl.add_argument("--disjoint", action="store_true",
                    help="each --base-pairs direction on its own share of the (three-way parallel) sentences")
    tl.add_argument("--lora-targets", nargs="+", default=None,
                    help="finetune.lora_targets (default: every attention and MLP projection); e.g. wq wk wv wo w1 w2 "
                         "tok_embeddings (the tied embedding: its adapter applies to the output layer too)")
    tl.add_argument("--lora-lr-scale", type=float, default=2.0, help="LoRA's lr = this x the recipe's lr")
    tl.add_argument("--base-override", action="append", default=[],
                    help="extra --section.key=value for the base (pre-training) run only, e.g. --base-override="
                         "--model.dropout=0.1 (the fine-tuning arms start from the base's model and take --override)")
    tl.add_argument("--ft-override", action="append", default=[],
                    help="extra --section.key=value for the two fine-tuning arms only, e.g. --ft-override="
                         "--finetune.inherit_dropout=false (fine-tune at the recipe's dropout 0 a base pre-trained "
                         "with --base-override=--model.dropout=0.1); name the result with --base-tag")
    tl.add_argument("--base-best", action="store_true",
                    help="fine-tune (and score) the base's checkpoint at its lowest held-out loss "
                         "(checkpoint.keep_best; evaluated every 250 steps, saved every 500) instead of its last")
    tl.add_argument("--base-tag", default="", help="a word for the results file name telling this base apart "
                    "(e.g. drop01 with --base-override=--model.dropout=0.1)")
    tl.add_argument("--dora", action="store_true", help="the LoRA arm is DoRA (finetune.lora_dora: rank-r direction "
                    "update plus one trainable magnitude per output row)")
    tl.add_argument("--lora-plus-ratio", type=float, default=1.0, help="finetune.lora_plus_ratio for the LoRA arm: "
                    "its B factors at this x its lr (LoRA+, Hayou et al. 2024, suggest 16); 1 = plain LoRA")
    tl.add_argument("--lora-rank", type=positive_int, default=8, help="the LoRA arm's rank (the goal is about 8; a higher "
                    "one tells whether the rank is what holds LoRA back)")
    tl.add_argument("--task-in-base", action="store_true",
                    help="with --disjoint and --base-pairs naming the fine-tuning direction (e.g. fr de): the base "
                         "already translates en->--pair on its share of the sentences, fine-tuning gets the other "
                         "shares' pairs (LoRA adapting a capable base rather than teaching it a new direction)")
    tl.add_argument("--pairs-only", action="store_true",
                    help="the base reads only its --base-pairs, not every language's sentences as documents (all "
                         "of its steps go to translating)")
    tl.add_argument("--ft-pairs", type=int, default=0, metavar="N",
                    help="fine-tune both arms on only the first N of the fine-tuning pairs (0: all of them): how "
                         "LoRA's gap to full fine-tuning depends on the amount of task data; with --ft-best")
    tl.add_argument("--ft-best", action="store_true",
                    help="score each fine-tuning arm at its lowest held-out loss (checkpoint.keep_best, evaluated "
                         "and saved every --ft-eval-interval steps) instead of its last step: on a few pairs both "
                         "arms overfit long before the budget ends (add --ft-override=--data.val_fraction=0.1 "
                         "for a held-out split worth the name)")
    tl.add_argument("--ft-eval-interval", type=positive_int, default=100, help="steps between --ft-best's evaluations")
    tl.add_argument("--reuse", action="store_true", help="reuse the base and the full fine-tuning a run in the "
                    "same --work made (their arm.json): only LoRA trains again, e.g. to try another --lora-lr-scale")
    s = sub.add_parser("sentiment", help="SST-2: scratch vs LM pre-training + fine-tuning, LoRA vs full")
    s.add_argument("--data", default=str(SHARED / "sst2"), help="folder with train.tsv.gz and dev.tsv")
    s.add_argument("--minutes", type=positive_float, default=20.0, help="total training wall time per arm")
    s.add_argument("--arch", action="append", choices=["transformer", "lstm", "encoder"],
                   help="repeatable (default transformer); encoder: masked-LM pre-training (issue 16)")
    s.add_argument("--pretrain-share", type=float, default=0.6, help="fraction of the budget for LM pre-training")
    s.add_argument("--classifier-steps", type=int, default=0,
                   help="at most this many steps for each classifier arm (0 = fill the budget); the LM then "
                        "pre-trains for the rest of the budget instead of --pretrain-share of it")
    s.add_argument("--lora", action="store_true", help="also LoRA rank 8 fine-tuning (transformer)")
    s.add_argument("--finetune-override", action="append", default=[],
                   help="extra --section.key=value for the arms that start from the LM only, e.g. "
                        "--finetune-override=--optim.layer_lr_decay=0.385 (ULMFiT's discriminative fine-tuning)")
    s.add_argument("--lm-override", action="append", default=[],
                   help="extra --section.key=value for the language-model pre-training run only, e.g. "
                        "--lm-override=--model.init_std=0.1 (the classifier arms keep the recipe's); with --reuse, "
                        "an LM trained with other overrides is trained again")
    s.add_argument("--lm-extra", action="append", default=[], metavar="FILE",
                   help="more unlabelled text for the LM (a sentence a line, .gz ok), after SST-2's sentences; "
                        "repeatable, e.g. ../shared/data/multi30k/train.en.gz")
    s.add_argument("--tag", default="", help="names a variant: in the result file name and the rows' application")
    s.add_argument("--reuse", action="store_true", help="reuse the scratch arm and the LM a run in the same --work "
                   "made (their arm.json): only the arms that start from the LM train again, e.g. to try another "
                   "--finetune-override")
    for x in (t, tl, s):
        x.add_argument("--threads", type=int, default=0, help="torch threads for training and scoring (0 = torch's "
                       "default; 1 was faster than 2 on a 2-core machine loaded by other jobs)")
        x.add_argument("--work", default=None, help="scratch folder for data and runs (default: a fresh temp dir)")
        x.add_argument("--override", action="append", default=[], help="extra --section.key=value for every run")
    args = p.parse_args()
    if args.cmd == "sentiment" and not args.arch:
        args.arch = ["transformer"]
    if args.cmd == "sentiment" and not 0 < args.pretrain_share < 1:  # else the budgets' floors hid it: unequal arms
        refuse(f"--pretrain-share {args.pretrain_share:g}: give a fraction of --minutes strictly between 0 and 1")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)  # scoring after training too (train() restores this count)
        args.override = [f"--train.threads={args.threads}", *args.override]
    made_work = args.work is None
    if made_work:
        import tempfile

        args.work = tempfile.mkdtemp(prefix=f"applications_{args.cmd}_")
    from clusterlm.log import setup_logging

    setup_logging(0)
    log.info("work folder %s", args.work)
    try:
        {"translate": translate, "translate-lora": translate_lora, "sentiment": sentiment}[args.cmd](args)
    except SystemExit:  # refused before anything was made (missing data): no empty temp folder left behind
        if made_work:
            with contextlib.suppress(OSError):
                os.rmdir(args.work)  # only while still empty
        raise


if __name__ == "__main__":
    main()
