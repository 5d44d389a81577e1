"""Single-process checkpoints of the encoder families (models/encdec.py): the checkpointer's save +
load_into and load_for_inference are model-agnostic; the shape check names n_enc_layers.
(DCP checkpoints of these models under FSDP/TP: tests/distributed/test_parity_encdec.py.)"""

from __future__ import annotations

import pytest
import torch

from clusterlm.config import CheckpointConfig, OptimConfig, RunConfig, to_toml
from clusterlm.eval.metrics import IGNORE_INDEX, lm_loss
from clusterlm.models.build import build_model
from clusterlm.models.config import ModelConfig

V = 260  # the byte tokenizer's vocabulary (256 bytes + specials) fits

CFGS = {
    "encdec": ModelConfig(arch="encdec", vocab_size=V, n_layers=2, n_enc_layers=1, dim=32, n_heads=4,
                          max_seq_len=16, bias=True),
    # sinusoidal positions: a buffer that is not saved, recomputed on load
    "encoder": ModelConfig(arch="encoder", vocab_size=V, n_layers=2, dim=32, n_heads=4, max_seq_len=16,
                           pos="sinusoidal", bias=True),
}


class _Loader:
    def __init__(self) -> None:
        self.pos = 0

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.pos = state["pos"]


def _inputs(cfg: ModelConfig) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    src = torch.randint(0, 256, (2, 9), generator=g)
    if cfg.arch == "encdec":
        mask = torch.ones(2, 9, dtype=torch.bool)
        mask[1, 6:] = False
        return src, torch.randint(0, 256, (2, 7), generator=g), mask
    return (src,)


def _model(cfg: ModelConfig, seed: int) -> torch.nn.Module:
    model = build_model(cfg)
    model.init_weights(seed)
    return model


@pytest.mark.parametrize("arch", list(CFGS))
def test_checkpointer_roundtrip(tmp_path, arch):
    """Checkpointer.save after one AdamW step, then load_into a model initialised from another seed,
    gives identical weights (every tensor, bit for bit), optimizer state, loader position and logits;
    load_for_inference (what eval, generate, serve and export read) gives the same logits."""
    from clusterlm.checkpoint.manager import Checkpointer, RunState
    from clusterlm.checkpoint.model_io import load_for_inference
    from clusterlm.tokenizer.kinds import make_tokenizer
    from clusterlm.train.optim import build_optimizer

    cfg = CFGS[arch]
    tok = tmp_path / "tokenizer.json"
    make_tokenizer("byte").save(tok)
    model = _model(cfg, 0)
    opt = build_optimizer(model, OptimConfig(lr=1e-2), fused=False)
    x = _inputs(cfg)
    labels = torch.randint(0, 256, x[1].shape if arch == "encdec" else x[0].shape)
    labels[0, :2] = IGNORE_INDEX
    lm_loss(model(*x), labels).backward()
    opt.step()
    loader = _Loader()
    loader.pos = 5
    root = tmp_path / "run" / "checkpoints"
    run = RunConfig(model=cfg)
    path = Checkpointer(root, CheckpointConfig(), config_toml=to_toml(run), tokenizer_path=tok).save(
        RunState(step=1, tokens_seen=14), model, opt, loader, reason="final")

    model2 = _model(cfg, 7)
    opt2 = build_optimizer(model2, OptimConfig(lr=1e-2), fused=False)
    loader2 = _Loader()
    state = Checkpointer(root, CheckpointConfig(), config_toml="", resume="auto", model_config=cfg).load_into(
        model2, opt2, loader2)
    assert state == RunState(step=1, tokens_seen=14) and loader2.pos == 5
    want = model.state_dict()
    assert model2.state_dict().keys() == want.keys()
    for k, v in model2.state_dict().items():
        assert torch.equal(v, want[k]), k
    if cfg.tie_embeddings:  # still one tensor after the load
        assert model2.output.weight is model2.tok_embeddings.weight
    for a, b in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    with torch.no_grad():
        logits = model(*x)
        assert torch.equal(model2(*x), logits)
        loaded = load_for_inference(path)
        assert type(loaded.model) is type(model) and loaded.config.model == cfg
        assert torch.equal(loaded.model(*x), logits)


def test_resume_into_another_encoder_depth_is_refused(tmp_path):
    """A checkpoint of an encdec model with 1 encoder block is refused, in one line naming
    model.n_enc_layers and both values, by a run that asks for 2."""
    import dataclasses

    from clusterlm.checkpoint.compat import check_resume, model_differences
    from clusterlm.errors import CheckpointError

    saved = CFGS["encdec"]
    wanted = dataclasses.replace(saved, n_enc_layers=2)
    assert model_differences(saved, wanted) == [("model.n_enc_layers", 1, 2)]
    assert model_differences(saved, dataclasses.replace(saved, n_enc_layers=None, n_layers=1)) == \
        [("model.n_layers", 2, 1)]  # n_enc_layers=None means n_layers: 1 encoder block both times
    assert model_differences(CFGS["encoder"], dataclasses.replace(CFGS["encoder"], ffn_dim=64)) == \
        [("model.ffn_dim", 128, 64)]
    from clusterlm.checkpoint.store import save_checkpoint

    model = _model(saved, 0)
    path = save_checkpoint(tmp_path / "ck", 1, model_state=model.state_dict(), optimizer_state=None,
                           train_state={"step": 1}, config_toml=to_toml(RunConfig(model=saved)))
    with pytest.raises(CheckpointError, match=r"model.n_enc_layers=1 but the run asks for model.n_enc_layers=2"):
        check_resume(path, wanted)
