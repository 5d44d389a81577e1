"""An exponential moving average (EMA, Polyak averaging) of the trained weights: `optim.ema_decay`.

    ema = WeightEMA(optimizer, decay=0.999)    # decay 0 = off: every method is a no-op
    opt.step(); ema.update(successful_steps)   # after each optimizer step that was taken
    with ema.applied():                        # the averaged weights in the model: evaluate, save
        ...

The average lives in the optimizer's per-parameter state under "ema", beside AdamW's exp_avg and
exp_avg_sq, in the parameter's own dtype, device and (under FSDP2) sharding. So every checkpoint
path, single-file or DCP, saves and resumes it with no format of its own, and a resume is bit-exact.

A checkpoint written with EMA on holds the averaged weights as the model: eval, serve, export and
finetune.init_from read them like any checkpoint. The weights training goes on from are in its
optimizer state under "train_weights" instead of "ema"; `restore_after_load` swaps them back after a
resume (also when the resumed run turns EMA off, which then drops the average, logged).

The decay warms up as in TensorFlow's ExponentialMovingAverage with num_updates: after n updates
it is min(decay, (1 + n) / (10 + n)), so the first steps' weights (far from trained) do not linger
in the average for 1 / (1 - decay) steps. Why: a classifier's accuracy at one step swings by a point
or more between evaluations while its loss still falls (SST-2, docs/finetune.md); the average of
the last few hundred steps' weights is steadier. Swapping the two copies costs one parameter-sized
temporary at a time, no second model.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch.optim.swa_utils import get_ema_multi_avg_fn

log = logging.getLogger(__name__)

EMA_KEY = "ema"
SAVED_KEY = "train_weights"  # in a checkpoint written with the average as the model


def ema_decay_at(decay: float, updates: int) -> float:
    """The decay for the update after `updates` earlier ones: min(decay, (1 + n) / (10 + n))."""
    return min(decay, (1.0 + updates) / (10.0 + updates))


class WeightEMA:
    def __init__(self, optimizer: torch.optim.Optimizer, decay: float) -> None:
        self.optimizer, self.decay = optimizer, decay

    def __bool__(self) -> bool:
        return self.decay > 0

    def _params(self) -> list[torch.nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    @torch.no_grad()
    def update(self, updates: int) -> None:
        """Fold the current weights in; `updates` = optimizer steps taken before this one (the
        RunState's step minus its skipped steps, so a resume continues the same decay schedule).
        A parameter without an average yet (the first step, or EMA turned on at a resume) starts
        from its current weights."""
        if not self:
            return
        old = []
        for p in self._params():
            st = self.optimizer.state[p]  # after opt.step(): AdamW's state exists, not initialised over ours
            if EMA_KEY in st:
                old.append(p)
            else:
                st[EMA_KEY] = p.detach().clone()
        avg = get_ema_multi_avg_fn(ema_decay_at(self.decay, updates))
        groups: dict[tuple, list] = {}  # one foreach call per kind: TP mixes DTensor and plain parameters
        for p in old:
            groups.setdefault((type(p.data), p.device, p.dtype), []).append(p)
        for ps in groups.values():
            avg([self.optimizer.state[p][EMA_KEY] for p in ps], [p.detach() for p in ps], None)

    @torch.no_grad()
    def _swap(self, src_key: str, dst_key: str) -> None:
        """Each parameter's weights <-> its state[src_key], which is then stored as state[dst_key]."""
        for p in self._params():
            st = self.optimizer.state.get(p)
            if not st or src_key not in st:
                continue
            other = st.pop(src_key)
            held = p.detach().clone()
            p.copy_(other)
            other.copy_(held)
            st[dst_key] = other

    @contextlib.contextmanager
    def applied(self, *, for_checkpoint: bool = False) -> Iterator[None]:
        """The averaged weights in the model for the block; the trained ones back after it. With
        for_checkpoint the trained weights sit in the state as "train_weights" meanwhile (what a
        checkpoint saved in the block records)."""
        if not self:
            yield
            return
        key = SAVED_KEY if for_checkpoint else EMA_KEY
        self._swap(EMA_KEY, key)
        try:
            yield
        finally:
            self._swap(key, EMA_KEY)

    def restore_after_load(self) -> bool:
        """After a resume: a checkpoint written with the average as the model holds the weights
        training goes on from as "train_weights"; put them back (the loaded weights become the
        average). With EMA off in this run the average is dropped. Returns whether one was found."""
        found = any(SAVED_KEY in self.optimizer.state.get(p, {}) for p in self._params())
        if not found:
            return False
        self._swap(SAVED_KEY, EMA_KEY)
        if not self:
            for p in self._params():
                self.optimizer.state.get(p, {}).pop(EMA_KEY, None)
            log.info("the checkpoint holds an average of the weights (optim.ema_decay was on); this run has "
                     "optim.ema_decay = 0, so training goes on from the trained weights and the average is dropped")
        return True
