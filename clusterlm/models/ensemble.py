"""Several classifiers of one shape answering as one model: the mean of their class probabilities.

    model = ClassifierEnsemble([build_model(cfg.model) for _ in range(4)])   # then load members.i.*
    model(idx)   # (B, C) float32: log of the members' mean probabilities

Seed-to-seed spread of a small classifier is often as large as any setting's effect (SST-2 with the
`sst2_lstm_cpu` recipe: 80.4-83.0% over eighteen seeds); averaging the probabilities of six adds 1.0
to 2.0 points to their mean (docs/finetune.md). `clusterlm ensemble RUN RUN ... --out DIR` (finetune/ensemble.py)
writes such a model as one checkpoint, which `eval`, `serve` (/classify) and `finetune.distill_from`
load like any classifier.

The output is log(mean_i softmax(member_i(idx))), computed as logsumexp over the members' log-softmax
minus log N: valid logits whose softmax is exactly the mean probability, so every caller that
applies softmax to a classifier's logits (eval.lm.classify_ids, the server, distillation) reads the
ensemble's probabilities without knowing it is one. Averaging probabilities (not logits) is the
usual rule for ensembles of independently trained classifiers (Lakshminarayanan et al. 2017).

Names: the members are `members.0`, `members.1`, ... with a member's own names inside, so a
member's state dict loads with the prefix `members.i.`. `config` is the members' shared
ModelConfig (one shape, one tokenizer, one label order: checked when the checkpoint is written).
Only for inference: an ensemble is not trained or fine-tuned as one model (finetune refuses one as
init_from); train its members, then combine them.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class ClassifierEnsemble(nn.Module):
    """Token ids (B, T) -> (B, C) float32 log mean probabilities of `members` (SequenceClassifiers
    built from one ModelConfig)."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {len(members)}")
        labels = [tuple(getattr(m, "labels", ())) for m in members]
        if not labels[0] or any(x != labels[0] for x in labels):
            raise ValueError(f"ensemble members must be classifiers with the same labels, got {labels}")
        self.members = nn.ModuleList(members)
        self.config = members[0].config
        self.labels: tuple[str, ...] = labels[0]

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        logp = torch.stack([torch.log_softmax(m(idx).float(), dim=-1) for m in self.members])  # (N, B, C)
        return torch.logsumexp(logp, dim=0) - math.log(len(self.members))  # (B, C)
