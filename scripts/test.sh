#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite. Extra arguments go to pytest.
#   bash scripts/test.sh            # everything
#   bash scripts/test.sh tests/unit # one folder
# In CI (CI=true) or with CLUSTERLM_SYSTEM_DEPS=1 it first installs optional system packages
# (scripts/system-deps.sh: Chromium for the chat-page test); without them those tests skip.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "${CI:-}" = "true" ] || [ "${CLUSTERLM_SYSTEM_DEPS:-}" = "1" ]; then bash scripts/system-deps.sh; fi
exec .venv/bin/python -m pytest "$@"
