"""`clusterlm quantize` on the encoder families (models/encdec.py): every Linear of both stacks
(self- and cross-attention, MLPs), the masked-LM head and the output become int8/int4 modules, and
the quantized checkpoint's logits stay close to the float model's (the thresholds of
tests/unit/test_quantize.py for the decoder-only model)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from clusterlm.checkpoint.model_io import load_for_inference
from clusterlm.models.build import build_model
from clusterlm.models.config import ModelConfig
from clusterlm.optimize.qlinear import Int4Linear, Int8Linear
from clusterlm.optimize.quantize import main

CFGS = {
    "encdec": ModelConfig(arch="encdec", vocab_size=259, n_layers=2, n_enc_layers=2, dim=128, n_heads=4,
                          max_seq_len=32, bias=True),
    "encoder": ModelConfig(arch="encoder", vocab_size=259, n_layers=2, dim=128, n_heads=4, max_seq_len=32, bias=True),
}
# quantized Linear modules: per encoder block wq wk wv wo w1 w2; per decoder block those and the
# cross-attention's four; the output (encdec); the masked-LM head's dense and the output (encoder)
N_LINEAR = {"encdec": 2 * 6 + 2 * 10 + 1, "encoder": 2 * 6 + 2}


def _checkpoint(tmp_path, cfg: ModelConfig) -> nn.Module:
    from clusterlm.checkpoint.store import save_checkpoint
    from clusterlm.config import RunConfig, to_toml
    from clusterlm.tokenizer.kinds import make_tokenizer

    make_tokenizer("byte").save(tmp_path / "tok.json")
    model = build_model(cfg)
    model.init_weights(0)
    save_checkpoint(tmp_path / "run" / "checkpoints", 10, model_state=model.state_dict(), optimizer_state=None,
                    train_state={"step": 10}, config_toml=to_toml(RunConfig(model=cfg)),
                    tokenizer_path=tmp_path / "tok.json")
    return model.eval()


@pytest.mark.parametrize("arch", list(CFGS))
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_encoder_families_close_to_float(tmp_path, arch, method):
    """`clusterlm quantize` of an encdec / encoder checkpoint: load_for_inference rebuilds every Linear
    quantized, and the logits on a padded batch stay close to the float model's (relative error
    < 6% int8, < 25% int4); an encdec model's cached decoding of the quantized model (the memory's keys
    and values projected once through the quantized wk/wv) stays as close, and equals the full
    forward for weight-only int4."""
    cfg = CFGS[arch]
    ref = _checkpoint(tmp_path, cfg)
    out = tmp_path / method
    group = ["--group-size", "64"] if method == "int4" else []  # int8 refuses it (one scale per channel)
    assert main([str(tmp_path / "run"), "--method", method, *group, "--out", str(out)]) == 0
    loaded = load_for_inference(out)
    kind = Int8Linear if method == "int8" else Int4Linear
    assert len([m for m in loaded.model.modules() if isinstance(m, kind)]) == N_LINEAR[arch]
    assert not any(isinstance(m, nn.Linear) for m in loaded.model.modules())
    g = torch.Generator().manual_seed(0)
    src = torch.randint(0, 256, (2, 20), generator=g)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1, 14:] = False
    args = (src, torch.randint(0, 256, (2, 12), generator=g), mask) if arch == "encdec" else (src, mask)
    with torch.no_grad():
        want, got = ref(*args), loaded.model(*args)
    rows = mask if arch == "encoder" else slice(None)
    rel = ((got[rows] - want[rows]).norm() / want[rows].norm()).item()
    assert 0 < rel < (0.06 if method == "int8" else 0.25)
    if arch == "encdec":  # the cross-attention cache projects the memory through the quantized wk/wv once
        model = loaded.model
        cache = model.make_cache(2, 12, device="cpu", dtype=torch.float32)
        with torch.no_grad():
            steps = [model(src, args[1][:, :5], mask, cache=cache)]
            steps += [model(None, args[1][:, t:t + 1], cache=cache) for t in range(5, 12)]
        # int8 quantizes activations with a per-call dynamic scale: cached steps see other scales than
        # the full forward, so they are held to the same bound against the float model
        cached = torch.cat(steps, dim=1)
        assert ((cached - want).norm() / want.norm()).item() < (0.06 if method == "int8" else 0.25)
        if method == "int4":  # weight-only: the same function as the full forward
            torch.testing.assert_close(cached, got, rtol=1e-4, atol=1e-4)
