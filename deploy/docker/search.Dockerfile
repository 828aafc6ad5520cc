# syntax=docker/dockerfile:1
# Search service: the Milvus client side only (no torch, no milvus-lite: it
# always runs against a Milvus server, SEARCH_MILVUS_URI). Build from the
# repository root:
#   docker build -f deploy/docker/search.Dockerfile -t REGISTRY/imagesearch/search:0.1.0 .
# Reproducible: the base image by digest (the tag is for readers), every
# Python package by hash (deploy/requirements/search.txt), the build backend
# too (build.txt). Verify or refresh the digest with
#   docker buildx imagetools inspect python:3.12.8-slim-bookworm
ARG PYTHON_IMAGE=docker.io/library/python:3.12.8-slim-bookworm@sha256:2199a62885a12290dc9c5be3ca0681d367576ab7bf037da120e564723292a2f0

# Dependencies only: this layer changes when the lock file does, not the code.
FROM ${PYTHON_IMAGE} AS deps
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY deploy/requirements/search.txt /tmp/requirements.txt
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --require-hashes --no-deps -r /tmp/requirements.txt

# The code as a wheel, built with the hash-locked setuptools.
FROM ${PYTHON_IMAGE} AS wheel
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
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
# tini as PID 1 (Kubernetes has no --init): forwards signals, reaps children.
# Debian's package versions are not pinned: the archive drops superseded
# (security-fixed) versions, which would break the build; the digest pins the release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/app \
       --shell /usr/sbin/nologin app
# Two layers: the dependencies (cached across code changes), then the code.
COPY --from=deps /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    SEARCH_HOST=0.0.0.0 \
    SEARCH_PORT=50052 \
    SEARCH_HEALTH_PORT=8081 \
    SEARCH_METRICS_PORT=9102 \
    SEARCH_WORKERS=0
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-deps --no-index /wheels/*.whl
USER 10001:10001
WORKDIR /home/app
# SEARCH_WORKERS=0: one search process per core the container may use (its
# CPU limit, read from the cgroup), at most 8, all on one port; one process is
# bound by its interpreter lock at about one core.
# 50052 gRPC (TLS when --tls-cert is set), 8081 plaintext grpc.health.v1 only
# (probes), 9102 Prometheus metrics.
EXPOSE 50052 8081 9102
# The health-only port answers in plaintext even when 50052 is TLS-only.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["sh", "-c", "imgsearch health 127.0.0.1:${SEARCH_HEALTH_PORT} || exit 1"]
ENTRYPOINT ["tini", "--", "imgsearch-search"]
