"""The `clusterlm` command: one table of subcommands, each imported only when it runs.

    clusterlm --help
    clusterlm prepare --builtin shakespeare --out data/shakespeare_char --tokenizer char

Every entry point is `main(argv: list[str]) -> int` in its own module, with its own argparse
parser (so `clusterlm CMD --help` works). This file never imports torch.
"""

from __future__ import annotations

import importlib
import logging
import sys

# command -> ("module:function", one line of help), in the order a user meets them. A command is
# listed only once its module exists (tests/unit/test_cli.py runs `--help` on every entry).
COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": ("clusterlm.quickstart:main", "prepare Shakespeare, train a small model on CPU, evaluate, sample"),
    "prepare": ("clusterlm.data.prepare:main", "text/JSONL files -> tokenizer + token shards + meta.json"),
    "tokenizer": ("clusterlm.tokenizer.cli:main", "train or inspect a tokenizer (byte, char, bpe)"),
    "config": ("clusterlm.config:main", "show the resolved config of a recipe with overrides"),
    "train": ("clusterlm.train.loop:main", "train a model from a recipe (TOML) with --section.key=value overrides"),
    "finetune": ("clusterlm.finetune.cli:main", "fine-tune a base model (SFT with chat templates, classification, LoRA)"),
    "launch": ("clusterlm.parallel.launch:main", "run `clusterlm train` on N processes per node with torchrun"),
    "jobs": ("clusterlm.cluster.slurm:jobs_main", "list runs submitted with `clusterlm launch --slurm` and their state"),
    "eval": ("clusterlm.eval.evaluate:main", "loss, perplexity and bits per byte of a checkpoint"),
    "generate": ("clusterlm.generate.cli:generate_main", "sample text from a checkpoint"),
    "chat": ("clusterlm.generate.cli:chat_main", "interactive chat with a checkpoint"),
    "report": ("clusterlm.train.report:main", "plots and a markdown summary of a training run"),
    "probe": ("clusterlm.cluster.probe:main", "inventory and benchmark the node this runs on"),
    "cluster": ("clusterlm.cluster.show:main", "show a cluster spec (TOML) as a tree"),
    "plan": ("clusterlm.cluster.planner:main", "memory, FLOPs, step time and parallel layout for a run"),
    "convert": ("clusterlm.interop.cli:main", "Hugging Face GPT-2/Llama folder -> clusterlm checkpoint"),
    "export": ("clusterlm.interop.cli:export_main", "clusterlm checkpoint -> Hugging Face folder (--format hf)"),
    "ensemble": ("clusterlm.finetune.ensemble:main", "combine classifiers of one recipe into one that averages them"),
    "quantize": ("clusterlm.optimize.quantize:main", "int8/int4 weight-only quantization of a checkpoint"),
    "prune": ("clusterlm.optimize.prune:main", "magnitude or structured (heads/channels) pruning of a checkpoint"),
    "serve": ("clusterlm.serve.app:main", "serve a checkpoint over an OpenAI-compatible HTTP API"),
    "stream-guard": ("clusterlm.serve.relay:main", "relay streams to replicas; a lost replica's streams end with an error event"),
}

# Exit codes live in errors.py (also in docs/cli.md); re-exported here for callers and tests.
from clusterlm.errors import (EXIT_BROKEN_PIPE, EXIT_DIVERGED, EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_IO,  # noqa: E402,F401
                              EXIT_OK, EXIT_PREEMPTED, EXIT_UNAVAILABLE, EXIT_USAGE, USAGE_ERRORS)


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [
        "usage: clusterlm COMMAND [ARGS...]",
        "",
        "Language models from raw text to a served API, on one CPU or a Slurm cluster.",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `clusterlm COMMAND --help` for the options of one command."]
    return "\n".join(lines)


def _resolve(command: str):
    target, _ = COMMANDS[command]
    module_name, func_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("clusterlm"):
            raise NotImplementedError(f"`clusterlm {command}` is not built yet ({module_name})") from e
        raise
    return getattr(module, func_name)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return EXIT_OK
    if argv[0] == "--version":
        from clusterlm import __version__

        print(f"clusterlm {__version__}")
        return EXIT_OK
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(command, COMMANDS, n=1)
        hint = f"; did you mean `{close[0]}`?" if close else ""
        print(f"clusterlm: unknown command `{command}`{hint}\n\n{_usage()}", file=sys.stderr)
        return EXIT_USAGE
    if not logging.getLogger().handlers:
        from clusterlm.log import setup_logging

        setup_logging()
    from clusterlm.errors import ClusterlmError

    try:
        return int(_resolve(command)(rest) or 0)
    except ClusterlmError as e:
        print(f"clusterlm {command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except USAGE_ERRORS as e:
        print(f"clusterlm {command}: error: {_usage_message(e)}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # the reader of stdout went away (`| head`): nothing to report
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that the exit's flush is quiet
        return EXIT_BROKEN_PIPE
    except OSError as e:  # disk full, read-only file system, I/O error: the OS's words and the path
        print(f"clusterlm {command}: error: {_os_message(e)}", file=sys.stderr)
        return EXIT_IO
    except KeyboardInterrupt:
        print(f"clusterlm {command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _usage_message(e: Exception) -> str:
    """The message of a bad-input error; an OSError's without Python's "[Errno N] ...: 'path'" dress."""
    if isinstance(e, OSError) and e.strerror:
        path = f": {e.filename}" if e.filename and str(e.filename) not in e.strerror else ""
        return f"{e.strerror}{path}"
    return str(e)


def _os_message(e: OSError) -> str:
    import os

    what = e.strerror or (os.strerror(e.errno) if e.errno else str(e))
    path = f": {e.filename}" if e.filename else ""
    return f"{what}{path} (nothing half-written was left; free space or fix permissions and rerun)"
