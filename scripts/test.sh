#!/usr/bin/env bash
# Install everything into .venv, then run the whole test suite (unit and
# integration: real service processes, real Milvus Lite, the bundled model).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python -m pytest -q "$@"
