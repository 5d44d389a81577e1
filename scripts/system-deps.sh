#!/usr/bin/env bash
# Best-effort system packages some tests use (Debian/Ubuntu, as root): Chromium for the chat-page
# test; docker.io (dockerd, containerd, runc) and debootstrap for the container-image test
# (tests/e2e/test_container.py); haproxy (tests/e2e/test_serve_replicas.py) and prometheus with
# promtool (tests/e2e/test_prometheus.py, tests/unit/test_serve_metrics.py). This never fails the run: a test whose package is missing skips
# with the reason; the container test fails instead in CI (CI=true), so a broken install there
# cannot pass unnoticed.
#   bash scripts/system-deps.sh
set -uo pipefail
[ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || { echo "system-deps: not root or no apt-get; skipping"; exit 0; }
groups=()
command -v chromium >/dev/null || groups+=("chromium")
# --no-install-recommends below, so what docker.io and debootstrap need of their Recommends is named:
# apparmor (dockerd refuses to start on an AppArmor kernel without apparmor_parser), cgroupfs-mount
# (cgroups on hosts without systemd), debian-archive-keyring (debootstrap checks the Release file).
# Left out: git, needrestart (its apt hook scans every process after each later install),
# prometheus-node-exporter, fonts and themes. A bare bookworm took 98 s for these groups with
# Recommends and 56 s without (measured 2026-12-07); the chat page renders the same.
{ command -v dockerd >/dev/null && command -v debootstrap >/dev/null; } \
    || groups+=("docker.io debootstrap apparmor cgroupfs-mount ca-certificates xz-utils debian-archive-keyring")
command -v haproxy >/dev/null || groups+=("haproxy")
{ command -v prometheus >/dev/null && command -v promtool >/dev/null; } || groups+=("prometheus")
[ ${#groups[@]} -eq 0 ] && exit 0
timeout 600 apt-get update -qq >/dev/null 2>&1 || true
for g in "${groups[@]}"; do  # one apt-get per test's packages: one failure does not take the others down
    echo "system-deps: installing $g"
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq --no-install-recommends $g >/dev/null 2>&1 \
        || echo "system-deps: could not install $g; the tests that need it will skip (fail in CI)"
done
exit 0
