"""The `clusterlm` command: help text, lazy imports, exit codes."""

import json
import subprocess
import sys

import pytest

from clusterlm.cli import COMMANDS
from clusterlm.errors import EXIT_INTERRUPTED
from tests.helpers import BLOCK_TORCH, console_script, signal_on_import



def run(*args, code=""):
    return subprocess.run([sys.executable, "-c", "import sys\n" + code + "\nfrom clusterlm.cli import main\nsys.exit(main(sys.argv[1:]))",
                           *args], capture_output=True, text=True)


def test_help_lists_every_command_without_torch():
    """`clusterlm --help` lists each command with its one line, and never imports torch."""
    r = run("--help", code=BLOCK_TORCH)
    assert r.returncode == 0, r.stderr
    for name, (_, help_) in COMMANDS.items():
        assert f"  {name}" in r.stdout and help_ in r.stdout


HELP_ALL = """
import contextlib, io, json, sys
from clusterlm.cli import COMMANDS, main
out = {}
for name in COMMANDS:
    buf, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(err):
        try:
            code = main([name, "--help"])
        except SystemExit as e:
            code = e.code
    out[name] = [code, buf.getvalue(), err.getvalue()[-2000:]]
print(json.dumps(out))
"""


def test_every_command_has_help():
    """Every command in the table answers --help with exit 0 and a usage line naming itself (all in
    one process: a process per command cost ~35 s of imports; the entry point itself is tested above
    and below)."""
    r = subprocess.run([sys.executable, "-c", HELP_ALL], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.splitlines()[-1])
    assert sorted(got) == sorted(COMMANDS)
    for name, (code, out, err) in got.items():
        assert code in (0, None), f"{name}: {code} {err}"
        assert f"clusterlm {name}" in out, name


def test_unknown_command_suggests():
    r = run("preapre")
    assert r.returncode == 2
    assert "did you mean `prepare`" in r.stderr


def test_module_entry_point_matches():
    r = subprocess.run([sys.executable, "-m", "clusterlm", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("clusterlm ")


def test_a_closed_pipe_ends_quietly():
    """`clusterlm plan ... | head -2`: the reader leaves early; exit 141 (as a tool killed by SIGPIPE)
    with nothing on stderr, not exit 74 with advice about disk space."""
    cmd = [sys.executable, "-m", "clusterlm", "plan", "--model", "llama-nano", "--vocab-size", "87", "--cluster",
           "h100-sxm-8x", "--tokens", "10M", "--top", "400"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader gone before the first write (imports take far longer than this)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141, err
    assert "error" not in err and "Traceback" not in err


@pytest.mark.parametrize("args, module, name", [(["prepare", "--help"], "clusterlm.cli", "clusterlm prepare"),
                                                 (["serve", "--help"], "clusterlm.errors", "clusterlm serve"),
                                                 (["--version"], "clusterlm.cli", "clusterlm")])
def test_ctrl_c_while_the_cli_imports_is_one_line_and_130(args, module, name):
    """Ctrl-C in a command's first ~30 ms, while the console script is still importing the CLI (before
    cli.main's own handler): one line `NAME: interrupted` and exit 130, as a Ctrl-C later gives
    (docs/cli.md), not a KeyboardInterrupt traceback. The SIGINT lands as `module` starts importing."""
    r = subprocess.run([*console_script(signal_on_import("SIGINT", module)), *args], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == EXIT_INTERRUPTED, r.stderr
    assert r.stderr == f"{name}: interrupted\n" and r.stdout == ""
