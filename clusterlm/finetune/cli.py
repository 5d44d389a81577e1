"""`clusterlm finetune RECIPE [--section.key=value ...]`: `clusterlm train` for recipes with a
[finetune] section (task sft, classify or seq2seq); the same loop, checkpoints, resume and launchers."""

from __future__ import annotations


def main(argv: list[str]) -> int:
    from clusterlm.train.loop import main as train_main

    return train_main(argv, finetune=True)
