# clip-search: the search server (`clip-serve`, the default command) and the indexer (`clip-index build`) in one
# CPU-only image. Build: `docker build -t clip-search:cpu .`; or `docker-compose build` (see docker-compose.yml).
#
# Two stages: the builder installs everything into a virtual environment at /opt/venv, the runtime copies only that
# venv onto a fresh slim base (no pip cache, no build files, no source tree).
#
# torch comes first, from PyTorch's CPU wheel index: a plain `torch` from PyPI is the CUDA build, several GB larger.
# For a CUDA image pass another index: `--build-arg TORCH_INDEX_URL=https://pypi.org/simple` (docker-compose.gpu.yml).
# torchvision is never installed: clip_model does its own preprocessing.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# optional extras of the project, e.g. EXTRAS=heif for HEIC/HEIF photos (pillow-heif bundles libheif: LGPL)
ARG EXTRAS=""

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# its own layer, so that editing the code does not download torch again
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY clip_model ./clip_model
COPY indexer ./indexer
COPY app ./app
# torch==TORCH_VERSION is already there and satisfies the project's `torch>=2.4`, so nothing replaces it.
# DL3013 (pin versions in pip): this installs the project itself from the build context; its dependencies' bounds
# live in pyproject.toml, and torch, the one that matters for the image's size, is pinned above.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".${EXTRAS:+[$EXTRAS]}" \
    && python -c "import torch, clip_model, indexer.cli, app.cli; assert torch.__version__.startswith('${TORCH_VERSION}')"


FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="clip-search" \
      org.opencontainers.image.description="Self-hostable semantic image search on CLIP (server and indexer)" \
      org.opencontainers.image.licenses="MIT"

# a fixed uid/gid, so that bind-mounted folders can be given to it: `chown -R 10001:10001 ./data`
RUN groupadd --system --gid 10001 clip \
    && useradd --system --uid 10001 --gid clip --home-dir /home/clip --create-home --shell /usr/sbin/nologin clip \
    && mkdir -p /data/index /data/cache /data/models /photos \
    && chown -R clip:clip /data /home/clip

COPY --from=builder /opt/venv /opt/venv

# /photos: the image folder, mounted read-only. /data: index, thumbnail cache and downloaded model weights (rw).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CLIPSEARCH_HOST=0.0.0.0 \
    CLIPSEARCH_PORT=8000 \
    CLIPSEARCH_IMAGE_ROOT=/photos \
    CLIPSEARCH_INDEX_DIR=/data/index \
    CLIPSEARCH_CACHE_DIR=/data/cache \
    CLIPSEARCH_LOG_FORMAT=json \
    CLIP_MODEL_CACHE=/data/models

VOLUME ["/photos", "/data"]
WORKDIR /home/clip
# numeric, so that orchestrators can verify it is not root (Kubernetes runAsNonRoot)
USER 10001:10001
EXPOSE 8000

# healthy = /readyz answers 200: an index is published and its model is loaded. Until the first
# `clip-index build` has run the container stays "unhealthy", and /readyz says why.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 CMD ["python", "-m", "app.healthcheck"]

CMD ["clip-serve"]
