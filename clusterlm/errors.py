"""Exceptions that mean "the user asked for something invalid", and the exit codes they map to.

Library code raises these (or ValueError / FileNotFoundError / OSError); only `cli.py` turns them
into a one-line message and an exit code. The table is also in docs/cli.md.
"""

EXIT_OK = 0
EXIT_FAILURE = 1  # unexpected error (a bug): traceback printed
EXIT_USAGE = 2  # bad input: a one-line message says what is wrong and what would be valid
EXIT_DIVERGED = 3  # training stopped after train.max_bad_steps consecutive NaN/Inf losses (state saved)
EXIT_UNAVAILABLE = 69  # a resource the command needs is taken: serve's port or --metrics-port is in use
#                        (EX_UNAVAILABLE)
EXIT_IO = 74  # the operating system refused a read or write (disk full, read-only file system, I/O
#               error); the message names the path, nothing half-written is left (EX_IOERR)
EXIT_PREEMPTED = 75  # SIGTERM/SIGINT/SIGUSR2 during training: step finished, checkpoint saved; resume with
#                      --train.resume=auto (75 is EX_TEMPFAIL; Slurm requeue scripts key on it).
#                      serve: a SIGTERM drain whose --drain-timeout (or a second signal) ended running
#                      requests with an error event (a drain that finished them all exits 0)
EXIT_RANK_LOST = 76  # training: a rank sent no heartbeat for train.heartbeat_timeout seconds (stopped, dead,
#                      link down); the rank and host are named, no checkpoint is written (the last
#                      committed one is resumed with --train.resume=auto; `launch --slurm` requeues)
EXIT_INTERRUPTED = 130  # Ctrl-C (or SIGTERM outside training): stopped, partial output removed
EXIT_BROKEN_PIPE = 141  # stdout closed by its reader (`clusterlm plan | head`): quiet, as a tool killed by SIGPIPE

# what cli.py reports as bad input (EXIT_USAGE) besides ClusterlmError
USAGE_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError,
                NotImplementedError)


def exit_code_of(e: BaseException) -> int:
    """The exit code cli.py gives an exception that ends a command (the table above)."""
    if isinstance(e, ClusterlmError):
        return e.exit_code
    if isinstance(e, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(e, BrokenPipeError):
        return EXIT_BROKEN_PIPE
    if isinstance(e, USAGE_ERRORS):
        return EXIT_USAGE
    if isinstance(e, OSError):
        return EXIT_IO
    return EXIT_FAILURE


class ClusterlmError(Exception):
    """Base class: bad input, with a message that says what is wrong and what would be valid."""

    exit_code = EXIT_USAGE


class ConfigError(ClusterlmError, ValueError):
    """An invalid run file, override or config value."""


class DataError(ClusterlmError, ValueError):
    """Unusable input text, shards or data directory."""


class CheckpointError(ClusterlmError, ValueError):
    """A missing, corrupt or incompatible checkpoint."""


class ResourceBusyError(ClusterlmError):
    """Something the command needs is held by another process (a port in use, a run folder in use)."""

    exit_code = EXIT_UNAVAILABLE


class DivergedError(ClusterlmError):
    """A short training run inside another command (prune's recovery fine-tune) reached a NaN/Inf loss or
    weights: stopped, nothing written."""

    exit_code = EXIT_DIVERGED
