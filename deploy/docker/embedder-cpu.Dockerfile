# syntax=docker/dockerfile:1
# CLIP embedder on the CPU. Build from the repository root:
#   docker build -f deploy/docker/embedder-cpu.Dockerfile -t REGISTRY/imagesearch/embedder-cpu:0.1.0 .
# Reproducible: the base image by digest (the tag is for readers), every
# PyPI package by hash (deploy/requirements/embedder-cpu.txt), the build
# backend too (build.txt). torch is the exception: its CPU build comes from
# PyTorch's own index, pinned by version (TORCH_VERSION, the constraints.txt
# pin), which our lock tooling cannot reach; see docs/deploy.md.
ARG PYTHON_IMAGE=docker.io/library/python:3.12.8-slim-bookworm@sha256:2199a62885a12290dc9c5be3ca0681d367576ab7bf037da120e564723292a2f0

# Dependencies only: these layers change when the locks do, not the code.
FROM ${PYTHON_IMAGE} AS deps
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch alone first, from PyTorch's CPU index (PyPI's Linux wheel is a
# multi-GB CUDA build). --no-deps: its dependencies are in the lock below.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0+cpu
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-deps --index-url "$TORCH_INDEX" "torch==${TORCH_VERSION}"
COPY deploy/requirements/embedder-cpu.txt /tmp/requirements.txt
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --require-hashes --no-deps -r /tmp/requirements.txt

# The code as a wheel, built with the hash-locked setuptools.
FROM deps AS wheel
WORKDIR /src
COPY deploy/requirements/build.txt /tmp/build.txt
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --require-hashes --no-deps -r /tmp/build.txt
COPY pyproject.toml README.md ./
COPY imagesearch ./imagesearch
COPY embedder_service ./embedder_service
COPY search_service ./search_service
RUN pip wheel --no-deps --no-build-isolation --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
# tini as PID 1 (Kubernetes has no --init): forwards signals, reaps the
# preprocess worker processes. A fixed non-root UID, so volume ownership and
# Kubernetes runAsUser/fsGroup can name it. /models is the Hugging Face cache.
# Debian's package versions are not pinned: the archive drops superseded
# (security-fixed) versions, which would break the build; the digest pins the release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/app \
       --shell /usr/sbin/nologin app \
    && mkdir -p /models && chown 10001:10001 /models
# Two layers: the dependencies (cached across code changes), then the code.
COPY --from=deps /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/models \
    HF_HUB_DISABLE_TELEMETRY=1 \
    EMBEDDER_DEVICE=cpu \
    EMBEDDER_HOST=0.0.0.0 \
    EMBEDDER_PORT=50051 \
    EMBEDDER_HEALTH_PORT=8081 \
    EMBEDDER_METRICS_PORT=9101
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-deps --no-index /wheels/*.whl
VOLUME ["/models"]
USER 10001:10001
WORKDIR /home/app
# 50051 gRPC (TLS when --tls-cert is set), 8081 plaintext grpc.health.v1 only
# (probes), 9101 Prometheus metrics.
EXPOSE 50051 8081 9101
# The health-only port answers in plaintext even when 50051 is TLS-only. The
# long start period covers a first start that downloads the model.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["sh", "-c", "imgsearch health 127.0.0.1:${EMBEDDER_HEALTH_PORT} || exit 1"]
ENTRYPOINT ["tini", "--", "imgsearch-embedder"]
