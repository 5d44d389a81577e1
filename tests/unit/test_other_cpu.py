"""Figures probed on one CPU are not silently used on another (issue 20): `clusterlm plan` prints a
note naming both CPUs, and training warns when its MFU peak comes from another CPU's probe."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from clusterlm.cluster import probe
from clusterlm.cluster.spec import CpuSpec, DeviceSpec, NodeType

SPEC = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "probe_this_machine.toml"


def _node(model: str, kind: str = "cpu") -> NodeType:
    return NodeType(name="n", cpu=CpuSpec(model=model), device=DeviceSpec(name=model, kind=kind, memory_gib=8.0))


def test_note_names_both_cpus(monkeypatch):
    monkeypatch.setattr(probe, "probe_cpu", lambda: CpuSpec(model="AMD EPYC 9B14"))
    note = probe.other_cpu_note(_node("Intel(R) Xeon(R) Processor"), "node.toml")
    assert "node.toml was probed on CPU 'Intel(R) Xeon(R) Processor'" in note and "'AMD EPYC 9B14'" in note
    assert probe.other_cpu_note(_node("AMD EPYC 9B14"), "node.toml") is None
    assert probe.other_cpu_note(_node("H100", kind="cuda"), "node.toml") is None  # a GPU node's CPU does not matter
    assert probe.other_cpu_note(_node("unknown"), "node.toml") is None


def test_plan_prints_the_note(monkeypatch, capsys):
    from clusterlm.cluster import planner

    monkeypatch.setattr(probe, "probe_cpu", lambda: CpuSpec(model="Some Other CPU"))
    planner.main(["--model", "gpt-nano", "--cluster", str(SPEC), "--vocab-size", "65", "--seq-len", "64",
                  "--global-batch-tokens", "768", "--dtype", "fp32", "--steps", "10"])
    out = capsys.readouterr().out
    assert "NOTE:" in out and "'Some Other CPU'" in out and "Intel(R) Xeon(R) Processor" in out


def test_training_peak_warns(monkeypatch, caplog):
    from clusterlm.train.loop import _probed_peak

    monkeypatch.setattr(probe, "probe_cpu", lambda: CpuSpec(model="Some Other CPU"))
    with caplog.at_level(logging.WARNING):
        assert _probed_peak(str(SPEC), "fp32") > 0
    assert any("Some Other CPU" in r.getMessage() and "MFU" in r.getMessage() for r in caplog.records)
