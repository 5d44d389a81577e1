"""The language-model loss and what is derived from it: perplexity, bits per byte, held-out loss.

    >>> perplexity(0.0), round(bits_per_byte(total_loss_nats=math.log(2) * 8, total_bytes=8), 12)
    (1.0, 1.0)

`lm_loss` is the one loss used by training and evaluation (cross-entropy in fp32, whatever the
autocast dtype of the logits). Bits per byte compares models with different tokenizers:

    bits_per_byte = total_nats / (ln 2 * total_bytes)

where total_nats = mean loss per token * tokens evaluated, and total_bytes = UTF-8 bytes of the
text those tokens encode. When only a subset of a split is evaluated, total_bytes is estimated as
tokens * (split bytes / split tokens) from the data directory's meta.json: exact for the whole
split, an average-rate estimate for a subset.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100  # targets equal to this are not scored (F.cross_entropy's default)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy in nats. logits (B, T, V) in any dtype, targets (B, T) int64.

    The logits are upcast to fp32 first: a bf16 log-softmax over a large vocabulary loses digits.
    Targets equal to IGNORE_INDEX are skipped. `reduction` is "mean" (per scored token) or "sum".
    Logits (1, N, V) of a model that computed them only at the N labelled positions (the masked-LM
    encoder with `predict`, data/mlm.predicting) are scored against those targets, in row-major order.
    """
    if logits.ndim == 3 and logits.shape[0] == 1 and targets.ndim == 2 and targets.shape != logits.shape[:2]:
        targets = targets[targets != IGNORE_INDEX].unsqueeze(0)  # (1, N)
    if logits.ndim != 3 or targets.shape != logits.shape[:2]:
        raise ValueError(f"lm_loss: logits {tuple(logits.shape)} must be (B, T, V) and targets "
                         f"{tuple(targets.shape)} must be (B, T)")
    V = logits.size(-1)
    return F.cross_entropy(logits.float().reshape(-1, V), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction=reduction)


def perplexity(mean_loss_nats: float) -> float:
    """exp(mean loss per token); inf when that overflows a float."""
    try:
        return math.exp(mean_loss_nats)
    except OverflowError:
        return math.inf


def bits_per_byte(total_loss_nats: float, total_bytes: float) -> float:
    """Total loss over the evaluated tokens (nats) -> bits per UTF-8 byte of the text they encode."""
    if not total_bytes > 0:
        raise ValueError(f"total_bytes={total_bytes} must be > 0")
    return total_loss_nats / (math.log(2) * total_bytes)


@torch.no_grad()
def evaluate_loss(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
                  device: torch.device | str, autocast_dtype: torch.dtype | None = None) -> dict[str, float | int]:
    """Mean next-token loss of `model` over `batches` of (x, y), each (B, T) token ids (x may be a
    tuple of inputs with a `.to`: data/seq2seq.py Inputs; y: labels, IGNORE_INDEX not scored).

    Returns {"loss": mean nats per scored token, "loss_sum": total nats, "tokens": scored tokens,
    "perplexity": exp(loss), "batches": n}. The sum is accumulated in fp64 on the device (one host
    sync at the end). The model is put in eval mode and its previous mode restored afterwards.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    tokens = torch.zeros((), dtype=torch.int64, device=device)
    n_batches = 0
    try:
        for x, y in batches:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            amp = (torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype is not None
                   else contextlib.nullcontext())
            with amp:  # a tuple x is several inputs: an encoder-decoder's (source, target input, source mask)
                logits = model(*x) if isinstance(x, tuple) else model(x)  # (B, T, V)
            total += lm_loss(logits, y, reduction="sum").double()
            tokens += (y != IGNORE_INDEX).sum()
            n_batches += 1
    finally:
        model.train(was_training)
    n_tokens = int(tokens)
    if n_batches == 0 or n_tokens == 0:
        raise ValueError(f"evaluate_loss: no tokens to score ({n_batches} batches); is the split empty or "
                         "shorter than one sequence?")
    loss_sum = float(total)
    loss = loss_sum / n_tokens
    return {"loss": loss, "loss_sum": loss_sum, "tokens": n_tokens, "perplexity": perplexity(loss),
            "batches": n_batches}
