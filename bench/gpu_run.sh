#!/usr/bin/env bash
# The GPU benchmark, as run on a lent H100/H200 (see docs/benchmarks.md): the
# packages that machine lacks travel as wheels in .whl/ (py3.12). After the
# suite, the embedder's tests run there too, so the GPU paths (nvJPEG, CUDA
# graphs) meet the same bad-input and ordering checks as the CPU ones.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# The Milvus server wheel (58 MB) does not fit one carry with the rest: an
# earlier call on the same warm machine installs it into /tmp/milvus-site.
# With it, the suite also measures ingest into a Milvus server through one
# search process and through one deployment of SEARCH_BENCH_WORKERS (default
# 8) worker processes on one port (--workers).
if [ -d /tmp/milvus-site/bin ]; then
  export PYTHONPATH=$PYTHONPATH:/tmp/milvus-site PATH=/tmp/milvus-site/bin:$PATH
fi
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi -L
python3 -c "import torch, torchvision, transformers, grpc, google.protobuf as p; print(torch.__version__, torchvision.__version__, transformers.__version__, grpc.__version__, p.__version__)"
python3 -m bench.suite --profile gpu --seconds "${SECONDS_PER_RUN:-15}" --commit "${COMMIT:-unknown}" \
  --work /tmp/benchwork ${TOKENIZER:+--tokenizer "$TOKENIZER"} $EXTRA --json "$OUT/gpu.json" 2>&1 | tee "$OUT/log"
status=$?
cp /tmp/benchwork/*.log "$OUT/" 2>/dev/null
# The peer side by side (bench/peer.py, about 2 minutes): Infinity's packages
# (Python 3.12 wheels in .peer/whl312, see docs/benchmarks.md) go ahead in a
# call of their own into /tmp/peer-site, as the Milvus server does; only the
# peer's process gets them on its path. PEER_MODEL: the checkpoint both serve
# (default the bundled test model; /tmp/benchwork/vit-b32-random after the
# suite for ViT-B/32).
if [ -d /tmp/peer-site/infinity_emb ]; then
  python3 -m bench.peer --device cuda --dtype float16 --batch-size 256 --preprocess-workers 14 \
    --image-clients 32 --procs 4 --seconds "${SECONDS_PER_RUN:-15}" ${PEER_MODEL:+--model "$PEER_MODEL"} \
    --peer-cmd "python3 -m infinity_emb.cli" --peer-pythonpath /tmp/peer-site \
    --commit "${COMMIT:-unknown}" --work /tmp/peerwork --json "$OUT/peer-gpu.json" 2>&1 | tail -60 | tee "$OUT/peer.log"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
  cp /tmp/peerwork/*.log "$OUT/" 2>/dev/null
fi
# TESTS: test paths; no Milvus server binary travels, so only the Lite variants
# run. float32, so that batch-versus-single comparisons test the decode path,
# not float16 rounding.
if [ -n "$TESTS" ]; then
  EMBEDDER_DTYPE=float32 python3 -m pytest -q -p no:cacheprovider $TESTS -k "not server" 2>&1 \
    | tail -40 | tee "$OUT/tests.log"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi
exit $status
