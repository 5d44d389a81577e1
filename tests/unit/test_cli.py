"""The `clusterlm` command: help text, lazy imports, exit codes."""

import json
import re
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
        # the description under the usage is whole (eval's stopped at "... on a data split, or")
        desc = " ".join(out.split("\n\n")[1].split())
        assert not re.search(r"(,| or| and| to| of)$", desc), f"{name}: {desc!r}"


def test_finetune_names_every_fine_tuning_task(capsys):
    """`clusterlm finetune` runs seq2seq recipes too (docs/encdec.md: multi30k_enfr_encdec_cpu); its --help
    and its refusal of a pre-training config said "task sft or classify" only."""
    from clusterlm.cli import main

    with pytest.raises(SystemExit) as e:
        main(["finetune", "--help"])
    assert e.value.code == 0 and "(task sft, classify or seq2seq;" in " ".join(capsys.readouterr().out.split())
    assert main(["finetune", "--train.max_steps=1"]) == 2
    assert "set [finetune] task = 'sft', 'classify' or 'seq2seq'" in capsys.readouterr().err


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


def test_a_bad_path_is_said_without_errno(tmp_path, capsys):
    """An OSError that means bad input (exit 2) is said in words and the path, without Python's
    "[Errno 21] ...: '/path'" (it was that for `plan --out FOLDER`, `cluster merge --out FOLDER`)."""
    from clusterlm.cli import main

    assert main(["plan", "--model", "gpt-nano", "--vocab-size", "65", "--cluster", "h100-sxm-8x", "--top", "1",
                 "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (f"clusterlm plan: error: --out {tmp_path} is a directory; "
                                                         f"give a file name")
    assert main(["cluster", "merge", str(tmp_path / "missing.toml"), "--out", str(tmp_path / "c.toml")]) == 2
    assert "Errno" not in capsys.readouterr().err
    from clusterlm.cli import _usage_message

    assert _usage_message(PermissionError(13, "Permission denied", "/p")) == "Permission denied: /p"
    assert _usage_message(IsADirectoryError(21, "/d is a directory; give a file name", "/d")) == \
        "/d is a directory; give a file name"
    (tmp_path / "f").write_text("")
    assert main(["plan", "--model", "gpt-nano", "--vocab-size", "65", "--cluster", "h100-sxm-8x", "--top", "1",
                 "--out", str(tmp_path / "f" / "r.toml")]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert "Errno" not in err and str(tmp_path / "f") in err, err


def test_plan_and_merge_check_out_before_the_work(tmp_path, capsys):
    """`plan --out` and `cluster merge --out` under a file: exit 2 naming --out and the file, before the plan
    is printed (it was "File exists: PATH" after the table); a folder still to be made is created."""
    from clusterlm.cli import main

    (tmp_path / "f").write_text("")
    assert main(["plan", "--model", "gpt-nano", "--vocab-size", "65", "--cluster", "h100-sxm-8x", "--top", "1",
                 "--out", str(tmp_path / "f" / "r.toml")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and f"error: --out {tmp_path / 'f' / 'r.toml'}: {tmp_path / 'f'} is not a folder" in err
    assert main(["cluster", "merge", "h100-sxm-8x", "--out", str(tmp_path / "f" / "c.toml")]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["cluster", "merge", "h100-sxm-8x", "--out", str(tmp_path / "new" / "c.toml")]) == 0
    assert (tmp_path / "new" / "c.toml").is_file()


def test_setup_stops_when_pip_fails(tmp_path):
    """scripts/setup.sh (README: run by quickstart.sh and test.sh) ran `pip install -e .[test,serve,eval] | grep
    ... || true`, so a failed install (no network, a dependency without a wheel) was swallowed and setup went
    on as if it had worked; now pip's failure stops it with pip's exit status, as the torch install already did.
    A venv of stand-ins: python answers every check, pip fails."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    for name, body in (("python", "exit 0"), ("pip", "echo 'ERROR: No matching distribution found for fastapi' >&2; exit 1")):
        (venv / "bin" / name).write_text(f"#!/bin/sh\n{body}\n")
        (venv / "bin" / name).chmod(0o755)
    r = subprocess.run(["bash", str(root / "scripts" / "setup.sh")], capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "VENV": str(venv)})
    assert r.returncode == 1 and "No matching distribution found for fastapi" in r.stdout + r.stderr, (r.stdout, r.stderr)
