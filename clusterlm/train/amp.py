"""Dynamic loss scaling for fp16 autocast (train.dtype = "fp16", GPUs without bf16 such as the V100
or T4).

fp16 keeps 5 exponent bits: gradients below ~6e-8 flush to zero and small updates are lost, so the
loss is multiplied by a scale S before backward (every gradient S times larger, out of the underflow
range) and the gradients are divided by S before clipping and the optimizer step. S starts at 2^16;
a step whose gradient norm is not finite (an fp16 overflow) is skipped and halves S; 2,000 finite
steps in a row double it (torch.amp.GradScaler's defaults and rule).

Why not torch.amp.GradScaler itself: it decides "inf found, skip the step" from the gradients each
process holds. Under FSDP2 a process holds a shard of each gradient, under pipeline parallelism one
stage's, so ranks could disagree on skipping and their weights drift apart (FSDP1 had a sharded
variant that all-reduces the flag; FSDP2 has none). The trainer already computes one global gradient
norm on every rank (parallel/parallelize.py clip_grad_norm_), so the skip is decided from it, the
same on every rank. The scale is in the RunState, so a resume continues with it (bit-exact).

    >>> s = LossScale.start()
    >>> s.scale
    65536.0
    >>> s.overflowed().scale
    32768.0
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

INIT_SCALE = 2.0**16
GROWTH_INTERVAL = 2000  # finite steps in a row before the scale doubles
MIN_SCALE = 1.0  # an overflow at scale 1 is a real non-finite gradient: a bad step, not a scale to lower


@dataclass(frozen=True)
class LossScale:
    scale: float = 1.0
    streak: int = 0  # finite steps in a row since the scale last changed (a bad step restarts it)

    @classmethod
    def start(cls) -> LossScale:
        return cls(INIT_SCALE, 0)

    @property
    def can_back_off(self) -> bool:
        """Whether a non-finite gradient is taken as an fp16 overflow (halve and retry next step)."""
        return self.scale > MIN_SCALE

    def finite(self) -> LossScale:
        """After a step with finite gradients: double the scale every GROWTH_INTERVAL of them."""
        if self.streak + 1 >= GROWTH_INTERVAL:
            return LossScale(self.scale * 2.0, 0)
        return dataclasses.replace(self, streak=self.streak + 1)

    def overflowed(self) -> LossScale:
        """After a step whose gradients overflowed: half the scale (not below MIN_SCALE)."""
        return LossScale(max(self.scale / 2.0, MIN_SCALE), 0)
