"""Weight-only quantized layers: nn.Linear -> Int8Linear (per output channel) or Int4Linear (group-wise).

    names = quantize_model(model, "int4", group_size=128)             # values from the float weights
    quantize_model(model, q["method"], group_size=q["group_size"], modules=q["modules"], empty=True)
    model.load_state_dict(quantized_weights)                          # a quantized checkpoint's

The module types and their state-dict format, with no checkpoint I/O: the checkpoint loader
(clusterlm.checkpoint.model_io) rebuilds these modules before loading quantized weights, and
`clusterlm quantize` (clusterlm.optimize.quantize) makes them from a float checkpoint.

The matmuls run on torch's low-precision kernels, never on a dequantized copy of the model:
- int8: symmetric per-output-channel scales. On x86 CPUs fbgemm's int8 GEMM (activations rounded to
  int8 per call with a dynamic scale: see Int8Linear); else `aten._weight_int8pack_mm(x, W_int8
  (N, K), scales (N,))` with float activations (weight-only).
- int4: asymmetric per-group (group of `group_size` input channels) scale and zero point, the
  gpt-fast layout: q in [0, 15], w ~= (q - 8) * scale + zero; on CPU
  `aten._weight_int4pack_mm_for_cpu` on the packed layout of `_convert_weight_to_int4pack_for_cpu`
  with bfloat16 activations and scales (its vectorized path: torch 2.13 runs float32 inputs through
  a much slower scalar loop; see Int4Linear), on CUDA `aten._weight_int4pack_mm` (bf16
  activations). Where no kernel applies (other devices), the layer dequantizes its own weight for
  each call (one layer at a time, never the whole model).

Every Linear in the blocks and the output projection are quantized; the token (and position)
embeddings stay float32: a lookup reads one row per token, so quantizing them saves disk but no
decode time. A tied output becomes an untied quantized copy (the embedding keeps the fp32 table).
A Linear whose input width is not a multiple of the int4 group size stays float32 (logged).

State dict: `*.weight_int8` + `*.scales`, or `*.weight_int4` (nibbles, two per byte, plain
row-major) + `*.scales_and_zeros`. The kernel-specific int4 packing is made at load time for the
device.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

METHODS = ("int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)


# ---- int8 ------------------------------------------------------------------------------------------------
def _fbgemm_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines or "x86" in torch.backends.quantized.supported_engines


class Int8Linear(nn.Module):
    """y ~= x @ (W_int8 * scales[:, None]).T + b, with per-output-channel float32 scales.

    Two CPU paths over the same stored weights (chosen per module by `activation_int8`):
    - False (weight-only): `aten._weight_int8pack_mm`, float32 activations; exact up to float
      rounding against the dequantized weight, but torch 2.13's CPU kernel is slower than the fp32
      GEMV for batch-1 decode (benchmarks/generate_speed.py).
    - True (default where fbgemm/x86 quantized kernels exist): fbgemm's int8 GEMM
      (`quantized.linear_dynamic`), which also rounds each input row set to int8 with one dynamic
      scale (reduce_range, 7-bit, as torch's dynamic quantization does on x86): a small extra
      relative error per layer on top of the weight rounding, and several times faster than fp32 at
      batch 1 (numbers: docs/compression.md).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, device: torch.device | str | None = None,
                 activation_int8: bool | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.activation_int8 = _fbgemm_available() if activation_int8 is None else activation_int8
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)
        self._packed: object | None = None  # fbgemm packed weight, made on first use

    @classmethod
    @torch.no_grad()
    def from_linear(cls, lin: nn.Linear, activation_int8: bool | None = None) -> Int8Linear:
        w = lin.weight.detach().float()
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, device=w.device,
                activation_int8=activation_int8)
        scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (N,)
        m.weight_int8.copy_(torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8))
        m.scales.copy_(scales)
        if lin.bias is not None:
            m.bias.copy_(lin.bias.detach().float())
        return m

    def dequantized(self) -> torch.Tensor:
        return self.weight_int8.float() * self.scales[:, None]  # (N, K)

    def _fbgemm_weight(self) -> object:
        if self._packed is None:
            import warnings

            with warnings.catch_warnings():  # quantized tensor creation is marked deprecated in 2.13
                warnings.simplefilter("ignore")
                zeros = torch.zeros(self.out_features, dtype=torch.long)
                qw = torch._make_per_channel_quantized_tensor(self.weight_int8.cpu(), self.scales.double().cpu(),
                                                              zeros, 0)
                b = self.bias.float().cpu() if self.bias is not None else None
                self._packed = torch.ops.quantized.linear_prepack(qw, b)
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (B*T, K)
        dev = x2.device.type
        if dev == "cpu" and self.activation_int8:
            y = torch.ops.quantized.linear_dynamic(x2.float().contiguous(), self._fbgemm_weight(), True)
            return y.to(x.dtype).reshape(*shape[:-1], self.out_features)  # bias applied inside
        if dev in ("cpu", "cuda"):
            y = torch.ops.aten._weight_int8pack_mm(x2.to(self.scales.dtype).contiguous(), self.weight_int8,
                                                  self.scales)  # (B*T, N)
        else:  # no kernel: this layer's weight only, dequantized per call
            y = F.linear(x2.float(), self.dequantized())
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        self._packed = None
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self._packed = None  # new weights: repack on next use
        return super()._load_from_state_dict(*args, **kwargs)


# ---- int4 ------------------------------------------------------------------------------------------------
def _group_qparams(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q (N, K) int32 in [0, 15], scales_and_zeros (K/G, N, 2)) for w (N, K); gpt-fast's scheme."""
    N, K = w.shape
    g = w.reshape(N, K // group_size, group_size)  # (N, K/G, G)
    lo, hi = g.amin(dim=-1, keepdim=True), g.amax(dim=-1, keepdim=True)
    scale = ((hi - lo).clamp(min=1e-6) / 15.0)  # (N, K/G, 1)
    q = torch.round((g - lo) / scale).clamp(0, 15).to(torch.int32).reshape(N, K)
    zero = lo + 8.0 * scale  # w = (q - 8) * scale + zero
    sz = torch.cat([scale, zero], dim=-1).transpose(0, 1).contiguous()  # (K/G, N, 2)
    return q, sz


class Int4Linear(nn.Module):
    """Group-wise asymmetric int4 weights (gpt-fast layout); see the module docstring.

    `activation_bf16` (CPU; default True): run torch's int4 CPU kernel on bfloat16 activations and
    bfloat16 scales/zeros, its vectorized (AVX-512) path, faster than the fp32 GEMV at batch 1, at a
    small relative error per layer from rounding the activations to bfloat16. False: float32
    activations, exact against the dequantized weight, but torch 2.13 runs that case through a
    scalar loop, slower than fp32 (measurements: docs/compression.md)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int,
                 device: torch.device | str | None = None, activation_bf16: bool = True) -> None:
        super().__init__()
        self.activation_bf16 = activation_bf16
        if in_features % group_size or in_features % 2:
            raise ValueError(f"int4: in_features={in_features} is not a multiple of group_size={group_size}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        # two 4-bit values per byte: low nibble = even input channel, high nibble = odd one
        self.register_buffer("weight_int4", torch.zeros(out_features, in_features // 2, dtype=torch.uint8,
                                                        device=device))
        self.register_buffer("scales_and_zeros", torch.zeros(in_features // group_size, out_features, 2,
                                                             device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)
        # kernel layout (weight, scales_and_zeros), made on first use for the device it runs on
        self._packed: tuple[tuple[torch.device, bool], tuple[torch.Tensor, torch.Tensor]] | None = None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, lin: nn.Linear, group_size: int, activation_bf16: bool = True) -> Int4Linear:
        w = lin.weight.detach().float()
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, group_size, device=w.device,
                activation_bf16=activation_bf16)
        q, sz = _group_qparams(w, group_size)
        m.weight_int4.copy_((q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8))
        m.scales_and_zeros.copy_(sz)
        if lin.bias is not None:
            m.bias.copy_(lin.bias.detach().float())
        return m

    def _q(self) -> torch.Tensor:
        b = self.weight_int4.to(torch.int32)
        return torch.stack([b & 0xF, b >> 4], dim=-1).reshape(self.out_features, self.in_features)  # (N, K)

    def dequantized(self) -> torch.Tensor:
        scale = self.scales_and_zeros[..., 0].t().repeat_interleave(self.group_size, dim=1)  # (N, K)
        zero = self.scales_and_zeros[..., 1].t().repeat_interleave(self.group_size, dim=1)
        return (self._q().float() - 8.0) * scale + zero

    def _kernel_weight(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(packed weight, scales_and_zeros), rows padded to a multiple of 16 as the CPU kernel needs."""
        if self._packed is None or self._packed[0] != (device, self.activation_bf16):
            q, sz = self._q(), self.scales_and_zeros
            pad = -self.out_features % 16
            if pad:  # padded rows: q = 8, scale 0, zero 0 -> weight 0; sliced off after the matmul
                q = torch.cat([q, torch.full((pad, self.in_features), 8, dtype=q.dtype, device=q.device)])
                sz = torch.cat([sz, torch.zeros(sz.shape[0], pad, 2, dtype=sz.dtype, device=sz.device)], dim=1)
            if device.type == "cpu":
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
                if self.activation_bf16:
                    sz = sz.to(torch.bfloat16)
            else:  # CUDA: uint8 (N, K/2) with the high nibble first, inner_k_tiles=8
                u = ((q[:, 0::2] << 4) | q[:, 1::2]).to(torch.uint8)
                packed = torch.ops.aten._convert_weight_to_int4pack(u.contiguous(), 8)
                sz = sz.to(torch.bfloat16)
            self._packed = ((device, self.activation_bf16), (packed, sz.contiguous()))
        return self._packed[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (B*T, K)
        dev = x2.device
        if dev.type == "cpu":
            w, sz = self._kernel_weight(dev)
            x2 = x2.to(sz.dtype).contiguous()  # bfloat16 with activation_bf16, else float32
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, w, self.group_size, sz).float()
        elif dev.type == "cuda":
            w, sz = self._kernel_weight(dev)
            y = torch.ops.aten._weight_int4pack_mm(x2.to(torch.bfloat16).contiguous(), w, self.group_size,
                                                   sz).float()
        else:
            y = F.linear(x2.float(), self.dequantized())
        y = y[:, : self.out_features]  # (B*T, N) without the padded rows
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        self._packed = None  # moved or converted: repack on next use
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self._packed = None
        return super()._load_from_state_dict(*args, **kwargs)


# ---- whole models ------------------------------------------------------------------------------------------
def quantizable(model: nn.Module, method: str, group_size: int, keep_output: bool = False) -> list[str]:
    """Names of the Linear modules `quantize_model` would replace. `keep_output` keeps every language
    model's output projection: the model's own `output`, or a classifier's `backbone.output` (and a
    bidirectional one's `reverse.output`)."""
    names = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or (keep_output and name.rpartition(".")[2] == "output"):
            continue
        if method == "int4" and mod.in_features % group_size:
            log.info("int4: %s keeps float32 weights (in_features=%d is not a multiple of group_size=%d)",
                     name, mod.in_features, group_size)
            continue
        names.append(name)
    return names


def quantize_model(model: nn.Module, method: str, *, group_size: int = 128, modules: list[str] | None = None,
                   keep_output: bool = False, empty: bool = False) -> list[str]:
    """Replace Linear modules of `model` in place; returns their names. `empty=True` builds the
    quantized modules without computing their values (a checkpoint's state dict is loaded next)."""
    if method not in METHODS:
        raise ValueError(f"quantization method {method!r}; expected one of {', '.join(METHODS)}")
    if method == "int4" and group_size not in GROUP_SIZES:
        raise ValueError(f"int4 group_size={group_size}; the kernels support {', '.join(map(str, GROUP_SIZES))}")
    names = quantizable(model, method, group_size, keep_output) if modules is None else list(modules)
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        lin = getattr(parent, attr)
        if not isinstance(lin, nn.Linear):
            raise ValueError(f"module {name!r} is {type(lin).__name__}, not nn.Linear; cannot quantize it")
        dev = lin.weight.device
        if method == "int8":
            new = Int8Linear(lin.in_features, lin.out_features, lin.bias is not None, dev) if empty \
                else Int8Linear.from_linear(lin)
        else:
            new = Int4Linear(lin.in_features, lin.out_features, lin.bias is not None, group_size, dev) if empty \
                else Int4Linear.from_linear(lin, group_size)
        setattr(parent, attr, new)
    cfg = getattr(model, "config", None)
    if "output" in names and cfg is not None and getattr(cfg, "tie_embeddings", False):
        # the output is now its own quantized copy; the model must not re-tie it on .to()/to_empty()
        model.config = dataclasses.replace(cfg, tie_embeddings=False)
    return names


def quantized_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict to save: tensors on CPU, aliases of one tensor kept once by the store."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}
