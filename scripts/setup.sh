#!/usr/bin/env bash
# Set up clusterlm in ./.venv: reuse an importable torch >= 2.11, else install torch==2.13.0 (CPU wheel
# where the machine has one), then install clusterlm with its test, serve and eval extras (eval:
# lm-evaluation-harness for the bridge's tests; it needs no torch of its own, the installed one stays).
#   bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    if "$PY" -c "import torch" >/dev/null 2>&1; then
        echo "setup: reusing the torch of $PY"
        "$PY" -m venv --system-site-packages .venv
    else
        "$PY" -m venv .venv
    fi
fi
# torch older than 2.11 (the oldest the suite has passed on, scripts/test_torch.sh) is replaced here, not
# by pip resolving pyproject's torch>=2.11 to the newest (CUDA) release
if ! .venv/bin/python -c "import sys, torch; sys.exit(tuple(map(int, torch.__version__.split('+')[0].split('.')[:2])) < (2, 11))" >/dev/null 2>&1; then
    echo "setup: installing torch==2.13.0 (no importable torch, or one older than 2.11)"
    .venv/bin/pip install --quiet "torch==2.13.0"
fi
.venv/bin/pip install --quiet --disable-pip-version-check -e ".[test,serve,eval]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import clusterlm, torch, lm_eval; print(f'setup: clusterlm {clusterlm.__version__}, torch {torch.__version__}, lm-eval {lm_eval.__version__} in .venv')"
