# syntax=docker/dockerfile:1
# Search service: the Milvus client side only, no torch. Build from the repository root:
#   docker build -f deploy/docker/search.Dockerfile -t imagesearch/search:0.1.0 .
# Pinned: the base image tag here, every Python package through constraints.txt.
ARG PYTHON_IMAGE=python:3.12.8-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY constraints.txt pyproject.toml README.md ./
COPY imagesearch ./imagesearch
COPY embedder_service ./embedder_service
COPY search_service ./search_service
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -c constraints.txt ".[search,tracing]"

FROM ${PYTHON_IMAGE}
# A fixed non-root UID, so volume ownership and Kubernetes runAsUser/fsGroup
# can name it. /data holds the Milvus Lite file when SEARCH_MILVUS_URI is empty.
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/app \
       --shell /usr/sbin/nologin app \
    && mkdir -p /data && chown 10001:10001 /data
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    SEARCH_HOST=0.0.0.0 \
    SEARCH_PORT=50052 \
    SEARCH_METRICS_PORT=9102 \
    SEARCH_DATA_DIR=/data
VOLUME ["/data"]
USER 10001:10001
WORKDIR /home/app
# 50052 gRPC, 9102 Prometheus metrics.
EXPOSE 50052 9102
# grpc.health.v1 overall status: SERVING once Milvus is open and the server is up.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["sh", "-c", "imgsearch health 127.0.0.1:${SEARCH_PORT} || exit 1"]
ENTRYPOINT ["imgsearch-search"]
