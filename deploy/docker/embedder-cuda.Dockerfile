# syntax=docker/dockerfile:1
# CLIP embedder on an NVIDIA GPU (float16). Build from the repository root:
#   docker build -f deploy/docker/embedder-cuda.Dockerfile -t REGISTRY/imagesearch/embedder-cuda:0.1.0 .
# Run with a GPU: docker run --gpus 1 ... (the host needs the NVIDIA driver and
# the NVIDIA Container Toolkit).
#
# The torch wheel brings its own CUDA runtime and cuDNN (PyPI's torch 2.13.0:
# CUDA 13.0 wheels, every one of them hash-locked in
# deploy/requirements/embedder-cuda.txt), so the base image is CUDA's small
# "base" flavour: it only sets up the NVIDIA container environment, and its
# CUDA version makes the NVIDIA runtime refuse a host driver too old for
# torch's CUDA (13.0 needs driver 580 or newer) at start instead of torch
# failing later. Ubuntu 24.04's python3 is 3.12, the Python the locks target.
# Pinned by digest (the tag is for readers); verify or refresh with
#   docker buildx imagetools inspect nvidia/cuda:13.0.1-base-ubuntu24.04
ARG CUDA_IMAGE=docker.io/nvidia/cuda:13.0.1-base-ubuntu24.04@sha256:f8ef28f579ea42a44b415d2c5d46f788e6a9b395c6c83f2929416e1fc192c143

# Dependencies only: this layer (several GB) changes when the lock does, not the code.
FROM ${CUDA_IMAGE} AS deps
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 DEBIAN_FRONTEND=noninteractive
# Ubuntu's package versions are not pinned: the archive drops superseded
# (security-fixed) versions, which would break the build; the digest pins the release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch, torchvision (nvJPEG: JPEGs decoded on the GPU) and the CUDA libraries.
COPY deploy/requirements/embedder-cuda.txt /tmp/requirements.txt
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

FROM ${CUDA_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
# The venv's python is a link to /usr/bin/python3: install the same package.
# tini as PID 1 (Kubernetes has no --init): forwards signals, reaps the
# preprocess worker processes.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 tini \
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
    EMBEDDER_DEVICE=cuda \
    EMBEDDER_HOST=0.0.0.0 \
    EMBEDDER_PORT=50051 \
    EMBEDDER_HEALTH_PORT=8081 \
    EMBEDDER_METRICS_PORT=9101
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-deps --no-index /wheels/*.whl
# /models is the Hugging Face cache: a volume keeps the checkpoint across restarts.
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
