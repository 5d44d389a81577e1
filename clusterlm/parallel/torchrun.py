"""torchrun as `clusterlm launch` runs it: `python -m clusterlm.parallel.torchrun ARGS` is exactly
`torchrun ARGS` (torch.distributed.run.main), except that the two ways it ends on purpose end without
a Python traceback:

- a signal (Ctrl-C, SIGTERM passed on by `clusterlm launch`): torchrun stops the workers, which save,
  and raises SignalException; here that is one line and exit 128 + the signal number (the launcher
  then reports the trainer's own code, 75 after a save);
- a failed worker: torchrun raises ChildFailedError; here its summary (rank, exit code, error file)
  is printed and the exit code is torchrun's 1.

Every other exception keeps its traceback: it is a bug, in torchrun or here.
"""

from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main as torchrun_main


def run(argv: list[str] | None = None) -> int:
    try:
        torchrun_main(argv)
    except SignalException as e:
        print(f"torchrun: stopped by {e.sigval.name}; the workers were told to stop", file=sys.stderr, flush=True)
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        print(e.format_msg(), file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run())
