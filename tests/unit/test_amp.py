"""fp16 dynamic loss scaling (clusterlm/train/amp.py): the scale's rule, and why it is there: under
fp16 autocast a gradient below fp16's smallest subnormal (~6e-8) reaches the weights as 0 unless the
loss was scaled before backward.

Run: .venv/bin/python -m pytest -q tests/unit/test_amp.py
"""

from __future__ import annotations

import contextlib
import functools
import types

import pytest
import torch
from torch import nn

from clusterlm.parallel.parallelize import ParallelModel
from clusterlm.train.amp import GROWTH_INTERVAL, INIT_SCALE, LossScale


def test_the_scale_halves_on_overflow_and_doubles_after_a_finite_run():
    s = LossScale.start()
    assert (s.scale, s.streak) == (INIT_SCALE, 0) == (65536.0, 0)
    for _ in range(GROWTH_INTERVAL - 1):
        s = s.finite()
    assert (s.scale, s.streak) == (INIT_SCALE, GROWTH_INTERVAL - 1)
    assert s.finite() == LossScale(2 * INIT_SCALE, 0)
    assert s.overflowed() == LossScale(INIT_SCALE / 2, 0)  # the streak starts again
    low = LossScale(1.0, 5)
    assert not low.can_back_off and low.overflowed().scale == 1.0  # a real inf at scale 1 is a bad step


def _single(loss_fn) -> ParallelModel:
    torch.manual_seed(0)
    lin = nn.Linear(16, 16)
    return ParallelModel(lin, lin, types.SimpleNamespace(owns_loss=True), None, "single", loss_fn)


@pytest.mark.parametrize("scale, lost", [(1.0, True), (INIT_SCALE, False)])
def test_scaling_keeps_the_small_gradients_fp16_autocast_flushes(scale, lost):
    """The loss's gradients are ~1e-8: through an fp16 matmul they flush to 0 unscaled; scaled by
    2^16, backward and unscale_grads_ give the fp32 gradients (to fp16's precision)."""
    loss_fn = lambda logits, y: logits.float().sum() * 1e-8  # noqa: E731
    x = torch.randn(8, 16)
    ref = _single(loss_fn)
    ref.forward_backward(x, None)
    want = ref.module.weight.grad.clone()
    pm = _single(loss_fn)
    autocast = functools.partial(torch.autocast, "cpu", dtype=torch.float16)
    loss = pm.forward_backward(x, None, autocast=autocast, loss_scale=scale)
    pm.unscale_grads_(scale)
    got = pm.module.weight.grad
    assert float(loss) == pytest.approx(float(loss_fn(ref.module(x).detach(), None)), rel=1e-2)  # returned unscaled
    if lost:
        assert want.abs().min() > 0 and torch.count_nonzero(got) == 0
    else:
        torch.testing.assert_close(got, want, rtol=1e-2, atol=0)  # x and W rounded to fp16


def test_unscale_at_scale_one_is_a_no_op():
    pm = _single(lambda logits, y: logits.sum())
    pm.forward_backward(torch.ones(2, 16), None, autocast=contextlib.nullcontext)
    g = pm.module.weight.grad.clone()
    pm.unscale_grads_(1.0)
    assert torch.equal(pm.module.weight.grad, g)
