"""Architecture rules for clusterlm/models (ARCHITECTURE.md, STYLE.md "Model code is math only").

Checked by reading the source with `ast`, not by importing it: no torch.distributed, no
environment reads, no device strings or .cuda(), no inference_mode; and models/config.py imports
with torch blocked, so `clusterlm plan` runs on a login node without torch.

Run: .venv/bin/python -m pytest -q tests/model/test_architecture.py
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import clusterlm.models
from tests.helpers import BLOCK_TORCH

MODELS_DIR = Path(clusterlm.models.__file__).parent
SOURCES = sorted(MODELS_DIR.rglob("*.py"))


def _dotted(node: ast.AST) -> str:
    """'os.environ' for Attribute(Name('os'), 'environ'); '' for anything not a dotted name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        where = f"{path.name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("torch.distributed"):
                    found.append(f"{where} imports {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            names = {a.name for a in node.names}
            if mod.startswith("torch.distributed") or (mod == "torch" and "distributed" in names):
                found.append(f"{where} imports torch.distributed")
            if mod == "os" and names & {"environ", "getenv", "putenv"}:
                found.append(f"{where} imports os.{names}")
        elif isinstance(node, ast.Attribute):
            name = _dotted(node)
            if name.startswith("torch.distributed") or name in ("os.environ", "os.getenv"):
                found.append(f"{where} uses {name}")
            if node.attr in ("cuda", "inference_mode", "is_cuda"):
                found.append(f"{where} uses .{node.attr}")
            if node.attr == "type" and isinstance(node.value, ast.Attribute) and node.value.attr == "device":
                found.append(f"{where} branches on a device type (.device.type): the caller decides")
        elif isinstance(node, ast.Constant) and node.value in ("cuda", "mps", "xla"):
            found.append(f"{where} has device string {node.value!r}")
    return found


def test_models_dir_has_the_model_files() -> None:
    """The scan covers the files it is meant to (config, build, transformer, rnn)."""
    names = {p.name for p in SOURCES}
    assert {"config.py", "build.py", "transformer.py", "rnn.py"} <= names


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_models_are_math_only(path: Path) -> None:
    """No file under clusterlm/models imports torch.distributed, reads os.environ/os.getenv, names a
    device, calls .cuda(), branches on a device type or uses inference_mode (reference: the rule list
    in STYLE.md; issue 13: device decisions belong to the caller)."""
    assert _violations(path) == []


def test_scanner_catches_violations(tmp_path: Path) -> None:
    """The scanner itself flags each forbidden pattern in a planted file (one finding per line)."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import os, sys\n"
        "import torch.distributed as dist\n"
        "from torch import distributed\n"
        "x = os.environ['RANK']\n"
        "y = t.cuda()\n"
        "z = t.to('cuda')\n"
        "@torch.inference_mode()\ndef f(): pass\n"
        "if x.device.type == 'cpu': pass\n",
        encoding="utf-8",
    )
    lines = {v.split(":")[1].split()[0] for v in _violations(bad)}
    assert lines == {"2", "3", "4", "5", "6", "7", "9"}  # a bare `import os` is allowed


def test_model_config_imports_without_torch() -> None:
    """`import clusterlm.models.config` succeeds in a fresh interpreter whose import system raises on
    any `import torch` (a meta path finder), and get_preset('gpt2-124m').num_params() is 124,439,808."""
    code = (
        BLOCK_TORCH +
        "from clusterlm.models.config import get_preset\n"
        "assert 'torch' not in sys.modules\n"
        "print(get_preset('gpt2-124m').num_params())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "124439808"
