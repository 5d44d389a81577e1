"""Small helpers shared by test files."""

from __future__ import annotations

from pathlib import Path

from clusterlm.train.metrics import read_metrics


def train_losses(run: Path) -> dict[int, float]:
    """Per-step training loss of a run directory, from its metrics.jsonl."""
    return {r["step"]: r["loss"] for r in read_metrics(Path(run) / "metrics.jsonl") if r.get("kind") == "train"}
