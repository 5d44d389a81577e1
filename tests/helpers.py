"""Small helpers shared by test files."""

from __future__ import annotations

from pathlib import Path

from clusterlm.train.metrics import read_metrics

# Python source that makes any later `import torch` fail: prepend it to `python -c` code to show that a
# command or module (CLI help, planner, Slurm launch, model configs) runs on a login node without torch.
BLOCK_TORCH = """
import sys
class _BlockTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
        return None
sys.meta_path.insert(0, _BlockTorch())
"""


def train_losses(run: Path) -> dict[int, float]:
    """Per-step training loss of a run directory, from its metrics.jsonl."""
    return {r["step"]: r["loss"] for r in read_metrics(Path(run) / "metrics.jsonl") if r.get("kind") == "train"}
