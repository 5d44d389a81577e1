#!/usr/bin/env bash
# A base image made from Debian packages only (no registry): `debootstrap --variant=minbase` with
# python3 and its venv module, apt's caches and the docs trimmed, packed as a tar and imported with
# `docker import`. The tar is cached, so later calls only import it (seconds); debootstrap itself
# takes about 1.5 min and needs a Debian mirror (or a local one, DEBIAN_MIRROR=http://...).
#
#   sudo bash deploy/docker/debian-base.sh                       # image clusterlm-base:bookworm
#   sudo bash deploy/docker/debian-base.sh --tag mybase:12 --cache /srv/images/bookworm.tar
#   bash deploy/docker/build.sh --base clusterlm-base:bookworm
#
# Options: --tag NAME (clusterlm-base:SUITE), --suite SUITE (bookworm), --cache TAR
# (~/.cache/clusterlm/debian-SUITE-minbase-python3.tar), --no-import (only make the tar).
# DEBIAN_MIRROR (http://deb.debian.org/debian) and DOCKER (docker) are read. Needs root and debootstrap.
set -euo pipefail

suite=bookworm tag="" cache="" import=1
need() { [ $# -ge 2 ] || { echo "debian-base.sh: $1 needs a value (see --help)" >&2; exit 2; }; }
while [ $# -gt 0 ]; do
    case "$1" in
        --tag) need "$@"; tag="$2"; shift 2 ;;
        --suite) need "$@"; suite="$2"; shift 2 ;;
        --cache) need "$@"; cache="$2"; shift 2 ;;
        --no-import) import=0; shift ;;
        -h|--help) awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"; exit 0 ;;
        *) echo "debian-base.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
tag="${tag:-clusterlm-base:$suite}"
cache="${cache:-$HOME/.cache/clusterlm/debian-$suite-minbase-python3.tar}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
DOCKER="${DOCKER:-docker}"

if [ ! -s "$cache" ]; then
    command -v debootstrap >/dev/null || { echo "debian-base.sh: debootstrap is not installed (apt-get install debootstrap)" >&2; exit 1; }
    [ "$(id -u)" = 0 ] || { echo "debian-base.sh: debootstrap needs root" >&2; exit 1; }
    mkdir -p "$(dirname "$cache")"
    root=$(mktemp -d "${TMPDIR:-/tmp}/clusterlm-rootfs.XXXXXX")
    trap 'rm -rf "$root"' EXIT
    echo "debian-base.sh: debootstrap $suite from $mirror (about 1.5 min)"
    if ! debootstrap --variant=minbase --include=python3,python3-venv "$suite" "$root" "$mirror" \
            > "$root.log" 2>&1; then
        echo "debian-base.sh: debootstrap $suite from $mirror failed (is the mirror reachable? set DEBIAN_MIRROR);" \
             "last lines of its log:" >&2
        tail -5 "$root.log" >&2
        rm -f "$root.log"
        exit 1
    fi
    rm -f "$root.log"
    # what official slim images leave out: downloaded .debs, package lists, documentation
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
           "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/*
    tar --numeric-owner -C "$root" -cf "$cache.tmp" .
    mv "$cache.tmp" "$cache"
    echo "debian-base.sh: $cache ($(du -h "$cache" | cut -f1))"
fi
if [ "$import" = 1 ]; then
    "$DOCKER" import --change 'CMD ["python3"]' "$cache" "$tag" >/dev/null
    echo "debian-base.sh: imported $tag from $cache"
fi
