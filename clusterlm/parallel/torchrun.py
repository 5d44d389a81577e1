"""torchrun as `clusterlm launch` runs it: `python -m clusterlm.parallel.torchrun ARGS` is exactly
`torchrun ARGS` (torch.distributed.run.main), except that the two ways it ends on purpose end without
a Python traceback:

- a signal (Ctrl-C, SIGTERM passed on by `clusterlm launch`): torchrun stops the workers, which save,
  and raises SignalException; here that is one line and exit 128 + the signal number (the launcher
  then reports the trainer's own code, 75 after a save);
- a failed worker: torchrun raises ChildFailedError; here its summary (rank, exit code, error file)
  is printed and the exit code is torchrun's 1.

A stop signal is acted on once: a terminal's Ctrl-C reaches torchrun both from the terminal and from
`clusterlm launch`, which passes it on; each further one raised torch's SignalException again inside
torchrun's shutdown (a "--- Logging error ---" traceback, or torchrun gone before its workers had saved).

Every other exception keeps its traceback: it is a bug, in torchrun or here.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import FrameType

import torch.distributed.elastic.multiprocessing.api as elastic_api
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main as torchrun_main


def stop_once(handler: Callable[[int, FrameType | None], None]) -> Callable[[int, FrameType | None], None]:
    """torch's stop-signal handler (it raises SignalException), acting on the first signal only: the
    later ones come while torchrun is already stopping its workers, and are ignored."""
    stopping: list[int] = []

    def handle(signum: int, frame: FrameType | None) -> None:
        if not stopping:
            stopping.append(signum)
            handler(signum, frame)

    return handle


def run(argv: list[str] | None = None) -> int:
    # torchrun registers this module attribute as its SIGINT/SIGTERM/... handler when it starts the workers
    # (PContext.start); tests/unit/test_torch_private_api.py checks that it still does
    handler = elastic_api._terminate_process_handler
    elastic_api._terminate_process_handler = stop_once(handler)
    try:
        torchrun_main(argv)
    except SignalException as e:
        print(f"torchrun: stopped by {e.sigval.name}; the workers were told to stop", file=sys.stderr, flush=True)
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        print(e.format_msg(), file=sys.stderr, flush=True)
        return 1
    finally:
        elastic_api._terminate_process_handler = handler
    return 0


if __name__ == "__main__":
    sys.exit(run())
