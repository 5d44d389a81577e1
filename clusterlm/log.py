"""Logging set-up: one format, messages from rank 0 only (other ranks log warnings and up).

Library code uses `logging.getLogger(__name__)`; only entry points call `setup_logging`.
"""

from __future__ import annotations

import logging
import sys


class RankFilter(logging.Filter):
    """Drop records below WARNING on every rank but 0."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        return self.rank == 0 or record.levelno >= logging.WARNING


def setup_logging(rank: int = 0, level: int = logging.INFO) -> None:
    """Configure the root logger once: `HH:MM:SS level name: message` on stderr."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_clusterlm", False):
            root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    prefix = f"[rank {rank}] " if rank else ""
    handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    handler.addFilter(RankFilter(rank))
    handler._clusterlm = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
