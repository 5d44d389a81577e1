"""Augmented copies of training texts for a distilled classifier to learn from (finetune.augment):
the rules of Tang et al. (2019), "Distilling task-specific knowledge from BERT into simple neural
networks", that distilled BERT into a BiLSTM on SST-2, with the part-of-speech-guided swap
simplified to a swap for any training word:

- each word (a whitespace-separated piece) is, with probability 0.1, replaced by a word drawn from
  all the training texts' words (so frequent words are drawn more often);
- then, with probability 0.25, the copy is cut to a random run of 1 to 5 of its words.

A copy that repeats a training text or an earlier copy is dropped. The copies carry no label a
student can trust (a swapped "not" flips a sentence), so only the teachers' probabilities train
on them (finetune/distill.py); the draw is seeded, so a data folder prepared twice is the same.

    copies = augment_texts(["a gripping film", "dull"], copies=2)    # [(source index, text), ...]
"""

from __future__ import annotations

import random
from collections.abc import Sequence

P_SWAP = 0.1
P_NGRAM = 0.25
MAX_NGRAM = 5


def augment_texts(texts: Sequence[str], copies: int, seed: int = 0) -> list[tuple[int, str]]:
    """Up to `copies` augmented copies of each text, as (index of its text, copy), texts in order."""
    if copies < 0:
        raise ValueError(f"copies={copies} must be >= 0")
    words = [w for t in texts for w in t.split()]
    if not copies or not words:
        return []
    rng = random.Random(seed)
    seen = set(texts)
    out: list[tuple[int, str]] = []
    for _ in range(copies):
        for i, text in enumerate(texts):
            ws = [rng.choice(words) if rng.random() < P_SWAP else w for w in text.split()]
            if rng.random() < P_NGRAM and len(ws) > 1:
                n = rng.randint(1, min(MAX_NGRAM, len(ws)))
                start = rng.randint(0, len(ws) - n)
                ws = ws[start:start + n]
            copy = " ".join(ws)
            if copy and copy not in seen:
                seen.add(copy)
                out.append((i, copy))
    return out
