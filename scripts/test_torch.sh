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
VENV="$venv" TORCH="$version" bash scripts/setup.sh
# the CLI the tests start as a subprocess is this venv's
PATH="$PWD/$venv/bin:$PATH" exec "$venv/bin/python" -m pytest "$@"
