"""Weight-only int8/int4 quantization: kernels against dequantized references, error bounds,
quantized checkpoints that load, evaluate and generate.

Run: .venv/bin/python -m pytest -q tests/unit/test_quantize.py
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from clusterlm.checkpoint.model_io import load_for_inference
from clusterlm.checkpoint.store import save_checkpoint
from clusterlm.config import RunConfig, to_toml
from clusterlm.generate.engine import complete
from clusterlm.models.build import build_model
from clusterlm.models.config import ModelConfig
from clusterlm.optimize.quantize import Int4Linear, Int8Linear, main, quantize_model
from clusterlm.tokenizer.kinds import make_tokenizer


@pytest.mark.parametrize("n_out", [65, 96, 512])
def test_kernels_match_dequantized_reference(n_out):
    """Int8Linear/Int4Linear outputs (torch's packed int8/int4 CPU kernels) equal x @ W_deq.T + b
    computed in float32 from the stored integers and scales; W_deq is within half a step of W."""
    torch.manual_seed(0)
    lin = nn.Linear(256, n_out)
    x = torch.randn(3, 5, 256)
    for m in (Int8Linear.from_linear(lin, activation_int8=False), Int4Linear.from_linear(lin, 128, False),
              Int4Linear.from_linear(lin, 32, False)):
        deq = m.dequantized()
        ref = x @ deq.T + lin.bias
        assert (m(x) - ref).abs().max().item() < 1e-4
        if isinstance(m, Int8Linear):
            bound = m.scales[:, None] / 2  # symmetric rounding: at most half a step per weight
        else:
            bound = m.scales_and_zeros[..., 0].t().repeat_interleave(m.group_size, 1) / 2
        assert bool(((deq - lin.weight).abs() <= bound + 1e-6).all())


@pytest.mark.parametrize("group_size", [32, 128])
def test_int4_bf16_activation_path_close_to_exact(group_size):
    """Int4Linear's default CPU path (bfloat16 activations and scales into the int4 kernel) stays
    within 1% relative error of the exact float32-activation path on the same stored weights, for a
    batch-1 row and a batch of rows, with an output width (65) that needs row padding."""
    torch.manual_seed(0)
    lin = nn.Linear(256, 65)
    fast = Int4Linear.from_linear(lin, group_size)
    exact = Int4Linear.from_linear(lin, group_size, activation_bf16=False)
    assert fast.activation_bf16 and torch.equal(fast.weight_int4, exact.weight_int4)
    for x in (torch.randn(1, 1, 256), torch.randn(3, 7, 256)):
        ref = exact(x)
        got = fast(x)
        assert got.dtype == torch.float32 and got.shape == ref.shape
        assert ((got - ref).norm() / ref.norm()).item() < 0.01
    fast.activation_bf16 = False  # the packed scales follow the switch
    assert torch.equal(fast(x), exact(x))


def _checkpoint(tmp_path, cfg: ModelConfig):
    tok = make_tokenizer("byte")
    tok.save(tmp_path / "tok.json")
    model = build_model(cfg)
    model.init_weights(0)
    save_checkpoint(tmp_path / "run" / "checkpoints", 10, model_state=model.state_dict(), optimizer_state=None,
                    train_state={"step": 10}, config_toml=to_toml(RunConfig(model=cfg)),
                    tokenizer_path=tmp_path / "tok.json")
    return model.eval()


def test_int8_fbgemm_path_close_to_weight_only():
    """The fbgemm path (int8 activations, dynamic scale) stays within 3% relative error of the
    weight-only kernel on the same stored weights, and both store identical int8 values."""
    torch.manual_seed(0)
    lin = nn.Linear(256, 96)
    x = torch.randn(4, 256)
    wo = Int8Linear.from_linear(lin, activation_int8=False)
    fb = Int8Linear.from_linear(lin, activation_int8=True)
    assert torch.equal(wo.weight_int8, fb.weight_int8)
    ref = wo(x)
    assert ((fb(x) - ref).norm() / ref.norm()).item() < 0.03


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_checkpoint_loads_and_generates(tmp_path, method):
    """`clusterlm quantize` writes a checkpoint that load_for_inference rebuilds with quantized
    modules (every Linear, tied output included); its logits stay close to the float model's
    (relative error < 6% int8 with int8 activations, < 25% int4), greedy generation runs, and
    model.safetensors shrinks."""
    cfg = ModelConfig(vocab_size=259, n_layers=2, dim=128, n_heads=4, max_seq_len=64, bias=True)
    ref = _checkpoint(tmp_path, cfg)
    out = tmp_path / method
    group = ["--group-size", "64"] if method == "int4" else []  # int8 refuses it (one scale per channel)
    assert main([str(tmp_path / "run"), "--method", method, *group, "--out", str(out)]) == 0
    loaded = load_for_inference(out)
    kind = Int8Linear if method == "int8" else Int4Linear
    quantized = [n for n, m in loaded.model.named_modules() if isinstance(m, kind)]
    assert len(quantized) == 2 * 6 + 1  # wq wk wv wo w1 w2 per layer + output
    assert not any(isinstance(m, nn.Linear) for m in loaded.model.modules())
    idx = torch.randint(0, 259, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = ref(idx), loaded.model(idx)
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < (0.06 if method == "int8" else 0.25)
    tokens, reasons = complete(loaded.model, [1, 2, 3], max_new_tokens=8, temperature=0.0)
    assert len(tokens[0]) == 8 and reasons == ["length"]
    fp_size = next((tmp_path / "run" / "checkpoints").glob("step-*/model.safetensors")).stat().st_size
    q_size = next((out / "checkpoints").glob("step-*/model.safetensors")).stat().st_size
    assert q_size < fp_size  # embedding stays fp32, so not 4x/8x on this tiny model


@pytest.mark.parametrize("inside", ["checkpoints", "checkpoints/step-00000010"])
def test_quantize_out_inside_a_checkpoint_is_refused(tmp_path, inside):
    """--out RUN/checkpoints (or a step folder) wrote the quantized run inside the source's checkpoints,
    after which `clusterlm generate RUN/checkpoints` loaded the nested quantized copy instead of the
    float checkpoint; refused before anything is written."""
    _checkpoint(tmp_path, ModelConfig(vocab_size=259, n_layers=1, dim=64, n_heads=2, max_seq_len=16))
    out = tmp_path / "run" / inside
    with pytest.raises(FileExistsError, match="is a checkpoint or a checkpoints folder, not a run directory"):
        main([str(tmp_path / "run"), "--method", "int8", "--out", str(out)])
    assert not (out / "checkpoints").exists()


def test_quantize_rejects_bad_arguments():
    """Unknown method and unsupported int4 group sizes are refused with the valid values named."""
    model = build_model(ModelConfig(vocab_size=50, n_layers=1, dim=64, n_heads=2, max_seq_len=16))
    with pytest.raises(ValueError, match="int8, int4"):
        quantize_model(model, "int2")
    with pytest.raises(ValueError, match="32, 64, 128, 256"):
        quantize_model(model, "int4", group_size=100)
    with pytest.raises(ValueError, match="32, 64, 128, 256"):
        quantize_model(model, "int4", group_size=0)  # `--group-size 0` once fell back to 128 silently


def test_quantization_metadata_has_its_own_file_and_old_checkpoints_still_load(tmp_path):
    """`clusterlm quantize` writes quantization.json (method, group size, the 13 module names, source)
    and leaves train_state.json without a "quantization" entry; a checkpoint written before that file
    existed (the entry in train_state.json, files re-hashed) loads to bit-identical logits."""
    import json
    import shutil

    from clusterlm.checkpoint.store import MANIFEST, QUANTIZATION, write_manifest

    cfg = ModelConfig(vocab_size=259, n_layers=2, dim=128, n_heads=4, max_seq_len=64)
    _checkpoint(tmp_path, cfg)
    out = tmp_path / "q"
    assert main([str(tmp_path / "run"), "--method", "int4", "--group-size", "64", "--out", str(out)]) == 0
    step = next((out / "checkpoints").glob("step-*"))
    q = json.loads((step / QUANTIZATION).read_text())
    assert q["method"] == "int4" and q["group_size"] == 64 and len(q["modules"]) == 13
    assert q["source"].endswith("step-00000010")
    train_state = json.loads((step / "train_state.json").read_text())
    assert "quantization" not in train_state and train_state["step"] == 10
    idx = torch.randint(0, 259, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = load_for_inference(out).model(idx)

    old = tmp_path / "old" / "checkpoints" / step.name  # the earlier layout of the same checkpoint
    shutil.copytree(step, old)
    (old / QUANTIZATION).unlink()
    (old / "train_state.json").write_text(json.dumps({**train_state, "quantization": q}))
    (old / MANIFEST).unlink()
    write_manifest(old, 10)
    with torch.no_grad():
        got = load_for_inference(old).model(idx)
    assert torch.equal(got, want)


def test_lstm_with_keep_output_is_refused_and_output_only_warns(tmp_path, caplog):
    """An LSTM's only Linear is its output projection: with --keep-output nothing qualifies, so the
    command is refused and writes nothing (it wrote the float model as "quantized", rc 0); without it
    the output alone is quantized (1 module) and a warning says the recurrent weights stay float32."""
    import json
    import logging

    _checkpoint(tmp_path, ModelConfig(arch="lstm", vocab_size=259, n_layers=1, dim=64, max_seq_len=16, pos="none"))
    with pytest.raises(ValueError, match=r"arch 'lstm'\) has no Linear module that int8 can quantize with "
                                         r"--keep-output .*nothing written"):
        main([str(tmp_path / "run"), "--method", "int8", "--keep-output", "--out", str(tmp_path / "q0")])
    assert not (tmp_path / "q0").exists()
    with caplog.at_level(logging.WARNING, logger="clusterlm.optimize.quantize"):
        assert main([str(tmp_path / "run"), "--method", "int8", "--out", str(tmp_path / "q1")]) == 0
    assert "recurrent weights stay float32" in caplog.text
    q = json.loads(next((tmp_path / "q1" / "checkpoints").glob("step-*/quantization.json")).read_text())
    assert q["modules"] == ["output"]


def test_int4_with_no_linear_on_the_group_size_names_the_group_size(tmp_path):
    """An LSTM of width 64 under int4's default group size 128: no Linear qualifies. The refusal said
    the output projection was kept by --keep-output, which was not given; it now names the group size."""
    _checkpoint(tmp_path, ModelConfig(arch="lstm", vocab_size=259, n_layers=1, dim=64, max_seq_len=16, pos="none"))
    with pytest.raises(ValueError, match="multiple of --group-size 128") as e:
        main([str(tmp_path / "run"), "--method", "int4", "--out", str(tmp_path / "q")])
    assert "--keep-output" not in str(e.value)
    assert not (tmp_path / "q").exists()
    assert main([str(tmp_path / "run"), "--method", "int4", "--group-size", "64", "--out", str(tmp_path / "q")]) == 0


@pytest.mark.parametrize("arch", ["encoder", "transformer"])
def test_keep_output_keeps_a_classifiers_output_projection(tmp_path, arch):
    """A classifier's language model sits under `backbone`, so its output projection is
    'backbone.output': --keep-output, which matched the name 'output' only, was ignored for it (the
    projection was quantized all the same). Now it stays float32 (absent from quantization.json's
    modules, its weight equal to the float model's) and the quantized classifier loads."""
    import json

    cfg = ModelConfig(arch=arch, vocab_size=259, n_layers=1, dim=64, n_heads=4, max_seq_len=16, labels=("a", "b"),
                      pad_id=258)
    float_model = _checkpoint(tmp_path, cfg)
    assert main([str(tmp_path / "run"), "--method", "int8", "--out", str(tmp_path / "q")]) == 0
    q = json.loads(next((tmp_path / "q" / "checkpoints").glob("step-*/quantization.json")).read_text())
    assert "backbone.output" in q["modules"]
    assert main([str(tmp_path / "run"), "--method", "int8", "--keep-output", "--out", str(tmp_path / "k")]) == 0
    k = json.loads(next((tmp_path / "k" / "checkpoints").glob("step-*/quantization.json")).read_text())
    assert "backbone.output" not in k["modules"] and "backbone.layers.0.attention.wq" in k["modules"]
    loaded = load_for_inference(tmp_path / "k")
    assert isinstance(loaded.model.backbone.output, nn.Linear)
    assert torch.equal(loaded.model.backbone.output.weight, float_model.backbone.output.weight)


def test_int4_of_a_magnitude_pruned_model_warns_that_the_zeros_go(tmp_path, caplog):
    """prune --method magnitude then quantize --method int4: the asymmetric zero point brings every pruned
    weight back as a small non-zero value, silently (the pruning record still said 50%). Now one warning
    says so; int8, which keeps the zeros exactly, says nothing."""
    from clusterlm.optimize.prune import main as prune_main

    cfg = ModelConfig(vocab_size=259, n_layers=1, dim=128, n_heads=4, max_seq_len=64)
    _checkpoint(tmp_path, cfg)
    assert prune_main([str(tmp_path / "run"), "--sparsity", "0.5", "--method", "magnitude",
                       "--out", str(tmp_path / "pruned")]) == 0
    for method, group in (("int4", ["--group-size", "64"]), ("int8", [])):
        caplog.clear()
        with caplog.at_level("WARNING", logger="clusterlm"):
            assert main([str(tmp_path / "pruned"), "--method", method, *group, "--out", str(tmp_path / method)]) == 0
        warned = [r.getMessage() for r in caplog.records if "magnitude-pruned" in r.getMessage()]
        assert len(warned) == (method == "int4"), (method, warned)
        model = load_for_inference(tmp_path / method).model
        w = next(m for n, m in model.named_modules() if n.endswith(".wq"))
        zeros = (w.dequantized() == 0).float().mean().item()
        assert zeros >= 0.5 if method == "int8" else zeros < 0.1, (method, zeros)
