# syntax=docker/dockerfile:1
# CLIP embedder on the CPU. Build from the repository root:
#   docker build -f deploy/docker/embedder-cpu.Dockerfile -t imagesearch/embedder-cpu:0.1.0 .
# Pinned: the base image tag here, every Python package through constraints.txt.
ARG PYTHON_IMAGE=python:3.12.8-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY constraints.txt ./
# torch alone first, from PyTorch's CPU index (PyPI's Linux wheel is a
# multi-GB CUDA build): its own layer, so code changes don't fetch it again.
# --no-deps: its small dependencies come from PyPI, pinned, in the next step.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -c constraints.txt --no-deps --index-url "$TORCH_INDEX" torch
COPY pyproject.toml README.md ./
COPY imagesearch ./imagesearch
COPY embedder_service ./embedder_service
COPY search_service ./search_service
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -c constraints.txt ".[embedder,tracing]"

FROM ${PYTHON_IMAGE}
# A fixed non-root UID, so volume ownership and Kubernetes runAsUser/fsGroup
# can name it. /models is the Hugging Face cache: a volume there keeps the
# downloaded checkpoint across restarts.
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/app \
       --shell /usr/sbin/nologin app \
    && mkdir -p /models && chown 10001:10001 /models
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/models \
    HF_HUB_DISABLE_TELEMETRY=1 \
    EMBEDDER_DEVICE=cpu \
    EMBEDDER_HOST=0.0.0.0 \
    EMBEDDER_PORT=50051 \
    EMBEDDER_METRICS_PORT=9101
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
