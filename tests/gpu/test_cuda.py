"""CUDA correctness: the same model on the GPU as on the CPU, bf16 training, generation, the trainer's MFU.

Skipped (with the reason) where torch sees no CUDA device, as in CI. Run on a GPU machine with
`.venv/bin/python -m pytest tests/gpu -v`. Speed is measured by benchmarks/, not here.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from clusterlm.models.build import build_model
from clusterlm.models.config import get_preset

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)")]

V = 64


@pytest.fixture(autouse=True)
def exact_fp32_matmuls():
    """fp32 on both devices means fp32: TF32 off while a test compares against the CPU."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def tiny(arch: str = "llama-nano"):
    cfg = dataclasses.replace(get_preset(arch, vocab_size=V), max_seq_len=64)
    model = build_model(cfg)
    model.init_weights(0)
    return model


def batch(seed: int = 0, b: int = 4, t: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (b, t + 1), generator=g)
    return x[:, :-1], x[:, 1:]


@pytest.mark.parametrize("arch", ["llama-nano", "gpt-nano"])
def test_forward_backward_match_cpu(arch):
    """fp32 logits, loss and every gradient on cuda:0 equal the CPU's (1e-4): no device-specific math."""
    from clusterlm.eval.metrics import lm_loss

    cpu = tiny(arch)
    gpu = tiny(arch).cuda()
    x, y = batch()
    out = {}
    for name, model, dev in (("cpu", cpu, "cpu"), ("cuda", gpu, "cuda")):
        logits = model(x.to(dev))
        loss = lm_loss(logits, y.to(dev))
        loss.backward()
        out[name] = (logits.detach().cpu(), loss.item(), {k: p.grad.cpu() for k, p in model.named_parameters()})
    torch.testing.assert_close(out["cuda"][0], out["cpu"][0], atol=1e-4, rtol=1e-4)
    assert out["cuda"][1] == pytest.approx(out["cpu"][1], abs=1e-4)
    for k, g in out["cpu"][2].items():
        torch.testing.assert_close(out["cuda"][2][k], g, atol=1e-4, rtol=1e-3, msg=k)


@pytest.mark.skipif(torch.cuda.is_available() and not torch.cuda.is_bf16_supported(),
                    reason="this GPU has no bf16 (e.g. V100)")
def test_bf16_autocast_training_learns():
    """30 AdamW steps under bf16 autocast on one batch: finite losses that fall by more than 1 nat."""
    from clusterlm.eval.metrics import lm_loss

    model = tiny().cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x, y = (t.cuda() for t in batch())
    losses = []
    for _ in range(30):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = lm_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 1.0, losses


def test_generation_with_cache_equals_full_forward():
    """Greedy generation on the GPU with the KV cache gives the tokens of argmax over full forwards."""
    from clusterlm.generate.engine import generate

    model = tiny().cuda().eval()
    prompt = [1, 2, 3, 4, 5]
    got = [step[0] for step in generate(model, prompt, max_new_tokens=12, temperature=0.0)]
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            seq.append(int(model(torch.tensor([seq], device="cuda"))[0, -1].argmax()))
    assert got == seq[len(prompt):]


def test_trainer_on_cuda_reports_mfu_against_the_real_peak(tmp_path):
    """`clusterlm train --train.device=cuda` (bf16 where supported) finishes, and its MFU uses this GPU's
    peak from the hardware table: a number for a known GPU, null (unknown) for one not in the table."""
    from clusterlm.config import load_run_config
    from clusterlm.data.prepare import prepare
    from clusterlm.train.loop import train
    from clusterlm.train.metrics import device_peak_flops, read_metrics

    (tmp_path / "t.txt").write_text("".join(f"Now is the winter of our discontent {i}\n" * 20 for i in range(30)))
    prepare([str(tmp_path / "t.txt")], tmp_path / "data", tokenizer="char", val_fraction=0.1)
    cfg = load_run_config(None, [f"--data.dir={tmp_path / 'data'}", f"--train.out_dir={tmp_path / 'run'}",
                                 "--model.preset=llama-nano", "--model.max_seq_len=64", "--train.seq_len=64",
                                 "--train.micro_batch_size=8", "--train.max_steps=20", "--train.device=cuda",
                                 "--train.eval_interval=10", "--train.log_interval=5", "--train.tensorboard=false"])
    result = train(cfg)
    assert result.exit_code == 0 and result.step == 20
    dtype = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    peak, _ = device_peak_flops(torch.device("cuda"), dtype)
    steps = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r.get("kind") == "train"]
    assert steps and all(r.get("mfu") is None for r in steps) == (peak is None)
    if peak is not None:
        assert all(0 < r["mfu"] < 1 for r in steps if r.get("mfu") is not None)


def test_fp16_training_scales_the_loss_and_learns(tmp_path):
    """`--train.dtype=fp16` on CUDA (docs/training.md, "fp16 and loss scaling"): every step logs its
    loss scale, every skipped step halved it, and the loss falls over 40 steps."""
    import math

    from clusterlm.config import load_run_config
    from clusterlm.data.prepare import prepare
    from clusterlm.train.loop import train
    from clusterlm.train.metrics import read_metrics

    (tmp_path / "t.txt").write_text("".join(f"Now is the winter of our discontent {i}\n" * 20 for i in range(30)))
    prepare([str(tmp_path / "t.txt")], tmp_path / "data", tokenizer="char", val_fraction=0.1)
    cfg = load_run_config(None, [f"--data.dir={tmp_path / 'data'}", f"--train.out_dir={tmp_path / 'run'}",
                                 "--model.preset=llama-nano", "--model.max_seq_len=64", "--train.seq_len=64",
                                 "--train.micro_batch_size=8", "--train.max_steps=40", "--train.device=cuda",
                                 "--train.dtype=fp16", "--optim.lr=3e-3", "--train.eval_interval=0",
                                 "--train.log_interval=10", "--train.tensorboard=false"])
    result = train(cfg)
    assert result.exit_code == 0 and result.step == 40
    steps = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r.get("kind") == "train"]
    scale = 2.0**16
    for r in steps:
        scale = scale / 2 if r["skipped"] else scale
        assert r["loss_scale"] == scale and (r["skipped"] or math.isfinite(r["grad_norm"]))
    trained = [r["loss"] for r in steps if not r["skipped"]]
    assert len(trained) >= 30 and trained[-1] < trained[0]
