"""FLOPs per token, MFU, throughput, memory, the JSONL/TensorBoard logger, and the eval metrics."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clusterlm.eval.metrics import bits_per_byte, evaluate_loss, lm_loss, perplexity
from clusterlm.models.config import get_preset
from clusterlm.train import metrics as train_metrics
from clusterlm.train.metrics import (
    MetricsLogger,
    Throughput,
    device_peak_flops,
    flops_per_token,
    memory_stats,
    mfu,
    read_metrics,
)


# ---- FLOPs and MFU ------------------------------------------------------------------------------------
def test_gpt2_124m_flops_per_token():
    """gpt2-124m at T=1024 equals the hand count: layers 12 x 7,087,872 + final LN 1,536 = 85,056,000
    non-embedding parameters, plus the tied output projection 50257 x 768 = 38,597,376 (nanoGPT's
    N = 124,439,808 - 786,432 position table = 123,653,376); 6N + 12*12*768*1024 = 855,166,464."""
    c = get_preset("gpt2-124m")
    per_layer = (4 * 768 * 768 + 4 * 768) + (2 * 768 * 3072 + 3072 + 768) + 2 * (2 * 768)
    assert per_layer == 7_087_872
    assert c.num_params(include_embeddings=False) == 12 * per_layer + 1_536 == 85_056_000
    f = flops_per_token(c, 1024)
    assert f["n_layer_params"] == 85_056_000
    assert f["n_output_params"] == 50257 * 768 == 38_597_376
    assert f["n_matmul_params"] == 124_439_808 - 1024 * 768 == 123_653_376
    assert f["dense"] == 6 * 123_653_376 == 741_920_256
    assert f["attention"] == 12 * 12 * 768 * 1024 == 113_246_208
    assert f["total"] == 855_166_464
    assert "PaLM" in f["convention"]


def test_lstm_flops_have_no_attention_term():
    """LSTM: 6*N only, with N = 4 gates x (2D^2 + 2D) per layer + output projection (+ output bias)."""
    c = get_preset("lstm-small", vocab_size=65)
    f = flops_per_token(c, 256)
    assert f["attention"] == 0.0
    assert f["total"] == f["dense"] == 6 * f["n_matmul_params"]
    assert f["n_matmul_params"] == 2 * 4 * (2 * 512 * 512 + 2 * 512) + 65 + 65 * 512
    assert "no attention" in f["convention"]


def test_mfu():
    """MFU = tokens/s * FLOPs/token / peak; None for an unknown (or non-positive) peak, never a guess."""
    assert mfu(1000.0, 6e9, 1.2e13) == pytest.approx(0.5)
    assert mfu(1000.0, 6e9, None) is None
    assert mfu(1000.0, 6e9, 0.0) is None
    assert mfu(None, 6e9, 1e12) is None


def test_device_peak_cpu_unknown_unless_measured():
    """CPU: (None, 'unknown: run `clusterlm probe`...') unless a measured peak is passed."""
    peak, source = device_peak_flops("cpu", "fp32")
    assert peak is None and "clusterlm probe" in source
    assert device_peak_flops(torch.device("cpu"), "bf16", measured_peak=2.5e11) == (2.5e11, "measured (probe or given figure)")
    with pytest.raises(ValueError, match="measured_peak"):
        device_peak_flops("cpu", "fp32", measured_peak=0.0)


def test_device_peak_cuda_lookup(monkeypatch):
    """CUDA: the device name is looked up in clusterlm.cluster.hardware (H100 SXM dense bf16 =
    989.4 TFLOP/s); fp32 with TF32 matmuls allowed uses the tf32 peak; an unknown GPU gives None
    with its name in the reason (no A100 fallback)."""
    from clusterlm.cluster.hardware import peak_flops

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    peak, source = device_peak_flops("cuda", "bf16")
    assert peak == peak_flops("NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(989.4e12)
    assert "H100" in source and "bf16" in source
    monkeypatch.setattr(train_metrics, "_tf32_matmuls", lambda: True)
    assert device_peak_flops("cuda", "fp32")[0] == peak_flops("NVIDIA H100 80GB HBM3", "tf32")
    monkeypatch.setattr(train_metrics, "_tf32_matmuls", lambda: False)
    assert device_peak_flops("cuda", "fp32")[0] == peak_flops("NVIDIA H100 80GB HBM3", "fp32")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    peak, source = device_peak_flops("cuda:0", "bf16")
    assert peak is None and "Some Future GPU" in source


def test_peak_dtype_follows_the_autocast_dtype(monkeypatch):
    """The peak MFU divides by is the compute dtype's: fp16 autocast on a V100 is against its 125 fp16
    TFLOP/s (it was against 15.7 fp32: 8x the MFU), bf16 against bf16, no autocast against fp32."""
    from clusterlm.train.metrics import peak_dtype

    assert [peak_dtype(d) for d in (torch.float16, torch.bfloat16, None)] == ["fp16", "bf16", "fp32"]
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-16GB")
    assert device_peak_flops("cuda", peak_dtype(torch.float16))[0] == pytest.approx(125e12)


def test_tf32_flag_follows_matmul_precision():
    """_tf32_matmuls is True after set_float32_matmul_precision("high"), False after "highest"."""
    saved = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert train_metrics._tf32_matmuls() is True
        torch.set_float32_matmul_precision("highest")
        assert train_metrics._tf32_matmuls() is False
    finally:
        torch.set_float32_matmul_precision(saved)


# ---- throughput and memory ------------------------------------------------------------------------------
def test_throughput_window_and_overall():
    """Windowed rate = sum(tokens)/sum(seconds) over the last `window` steps; overall skips the first."""
    t = Throughput(window=2, skip=1)
    assert t.update(100, 10.0) == 10.0  # slow first step (start-up)
    assert t.update(100, 1.0) == pytest.approx(200 / 11)
    assert t.update(100, 1.0) == 100.0
    assert t.overall == 100.0
    assert Throughput().overall == 0.0


def test_memory_stats_cpu():
    """CPU peak RSS in bytes: ru_maxrss (KiB on Linux) x 1024, at least the size of a tensor we hold."""
    x = torch.ones(4 << 20, dtype=torch.uint8)  # 4 MiB, touched
    stats = memory_stats("cpu")
    assert set(stats) == {"cpu_peak_rss_bytes"}
    assert stats["cpu_peak_rss_bytes"] > x.numel()
    assert stats["cpu_peak_rss_bytes"] % 1024 == 0


# ---- the logger -----------------------------------------------------------------------------------------
def test_logger_jsonl_and_tensorboard(tmp_path):
    """Each record is one valid JSON line (NaN as null, tensors as numbers, time added); numeric
    fields land in a TensorBoard event file under tb/ with the right tag, step and value."""
    with MetricsLogger(tmp_path) as m:
        m.log({"kind": "train", "step": 1, "loss": torch.tensor(2.5), "lr": 1e-3, "skipped": False})
        m.log({"kind": "train", "step": 2, "loss": float("nan"), "lr": 2e-3, "skipped": True})
        m.log({"kind": "eval", "step": 2, "val_loss": 2.25})
        m.log({"kind": "event", "step": 2, "event": "checkpoint", "path": "x"}, tensorboard=False)
        with pytest.raises(ValueError, match="kind='bogus'"):
            m.log({"kind": "bogus", "step": 3})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    recs = [json.loads(line) for line in lines]
    assert [r["kind"] for r in recs] == ["train", "train", "eval", "event"]
    assert recs[0]["loss"] == 2.5 and recs[1]["loss"] is None and recs[2]["val_loss"] == 2.25
    assert all(isinstance(r["time"], float) for r in recs)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tmp_path / "tb"))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    assert {"train/loss", "train/lr", "eval/val_loss"} <= tags
    assert "train/skipped" not in tags and "event/path" not in tags
    assert [(e.step, e.value) for e in ea.Scalars("train/lr")] == [(1, pytest.approx(1e-3)), (2, pytest.approx(2e-3))]
    assert [(e.step, e.value) for e in ea.Scalars("eval/val_loss")] == [(2, 2.25)]


def test_truncate_after_resume(tmp_path):
    """A run logs steps 1..5 (and a torn last line); resuming at step 3 keeps steps <= 3 and the
    step-less record, and the resumed run appends 4, 5 so every step appears once."""
    with MetricsLogger(tmp_path, tensorboard=False) as m:
        m.log({"kind": "event", "event": "start"})
        for s in range(1, 6):
            m.log({"kind": "train", "step": s, "loss": 1.0 / s})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 6, "lo')  # crash mid-write
    with MetricsLogger(tmp_path, tensorboard=False) as m:
        assert m.truncate_after(3) == 3  # steps 4, 5 and the torn line
        for s in (4, 5):
            m.log({"kind": "train", "step": s, "loss": 0.0})
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert [r.get("step") for r in recs] == [None, 1, 2, 3, 4, 5]
    assert [r["loss"] for r in recs[1:]] == [1.0, 0.5, 1.0 / 3, 0.0, 0.0]


def test_start_fresh_keeps_the_earlier_runs_log_aside(tmp_path, caplog):
    """A fresh start over an earlier run's metrics.jsonl (steps 0..4 and a step-less record) renames it to
    metrics.jsonl.old-STAMP whole, says so in one warning, and the new run's file holds only its own records;
    a second fresh start keeps both earlier files. (It used to drop steps > 0 "after step 0 (resuming)" and
    mix the earlier run's step-0 and step-less records into the new log.)"""
    old = "".join(json.dumps({"kind": "train", "step": s, "loss": 9.0}) + "\n" for s in range(5))
    (tmp_path / "metrics.jsonl").write_text('{"kind": "event", "event": "start"}\n' + old)
    with caplog.at_level("WARNING"), MetricsLogger(tmp_path, tensorboard=False) as m:
        aside = m.start_fresh()
        m.log({"kind": "train", "step": 1, "loss": 1.0})
    assert aside is not None and aside.name.startswith("metrics.jsonl.old-")
    assert aside.read_text() == '{"kind": "event", "event": "start"}\n' + old
    assert "starting fresh" in caplog.text and "6 records of an earlier run" in caplog.text
    assert "resuming" not in caplog.text
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == [(1, 1.0)]
    with MetricsLogger(tmp_path, tensorboard=False) as m:
        second = m.start_fresh()
    assert second is not None and second != aside and aside.exists() and second.exists()
    assert not (tmp_path / "metrics.jsonl").exists()
    with MetricsLogger(tmp_path, tensorboard=False) as m:
        assert m.start_fresh() is None  # nothing to keep


def test_append_after_torn_line_starts_fresh_line(tmp_path):
    """Appending to a file whose last line was torn starts a new line, so later records still parse."""
    (tmp_path / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n{"kind": "tr')
    with MetricsLogger(tmp_path, tensorboard=False) as m:
        m.log({"kind": "train", "step": 2})
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]


def test_disabled_logger_writes_nothing(tmp_path):
    """enabled=False (ranks other than 0): no file, no folder."""
    m = MetricsLogger(tmp_path / "run", enabled=False)
    m.log({"kind": "train", "step": 1, "loss": 1.0})
    assert m.truncate_after(0) == 0
    m.close()
    assert not (tmp_path / "run").exists()


# ---- eval metrics -----------------------------------------------------------------------------------------
def test_perplexity_and_bits_per_byte():
    """perplexity = exp(loss); bpb = total nats / (ln 2 * bytes): 1000 tokens at ln(2) nats each over
    500 bytes is 2 bits per byte; an overflowing exp is inf; zero bytes is an error."""
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(65)) == pytest.approx(65.0)
    assert perplexity(1000.0) == math.inf
    assert bits_per_byte(math.log(2) * 1000, 500) == pytest.approx(2.0, rel=1e-15)
    assert bits_per_byte(1.5 * 4000, 12_000) == pytest.approx(6000 / (math.log(2) * 12_000))
    with pytest.raises(ValueError, match="total_bytes=0"):
        bits_per_byte(1.0, 0)


class TinyLM(nn.Module):
    def __init__(self, v: int = 13, d: int = 6) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(v, d)
        self.dropout = nn.Dropout(0.5)  # makes train/eval mode observable
        self.output = nn.Linear(d, v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.dropout(self.tok_embeddings(x)))  # (B, T, V)


def _hand_mean_ce(model: nn.Module, batches) -> tuple[float, int]:
    """Mean of -log softmax(logits)[target] over every token, in float64 with explicit loops."""
    total, n = 0.0, 0
    with torch.no_grad():
        for x, y in batches:
            logits = model(x).double()
            for b in range(x.shape[0]):
                for t in range(x.shape[1]):
                    row = logits[b, t]
                    total += float(torch.logsumexp(row, 0) - row[y[b, t]])
                    n += 1
    return total / n, n


def test_evaluate_loss_matches_hand_computation():
    """evaluate_loss equals the float64 hand computation of mean cross-entropy over all tokens, runs
    in eval mode (dropout off) and restores training mode."""
    torch.manual_seed(0)
    model = TinyLM()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 13, (3, 7), generator=g), torch.randint(0, 13, (3, 7), generator=g))
               for _ in range(4)]
    model.train()
    res = evaluate_loss(model, batches, device="cpu", autocast_dtype=None)
    assert model.training
    model.eval()
    expected, n = _hand_mean_ce(model, batches)
    assert res["tokens"] == n == 4 * 3 * 7
    assert res["batches"] == 4
    assert res["loss"] == pytest.approx(expected, rel=1e-6)
    assert res["loss_sum"] == pytest.approx(expected * n, rel=1e-6)
    assert res["perplexity"] == pytest.approx(math.exp(expected), rel=1e-6)


def test_evaluate_loss_bf16_autocast_and_empty():
    """Under bf16 autocast on CPU the loss stays within 2% of fp32; no batches is a clear error."""
    torch.manual_seed(0)
    model = TinyLM()
    batches = [(torch.randint(0, 13, (2, 5)), torch.randint(0, 13, (2, 5)))]
    fp32 = evaluate_loss(model, batches, device="cpu")["loss"]
    bf16 = evaluate_loss(model, batches, device="cpu", autocast_dtype=torch.bfloat16)["loss"]
    assert bf16 == pytest.approx(fp32, rel=0.02)
    with pytest.raises(ValueError, match="no tokens"):
        evaluate_loss(model, [], device="cpu")


def test_lm_loss_fp32_and_ignore_index():
    """lm_loss equals F.cross_entropy on fp32 logits, returns fp32 for bf16 logits, and skips -100."""
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5)
    y = torch.randint(0, 5, (2, 3))
    assert torch.equal(lm_loss(logits, y), F.cross_entropy(logits.view(-1, 5), y.view(-1)))
    assert lm_loss(logits.bfloat16(), y).dtype == torch.float32
    y2 = y.clone()
    y2[0, 0] = -100
    keep = y2.view(-1) != -100
    expected = F.cross_entropy(logits.view(-1, 5)[keep], y2.view(-1)[keep])
    torch.testing.assert_close(lm_loss(logits, y2), expected)
    with pytest.raises(ValueError, match=r"\(B, T, V\)"):
        lm_loss(logits[0], y)


def test_truncate_after_purges_tensorboard(tmp_path):
    """TensorBoard after a resume at step 3 shows steps 4, 5 from the resumed run only (the
    writer's purge_step hides the first run's 4, 5)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path) as m:
        for s in range(1, 6):
            m.log({"kind": "train", "step": s, "loss": float(s)})
    with MetricsLogger(tmp_path) as m:
        m.truncate_after(3)
        for s in (4, 5):
            m.log({"kind": "train", "step": s, "loss": 100.0 + s})
    ea = EventAccumulator(str(tmp_path / "tb"))
    ea.Reload()
    assert [(e.step, e.value) for e in ea.Scalars("train/loss")] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 104.0),
                                                                      (5, 105.0)]


def test_mfu_is_against_every_device_of_the_run():
    """The trainer's tokens/s counts every data-parallel rank's tokens (tokens per step = accum x micro-batch x
    seq_len x dp), so MFU divides by one device's peak x the devices, as the planner's `world * peak` does:
    8 GPU ranks at 8 x 100k tokens/s of 6e9 FLOPs each on 989.4-TFLOP/s H100s are 60.6% MFU, not 485%
    (the trainer divided by one GPU's peak). Ranks on one CPU host share the CPU the probe measured as one
    device: 2 ranks on 1 host count 1 device, 4 ranks on 2 hosts 2."""
    from clusterlm.train.metrics import mfu_devices

    assert mfu_devices("cuda", 8, 8) == 8 and mfu_devices("cuda", 16, 8) == 16
    assert mfu_devices("cpu", 2, 2) == 1 and mfu_devices("cpu", 4, 2) == 2 and mfu_devices("cpu", 1, 1) == 1
    peak = 989.4e12
    assert mfu(8 * 100_000.0, 6e9, peak * mfu_devices("cuda", 8, 8)) == pytest.approx(0.6064, abs=1e-4)
