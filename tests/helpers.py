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


def overfit_loss(model, vocab: int = 37, steps: int = 300) -> float:
    """Final loss of `model` trained with Adam (lr 1e-2) on 4 fixed random sequences of 16 tokens: a
    model that can fit its data drives the cross-entropy towards 0."""
    import torch
    import torch.nn.functional as F

    x = torch.randint(0, vocab, (4, 17))  # from the caller's seeded global RNG
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()
