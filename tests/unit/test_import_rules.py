"""The package's boundaries (shared ARCHITECTURE.md, "Boundaries"), checked by reading the source.

    .venv/bin/python -m pytest -q tests/unit/test_import_rules.py

Each rule is a function from a source root to a list of violations, so the same code checks the
real tree (must be empty) and a small fixture tree with one deliberate violation per rule (must
not be): a rule that cannot fail proves nothing. Lazy imports inside functions count like
top-level ones. tests/model/test_architecture.py holds the models/ rules (math only).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

import clusterlm
from tests.helpers import BLOCK_TORCH

ROOT = Path(clusterlm.__file__).parent

# Packages that may import torch.distributed (ARCHITECTURE.md: "imported only in parallel/ and checkpoint/").
DISTRIBUTED_OK = ("parallel", "checkpoint")
# Rank, launcher and Slurm allocation variables: read in parallel/ (launch.py), and by the Slurm and probe
# code of cluster/ only through an `env` mapping passed in (os.environ is the default, never read directly).
RANK_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")
RANK_VAR_PREFIXES = ("SLURM_", "TORCHELASTIC_")
RANK_VARS_OK = ("parallel/", "cluster/slurm.py", "cluster/probe.py", "cluster/probe_all.py")
# Command-line modules: the entry points. Library code never imports them (imports run downhill).
CLI_MODULES = ("clusterlm.cli", "clusterlm.__main__", "clusterlm.quickstart")
# Importable on a login node without torch: the CLI table, planning and Slurm code, configs.
TORCH_FREE = ("clusterlm.cli", "clusterlm.config", "clusterlm.errors", "clusterlm.models.config",
              "clusterlm.parallel.dims")
TORCH_FREE_PACKAGES = ("cluster",)


def _modules(root: Path) -> dict[str, Path]:
    """'clusterlm.a.b' -> file, for every .py under root (root's own name is the top package)."""
    out = {}
    for f in sorted(root.rglob("*.py")):
        parts = (root.name, *f.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, dotted name) of every import in the file, top-level or lazy; `from a import b` gives
    both 'a' and 'a.b' (b may be a module)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return found


def _rel(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def distributed_outside_allowed(root: Path) -> list[str]:
    bad = []
    for mod, path in _modules(root).items():
        pkg = _rel(root, path).split("/")[0]
        if pkg in DISTRIBUTED_OK:
            continue
        for line, name in _imports(path):
            if name == "torch.distributed" or name.startswith("torch.distributed."):
                bad.append(f"{_rel(root, path)}:{line} imports {name}")
    return sorted(set(bad))


def _is_rank_var(s: str) -> bool:
    """A variable's name (not a message that mentions one)."""
    return (s in RANK_VARS or s.startswith(RANK_VAR_PREFIXES)) and re.fullmatch(r"[A-Z][A-Z0-9_]*", s) is not None


def rank_vars_outside_allowed(root: Path) -> list[str]:
    """String constants naming rank/Slurm variables outside the allowed files, and direct
    os.environ/os.getenv reads of them in cluster/ (which must go through its `env` argument)."""
    bad = []
    for mod, path in _modules(root).items():
        rel = _rel(root, path)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        allowed = rel.startswith(RANK_VARS_OK)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and _is_rank_var(node.value):
                if not allowed:
                    bad.append(f"{rel}:{node.lineno} names {node.value}")
            if isinstance(node, ast.Call) and rel.startswith("cluster/"):
                f = ast.unparse(node.func)
                if f in ("os.environ.get", "os.getenv") and node.args and isinstance(node.args[0], ast.Constant) \
                        and isinstance(node.args[0].value, str) and _is_rank_var(node.args[0].value):
                    bad.append(f"{rel}:{node.lineno} reads {node.args[0].value} from os.environ, not its env argument")
            if isinstance(node, ast.Subscript) and rel.startswith("cluster/") and ast.unparse(node.value) == "os.environ":
                bad.append(f"{rel}:{node.lineno} reads os.environ[...] directly, not its env argument")
    return sorted(set(bad))


def _is_cli(mod: str) -> bool:
    return mod in CLI_MODULES or mod.endswith(".cli")


def library_imports_cli(root: Path) -> list[str]:
    mods = _modules(root)
    bad = []
    for mod, path in mods.items():
        if _is_cli(mod):
            continue
        for line, name in _imports(path):
            if name in mods and _is_cli(name):
                bad.append(f"{_rel(root, path)}:{line} (library) imports the command-line module {name}")
    return sorted(set(bad))


def import_cycles(root: Path) -> list[str]:
    """Strongly connected groups of modules in the import graph (lazy imports included)."""
    mods = _modules(root)
    graph: dict[str, set[str]] = defaultdict(set)
    for mod, path in mods.items():
        for _, name in _imports(path):
            if name in mods and name != mod and not mod.startswith(name + "."):  # a package's own __init__
                graph[mod].add(name)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[str] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                cycles.append(" <-> ".join(sorted(group)))

    for m in sorted(mods):
        if m not in index:
            visit(m)
    return sorted(cycles)


RULES = {
    "torch.distributed only in parallel/ and checkpoint/": distributed_outside_allowed,
    "rank and Slurm variables only in parallel/ and, through `env`, the Slurm/probe code": rank_vars_outside_allowed,
    "library code never imports a command-line module": library_imports_cli,
    "imports run downhill: no import cycles": import_cycles,
}


@pytest.mark.parametrize("rule", list(RULES))
def test_rule_holds_on_the_tree(rule):
    """Every boundary rule finds nothing in clusterlm/."""
    assert RULES[rule](ROOT) == []


def _fixture_tree(tmp: Path) -> Path:
    """A package `clusterlm` with one deliberate violation of each rule."""
    files = {
        "__init__.py": "",
        "cli.py": "def main(): pass\n",
        "train/__init__.py": "",
        "train/loop.py": "import torch.distributed as dist\nimport os\nn = os.environ['WORLD_SIZE']\n",
        "cluster/__init__.py": "",
        "cluster/slurm.py": "import os\njob = os.environ.get('SLURM_JOB_ID')\n",
        "serve/__init__.py": "",
        "serve/app.py": "from clusterlm.generate.cli import render\n",
        "generate/__init__.py": "",
        "generate/cli.py": "def render(): pass\n",
        "data/__init__.py": "",
        "data/a.py": "def f():\n    from clusterlm.data import b\n",
        "data/b.py": "from clusterlm.data.a import f\n",
    }
    root = tmp / "clusterlm"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_each_rule_catches_a_deliberate_violation(tmp_path):
    """The fixture tree breaks every rule once, and each rule names the file and line."""
    root = _fixture_tree(tmp_path)
    assert distributed_outside_allowed(root) == ["train/loop.py:1 imports torch.distributed"]
    assert rank_vars_outside_allowed(root) == [
        "cluster/slurm.py:2 reads SLURM_JOB_ID from os.environ, not its env argument",
        "train/loop.py:3 names WORLD_SIZE"]
    assert library_imports_cli(root) == [
        "serve/app.py:1 (library) imports the command-line module clusterlm.generate.cli"]
    assert import_cycles(root) == ["clusterlm.data.a <-> clusterlm.data.b"]


def test_torch_free_modules_import_with_torch_blocked():
    """The CLI table, configs, ParallelDims and everything in cluster/ (the planner, the Slurm code, the
    probe's inventory) import on a login node without torch."""
    mods = list(TORCH_FREE) + sorted(m for m in _modules(ROOT)
                                     if m.split(".")[1:2] and m.split(".")[1] in TORCH_FREE_PACKAGES)
    code = BLOCK_TORCH + "import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in mods)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(mods) > 10


def test_docs_architecture_names_every_module():
    """docs/architecture.md has "one line per module": every module of the package is named there
    (models/ensemble.py, train/ema.py, finetune/distill.py and others were missing)."""
    doc = (ROOT.parent / "docs" / "architecture.md").read_text()
    missing = [str(p.relative_to(ROOT)) for p in sorted(ROOT.rglob("*.py"))
               if p.name not in ("__init__.py", "__main__.py") and not re.search(rf"\b{re.escape(p.name)}\b", doc)]
    assert not missing, f"not in docs/architecture.md: {missing}"
