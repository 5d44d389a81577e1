#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run the quickstart on the bundled Shakespeare corpus.
#   bash scripts/quickstart.sh [--minutes M] [--out DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/clusterlm quickstart "$@"
