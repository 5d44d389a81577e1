#!/usr/bin/env bash
# Set up clusterlm in ./.venv: reuse an importable torch >= 2.11, else install torch==2.13.0 (CPU wheel
# where the machine has one), then install clusterlm with its test, serve and eval extras (eval:
# lm-evaluation-harness for the bridge's tests; it needs no torch of its own, the installed one stays).
#   bash scripts/setup.sh
# VENV=DIR and TORCH=X.Y.Z set up another venv with exactly that torch (scripts/test_torch.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
TORCH="${TORCH:-}"
if [ ! -x "$VENV/bin/python" ]; then
    if [ -z "$TORCH" ] && "$PY" -c "import torch" >/dev/null 2>&1; then
        echo "setup: reusing the torch of $PY"
        "$PY" -m venv --system-site-packages "$VENV"
    else
        "$PY" -m venv "$VENV"
    fi
fi
# a torch older than 2.11 (the oldest the suite has passed on, scripts/test_torch.sh) is replaced here,
# not by pip resolving pyproject's torch>=2.11 to the newest (CUDA) release
if [ -n "$TORCH" ]; then
    ok="torch.__version__.split('+')[0] == '$TORCH'"
else
    ok="tuple(map(int, torch.__version__.split('+')[0].split('.')[:2])) >= (2, 11)"
fi
if ! "$VENV/bin/python" -c "import sys, torch; sys.exit(not ($ok))" >/dev/null 2>&1; then
    echo "setup: installing torch==${TORCH:-2.13.0} into $VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "torch==${TORCH:-2.13.0}" 2>&1 | { grep -v "^WARNING: Location" || true; }
fi
"$VENV/bin/pip" install --quiet --disable-pip-version-check -e ".[test,serve,eval]" 2>&1 | { grep -v "^WARNING: Location" || true; }
"$VENV/bin/python" -c "import clusterlm, torch, lm_eval; print(f'setup: clusterlm {clusterlm.__version__}, torch {torch.__version__}, lm-eval {lm_eval.__version__} in $VENV')"
