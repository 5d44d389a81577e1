#!/usr/bin/env bash
# Run the test suite on another torch release, in a venv of its own (.venv-torch-VERSION, ignored by
# git), so that a torch older or newer than setup.sh's 2.13.0 is known to work before a machine that
# has it runs clusterlm (the lent GPU machines have torch 2.11):
#   bash scripts/test_torch.sh 2.11.0                                   # the whole suite (~15 min, 2 cores)
#   bash scripts/test_torch.sh 2.11.0 tests/distributed -x              # any pytest arguments after the version
# Where the registry has no CPU wheel of that release this downloads the CUDA wheel and its NVIDIA
# libraries (about 4.6 GB installed for 2.11.0); the tests still run on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:?usage: bash scripts/test_torch.sh TORCH_VERSION [pytest args...]}
shift
venv=".venv-torch-$version"
PY="${PYTHON:-python3}"
[ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
if ! "$venv/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$version')" 2>/dev/null; then
    echo "test_torch: installing torch==$version into $venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "torch==$version" 2>&1 | { grep -v "^WARNING: Location" || true; }
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check -e ".[test,serve,eval]" 2>&1 | grep -v "^WARNING: Location" || true
"$venv/bin/python" -c "import torch; print(f'test_torch: torch {torch.__version__} in $venv')"
# the CLI the tests start as a subprocess is this venv's
PATH="$PWD/$venv/bin:$PATH" exec "$venv/bin/python" -m pytest "$@"
