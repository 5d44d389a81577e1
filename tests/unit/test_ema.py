"""optim.ema_decay (train/ema.py): the average's arithmetic and warm-up, swapping it in and out
exactly, and the checkpoint layout (average as the model, trained weights in the optimizer state)
surviving an optimizer state_dict round trip."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from clusterlm.config import OptimConfig
from clusterlm.errors import ConfigError
from clusterlm.train.ema import EMA_KEY, SAVED_KEY, WeightEMA, ema_decay_at


def _setup(decay: float):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    return model, opt, WeightEMA(opt, decay)


def _step(model, opt):
    loss = model(torch.randn(5, 4)).square().sum()
    loss.backward()
    opt.step()
    opt.zero_grad()


def test_decay_warms_up_then_holds():
    assert ema_decay_at(0.999, 0) == pytest.approx(0.1)  # the second weights count 90%
    assert ema_decay_at(0.999, 90) == pytest.approx(91 / 100)
    assert ema_decay_at(0.999, 10**6) == 0.999
    with pytest.raises(ConfigError, match=r"optim.ema_decay=1.0 must be in \[0, 1\)"):
        OptimConfig(ema_decay=1.0)


def test_average_matches_the_formula_and_swaps_exactly():
    model, opt, ema = _setup(0.5)
    expected = None
    for n in range(5):
        _step(model, opt)
        ema.update(n)
        w = [p.detach().clone() for p in model.parameters()]
        if expected is None:
            expected = w  # the first update copies the weights
        else:
            d = ema_decay_at(0.5, n)
            expected = [d * e + (1 - d) * x for e, x in zip(expected, w)]
    trained = [p.detach().clone() for p in model.parameters()]
    with ema.applied():
        for p, e in zip(model.parameters(), expected):
            torch.testing.assert_close(p.detach(), e, rtol=1e-6, atol=1e-7)
        assert not torch.equal(next(model.parameters()).detach(), trained[0])
    for p, t in zip(model.parameters(), trained):
        assert torch.equal(p.detach(), t)  # bit-exact after the swap back


def test_checkpoint_layout_round_trips_through_state_dict():
    """Inside applied(for_checkpoint=True) the model is the average and the state holds the trained
    weights as train_weights; a fresh optimizer loading that state and restore_after_load gives the
    trained weights back in the model and the average under "ema", exactly."""
    model, opt, ema = _setup(0.9)
    for n in range(3):
        _step(model, opt)
        ema.update(n)
    trained = [p.detach().clone() for p in model.parameters()]
    average = [opt.state[p][EMA_KEY].clone() for p in model.parameters()]
    with ema.applied(for_checkpoint=True):
        saved_model = {k: v.clone() for k, v in model.state_dict().items()}
        saved_opt = opt.state_dict()
        assert all(SAVED_KEY in s and EMA_KEY not in s for s in saved_opt["state"].values())
        saved_opt = {"state": {i: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
                               for i, s in saved_opt["state"].items()}, "param_groups": saved_opt["param_groups"]}
    for p, a in zip(model.parameters(), saved_model.values()):
        assert not torch.equal(p.detach(), a)

    for decay in (0.9, 0.0):  # a resume with EMA on, and one that turned it off
        model2, opt2, ema2 = _setup(decay)
        model2.load_state_dict(saved_model)
        opt2.load_state_dict(copy.deepcopy(saved_opt))  # load_state_dict keeps the tensors it is given
        assert ema2.restore_after_load()
        for p, t, a in zip(model2.parameters(), trained, average):
            assert torch.equal(p.detach(), t)
            if decay:
                assert torch.equal(opt2.state[p][EMA_KEY], a)
            else:
                assert EMA_KEY not in opt2.state[p] and SAVED_KEY not in opt2.state[p]
        assert not ema2.restore_after_load()  # nothing left to restore


def test_off_is_a_no_op():
    model, opt, ema = _setup(0.0)
    _step(model, opt)
    ema.update(0)
    assert all(set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq"} for p in model.parameters())
    with ema.applied(for_checkpoint=True):
        pass
    assert not ema.restore_after_load()
