#!/usr/bin/env bash
# Best-effort system packages some tests use (Debian/Ubuntu, as root): Chromium for the chat-page
# test. Tests that need a missing package skip with a reason, so this never fails the run.
#   bash scripts/system-deps.sh
set -uo pipefail
[ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || { echo "system-deps: not root or no apt-get; skipping"; exit 0; }
need=()
command -v chromium >/dev/null || need+=(chromium)
[ ${#need[@]} -eq 0 ] && exit 0
echo "system-deps: installing ${need[*]}"
timeout 600 apt-get update -qq >/dev/null 2>&1 || true
DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq "${need[@]}" >/dev/null 2>&1 \
    || echo "system-deps: could not install ${need[*]}; the tests that need them will skip"
exit 0
