#!/usr/bin/env bash
# Regenerate the hash-locked requirements of the three images from
# pyproject.toml's extras and constraints.txt:
#   deploy/requirements/compile.sh            (from anywhere; needs PyPI)
# uv resolves from PyPI's metadata only (no wheel is downloaded, the CUDA set
# included). It is installed into a throwaway venv, never into .venv.
# Each file starts with the exact command that wrote it; a test checks that
# every pin agrees with constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/../.."
UV_VERSION=${UV_VERSION:-0.13.9}
TOOLS=$(mktemp -d)
trap 'rm -rf "$TOOLS"' EXIT
python3 -m venv "$TOOLS/venv"
"$TOOLS/venv/bin/pip" install -q "uv==$UV_VERSION"
export UV_NO_CONFIG=1 UV_INDEX_URL=https://pypi.org/simple
# The images run CPython 3.12 on x86_64 glibc (python:3.12-slim, Ubuntu 24.04).
COMMON=(-c constraints.txt --generate-hashes --python-version 3.12
        --python-platform x86_64-manylinux_2_28 --no-header)

compile() {  # compile OUT ARGS...: OUT gets a header with the command, then the lock
  local out=$1; shift
  local cmd="uv pip compile pyproject.toml $* ${COMMON[*]}"
  {
    echo "# Hash-locked by deploy/requirements/compile.sh (uv $UV_VERSION, index https://pypi.org/simple):"
    echo "#   $cmd"
    echo "# Install with: pip install --require-hashes --no-deps -r $out"
  } > "$out"
  # shellcheck disable=SC2086
  "$TOOLS/venv/bin/uv" pip compile pyproject.toml "$@" "${COMMON[@]}" -q >> "$out"
}

# Search: the Milvus client side; no torch, and no milvus-lite (the `lite`
# extra), so no pyarrow or faiss either.
compile deploy/requirements/search.txt --extra search --extra tracing
# CUDA embedder: PyPI's torch 2.13.0 is the CUDA 13.0 build; its nvidia-*,
# cuda-* and triton wheels are locked here too.
compile deploy/requirements/embedder-cuda.txt --extra embedder --extra gpu --extra tracing
# CPU embedder: torch itself comes from PyTorch's CPU index (torch==VERSION+cpu,
# installed with --no-deps in its own layer), so the CUDA build's own
# dependencies are left out; the CPU wheel's (filelock, sympy, networkx,
# jinja2, fsspec, setuptools, typing-extensions) stay in.
NO_CUDA=(--no-emit-package torch --no-emit-package triton)
for pkg in $(grep -oE '^(nvidia|cuda)-[a-z0-9-]+' deploy/requirements/embedder-cuda.txt); do
  NO_CUDA+=(--no-emit-package "$pkg")
done
compile deploy/requirements/embedder-cpu.txt --extra embedder --extra tracing "${NO_CUDA[@]}"
# The build backend that turns the code into a wheel (pip wheel --no-build-isolation).
compile_build() {
  local out=deploy/requirements/build.txt
  local cmd="uv pip compile deploy/requirements/build.in --generate-hashes --python-version 3.12 --python-platform x86_64-manylinux_2_28 --no-header"
  {
    echo "# Hash-locked by deploy/requirements/compile.sh (uv $UV_VERSION, index https://pypi.org/simple):"
    echo "#   $cmd"
    echo "# Install with: pip install --require-hashes --no-deps -r $out"
  } > "$out"
  "$TOOLS/venv/bin/uv" pip compile deploy/requirements/build.in --generate-hashes \
    --python-version 3.12 --python-platform x86_64-manylinux_2_28 --no-header -q >> "$out"
}
compile_build
