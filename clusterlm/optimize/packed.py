"""Packed weights for CPU inference: the Linear layers of a model run oneDNN's inner product on
weights reordered once into its blocked layout (`torch.ops.mkldnn._reorder_linear_weight`, what
inductor's freezing uses), instead of MKL's sgemm on the plain (N, K) layout.

    from clusterlm.optimize.packed import pack_for_inference

    pack_for_inference(model)              # fp32, exact precision: packed for calls of >= 4 rows
    pack_for_inference(model, "bf16")      # bf16 weights, AMX/AVX512-BF16: every call, ~1e-2 relative error
    pack_for_inference(model, None)        # back to plain nn.Linear modules

Why (gpt2-124m's 73 weight matrices, one pass, 2 threads; docs/compression.md, "Decode step"):
MKL's sgemm streams the weights at about half its one-row rate for 2-16 rows (18.6 ms for one
row, 36.7 for 4, 66 for 16), oneDNN's packed inner product holds 24.7 / 24.7 / 39.7 ms. For one row
it depends on the CPU: on that Intel Xeon MKL's GEMV won (18.6 against 24.8 ms), on an AMD EPYC
(AVX-512) it streams at a third of the memory bandwidth and lost (44.7 against 24.0 ms). So in
"fp32" mode the default `min_rows` is measured once per process (`one_row_min_rows`: one row
through both paths on a gpt2-sized matrix; packed must win by 15%): 1 where packed wins, else 4, so
that a batch-1 decode step takes the faster path; batched decode steps, the server's slot-cache
steps and prefills always take the packed path. "bf16" keeps a bfloat16 packed copy and runs every call on it (13.2 ms for one
row, 14.2 for 16 on this AMX CPU): half the bytes per token, at the accuracy cost measured in
docs/compression.md; activations are rounded to bf16 at each Linear and the output returned in
the input's dtype (norms, attention, residuals and logits stay fp32).

Under torch.compile (generate(compile=True) on the CPU compiles the one-row decode step), a
PackedLinear computes in plain fp32 on its weights, not on the opaque packed copy inductor cannot
lower: one-row calls as a multiply-and-sum (`reduce_linear`) where a measurement finds inductor's
fused reduction faster than MKL's GEMV on this machine (`compiled_reduction_wins`; an AMD EPYC:
27 against 14 GB/s over 113 MB of weights), else F.linear.

Each module is replaced by a `PackedLinear` that holds the SAME Parameter objects (state dict
keys and tied weights unchanged), computes exactly as nn.Linear when gradients are on, and
repacks lazily when its weight is replaced or changed in place (storage pointer or version
counter moved). The packed copy costs memory: a second copy of the weights in fp32 mode (494 MB
for gpt2-124m), half a copy in bf16 mode.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from clusterlm.device import cpu_flags

MODES = ("fp32", "bf16")
MIN_ROWS = 4  # fp32 where MKL's one-row GEMV wins: one to three rows run faster through F.linear
PACKED_MARGIN = 0.85  # packed must take <= 85% of F.linear's one-row time to be used for one row


@functools.cache
def one_row_min_rows(threads: int) -> int:
    """fp32 `min_rows` for this machine at `threads` intra-op threads: 1 when oneDNN's packed inner
    product runs a one-row call in at most PACKED_MARGIN of F.linear's time (MKL's GEMV), else
    MIN_ROWS. Measured once per process and thread count on a 3072 x 768 matrix (9.4 MB, past the
    L2 cache as a decode step's weights are): best of 7 interleaved pairs of 4 calls, ~30 ms.
    Both paths compute in fp32 (within ~1e-6 of each other); only the speed differs."""
    w = torch.randn(3072, 768) * 0.02
    packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
    x = torch.randn(1, 768)
    plain_s, packed_s = _best_times(
        [lambda: F.linear(x, w), lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")],
        repeats=7, calls=4)
    return 1 if packed_s <= PACKED_MARGIN * plain_s else MIN_ROWS


def _best_times(fns: list, repeats: int, calls: int) -> list[float]:
    """Each function's best time for `calls` calls in a row, over `repeats` interleaved rounds (each
    timed batch after one untimed call), without gradients: the two measurements above."""
    import time

    best = [float("inf")] * len(fns)
    with torch.no_grad():
        for _ in range(repeats):
            for i, fn in enumerate(fns):
                fn()
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn()
                best[i] = min(best[i], time.perf_counter() - t0)
    return best


def reduce_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x W^T + b written as a multiply-and-sum over the last dimension. For compiled code only:
    inductor fuses it into one vectorized, multi-threaded reduction that reads each weight once (a
    GEMV generated for this shape), where eager PyTorch would materialize the (rows, out, in)
    product. Same fp32 math as F.linear, another summation order (differences ~1e-6 relative)."""
    y = (x.unsqueeze(-2) * weight).sum(-1)
    return y if bias is None else y + bias


@functools.cache
def compiled_reduction_wins(threads: int) -> bool:
    """Whether inductor's compiled `reduce_linear` runs one-row calls in at most PACKED_MARGIN of
    F.linear's time (MKL's GEMV) at `threads` intra-op threads: measured once per process and thread
    count over 12 matrices of 3072 x 768 (113 MB, past the last-level cache as a decode step's
    weights are), best of 5 interleaved pairs; compiling the kernel takes a few seconds (cached on
    disk by inductor), so only `generate(compile=True)` asks. Measured: an AMD EPYC (2 threads)
    12.5 against 23.1 ms, so True there."""
    kernel = torch.compile(reduce_linear, dynamic=False)
    ws = [torch.randn(3072, 768) * 0.02 for _ in range(12)]
    x = torch.randn(1, 768)
    caller = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        compiled_s, plain_s = _best_times([lambda: [kernel(x, w, None) for w in ws],
                                           lambda: [F.linear(x, w) for w in ws]], repeats=5, calls=1)
    finally:
        torch.set_num_threads(caller)
    return compiled_s <= PACKED_MARGIN * plain_s


def set_compiled_one_row(model: nn.Module, reduce: bool) -> int:
    """Tell every PackedLinear of `model` whether its one-row calls under torch.compile take
    `reduce_linear` (True) or F.linear; returns the number of modules told."""
    n = 0
    for mod in model.modules():
        if type(mod) is PackedLinear:
            mod.reduce_when_compiled = reduce
            n += 1
    return n


def packing_unavailable() -> str | None:
    """Why oneDNN packed linears cannot run here, or None when they can."""
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (mkldnn)"
    return None


def bf16_unavailable() -> str | None:
    """Why bf16 packing would be slow or unsupported here (no AVX512-BF16/AMX), or None."""
    if packing_unavailable():
        return packing_unavailable()
    flags = cpu_flags()
    if flags is None:
        return "cannot read /proc/cpuinfo to check for AVX512-BF16 or AMX"
    if not flags & {"avx512_bf16", "amx_bf16"}:
        return "the CPU has neither AVX512-BF16 nor AMX-BF16; bf16 matmuls would be emulated"
    return None


class PackedLinear(nn.Linear):
    """nn.Linear over the same parameters whose gradient-free CPU calls run oneDNN's packed
    inner product (see the module docstring); `mode` "fp32" or "bf16"."""

    def __init__(self, lin: nn.Linear, mode: str = "fp32", min_rows: int | None = MIN_ROWS) -> None:
        nn.Module.__init__(self)
        if mode not in MODES:
            raise ValueError(f"packing mode {mode!r}; expected one of {', '.join(MODES)}")
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.weight = lin.weight  # the same Parameter: tied and shared weights stay so
        self.bias = lin.bias
        self.mode, self.min_rows = mode, _min_rows(mode, min_rows)
        self._packed: tuple[tuple, torch.Tensor, torch.Tensor | None] | None = None
        self.reduce_when_compiled = False  # set_compiled_one_row

    def _key(self) -> tuple:
        ts = [self.weight] if self.bias is None else [self.weight, self.bias]
        # inference tensors have no version counter: their storage pointer alone identifies them
        return tuple((t.data_ptr(), None if t.is_inference() else t._version) for t in ts) + (self.mode,)

    def packed(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(packed weight, bias) in the mode's dtype, rebuilt when the weights changed."""
        key = self._key()
        if self._packed is None or self._packed[0] != key:
            dtype = torch.bfloat16 if self.mode == "bf16" else self.weight.dtype
            with torch.no_grad():
                w = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach().to(dtype), None)
                b = None if self.bias is None else self.bias.detach().to(dtype)
            self._packed = (key, w, b)
        return self._packed[1], self._packed[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # plain fp32 on the weights: inductor cannot lower the packed copy
            if self.reduce_when_compiled and x.numel() == self.in_features and self.mode == "fp32":
                return reduce_linear(x, self.weight, self.bias)
            return F.linear(x, self.weight, self.bias)
        if (torch.is_grad_enabled() or x.device.type != "cpu" or x.numel() < self.min_rows * self.in_features
                or type(self.weight.data) is not torch.Tensor or self.weight.dtype not in _DTYPES):
            return F.linear(x, self.weight, self.bias)
        w, b = self.packed()
        y = torch.ops.mkldnn._linear_pointwise(x.to(w.dtype), w, b, "none", [], "")
        return y.to(x.dtype)

    # The packed copy is per-process inference state (an opaque oneDNN tensor, no storage): a deep
    # copy or a pickle (torch.save) of a packed model holds plain nn.Linear modules over copies of
    # the parameters, which a LoRA adapter can wrap (the server clones its base model for one) and
    # whose user packs again if wanted.
    def __deepcopy__(self, memo: dict) -> nn.Linear:
        import copy

        return copy.deepcopy(_plain(self), memo)

    def __reduce_ex__(self, protocol):  # type: ignore[no-untyped-def]
        return _rebuild_linear, (self.in_features, self.out_features, self.weight, self.bias, self.training)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, packed={self.mode}, min_rows={self.min_rows}"


_DTYPES = (torch.float32, torch.bfloat16)  # what oneDNN's CPU inner product takes here


def _plain(mod: nn.Linear) -> nn.Linear:
    """An nn.Linear over mod's parameters (the same Parameter objects), its hooks not carried."""
    return _rebuild_linear(mod.in_features, mod.out_features, mod.weight, mod.bias, mod.training)


def _rebuild_linear(in_features: int, out_features: int, weight: nn.Parameter, bias: nn.Parameter | None,
                    training: bool) -> nn.Linear:
    """Unpickling a PackedLinear: a plain nn.Linear over the unpickled parameters."""
    plain = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(plain)
    plain.in_features, plain.out_features, plain.weight, plain.bias = in_features, out_features, weight, bias
    plain.train(training)
    return plain


def _packable(mod: nn.Module) -> bool:
    w = mod.weight
    return type(w.data) is torch.Tensor and w.device.type == "cpu" and w.dtype in _DTYPES


def _min_rows(mode: str, min_rows: int | None) -> int:
    """The row count from which a call takes the packed path: every call in bf16 mode; in fp32 mode
    `min_rows`, or where None this machine's measured choice (one_row_min_rows)."""
    if mode == "bf16":
        return 1
    return one_row_min_rows(torch.get_num_threads()) if min_rows is None else min_rows


def pack_for_inference(model: nn.Module, mode: str | None = "fp32", min_rows: int | None = None) -> int:
    """Replace every plain nn.Linear of `model` on the CPU by a PackedLinear in `mode` over the same
    parameters (None: back to nn.Linear). fp32 calls of fewer than `min_rows` rows keep F.linear;
    None measures which path is faster for one row on this machine (one_row_min_rows). Quantized
    layers, DTensor shards and other devices are left alone. A second call with the same mode is a
    cheap no-op. Returns the number of packed modules. Raises ValueError where oneDNN is missing."""
    if mode is not None:
        if mode not in MODES:
            raise ValueError(f"packing mode {mode!r}; expected one of {', '.join(MODES)} or None")
        problem = packing_unavailable()
        if problem:
            raise ValueError(f"cannot pack weights: {problem}")
    n = 0
    for name, mod in list(model.named_modules()):
        is_packed = type(mod) is PackedLinear
        if not (is_packed or type(mod) is nn.Linear) or not _packable(mod):
            continue
        if mode is not None and is_packed and (mod.mode, mod.min_rows) == (mode, _min_rows(mode, min_rows)):
            n += 1
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if mode is None:
            setattr(parent, attr, _plain(mod))
        else:
            setattr(parent, attr, PackedLinear(mod, mode, min_rows))
            n += 1
    return n
