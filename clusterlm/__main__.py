"""The `clusterlm` command's entry point: `python -m clusterlm ...` and the console script
(pyproject.toml, [project.scripts]) both run `main` below.

Kept tiny on purpose: it imports nothing of clusterlm outside its `try`. Importing the
CLI takes about 30 ms and a command's own imports (torch, uvicorn) seconds; a Ctrl-C in that time
ends the command as it would later (one line, exit 130). A signal during the interpreter's own
start-up (site-packages, before this file runs) cannot be handled here.
"""

import sys


def main() -> int:
    argv = sys.argv[1:]
    name = f"clusterlm {argv[0]}" if argv and not argv[0].startswith("-") else "clusterlm"
    try:
        from clusterlm.cli import main as cli_main

        return cli_main(argv)
    except KeyboardInterrupt:  # Ctrl-C while importing (cli_main reports the ones after)
        from clusterlm.errors import EXIT_INTERRUPTED

        print(f"{name}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
