#!/usr/bin/env bash
# The Milvus "text to image search" tutorial, as two services: install, start
# the embedder and the search service (embedded Milvus Lite) as separate
# processes, ingest a folder of images, search it by text, write the grid.
#
# Offline by default: the bundled test model (tests/fixtures/shapes-clip) and
# a generated set of coloured shapes. With the real CLIP and your own folder:
#   MODEL=openai/clip-vit-base-patch32 IMAGES=~/photos QUERY="a white dog" bash scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-demo}
EMBEDDER_PORT=${EMBEDDER_PORT:-50051}
SEARCH_PORT=${SEARCH_PORT:-50052}
SERVER=127.0.0.1:$SEARCH_PORT

bash scripts/install.sh
. .venv/bin/activate
mkdir -p "$WORK"

if [ -z "${MODEL:-}" ] || [ -z "${IMAGES:-}" ]; then
  echo "offline demo: bundled test model and generated images (see README for the real CLIP)"
fi
if [ -z "${MODEL:-}" ]; then
  MODEL=tests/fixtures/shapes-clip
  export HF_HUB_OFFLINE=1
fi
if [ -z "${IMAGES:-}" ]; then
  IMAGES=$WORK/images
  python -m imagesearch.synthetic "$IMAGES" --seed 7 --per-label 10
  QUERY=${QUERY:-a photo of a red circle}
fi
QUERY=${QUERY:-a white dog}

python -m embedder_service --model "$MODEL" --host 127.0.0.1 --port "$EMBEDDER_PORT" \
  > "$WORK/embedder.log" 2>&1 &
EMBEDDER_PID=$!
trap 'kill $EMBEDDER_PID 2>/dev/null; wait' EXIT
echo "waiting for the services (logs in $WORK/)"
imgsearch health "127.0.0.1:$EMBEDDER_PORT" --wait 600 >/dev/null \
  || { echo "embedder did not start:"; tail -20 "$WORK/embedder.log"; exit 1; }
python -m search_service --host 127.0.0.1 --port "$SEARCH_PORT" \
  --embedder "127.0.0.1:$EMBEDDER_PORT" --data-dir "$WORK/data" > "$WORK/search.log" 2>&1 &
SEARCH_PID=$!
trap 'kill $SEARCH_PID $EMBEDDER_PID 2>/dev/null; wait' EXIT
imgsearch health "$SERVER" --wait 60 >/dev/null \
  || { echo "search service did not start:"; tail -20 "$WORK/search.log"; exit 1; }

imgsearch --server "$SERVER" ingest "$IMAGES"
imgsearch --server "$SERVER" stats
echo "top 10 for: $QUERY"
imgsearch --server "$SERVER" search "$QUERY" -k 10 --grid "$WORK/results.png"
