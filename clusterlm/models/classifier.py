"""A sequence classifier: a language model (Transformer or LSTM/GRU) as the backbone and a linear
head on its pooled final hidden state (transfer learning: the pre-trained body, a task layer).

    >>> import torch
    >>> from clusterlm.models.config import get_preset
    >>> from clusterlm.models.build import build_model
    >>> cfg = get_preset("gpt-nano", vocab_size=65, labels=("negative", "positive"), pad_id=0)
    >>> model = build_model(cfg); model.init_weights(seed=0)
    >>> model(torch.tensor([[64, 5, 6, 0], [64, 7, 8, 9]])).shape   # right-padded with pad_id
    torch.Size([2, 2])

Pooling (config.pool; `auto` = `last` for the Transformer, `mean` for LSTM/GRU): position t of a
row is real when idx[:, t] != pad_id (pad_id -1: every position), and padding is on the right.
`last` reads the state of the last real token: a causal decoder's only state that has seen the
whole input (transformers' *ForSequenceClassification does the same); `mean` averages the states of
the real tokens (ULMFiT pools an LSTM's states; its concat pooling adds max and last); `max` takes
each feature's largest value over the real tokens (the max-pooled BiLSTM of InferSent). Padding after
a row's last real token cannot change the states of its real tokens (causal attention, recurrence
from the left), so a padded batch gives each row the logits it gets alone.

Bidirectional (config.bidirectional, LSTM/GRU): a second language model of the same shape,
`reverse`, reads each row's real tokens right to left (padding stays on the right, so it still
changes nothing), and the head reads [forward pooled, reverse pooled] (2 x dim): the BiLSTM that
sentence classifiers use, as separate forward and backward models the way ULMFiT trains its two
directions, so that each is a language model of its own and can start from one.

Names: the language model is `backbone` (its own names inside, so a pre-trained LM's state dict
loads with the prefix `backbone.`), the head is `score`, an nn.Linear(D, C) without bias (the name
and shape of transformers' LlamaForSequenceClassification, so an export can map it later). The
backbone's output layer is kept (the state dict still holds the whole LM) but unused: when it is
its own parameter (untied embeddings, or an LSTM/GRU output bias) it is frozen here, so DDP does
not wait for gradients that never come (no find_unused_parameters) and no optimizer moves it.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn

from clusterlm.models.config import ModelConfig


class SequenceClassifier(nn.Module):
    """Token ids (B, T) -> class logits (B, C) in float32, C = len(config.labels)."""

    def __init__(self, cfg: ModelConfig, backbone: nn.Module, reverse: nn.Module | None = None) -> None:
        super().__init__()
        if not cfg.labels:
            raise ValueError("SequenceClassifier needs model.labels (at least 2 class names)")
        if (reverse is not None) != cfg.bidirectional:
            raise ValueError(f"model.bidirectional={cfg.bidirectional} but a reverse backbone was "
                             f"{'given' if reverse is not None else 'not given'}")
        self.config = cfg
        self.labels: tuple[str, ...] = tuple(cfg.labels)
        self.backbone = backbone
        self.reverse = reverse  # the right-to-left reader (config.bidirectional), or None
        width = cfg.dim * (2 if reverse is not None else 1)
        self.score = nn.Linear(width, len(cfg.labels), bias=False)
        self._freeze_unused_output()

    def readers(self) -> list[tuple[str, nn.Module]]:
        """(name, language model) of each backbone: `backbone`, and `reverse` when bidirectional."""
        return [("backbone", self.backbone)] + ([("reverse", self.reverse)] if self.reverse is not None else [])

    def unused_heads(self) -> tuple[str, ...]:
        """The backbone's modules this classifier keeps but never runs: `output`, and a masked-LM
        encoder's `mlm_head` (the backbone's `lm_head_modules`)."""
        return tuple(getattr(self.backbone, "lm_head_modules", ("output",)))

    def _freeze_unused_output(self) -> None:
        """requires_grad=False on the backbone's parameters that only the unused LM head uses."""
        heads = self.unused_heads()
        prefixes = tuple(f"{h}." for h in heads)
        for _, lm in self.readers():
            shared = {id(p) for name, p in lm.named_parameters() if not name.startswith(prefixes)}
            for head in heads:
                module = getattr(lm, head, None)
                for p in () if module is None else module.parameters():
                    if id(p) not in shared:  # a tied output.weight IS tok_embeddings.weight: it trains
                        p.requires_grad_(False)

    # ---- weights ------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """The backbone's own init_weights(seed) (the same values as the language model alone), and
        score.weight ~ Normal(0, init_std) from a CPU generator seeded by (seed, 'score.weight'), as
        the Transformer seeds each parameter. Meta parameters are skipped (parallel.init_sharded
        fills one parameter at a time on a meta shadow). A reverse backbone draws from its own seed."""
        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, ()).item())
        self.backbone.init_weights(seed)
        if self.reverse is not None:  # its own draw: (seed, 'reverse') as the head's below
            self.reverse.init_weights((seed * 1_000_003 + zlib.crc32(b"reverse")) % (2**31 - 1))
        w = self.score.weight
        if not w.is_meta:
            g = torch.Generator(device="cpu")
            g.manual_seed((seed * 1_000_003 + zlib.crc32(b"score.weight")) % (2**63 - 1))
            w.copy_(torch.empty(w.shape, dtype=torch.float32).normal_(0.0, self.config.init_std, generator=g))

    def _tie(self) -> None:
        """Tie each backbone's output to its embedding again (parallel.init_sharded calls it)."""
        for _, lm in self.readers():
            lm._tie()

    # ---- forward --------------------------------------------------------------------------------
    def pool(self, h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Hidden states (B, T, D) of ids (B, T) -> the pooled state (B, D) (module docstring). A row
        with no real token (all padding) reads position 0."""
        B = h.shape[0]
        pad = self.config.pad_id
        real = idx != pad if pad >= 0 else torch.ones_like(idx, dtype=torch.bool)  # (B, T)
        real[:, 0] |= ~real.any(dim=1)  # an all-padding row: position 0
        n_real = real.sum(dim=1)  # (B,)
        if self.config.pooling == "last":
            # right padding: the last real token sits at n_real - 1
            return h[torch.arange(B, device=h.device), n_real - 1]  # (B, D)
        if self.config.pooling == "max":  # each feature's largest value over the real tokens
            return h.masked_fill(~real.unsqueeze(-1), float("-inf")).amax(dim=1)  # (B, D)
        mask = real.to(h.dtype).unsqueeze(-1)  # (B, T, 1)
        return (h * mask).sum(dim=1) / n_real.to(h.dtype).unsqueeze(-1)  # (B, D)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(self.backbone.hidden_states(idx), idx)  # (B, D)
        if self.reverse is not None:
            rev = reverse_real(idx, self.config.pad_id)
            pooled = torch.cat([pooled, self.pool(self.reverse.hidden_states(rev), rev)], dim=-1)  # (B, 2D)
        return self.score(pooled).float()  # (B, C)


def reverse_real(idx: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Each row's real tokens in reverse order, its right-padding left where it was:
    [[a, b, c, pad]] -> [[c, b, a, pad]] (pad_id -1: every position is real)."""
    B, T = idx.shape
    n = (idx != pad_id).sum(dim=1, keepdim=True) if pad_id >= 0 else torch.full((B, 1), T, device=idx.device)
    j = torch.arange(T, device=idx.device).expand(B, T)
    return idx.gather(1, torch.where(j < n, n - 1 - j, j))


def language_model(model: nn.Module) -> nn.Module:
    """The language model inside a classifier (its `backbone`), or `model` itself: where
    parallel/ finds the blocks (`layers`) to shard or checkpoint."""
    return model.backbone if isinstance(model, SequenceClassifier) else model
