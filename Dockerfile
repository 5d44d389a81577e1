# clusterlm serve as a container image, installed offline from a wheelhouse (docs/deploy.md).
#
#   bash deploy/docker/build.sh                  # fills build/wheelhouse, then builds clusterlm:cpu
#   docker build --network none -t clusterlm:cpu .   # the same build by hand, once the wheelhouse is there
#                                                    # (BuildKit: Docker 23+; DOCKER_BUILDKIT=1 on 20.10)
#
# Nothing is downloaded while building: every Python package comes from build/wheelhouse
# (`pip install --no-index`), made beforehand by deploy/docker/build.sh with `pip wheel`, the way
# air-gapped sites build. The wheelhouse's Python must match the base image's (cp311 for bookworm).
#
# Build arguments:
#   BASE_IMAGE  an image with python3 and its venv module (default: Python 3.11 on Debian bookworm;
#               deploy/docker/debian-base.sh makes one from Debian packages with debootstrap).
#               The CUDA variant uses the same base: torch's CUDA wheels carry the CUDA libraries,
#               the host's driver comes in through the NVIDIA container toolkit (`--gpus all`).
#   VARIANT     cpu or cuda: only a label; which torch is installed is decided by the wheelhouse
#               (build.sh --torch-index, e.g. https://download.pytorch.org/whl/cu128).
#   WHEELHOUSE  the wheelhouse folder in the build context (build/wheelhouse; build.sh gives
#               build/wheelhouse-cuda for the cuda variant).
#   UID         the user the server runs as (not root).
#
# Run (the model is a run directory mounted read-only at /models; the key a file at
# /run/secrets/clusterlm_api_key, readable by UID):
#   docker run -p 127.0.0.1:8000:8000 -v $PWD/runs/x:/models:ro \
#       -v $PWD/key.txt:/run/secrets/clusterlm_api_key:ro clusterlm:cpu
# Arguments after the image name replace the default command (they go to `clusterlm serve`):
#   docker run ... clusterlm:cpu /models --host 0.0.0.0 --api-key-file /run/secrets/k --model-name tiny

ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---- stage 1: the wheelhouse and the list of what serving needs, on their own --------------------------
# Never part of the image: the install below bind-mounts this stage on /mnt (BuildKit's RUN --mount; /mnt
# is in every Debian base, so not even a mount point is left behind), so no layer holds the wheels, and the 1 GB environment is installed where it runs instead of copied between stages
# (the COPY --from of the venv took 41 s of a 100 s build on 2 cores).
FROM scratch AS wheels
ARG WHEELHOUSE=build/wheelhouse
COPY ${WHEELHOUSE}/ /wheelhouse/
COPY deploy/docker/requirements-serve.txt /wheelhouse/

# ---- stage 2: the runtime: the base, a virtual environment from the wheelhouse, a non-root user ---------
FROM ${BASE_IMAGE}
ARG VARIANT=cpu
ARG UID=10001
LABEL org.opencontainers.image.title="clusterlm" \
      org.opencontainers.image.description="clusterlm serve: an OpenAI-compatible API over a checkpoint (${VARIANT})"
# --no-index: only the wheelhouse; a missing wheel fails here instead of reaching out. clusterlm
# without its dependencies, then what serving needs: training, report and metric packages
# (matplotlib, tensorboard, scikit-learn, scipy, ...) are not in the image. pip itself is removed.
RUN --mount=type=bind,from=wheels,source=/wheelhouse,target=/mnt \
    python3 -m venv /opt/clusterlm \
 && /opt/clusterlm/bin/pip install --no-index --find-links /mnt --no-cache-dir \
        --disable-pip-version-check --quiet --no-deps clusterlm \
 && /opt/clusterlm/bin/pip install --no-index --find-links /mnt --no-cache-dir \
        --disable-pip-version-check --quiet -r /mnt/requirements-serve.txt \
 && /opt/clusterlm/bin/pip uninstall --yes --quiet pip \
 && /opt/clusterlm/bin/python -c "import clusterlm.serve.app, torch; print('torch', torch.__version__)" \
 && useradd --uid ${UID} --user-group --no-create-home --home-dir /tmp --shell /usr/sbin/nologin clusterlm \
 && mkdir -p /models && chown root:root /models
# HOME=/tmp: the only place that must be writable, so the root filesystem can be read-only
# (docker run --read-only --tmpfs /tmp; readOnlyRootFilesystem in deploy/k8s/deployment.yaml)
ENV PATH=/opt/clusterlm/bin:${PATH} \
    HOME=/tmp \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CLUSTERLM_HEALTH_URL=http://127.0.0.1:8000/health
USER ${UID}:${UID}
VOLUME ["/models"]
EXPOSE 8000
# /health answers 200 while the process is alive (no key needed); set CLUSTERLM_HEALTH_URL when
# the command uses another --port
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['CLUSTERLM_HEALTH_URL'], timeout=4)"]
ENTRYPOINT ["clusterlm", "serve"]
# 0.0.0.0 only inside the container: the host decides what is published (-p, a Service).
# The key: a file mounted at this path (a Docker/Kubernetes secret); or replace the command and give
# `--api-key-env NAME` to read it from an environment variable (docs/deploy.md).
CMD ["/models", "--host", "0.0.0.0", "--port", "8000", "--api-key-file", "/run/secrets/clusterlm_api_key"]
