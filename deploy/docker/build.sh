#!/usr/bin/env bash
# Build the clusterlm serve image offline: `pip wheel` clusterlm and what serving needs
# (deploy/docker/requirements-serve.txt; torch pinned) into build/wheelhouse (build/wheelhouse-cuda for --variant cuda), then `docker build
# --network none` from the repository root, so the Dockerfile installs with `pip install --no-index`
# (docs/deploy.md).
#
#   bash deploy/docker/build.sh                                   # clusterlm:cpu on python:3.11-slim-bookworm
#   bash deploy/docker/build.sh --base clusterlm-base:bookworm --tag clusterlm:test
#   bash deploy/docker/build.sh --wheelhouse-only                 # then carry build/wheelhouse to the air gap
#   bash deploy/docker/build.sh --skip-wheelhouse                 # on the air-gapped side: the image only
#   bash deploy/docker/build.sh --variant cuda --torch-index https://download.pytorch.org/whl/cu128 --tag clusterlm:cuda
#
# Options: --tag TAG (clusterlm:VARIANT), --base IMAGE (python:3.11-slim-bookworm; must be local or
# pullable, and have python3 with venv), --variant cpu|cuda (cpu), --torch-index URL (an extra index
# for torch; default: pip's configuration), --torch-version V (2.13.0), --python PY (the interpreter
# that makes the wheels: its major.minor must be the base image's; default .venv/bin/python, else
# python3), --wheelhouse-only, --skip-wheelhouse (use build/wheelhouse as it is). BASE_IMAGE and
# TORCH_INDEX in the environment are the defaults of --base and --torch-index. DOCKER (default
# docker) is the client; DOCKER_HOST is honoured.
# The cpu variant refuses a torch that is not a +cpu build before downloading it: on Linux PyPI's
# plain torch wheel is the CUDA one and pulls several GB of nvidia-* wheels.
set -euo pipefail
cd "$(dirname "$0")/../.."

tag="" base="${BASE_IMAGE:-python:3.11-slim-bookworm}" variant=cpu torch_index="${TORCH_INDEX:-}"
torch_version=2.13.0 only=0 skip=0
py=""
need() { [ $# -ge 2 ] || { echo "build.sh: $1 needs a value (see --help)" >&2; exit 2; }; }
while [ $# -gt 0 ]; do
    case "$1" in
        --tag) need "$@"; tag="$2"; shift 2 ;;
        --base) need "$@"; base="$2"; shift 2 ;;
        --variant) need "$@"; variant="$2"; shift 2 ;;
        --torch-index) need "$@"; torch_index="$2"; shift 2 ;;
        --torch-version) need "$@"; torch_version="$2"; shift 2 ;;
        --python) need "$@"; py="$2"; shift 2 ;;
        --wheelhouse-only) only=1; shift ;;
        --skip-wheelhouse) skip=1; shift ;;
        -h|--help) awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"; exit 0 ;;
        *) echo "build.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$variant" in cpu|cuda) ;; *) echo "build.sh: --variant must be cpu or cuda, got $variant" >&2; exit 2 ;; esac
tag="${tag:-clusterlm:$variant}"
if [ -z "$py" ]; then if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi; fi
DOCKER="${DOCKER:-docker}"
# one wheelhouse per variant: both torches are 2.13.0 (+cpu sorts higher), so a shared one would
# install whichever came first
wheels=build/wheelhouse
[ "$variant" = cuda ] && wheels=build/wheelhouse-cuda
index_args=()
[ -n "$torch_index" ] && index_args=(--extra-index-url "$torch_index")
pyver=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')

mkdir -p "$wheels"
exec 9>build/wheelhouse.lock
flock 9  # one build at a time fills (and reads) the wheelhouse

make_wheelhouse() {
    # which torch wheel pip would take, without downloading it (the report has its URL)
    url=$("$py" -m pip install --dry-run --quiet --ignore-installed --no-deps --disable-pip-version-check \
          "${index_args[@]}" --report - "torch==$torch_version" 2> >(grep -v "^WARNING: Location" >&2) \
          | "$py" -c 'import json, sys, urllib.parse as u; print(u.unquote(json.load(sys.stdin)["install"][0]["download_info"]["url"]))')
    echo "build.sh: torch==$torch_version from ${url##*/}"
    if [ "$variant" = cpu ] && [[ "${url##*/}" != *+cpu* ]]; then
        echo "build.sh: --variant cpu needs a +cpu torch wheel, pip would take ${url##*/}; add" \
             "--torch-index https://download.pytorch.org/whl/cpu" >&2
        exit 2
    fi
    if [ "$variant" = cuda ] && [[ "${url##*/}" == *+cpu* ]]; then
        echo "build.sh: --variant cuda needs a CUDA torch wheel, pip would take ${url##*/} (from ${url%/*});" \
             "give --torch-index https://download.pytorch.org/whl/cu128, or keep a local +cpu wheel out of" \
             "pip's find-links (PIP_FIND_LINKS, pip.conf)" >&2
        exit 2
    fi

    start=$(date +%s)
    rm -f "$wheels"/clusterlm-*.whl  # always the working tree's clusterlm
    # clusterlm itself without its dependencies, then what serving needs (deploy/docker/requirements-serve.txt):
    # training, report and metric packages (matplotlib, tensorboard, scikit-learn, scipy, ...) stay out
    "$py" -m pip wheel --quiet --disable-pip-version-check --wheel-dir "$wheels" --no-deps . 2>&1 \
        | { grep -v "^WARNING: Location" || true; }
    "$py" -m pip wheel --quiet --disable-pip-version-check --wheel-dir "$wheels" --find-links "$wheels" \
        "${index_args[@]}" "torch==$torch_version" -r deploy/docker/requirements-serve.txt 2>&1 \
        | { grep -v "^WARNING: Location" || true; }
    ls "$wheels"/clusterlm-*.whl >/dev/null 2>&1 || { echo "build.sh: pip wheel failed (no clusterlm wheel in $wheels)" >&2; exit 1; }
    if [ "$variant" = cpu ] && ls "$wheels" | grep -q '^nvidia_'; then
        echo "build.sh: nvidia-* wheels in $wheels (a CUDA torch?); remove them and rerun" >&2
        exit 2
    fi
    echo "build.sh: wheelhouse $wheels ($(du -sh "$wheels" | cut -f1), Python $pyver) in $(( $(date +%s) - start )) s"
}
[ "$skip" = 0 ] && make_wheelhouse
[ "$only" = 1 ] && exit 0
ls "$wheels"/clusterlm-*.whl >/dev/null 2>&1 || { echo "build.sh: no clusterlm wheel in $wheels; run without --skip-wheelhouse" >&2; exit 1; }

# the wheels are for Python $pyver: the base image must run the same major.minor
base_ver=$("$DOCKER" run --rm --network none --entrypoint python3 "$base" \
           -c 'import sys; print("%d.%d" % sys.version_info[:2])') \
    || { echo "build.sh: cannot run python3 in the base image $base (docker pull/load/import it first)" >&2; exit 1; }
if [ "$base_ver" != "$pyver" ]; then
    echo "build.sh: the base image $base has Python $base_ver, the wheelhouse is for $pyver; pass --python python$base_ver" >&2
    exit 2
fi
start=$(date +%s)
# --network none: the build cannot download anything, whatever the Dockerfile says
# BuildKit (the default from Docker 23; 20.10, Debian bookworm's docker.io, needs it asked for): the
# Dockerfile bind-mounts the wheelhouse stage with RUN --mount
DOCKER_BUILDKIT=1 "$DOCKER" build --progress=plain --network none --build-arg "BASE_IMAGE=$base" --build-arg "VARIANT=$variant" \
    --build-arg "WHEELHOUSE=$wheels" -t "$tag" -f Dockerfile .
echo "build.sh: built $tag on $base in $(( $(date +%s) - start )) s"
