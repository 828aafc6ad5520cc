#!/usr/bin/env bash
# The Milvus "text to image search" tutorial, as two services: install, start
# the embedder and the search service (embedded Milvus Lite) as separate
# processes, ingest a folder of images, search it by text, write the grid.
#
# Offline by default: the bundled test model (tests/fixtures/shapes-clip) and
# a generated set of coloured shapes. With the real CLIP and your own folder:
#   MODEL=openai/clip-vit-base-patch32 IMAGES=~/photos QUERY="a white dog" bash scripts/demo.sh
#
# The services listen on free loopback ports of their own (metrics off), so
# the demo never talks to another instance; it stops waiting as soon as one
# of its services exits, and shows that service's own error.
# SKIP_INSTALL=1 skips the install step (tests set it; .venv must exist).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-demo}

[ -n "${SKIP_INSTALL:-}" ] || bash scripts/install.sh
. .venv/bin/activate
mkdir -p "$WORK"

free_port() { python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
EMBEDDER_PORT=$(free_port)
SEARCH_PORT=$(free_port)
SERVER=127.0.0.1:$SEARCH_PORT

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

PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null; wait' EXIT

# wait_ready NAME PID ADDRESS LOG SECONDS: until ADDRESS is SERVING; fail at
# once, with the service's own last lines, if its process has exited.
wait_ready() {
  local name=$1 pid=$2 address=$3 log=$4 deadline=$((SECONDS + $5))
  until imgsearch health "$address" >/dev/null 2>&1; do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "the $name exited while starting; its log ($log) ends:" >&2
      grep -v "^\s*$" "$log" | tail -15 >&2
      exit 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "the $name is not ready after $5 s; its log ($log) ends:" >&2
      tail -15 "$log" >&2
      exit 1
    fi
    sleep 0.5
  done
}

echo "starting the services on 127.0.0.1:$EMBEDDER_PORT and $SERVER (logs in $WORK/)"
python -m embedder_service --model "$MODEL" --host 127.0.0.1 --port "$EMBEDDER_PORT" \
  --metrics-port 0 > "$WORK/embedder.log" 2>&1 &
PIDS+=($!)
wait_ready embedder "${PIDS[0]}" "127.0.0.1:$EMBEDDER_PORT" "$WORK/embedder.log" 600
python -m search_service --host 127.0.0.1 --port "$SEARCH_PORT" --metrics-port 0 \
  --embedder "127.0.0.1:$EMBEDDER_PORT" --data-dir "$WORK/data" > "$WORK/search.log" 2>&1 &
PIDS+=($!)
wait_ready "search service" "${PIDS[1]}" "$SERVER" "$WORK/search.log" 120

imgsearch --server "$SERVER" ingest "$IMAGES"
imgsearch --server "$SERVER" stats
echo "top 10 for: $QUERY"
imgsearch --server "$SERVER" search "$QUERY" -k 10 --grid "$WORK/results.png"
