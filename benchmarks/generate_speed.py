"""Batch-1 decode speed of the gpt2-124m architecture (random weights) against transformers'
generate() on the same weights in the same run, and against the memory-bandwidth bound.

    .venv/bin/python benchmarks/generate_speed.py            # writes benchmarks/results/generate_speed.json
    .venv/bin/python benchmarks/generate_speed.py --new-tokens 32 --repeats 2   # quicker
    python benchmarks/generate_speed.py --device cuda --dtype bfloat16 --compile
        # on a GPU: bf16 against the HBM bound; writes results/generate_speed_cuda_bfloat16.json

Decode tokens/s: the interval between consecutive new tokens, timed per token (clusterlm: each step
of the stream; generate(): a streamer's put() calls), prefill and first token left out, greedy, no
eos, pooled over `repeats` runs after a warm-up run; the variants are interleaved (each repeat runs every
variant once) so they share the machine's load. Reported as 1/median interval (typical) and
1/min interval (least disturbed: the machine is shared with other jobs, so the median can be far
off on a busy machine); ratios use the median unless --ratio best.

GEMV chain: the fp32 model's matrix-vector products alone, back to back (no attention, norms or
Python), timed in the same run: how close to the bound the matmuls themselves get.

Bound: bytes of weights read per decode token (every Linear in the blocks + the output projection;
the embedding lookups read one row each) / bandwidth, where bandwidth is measured here with a
float32 matrix-vector product over a 1.07 GB matrix (349525 x 768), best of 5, before and after
the timings, and the higher of the two taken ("bandwidth_gbs_bound"): larger than the CPU's
last-level cache, as a decode step's 494 MB of weights are. The earlier yardstick, the
50257 x 768 output-projection shape (154 MB, best of 20), is still reported
("bandwidth_gbs_output_matrix", "fraction_of_output_matrix_bound"): a matrix that small is re-read
partly from a large L3 (480 MB on the VM measured here), which inflated the bound by up to 1.5x
from run to run (30-45 GB/s), beyond what the model's own matrix-vector products reach.
For int8/int4 the bytes are the quantized weights plus their scales (and zero points). int8 runs
fbgemm's int8 GEMM (activations rounded to int8 per call), int4 torch's int4 CPU kernel on bfloat16
activations (clusterlm.optimize.quantize).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from clusterlm.generate.engine import generate
from clusterlm.models.build import build_model
from clusterlm.models.config import get_preset
from clusterlm.models.convert import config_to_hf, state_to_hf
from clusterlm.optimize.quantize import quantize_model
from common import cpu_model, positive_int, write_result  # benchmarks/common.py

OUT = Path(__file__).parent / "results" / "generate_speed.json"


STREAM_ROWS = 349_525  # x 768 fp32 = 1.07 GB: larger than any L3 (this VM reports 480 MB), so read from DRAM


def bandwidth_gbs(rows: int = 50257, repeats: int = 20, device: str = "cpu", dtype: torch.dtype = torch.float32
                  ) -> float:
    """GB/s streamed by a (rows, 768) matrix-vector product in `dtype` on `device`, best of `repeats`."""
    w = torch.randn(rows, 768, device=device, dtype=dtype)
    x = torch.randn(768, device=device, dtype=dtype)
    for _ in range(3):
        torch.mv(w, x)
    best = min(_timed(lambda: torch.mv(w, x), device) for _ in range(repeats))
    return w.numel() * w.element_size() / best / 1e9


def gemv_chain_s(model: torch.nn.Module, repeats: int = 20) -> float:
    """Seconds for one pass of torch.mv over every Linear weight of the model in decode order (the
    blocks' wq wk wv wo w1 w2, then the output), nothing else: what a decode step would take if it
    were only its matrix-vector products. Median of `repeats` passes after a warm-up pass."""
    ws = [m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    xs = {w.shape[1]: torch.randn(w.shape[1], device=w.device, dtype=w.dtype) for w in ws}

    def chain() -> None:
        for w in ws:
            torch.mv(w, xs[w.shape[1]])

    with torch.inference_mode():
        chain()
        times = sorted(_timed(chain, ws[0].device.type) for _ in range(repeats))
    return times[len(times) // 2]


def _timed(fn, device: str = "cpu") -> float:  # type: ignore[no-untyped-def]
    """Seconds fn() takes; on a GPU its queued kernels are waited for before and after."""
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes read per decode token: every parameter/buffer of the Linear-like modules (blocks + output)."""
    total = 0
    for name, mod in model.named_modules():
        if name.startswith("layers.") or name == "output":
            if name.count(".") == 3 or name == "output":  # layers.i.attention.wq etc.
                total += sum(t.numel() * t.element_size() for t in mod.state_dict().values())
    return total


def _rates(intervals: list[float]) -> dict[str, float]:
    """tokens/s from per-token decode intervals: median (typical) and best (least disturbed)."""
    xs = sorted(intervals)
    return {"median": 1.0 / xs[len(xs) // 2], "best": 1.0 / xs[0]}


def ours_run(model: torch.nn.Module, prompt: list[int], n: int, compile_: bool = False) -> list[float]:
    """Per-token intervals of one greedy clusterlm generation; the first step (prefill) is left out."""
    stamps = []
    for _ in generate(model, [prompt], max_new_tokens=n, temperature=0.0, compile=compile_):
        stamps.append(time.perf_counter())
    return [b - a for a, b in zip(stamps, stamps[1:])]


class _Stamps:
    """A transformers streamer that records when each new token arrives."""

    def __init__(self) -> None:
        self.t: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.t.append(time.perf_counter())

    def end(self) -> None:
        pass


def hf_run(hf: torch.nn.Module, prompt: list[int], n: int) -> list[float]:
    """Per-token intervals of one greedy transformers generate(); prompt and first token left out."""
    st = _Stamps()
    with torch.inference_mode():
        out = hf.generate(torch.tensor([prompt], device=hf.device), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          pad_token_id=0, streamer=st)
    assert out.shape[1] == len(prompt) + n
    return [b - a for a, b in zip(st.t[1:], st.t[2:])]  # st.t[0] is the prompt, st.t[1] the first token


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=positive_int, default=64)
    ap.add_argument("--repeats", type=positive_int, default=5)
    ap.add_argument("--threads", type=positive_int, default=torch.get_num_threads())
    ap.add_argument("--ratio", choices=["median", "best"], default="median",
                    help="which per-token rate the ratios and bound fractions use")
    ap.add_argument("--compile", action="store_true", help="also time the torch.compile'd decode step")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="the weights' and activations' dtype for generate() and clusterlm (int8/int4 rows: "
                         "their own formats)")
    ap.add_argument("--out", type=Path, default=None,
                    help=f"default {OUT} for cpu float32, else generate_speed_DEVICE_DTYPE.json beside it")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is visible to torch here")
    if args.out is None:
        args.out = OUT if (args.device, args.dtype) == ("cpu", "float32") else \
            OUT.with_name(f"generate_speed_{args.device}_{args.dtype}.json")
    torch.set_num_threads(args.threads)
    import transformers

    dev, dtype, label = args.device, getattr(torch, args.dtype), {"float32": "fp32", "bfloat16": "bf16"}[args.dtype]
    cfg = get_preset("gpt2-124m")
    model = build_model(cfg)
    model.init_weights(0)
    model.eval()
    hf_cfg = transformers.GPT2Config(**{k: v for k, v in config_to_hf(cfg, 50256, 50256).items()
                                        if k not in ("architectures", "model_type", "dtype")})
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    missing, unexpected = hf.load_state_dict(state_to_hf(model.state_dict(), cfg), strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
    hf.tie_weights()
    model.to(dev, dtype)
    hf.to(dev, dtype)
    prompt = list(range(100, 116))
    with torch.inference_mode():
        idx = torch.tensor([prompt], device=dev)
        diff = (model(idx) - hf(idx).logits.float()).abs().max().item()  # same weights: same logits
    load_before = [round(x, 2) for x in os.getloadavg()]
    bw_out = bandwidth_gbs(device=dev, dtype=dtype)
    bw = bandwidth_gbs(STREAM_ROWS, repeats=5, device=dev, dtype=dtype)
    machine = torch.cuda.get_device_name() if dev == "cuda" else platform.processor() or platform.machine()
    results: dict = {"command": " ".join(["python", "benchmarks/generate_speed.py", *sys.argv[1:]]),
                     "load_average_before_1_5_15_min": load_before, "machine": machine, "cpu": cpu_model(),
                     "threads": args.threads,
                     "device": dev, "dtype": args.dtype,
                     "torch": torch.__version__, "transformers": transformers.__version__,
                     "new_tokens": args.new_tokens, "repeats": args.repeats, "bandwidth_gbs": round(bw, 2),
                     "bandwidth_gbs_output_matrix": round(bw_out, 2),
                     "same_logits_max_abs_diff": diff, "rows": []}
    bytes_float = weight_bytes(model)
    results["ratio_basis"] = args.ratio
    hf_name = f"transformers generate() {label}"
    runners = {hf_name: (lambda: hf_run(hf, prompt, args.new_tokens), bytes_float)}
    variants = [(f"clusterlm {label}", None, False)]
    if args.compile:
        variants.append((f"clusterlm {label} compiled", None, True))
    variants += [("clusterlm int8", "int8", False), ("clusterlm int4 (group 128)", "int4", False)]
    errors: dict[str, str] = {}
    for name, method, comp in variants:
        m = model
        if method is not None:
            m = build_model(cfg)
            m.load_state_dict(model.state_dict())
            m.to(dev).eval()  # quantized from float32 weights: the int8/int4 rows do not depend on --dtype
            try:
                quantize_model(m, method, group_size=128)
            except (RuntimeError, NotImplementedError, ValueError) as e:  # a format this device has no kernel for
                errors[name] = f"{type(e).__name__}: {e}"[:500]
                print(f"{name}: skipped, {errors[name]}", file=sys.stderr)
                continue
        runners[name] = ((lambda m=m, comp=comp: ours_run(m, prompt, args.new_tokens, comp)), weight_bytes(m))
    # interleaved: each repeat runs every variant once, so all of them see the same machine load
    intervals: dict[str, list[float]] = {name: [] for name in runners}
    for r in range(args.repeats + 1):  # repeat 0 warms up (and compiles)
        for name, (fn, _) in list(runners.items()):
            try:
                got = fn()
            except (RuntimeError, NotImplementedError, ValueError) as e:  # e.g. no int4 kernel on this device
                if r:
                    raise
                errors[name] = f"{type(e).__name__}: {e}"[:500]
                del runners[name]
                print(f"{name}: skipped, {errors[name]}", file=sys.stderr)
                continue
            if r:
                intervals[name] += got
    results["skipped_variants"] = errors
    chain = gemv_chain_s(model)
    bw_after, bw_out_after = bandwidth_gbs(STREAM_ROWS, repeats=5, device=dev, dtype=dtype), bandwidth_gbs(device=dev, dtype=dtype)
    # the bound takes the higher of the two measurements: other tenants of the machine share its
    # memory bandwidth, and one measurement alone swung 27.5-29.3 GB/s between runs
    bw, bw_out = max(bw, bw_after), max(bw_out, bw_out_after)
    results.update(bandwidth_gbs_after=round(bw_after, 2), bandwidth_gbs_output_matrix_after=round(bw_out_after, 2),
                   bandwidth_gbs_bound=round(bw, 2), bandwidth_gbs_output_matrix_bound=round(bw_out, 2))
    hf_tps = _rates(intervals[hf_name])[args.ratio]
    for name, (_, nbytes) in runners.items():
        rates = _rates(intervals[name])
        bound = bw * 1e9 / nbytes
        row = {"name": name, "tokens_per_s": round(rates[args.ratio], 2),
               "tokens_per_s_median": round(rates["median"], 2), "tokens_per_s_best": round(rates["best"], 2),
               "weight_bytes_per_token": nbytes, "bound_tokens_per_s": round(bound, 2),
               "fraction_of_bound": round(rates[args.ratio] / bound, 3),
               "fraction_of_output_matrix_bound": round(rates[args.ratio] / (bw_out * 1e9 / nbytes), 3),
               f"vs_generate_{label}": round(rates[args.ratio] / hf_tps, 2)}
        results["rows"].append(row)
        print(json.dumps(row))
    results["gemv_chain"] = {"note": f"torch.mv over the {label} model's Linear weights alone, per token (median)",
                             "ms": round(chain * 1e3, 2), "tokens_per_s": round(1 / chain, 2),
                             "fraction_of_bound": round(1 / chain / (bw * 1e9 / bytes_float), 3)}
    results["load_average_1_5_15_min"] = [round(x, 2) for x in os.getloadavg()]  # > threads: shared machine
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_result(args.out, json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
