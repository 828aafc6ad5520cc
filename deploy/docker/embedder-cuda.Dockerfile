# syntax=docker/dockerfile:1
# CLIP embedder on an NVIDIA GPU (float16). Build from the repository root:
#   docker build -f deploy/docker/embedder-cuda.Dockerfile -t imagesearch/embedder-cuda:0.1.0 .
# Run with a GPU: docker run --gpus 1 ... (the host needs the NVIDIA driver and
# the NVIDIA Container Toolkit).
#
# The torch wheel brings its own CUDA runtime and cuDNN (PyPI's torch 2.13.0:
# CUDA 13.0 wheels), so the base image is CUDA's small "base" flavour: it only
# sets up the NVIDIA container environment, and its CUDA version makes the
# NVIDIA runtime refuse a host driver too old for torch's CUDA (13.0 needs
# driver 580 or newer) at start instead of torch failing later. A cudnn-runtime
# base would ship a second copy of the same libraries, several GB of it.
# Ubuntu 24.04's python3 is 3.12, the Python the other images use.
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-base-ubuntu24.04

FROM ${CUDA_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 DEBIAN_FRONTEND=noninteractive
# Ubuntu's package versions are not pinned: the archive drops superseded
# (security-fixed) versions, which would break the build. The tag pins the release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY constraints.txt ./
# torch and its CUDA libraries first, in their own layer (several GB), so code
# changes don't fetch them again. Empty TORCH_INDEX: PyPI, whose Linux x86_64
# torch is the CUDA build; or add a PyTorch index for another CUDA flavour
# (its +cuXYZ build wins over PyPI's; the other packages stay PyPI's, pinned)
# with a CUDA_IMAGE to match, e.g. for older drivers:
#   --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 \
#   --build-arg CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04
# torchvision (the build for the same torch and CUDA) brings nvJPEG: JPEGs are
# then decoded on the GPU (--image-decode auto).
ARG TORCH_INDEX=
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -c constraints.txt ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} torch torchvision
COPY pyproject.toml README.md ./
COPY imagesearch ./imagesearch
COPY embedder_service ./embedder_service
COPY search_service ./search_service
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -c constraints.txt ".[embedder,tracing]"

FROM ${CUDA_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
# The venv's python is a link to /usr/bin/python3: install the same package.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/app \
       --shell /usr/sbin/nologin app \
    && mkdir -p /models && chown 10001:10001 /models
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/models \
    HF_HUB_DISABLE_TELEMETRY=1 \
    EMBEDDER_DEVICE=cuda \
    EMBEDDER_HOST=0.0.0.0 \
    EMBEDDER_PORT=50051 \
    EMBEDDER_METRICS_PORT=9101
# /models is the Hugging Face cache: a volume keeps the checkpoint across restarts.
VOLUME ["/models"]
USER 10001:10001
WORKDIR /home/app
# 50051 gRPC, 9101 Prometheus metrics.
EXPOSE 50051 9101
# grpc.health.v1 overall status: SERVING once the model is loaded and warmed
# up. The long start period covers the first start's model download.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["sh", "-c", "imgsearch health 127.0.0.1:${EMBEDDER_PORT} || exit 1"]
ENTRYPOINT ["imgsearch-embedder"]
