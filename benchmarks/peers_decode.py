"""clusterlm's decode against ctranslate2 on identical weights, side by side in one run, and the
machine's real memory-bandwidth bound.

    .venv/bin/pip install -e '.[bench]'                 # ctranslate2 (the optional benchmark extra)
    .venv/bin/python benchmarks/peers_decode.py         # writes results/peers_decode.json and .md
    .venv/bin/python benchmarks/peers_decode.py --repeats 2 --batches 1 16 --formats fp32   # quicker

The model: the gpt2-124m preset with random weights (init_weights(0)), saved as a clusterlm
checkpoint, exported through `clusterlm export` (clusterlm.interop.hf_io.export_to_hf), then
converted by ctranslate2's TransformersConverter (what `ct2-transformers-converter` runs). Both
engines read the same numbers; the first greedy tokens are compared as a check.

Each engine variant generates `--new-tokens` tokens greedily after a `--prompt-len`-token prompt
for every batch size in `--batches`, no eos (ctranslate2: min_length = max_length), and the
variants are interleaved: each repeat runs every (engine, format, batch) once in turn, so they
share the machine's load. ctranslate2 runs in a worker process of its own (Ct2Process), driven one
generation at a time: in one process the two engines slowed each other. tokens/s counts generated tokens of all rows: decode = B * (n - 1) over
the span from the first to the last new token (prefill and first token left out); end to end =
B * n over the whole call (prefill included). The ratio uses the median over repeats of the decode
rate. "fp32-compile" runs `generate(compile=True)` (`clusterlm generate --compile`): one-row steps
compiled, their Linears as inductor's fused reduction where that beats MKL's GEMV on this CPU,
batched steps eager on packed weights (clusterlm/generate/engine.py); its compile happens in the
warm-up repeat, reported beside the table. clusterlm fp32 rows run `generate()` as the CLI and server do (fp32 packed weights for calls of
4+ rows: optimize/packed.py); "bf16" is clusterlm's bf16 packed weights (AMX) against ctranslate2's
float32 (ctranslate2 has no bf16 compute type on CPU: int8, int8_float32, int16, float32); "int8" is clusterlm's Int8Linear
(fbgemm, dynamic int8 activations) against ctranslate2's compute_type="int8" (its own int8 GEMM,
dynamic int8 activations too).

Bandwidth: STREAM-style copy (a = b) and triad (a = b + s * c) over float32 arrays of
`--stream-mib` MiB each (default 1024, beside this VM's 480 MiB L3: far larger), measured in
every repeat between the engines' runs (other tenants share the host's memory bandwidth), best of
all, counted as STREAM counts (copy 2 arrays, triad 3, no write-allocate), and a
read-only pass (a sum over one array: a decode step only reads its weights);
beside it torch's GEMV rate over a 1.07 GB matrix (generate_speed.py's yardstick). The bound
for fp32 batch 1 is the highest of these rates / the fp32 weights' bytes read per token.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from clusterlm.checkpoint.model_io import load_for_inference
from clusterlm.checkpoint.store import save_checkpoint
from clusterlm.config import RunConfig, to_toml
from clusterlm.generate.engine import generate
from clusterlm.interop.hf_io import export_to_hf
from clusterlm.models.build import build_model
from clusterlm.models.config import get_preset
from clusterlm.optimize.quantize import quantize_model
from clusterlm.tokenizer.kinds import make_tokenizer
from common import machine, positive_int, refuse, write_result  # benchmarks/common.py
from generate_speed import STREAM_ROWS, bandwidth_gbs, weight_bytes  # benchmarks/generate_speed.py

RESULTS = Path(__file__).parent / "results"
FORMATS = ["fp32", "fp32-compile", "bf16", "int8"]


# ---- the bound -------------------------------------------------------------------------------------------
def stream_gbs(mib: int, repeats: int) -> dict[str, float]:
    """STREAM copy and triad (best of `repeats`) over float32 arrays of `mib` MiB each, torch's
    intra-op threads; GB/s as STREAM counts bytes (copy: read b + write a; triad: read b, c + write a,
    the write-allocate read not counted), and a read-only pass (a sum: what a decode step does to
    its weights)."""
    n = mib * 2**20 // 4
    a, b, c = torch.empty(n), torch.rand(n), torch.rand(n)
    a.copy_(b)  # touch every page first
    copy, triad, read = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        b.sum()
        read.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        a.copy_(b)
        copy.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        torch.add(b, c, alpha=3.0, out=a)
        triad.append(time.perf_counter() - t0)
    return {"copy": round(2 * 4 * n / min(copy) / 1e9, 2), "triad": round(3 * 4 * n / min(triad) / 1e9, 2),
            "read": round(4 * n / min(read) / 1e9, 2)}


# ---- the model in both engines ---------------------------------------------------------------------------
def make_checkpoint(work: Path, preset: str) -> Path:
    cfg = get_preset(preset)
    model = build_model(cfg)
    model.init_weights(0)
    tok = make_tokenizer("byte")
    tok.save(work / "tok.json")
    return save_checkpoint(work / "run" / "checkpoints", 0, model_state=model.state_dict(), optimizer_state=None,
                           train_state={"step": 0}, config_toml=to_toml(RunConfig(model=cfg)),
                           tokenizer_path=work / "tok.json")


def ct2_model(ckpt: Path, work: Path) -> tuple[Path, list[str]]:
    """The checkpoint exported to Hugging Face, converted by ctranslate2 (float32 on disk; int8 is
    chosen at load time by compute_type); and ctranslate2's vocabulary (id -> token string)."""
    import ctranslate2
    from ctranslate2.converters import transformers as ct2_hf

    @ct2_hf.register_loader("GPT2Config")  # replaces ctranslate2's GPT-2 loader for this process
    class PaddedGPT2Loader(ct2_hf.GPT2Loader):
        """The byte tokenizer has 259 tokens, the gpt2-124m embedding 50257 rows: pad the vocabulary
        with placeholder tokens, as ctranslate2's own T5 loader does ("<extra_id_N>")."""

        def get_vocabulary(self, model, tokenizer):  # type: ignore[no-untyped-def]
            tokens = super().get_vocabulary(model, tokenizer)
            return tokens + [f"<extra_id_{i}>" for i in range(model.config.vocab_size - len(tokens))]

        def set_config(self, config, model, tokenizer):  # type: ignore[no-untyped-def]
            super().set_config(config, model, tokenizer)  # the byte tokenizer names no bos/eos/unk: placeholders
            config.bos_token = config.bos_token or "<extra_id_0>"
            config.eos_token = config.eos_token or "<extra_id_0>"
            config.unk_token = config.unk_token or "<extra_id_0>"

    hf = export_to_hf(ckpt, work / "hf")
    out = work / "ct2"
    ctranslate2.converters.TransformersConverter(str(hf)).convert(str(out), quantization=None, force=True)
    vocab = json.loads((out / "vocabulary.json").read_text()) if (out / "vocabulary.json").is_file() else \
        (out / "vocabulary.txt").read_text(encoding="utf-8").split("\n")
    return out, vocab


def ours_run(model: torch.nn.Module, prompts: list[list[int]], n: int, pack: str,
             compile: bool = False) -> tuple[float, float, list[int]]:
    """(decode tokens/s, end-to-end tokens/s, row 0's tokens) of one greedy clusterlm generation."""
    t0 = time.perf_counter()
    stamps = []
    stream = generate(model, prompts, max_new_tokens=n, temperature=0.0, pack=pack, compile=compile)
    for _ in stream:
        stamps.append(time.perf_counter())
    B = len(prompts)
    assert all(len(t) == n for t in stream.tokens)
    return B * (n - 1) / (stamps[-1] - stamps[0]), B * n / (stamps[-1] - t0), stream.tokens[0]


def ct2_run(gen: object, prompts: list[list[str]], n: int) -> tuple[float, float, list[int]]:
    """The same for a ctranslate2 Generator: the callback stamps each step (step index per row)."""
    first: list[float] = []
    last: list[float] = []

    def cb(step: object) -> bool:
        if step.step == 0 and not first:
            first.append(time.perf_counter())
        if step.step == n - 1:
            last.append(time.perf_counter())
        return False

    t0 = time.perf_counter()
    res = gen.generate_batch(prompts, max_length=n, min_length=n, sampling_topk=1, beam_size=1,
                             include_prompt_in_result=False, callback=cb)
    t1 = time.perf_counter()
    B = len(prompts)
    assert all(len(r.sequences_ids[0]) == n for r in res), [len(r.sequences_ids[0]) for r in res]
    return B * (n - 1) / (max(last) - first[0]), B * n / (t1 - t0), list(res[0].sequences_ids[0])


class Ct2Process:
    """ctranslate2 in a process of its own (as a user runs it), driven one generation at a time over
    pipes so the runs stay interleaved with clusterlm's. In one process the two engines slowed each
    other: measured here, clusterlm's fp32 batch-1 decode fell from ~31 to ~24 tokens/s once a
    ctranslate2 Generator had run in the same process, and stayed there (each engine brings its own
    OpenMP runtime: torch's libgomp and ctranslate2's bundled copy)."""

    def __init__(self, ct2_dir: Path, types: dict[str, str], threads: int) -> None:
        import subprocess

        self.proc = subprocess.Popen([sys.executable, __file__, "--ct2-worker", str(ct2_dir), "--threads", str(threads),
                                      "--ct2-types", json.dumps(types)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        ready = self.proc.stdout.readline()
        if ready.strip() != "ready":
            raise RuntimeError(f"the ctranslate2 worker did not start (it said {ready!r})")

    def run(self, fmt: str, prompts: list[list[str]], n: int) -> tuple[float, float, list[int]]:
        self.proc.stdin.write(json.dumps({"format": fmt, "prompts": prompts, "n": n}) + "\n")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the ctranslate2 worker exited (code {self.proc.wait()})")
        dec, e2e, toks = json.loads(line)
        return dec, e2e, toks

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def ct2_worker(ct2_dir: str, types: dict[str, str], threads: int) -> None:
    """The worker's side of Ct2Process: one Generator per format; a JSON request per stdin line, the
    (decode, end to end, tokens) answer per stdout line."""
    import ctranslate2

    gens = {f: ctranslate2.Generator(ct2_dir, device="cpu", compute_type=t, intra_threads=threads, inter_threads=1)
            for f, t in types.items()}
    print("ready", flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        print(json.dumps(ct2_run(gens[req["format"]], req["prompts"], req["n"])), flush=True)


def accuracy_logits(ckpt: Path, prompts: list[list[int]]) -> dict[str, float]:
    """Max |logit difference| against the plain fp32 path over the prompts' every position (the
    gpt2-124m shape, random weights), for each packed format and int8; and the logits' max |value|."""
    from clusterlm.optimize.packed import pack_for_inference, set_compiled_one_row

    model = load_for_inference(ckpt).model.eval()
    idx = torch.tensor(prompts)
    with torch.inference_mode():
        ref = model(idx)
        out = {"max_abs_logit": round(ref.abs().max().item(), 4)}
        for mode in ("fp32", "bf16"):
            pack_for_inference(model, mode)
            out[f"{mode}_packed_max_abs_diff"] = round((model(idx) - ref).abs().max().item(), 6)
        # compile=True's one-row path: every Linear as inductor's fused reduction (reduce_linear) on
        # one-token rows, the way a compiled batch-1 decode step calls them
        pack_for_inference(model, "fp32")
        set_compiled_one_row(model, True)
        step = torch.compile(model, dynamic=False)
        one = idx[:, :1]
        rows = [step(one[i:i + 1]) for i in range(len(one))]
        out["fp32_compiled_reduction_max_abs_diff"] = round(
            (torch.cat(rows) - model(one)).abs().max().item(), 6)  # against eager fp32 on the same rows
        pack_for_inference(model, None)
        quantize_model(model, "int8")
        out["int8_max_abs_diff"] = round((model(idx) - ref).abs().max().item(), 6)
    return out


def check_val_args(ckpt: Path | None, data: Path | None) -> None:
    """--val-ckpt and --val-data come together, a checkpoint and a prepared data directory (refused here
    with one line: the val losses are measured last, after the whole decode comparison)."""
    from clusterlm.checkpoint.store import resolve_checkpoint
    from clusterlm.errors import ClusterlmError

    if (ckpt is None) != (data is None):
        refuse("--val-ckpt and --val-data go together: a trained checkpoint and its prepared data directory")
    if ckpt is None:
        return
    try:
        resolve_checkpoint(ckpt)
    except ClusterlmError as e:
        refuse(f"--val-ckpt {ckpt}: {e}")
    if not (data / "meta.json").is_file():
        refuse(f"--val-data {data}: not a prepared data directory (no meta.json); give the checkpoint's "
               "(clusterlm prepare ... --out DIR)")


def accuracy_val_loss(ckpt: Path, data: Path, batches: int) -> dict[str, float]:
    """Val loss of a trained checkpoint (the Shakespeare recipe) over `batches` sequential val batches:
    plain fp32, fp32 packed, bf16 packed, int8."""
    from clusterlm.data.loader import iter_eval_batches
    from clusterlm.eval.metrics import lm_loss
    from clusterlm.optimize.packed import pack_for_inference

    loaded = load_for_inference(ckpt)
    model, T = loaded.model.eval(), loaded.config.train.seq_len

    def val() -> float:
        total = n = 0.0
        with torch.inference_mode():
            for x, y in iter_eval_batches(data, "val", 64, T, max_batches=batches):
                total += lm_loss(model(x), y).item() * x.numel()
                n += x.numel()
        return round(total / n, 5)

    out = {"fp32": val()}
    for mode in ("fp32", "bf16"):
        pack_for_inference(model, mode)
        out[f"{mode}_packed"] = val()
    pack_for_inference(model, None)
    quantize_model(model, "int8")
    out["int8"] = val()
    return out


def markdown(res: dict) -> str:
    lines = ["# clusterlm against ctranslate2: decode on CPU, side by side", "",
             f"`{res['command']}`", "",
             f"{res['machine']['cpu']}, {res['threads']} threads, torch {res['torch']}, ctranslate2 "
             f"{res['ctranslate2']}; {res['preset']} shape, random weights, greedy, {res['prompt_len']}-token "
             f"prompt, {res['new_tokens']} new tokens, {res['repeats']} interleaved repeats (medians; range "
             f"in brackets). Load average (1, 5, 15 min) before {res['load_before']}, after {res['load_after']}.",
             "", "| decode tokens/s | clusterlm | ctranslate2 | clusterlm / ctranslate2 |", "|---|---|---|---|"]
    for r in res["rows"]:
        o, c = r["clusterlm"], r["ctranslate2"]
        fmt = {"bf16": "bf16 (ctranslate2: float32)", "fp32-compile": "fp32, compile=True"}.get(r["format"], r["format"])
        lines.append(f"| {fmt}, batch {r['batch']} | {o['decode_median']} ({o['decode_min']}-{o['decode_max']})"
                     f" | {c['decode_median']} ({c['decode_min']}-{c['decode_max']}) | {r['ratio_decode']}x "
                     f"(end to end {r['ratio_end_to_end']}x) |")
    b = res["bandwidth"]
    lines += ["", f"Memory bandwidth: STREAM copy {b['stream_copy_gbs']} GB/s, triad {b['stream_triad_gbs']} GB/s "
              f"read-only (sum) {b['read_sum_gbs']} GB/s ({b['stream_mib']} MiB arrays, best of every repeat); torch GEMV over a 1.07 GB matrix "
              f"{b['torch_gemv_gbs']} GB/s. fp32 weights read per token: {b['fp32_weight_bytes'] / 1e6:.0f} MB, so "
              f"fp32 batch 1 is bound by {b['fp32_batch1_bound_tokens_per_s']} tokens/s (best of the STREAM-style rates) and "
              f"{b['fp32_batch1_gemv_bound_tokens_per_s']} tokens/s (torch GEMV).", ""]
    acc = res.get("accuracy", {})
    if "gpt2_logits" in acc:
        a = acc["gpt2_logits"]
        lines.append(f"Accuracy, {res['preset']} logits against plain fp32 (max |diff|; logits up to {a['max_abs_logit']}): "
                     f"fp32 packed {a['fp32_packed_max_abs_diff']}, bf16 packed {a['bf16_packed_max_abs_diff']}, "
                     f"int8 {a['int8_max_abs_diff']}; the compiled one-row reduction against eager fp32 on one-token "
                     f"rows {a.get('fp32_compiled_reduction_max_abs_diff')}.")
    if "val_loss" in acc:
        v = acc["val_loss"]
        lines.append(f"Val loss of `{acc['val_ckpt']}` ({acc['val_batches']} batches of 64): plain fp32 {v['fp32']}, "
                     f"fp32 packed {v['fp32_packed']}, bf16 packed {v['bf16_packed']}, int8 {v['int8']}.")
    lines.append("")
    if res.get("first_tokens_equal") is not None:
        lines.append(f"First greedy tokens equal between the engines (fp32, row 0): {res['first_tokens_equal']}.")
    if res.get("first_tokens_equal_compiled") is not None:
        lines.append(f"First greedy tokens equal between the engines (fp32, compile=True, row 0): "
                     f"{res['first_tokens_equal_compiled']}.")
    warm = {f"{r['format']} b{r['batch']}": r.get("clusterlm_warmup_call_s") for r in res["rows"]}
    lines.append(f"clusterlm's warm-up call (repeat 0, not timed in the table: packing, and the compile of "
                 f"fp32-compile), seconds: {warm}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt2-124m")
    ap.add_argument("--batches", type=positive_int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--formats", nargs="+", default=["fp32", "fp32-compile", "bf16", "int8"], choices=FORMATS,
                    help="bf16: clusterlm's bf16 packed weights against ctranslate2 float32 (it has no bf16 on CPU); "
                         "fp32-compile: generate(compile=True) against ctranslate2 float32")
    ap.add_argument("--prompt-len", type=positive_int, default=16)
    ap.add_argument("--new-tokens", type=positive_int, default=48)
    ap.add_argument("--repeats", type=positive_int, default=3)
    ap.add_argument("--threads", type=positive_int, default=torch.get_num_threads())
    ap.add_argument("--stream-mib", type=positive_int, default=1024)
    ap.add_argument("--stream-repeats", type=positive_int, default=3, help="per measurement, one measurement per repeat")
    ap.add_argument("--out", type=Path, default=RESULTS / "peers_decode.json")
    ap.add_argument("--val-ckpt", type=Path, default=None,
                    help="a trained checkpoint (recipes/shakespeare_char_cpu.toml) whose val loss is measured per format")
    ap.add_argument("--val-data", type=Path, default=None, help="its prepared data directory")
    ap.add_argument("--val-batches", type=positive_int, default=50)
    ap.add_argument("--ct2-worker", default=None, help=argparse.SUPPRESS)  # Ct2Process's child
    ap.add_argument("--ct2-types", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.ct2_worker:
        torch.set_num_threads(args.threads)
        return ct2_worker(args.ct2_worker, json.loads(args.ct2_types), args.threads)
    check_val_args(args.val_ckpt, args.val_data)  # before minutes of decoding, not after them
    try:
        import ctranslate2
    except ImportError:
        refuse("peers_decode.py needs ctranslate2 (the peer it times): pip install -e '.[bench]'")

    torch.set_num_threads(args.threads)
    load_before = [round(x, 2) for x in os.getloadavg()]
    work = Path(tempfile.mkdtemp(prefix="peers_decode_"))
    ckpt = make_checkpoint(work, args.preset)
    ct2_dir, vocab = ct2_model(ckpt, work)
    fp32 = load_for_inference(ckpt).model.eval()
    models = {"fp32": fp32}
    if "bf16" in args.formats:
        models["bf16"] = load_for_inference(ckpt).model.eval()
    if "fp32-compile" in args.formats:  # a model of its own: the compiled step is cached per model
        models["fp32-compile"] = load_for_inference(ckpt).model.eval()
    if "int8" in args.formats:
        m8 = load_for_inference(ckpt).model.eval()
        quantize_model(m8, "int8")
        models["int8"] = m8
    ct2_type = {"fp32": "float32", "fp32-compile": "float32", "bf16": "float32", "int8": "int8"}
    ct2 = Ct2Process(ct2_dir, {f: ct2_type[f] for f in args.formats}, args.threads)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (max(args.batches), args.prompt_len), generator=g).tolist()  # byte-token prompts
    variants = [(eng, f, b) for f in args.formats for b in args.batches for eng in ("clusterlm", "ctranslate2")]
    got: dict[tuple, list[tuple[float, float]]] = {v: [] for v in variants}
    first_tokens: dict[tuple, list[int]] = {}
    first_call_s: dict[tuple, float] = {}  # repeat 0 (warm-up): packing, the compile of fp32-compile
    bw_runs: list[dict[str, float]] = []
    for r in range(args.repeats + 1):  # repeat 0 warms up (packing, allocations)
        for eng, f, b in variants:
            prompts = ids[:b]
            if eng == "clusterlm":
                t0 = time.perf_counter()
                dec, e2e, toks = ours_run(models[f], prompts, args.new_tokens,
                                          pack={"int8": "auto", "fp32-compile": "fp32"}.get(f, f),
                                          compile=f == "fp32-compile")
                if r == 0:
                    first_call_s[(f, b)] = round(time.perf_counter() - t0, 1)
            else:
                dec, e2e, toks = ct2.run(f, [[vocab[t] for t in p] for p in prompts], args.new_tokens)
            first_tokens[(eng, f, b)] = toks
            if r:
                got[(eng, f, b)].append((dec, e2e))
            print(f"repeat {r} {eng} {f} batch {b}: decode {dec:.1f} tokens/s, end to end {e2e:.1f}", flush=True)
        # the bandwidth too, in every repeat: other tenants share the host's memory bandwidth (it
        # measured 10-28 GB/s within minutes here), so the bound is the best seen while the engines ran
        bw_runs.append({**stream_gbs(args.stream_mib, args.stream_repeats),
                        "gemv": round(bandwidth_gbs(STREAM_ROWS, repeats=args.stream_repeats), 2)})
        print(f"repeat {r} bandwidth GB/s: {bw_runs[-1]}", flush=True)
    ct2.close()
    rows = []
    for f in args.formats:
        for b in args.batches:
            row: dict = {"format": f, "batch": b, "ctranslate2_compute_type": ct2_type[f],
                         "clusterlm_warmup_call_s": first_call_s[(f, b)]}
            for eng in ("clusterlm", "ctranslate2"):
                dec = [x[0] for x in got[(eng, f, b)]]
                e2e = [x[1] for x in got[(eng, f, b)]]
                row[eng] = {"decode": [round(x, 1) for x in dec], "decode_median": round(statistics.median(dec), 1),
                            "decode_min": round(min(dec), 1), "decode_max": round(max(dec), 1),
                            "end_to_end_median": round(statistics.median(e2e), 1)}
            row["ratio_decode"] = round(row["clusterlm"]["decode_median"] / row["ctranslate2"]["decode_median"], 2)
            row["ratio_end_to_end"] = round(row["clusterlm"]["end_to_end_median"]
                                            / row["ctranslate2"]["end_to_end_median"], 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    accuracy: dict = {"gpt2_logits": accuracy_logits(ckpt, ids[:4])}
    if args.val_ckpt is not None:
        accuracy.update(val_ckpt=str(args.val_ckpt), val_batches=args.val_batches,
                        val_loss=accuracy_val_loss(args.val_ckpt, args.val_data, args.val_batches))
    print(json.dumps(accuracy), flush=True)
    stream = {k: max(b[k] for b in bw_runs) for k in ("copy", "triad", "read")}
    gemv = max(b["gemv"] for b in bw_runs)
    nbytes = weight_bytes(fp32)
    best_bw = max(stream.values())
    b1 = next((r for r in rows if r["format"] == "fp32" and r["batch"] == 1), None)
    res = {"command": " ".join(["python", "benchmarks/peers_decode.py", *sys.argv[1:]]),
           "machine": machine(), "load_before": load_before, "threads": args.threads,
           "torch": torch.__version__, "ctranslate2": ctranslate2.__version__, "ctranslate2_process": "its own",
           "preset": args.preset,
           "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
           "first_tokens_equal": first_tokens.get(("clusterlm", "fp32", 1)) == first_tokens.get(("ctranslate2", "fp32", 1))
           if "fp32" in args.formats and 1 in args.batches else None,
           "first_tokens_equal_compiled": first_tokens.get(("clusterlm", "fp32-compile", 1))
           == first_tokens.get(("ctranslate2", "fp32-compile", 1)) if "fp32-compile" in args.formats and 1 in args.batches
           else None,
           "rows": rows, "accuracy": accuracy,
           "bandwidth": {"stream_mib": args.stream_mib, "stream_repeats": args.stream_repeats,
                         "stream_copy_gbs": stream["copy"], "stream_triad_gbs": stream["triad"],
                         "read_sum_gbs": stream["read"], "per_repeat_gbs": bw_runs,
                         "torch_gemv_gbs": round(gemv, 2), "fp32_weight_bytes": nbytes,
                         "fp32_batch1_bound_tokens_per_s": round(best_bw * 1e9 / nbytes, 1),
                         "fp32_batch1_gemv_bound_tokens_per_s": round(gemv * 1e9 / nbytes, 1),
                         "clusterlm_fp32_batch1_of_stream_bound":
                             round(b1["clusterlm"]["decode_median"] / (best_bw * 1e9 / nbytes), 3) if b1 else None,
                         "ctranslate2_fp32_batch1_of_stream_bound":
                             round(b1["ctranslate2"]["decode_median"] / (best_bw * 1e9 / nbytes), 3) if b1 else None},
           "load_after": [round(x, 2) for x in os.getloadavg()]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_result(args.out, json.dumps(res, indent=2) + "\n")
    write_result(args.out.with_suffix(".md"), markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
