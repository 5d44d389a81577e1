"""`clusterlm serve` options as an operator writes them: refusals are one line on stderr and exit 2,
before anything binds, loads or generates a key (the console script in a child process, with a
timeout: a server that starts instead is killed, and the test fails)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from clusterlm.errors import EXIT_USAGE
from tests.helpers import console_script, random_checkpoint

ROOT = Path(__file__).resolve().parents[2]
TEXT = "\n".join(f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(20))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return random_checkpoint(tmp_path_factory.mktemp("opts"), "byte", TEXT, bpe_vocab=0, n_layers=1, context=64)


def _refused(run: Path, *args: str) -> str:
    """stderr of `clusterlm serve RUN --port 0 ARGS`, which must exit 2 with one line and print no key."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CLUSTERLM_TEST_KEY": "operator-key-0123"}
    try:
        r = subprocess.run([*console_script(), "serve", str(run), "--host", "127.0.0.1", "--port", "18190", *args],
                           capture_output=True, text=True, timeout=90, env=env)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"serve {args} started instead of refusing: {e.stdout!r}") from None
    err = r.stderr.strip()
    assert r.returncode == EXIT_USAGE, (r.returncode, err)
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert "API key (generated" not in r.stdout, r.stdout
    return err


def test_empty_key_option_is_refused_not_replaced_by_a_generated_key(run):
    """`--api-key-env "$NAME"` or `--api-key-file "$FILE"` with the shell variable unset is an empty
    value: refused (exit 2, one line), where it used to start the server with a random key, as if
    neither option had been given (the clients' real key then got 401)."""
    for flag in ("--api-key-env", "--api-key-file"):
        assert f"{flag} '' is empty" in _refused(run, flag, "")


def test_refused_key_file_gets_no_mode_warning_first(run, tmp_path):
    """An empty (or placeholder) key file that is world-readable: the one error line only, not the
    mode warning about a file that will not be used followed by the error."""
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    placeholder = tmp_path / "placeholder.txt"
    placeholder.write_text("CHANGE-ME-placeholder-not-a-secret\n")
    for path, fragment in ((empty, "is empty"), (placeholder, "placeholder")):
        path.chmod(0o644)
        err = _refused(run, "--api-key-file", str(path))
        assert fragment in err and "mode" not in err, err


def test_device_cuda_without_a_gpu_names_a_value_serve_accepts(run):
    """`--device cuda` without a GPU said "use 'auto' or 'cpu'", but serve's --device takes cpu or
    cuda only (`--device auto` is an argparse error): the refusal names 'cpu' alone."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: --device cuda is served")
    err = _refused(run, "--device", "cuda")
    assert err.endswith("error: --device='cuda' but no CUDA device is available; use 'cpu'"), err


def test_stream_guard_refuses_itself_as_upstream(capsys):
    """`clusterlm stream-guard --upstream http://127.0.0.1:8020` (its own default port) relayed each
    request to itself until the client gave up (no answer at all); now refused, exit 2, one line.
    A different port, or another host, is still accepted as far as the option checks go."""
    for argv in (["--upstream", "http://127.0.0.1:18124", "--port", "18124"],
                 ["--upstream", "http://localhost:18124", "--port", "18124"],
                 ["--upstream", "http://127.0.0.1:18123", "--port", "18123", "--host", "0.0.0.0"],
                 ["--upstream", "http://[::1]:18123", "--port", "18123", "--host", "::1"]):
        try:
            proc = subprocess.run([*console_script(), "stream-guard", *argv], capture_output=True, text=True,
                                  timeout=30, env={**os.environ, "PYTHONPATH": str(ROOT)})
        except subprocess.TimeoutExpired:
            raise AssertionError(f"stream-guard {argv} started instead of refusing") from None
        err = proc.stderr.strip()
        assert proc.returncode == EXIT_USAGE and "is this guard's own address" in err, (argv, err)
        assert len(err.splitlines()) == 1, err
    from clusterlm.serve.relay import _refuse_self

    _refuse_self("http://127.0.0.1:8010", "127.0.0.1", 8020)  # the documented setup
    _refuse_self("http://10.0.0.5:8020", "127.0.0.1", 8020)


def test_max_batch_too_large_for_memory_names_the_option(run):
    """`--max-batch 100000000` (a typo, or a GPU's value on a small host) ended in "checkpoint RUN cannot
    be served: RuntimeError: [enforce fail at alloc_cpu.cpp:127] ... can't allocate memory", blaming
    the checkpoint; now the one line names max_batch, the memory asked for and --max-batch (exit 2)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CLUSTERLM_TEST_KEY": "operator-key-0123"}
    r = subprocess.run([*console_script(), "serve", str(run), "--host", "127.0.0.1", "--port", "18191",
                        "--api-key-env", "CLUSTERLM_TEST_KEY", "--max-batch", "100000000"],
                       capture_output=True, text=True, timeout=120, env=env)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == EXIT_USAGE, r.stderr[-2000:]
    assert last.startswith("clusterlm serve: error: model ") and "max_batch=100000000" in last, last
    assert "lower --max-batch" in last and "GiB asked" in last and "enforce fail" not in last, last


def test_key_file_with_a_byte_order_mark_reads_the_key_without_it(tmp_path):
    """A key file saved as "UTF-8 with BOM" (Windows Notepad, PowerShell 5's Out-File) kept U+FEFF at the
    start of the key, so every client's correct key got 401 with nothing to tell why; the BOM is not
    part of the key."""
    from clusterlm.serve.app import _read_key

    key = tmp_path / "key.txt"
    key.write_bytes("\ufeffoperator-key-0123\r\n".encode())
    key.chmod(0o600)
    assert _read_key(str(key)) == "operator-key-0123"
