"""The `clusterlm` command's entry point: `python -m clusterlm ...` and the console script
(pyproject.toml, [project.scripts]) both run `main` below.

Kept tiny on purpose: it imports nothing of clusterlm before its handlers are in place. Importing the
CLI takes about 30 ms and a command's own imports (torch, uvicorn) seconds; a Ctrl-C in that time
ends the command as it would later (one line, exit 130), and a SIGTERM sent to `serve` before its
server is ready ends it with exit 0 (a replica told to stop before it is ready has nothing to drain).
A signal during the interpreter's own start-up (site-packages, before this file runs) cannot be
handled here.
"""

import sys


def _stop_before_ready(signum: int, frame: object) -> None:
    """SIGTERM to `serve` before uvicorn takes over the signals (imports, option checks, binding):
    no request, loader thread or scheduler exists yet. One line, then exit 0 without the
    interpreter's teardown (a half-imported torch is not worth unwinding). uvicorn puts this handler
    back once the server has stopped, so a SIGTERM in that last instant exits 0 as well."""
    import os

    msg = "stopped by SIGTERM before the server was ready (nothing to drain)"
    logging = sys.modules.get("logging")
    root = getattr(logging, "root", None)  # None while logging is imported or not at all: no imports here
    if root is not None and root.handlers:  # the log is set up: the line in its format (text or json)
        logging.getLogger("clusterlm.serve").info(msg)
    else:
        os.write(2, f"clusterlm serve: {msg}\n".encode())
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(0)


def main() -> int:
    argv = sys.argv[1:]
    name = f"clusterlm {argv[0]}" if argv and not argv[0].startswith("-") else "clusterlm"
    try:
        if argv[:1] == ["serve"]:
            import signal

            signal.signal(signal.SIGTERM, _stop_before_ready)
        from clusterlm.cli import main as cli_main

        return cli_main(argv)
    except KeyboardInterrupt:  # Ctrl-C while importing (cli_main reports the ones after)
        from clusterlm.errors import EXIT_INTERRUPTED

        print(f"{name}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
