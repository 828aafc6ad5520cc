"""`imgsearch`: ingest a folder, search by text or image, delete, stats.

Talks to the search service over gRPC; needs neither torch nor Milvus.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Iterator

import grpc
from tqdm import tqdm

from imagesearch.client import (DEFAULT_SEARCH_SERVER, Hit, IngestItem, IngestResult, SearchClient,
                                Security)
from imagesearch.grid import write_grid
from imagesearch.health import status, wait_serving
from imagesearch.security import channel_credentials

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """`text` with control characters escaped (\\x1b, \\n, ...): stored uris and
    metadata come from other callers and must not drive the terminal."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


def find_images(root: Path) -> list[Path]:
    """Image files under `root`, recursively, by suffix (any case), sorted."""
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _items(paths: list[Path], max_bytes: int, unsent: list[tuple[str, str]]) -> Iterator[IngestItem]:
    """Read lazily: the stream holds a few images in memory, never the folder.
    A file that cannot be sent is recorded in `unsent` and skipped alone."""
    for path in paths:
        uri = str(path.resolve())
        try:
            data = path.read_bytes()
        except OSError as exc:
            unsent.append((uri, f"cannot read: {exc.strerror or exc}"))
            continue
        if len(data) > max_bytes:
            unsent.append((uri, f"{len(data)} bytes, above the {max_bytes}-byte message limit"))
            continue
        yield IngestItem(image=data, uri=uri, metadata={"label": path.parent.name})


def cmd_ingest(client: SearchClient, args: argparse.Namespace) -> int:
    root = Path(args.dir)
    if not root.is_dir():
        print(f"error: {root} is not a directory", file=sys.stderr)
        return 2
    paths = find_images(root)
    if not paths:
        print(f"error: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}", file=sys.stderr)
        return 2
    counts: Counter = Counter()
    unsent: list[tuple[str, str]] = []  # (uri, why) of files never sent
    failures: list[tuple[str, str]] = []  # (uri, why) of items the server refused
    items = _items(paths, client.max_message_bytes - 64 * 1024, unsent)  # room for uri, metadata
    with tqdm(total=len(paths), unit="img", desc="ingest", disable=args.quiet) as bar:
        for result in client.ingest(items, collection=args.collection):
            counts[result.status] += 1
            if result.status == IngestResult.STATUS_FAILED:
                failures.append((result.uri, result.error))
            bar.update(sum(counts.values()) + len(unsent) - bar.n)
    failures = unsent + failures
    print(f"{len(paths)} images: {counts[IngestResult.STATUS_INSERTED]} inserted, "
          f"{counts[IngestResult.STATUS_ALREADY_PRESENT]} already present, {len(failures)} failed")
    for uri, why in failures:
        print(f"  failed: {printable(uri)}: {printable(why)}")
    return 1 if failures else 0


def _print_hits(hits: list[Hit], as_json: bool) -> None:
    if as_json:
        print(json.dumps([{"id": h.id, "score": h.score, "uri": h.uri, "metadata": h.metadata}
                          for h in hits], indent=2))
        return
    for rank, hit in enumerate(hits, 1):
        print(f"{rank:3d}  {hit.score:.4f}  {hit.id[:12]}  {printable(hit.uri)}")


def cmd_search(client: SearchClient, args: argparse.Namespace) -> int:
    if (args.query is None) == (args.image is None):
        print("error: give either a text query or --image PATH", file=sys.stderr)
        return 2
    where: dict[str, list[str]] = {}
    for pair in args.filter:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            print(f"error: --filter {pair!r} is not KEY=VALUE", file=sys.stderr)
            return 2
        where.setdefault(key, []).append(value)
    options = dict(where=where, uri_prefix=args.uri_prefix, offset=args.offset,
                   min_score=args.min_score)
    if args.image is not None:
        hits = client.search_image(Path(args.image).read_bytes(), args.k, args.collection, **options)
    else:
        hits = client.search_text(args.query, args.k, args.collection, **options)
    _print_hits(hits, args.json)
    if args.grid and hits:
        out = write_grid([h.uri for h in hits], args.grid)
        print(f"grid of {len(hits)} thumbnails written to {out}", file=sys.stderr)
    return 0


def cmd_stats(client: SearchClient, args: argparse.Namespace) -> int:
    stats = client.stats(args.collection)
    print(f"collection {stats.collection}: {stats.count} images, {stats.model.dim}-d vectors, "
          f"model {printable(stats.model.name)} ({printable(stats.model.fingerprint)})")
    return 0


def cmd_delete(client: SearchClient, args: argparse.Namespace) -> int:
    response = client.delete(args.ids, args.collection)
    print(f"deleted {response.deleted}")
    for missing in response.missing:
        print(f"  not found: {missing}")
    return 0


def cmd_health(client: SearchClient, args: argparse.Namespace) -> int:
    """Exit 0 when the server is SERVING (after waiting up to --wait seconds)."""
    credentials = None
    if args.security.tls:
        credentials = channel_credentials(args.tls_ca, args.tls_cert, args.tls_key)
    if args.wait:
        try:
            wait_serving(args.address or args.server, args.wait, credentials=credentials)
        except TimeoutError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    state = status(args.address or args.server, credentials=credentials)
    print(state)
    return 0 if state == "SERVING" else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imgsearch", description=__doc__.splitlines()[0])
    parser.add_argument("--server", default=os.environ.get("IMGSEARCH_SERVER", DEFAULT_SEARCH_SERVER),
                        help="search service HOST:PORT (env IMGSEARCH_SERVER; default %(default)s)")
    parser.add_argument("--collection", default="",
                        help="collection to use (default: the server's default)")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds to wait for a search, delete or stats call (default %(default)s)")
    parser.add_argument("--tls-ca", default=os.environ.get("IMGSEARCH_TLS_CA", ""), metavar="PEM",
                        help="connect with TLS, trusting this CA (env IMGSEARCH_TLS_CA)")
    parser.add_argument("--tls-cert", default=os.environ.get("IMGSEARCH_TLS_CERT", ""), metavar="PEM",
                        help="client certificate for mutual TLS (env IMGSEARCH_TLS_CERT)")
    parser.add_argument("--tls-key", default=os.environ.get("IMGSEARCH_TLS_KEY", ""), metavar="PEM",
                        help="its private key (env IMGSEARCH_TLS_KEY)")
    parser.add_argument("--token-file", default="", metavar="PATH",
                        help="file holding the token the server requires; or set IMGSEARCH_TOKEN "
                             "(never on the command line)")
    sub = parser.add_subparsers(dest="command", required=True)

    ingest = sub.add_parser("ingest", help="add every image under a folder, recursively")
    ingest.add_argument("dir", help="folder to walk")
    ingest.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    ingest.set_defaults(run=cmd_ingest)

    search = sub.add_parser("search", help="nearest images to a text, or to an image with --image")
    search.add_argument("query", nargs="?", help='text to search for, e.g. "a white dog"')
    search.add_argument("--image", help="search by this image file instead of a text")
    search.add_argument("-k", type=int, default=10, help="number of hits (default %(default)s)")
    search.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE",
                        help="only images whose metadata KEY equals VALUE; repeat a key to "
                             "accept any of several values, repeat keys to require all "
                             "(ingest sets label=FOLDER NAME)")
    search.add_argument("--uri-prefix", default="", metavar="PREFIX",
                        help="only images whose uri (ingest: absolute path) starts with PREFIX")
    search.add_argument("--offset", type=int, default=0,
                        help="skip this many hits first, for paging (default %(default)s)")
    search.add_argument("--min-score", type=float, metavar="S",
                        help="drop hits with a cosine score below S, in [-1, 1]")
    search.add_argument("--json", action="store_true",
                        help="print a JSON array of {id, score, uri, metadata}, best first")
    search.add_argument("--grid", metavar="PNG",
                        help="also write the hits as a grid of 150x150 thumbnails, 5 per row")
    search.set_defaults(run=cmd_search)

    stats = sub.add_parser("stats", help="image count, dimension and model of a collection")
    stats.set_defaults(run=cmd_stats)

    delete = sub.add_parser("delete", help="remove images by id")
    delete.add_argument("ids", nargs="+", metavar="ID", help="image ids, as ingest and search print")
    delete.set_defaults(run=cmd_delete)

    health = sub.add_parser("health", help="print a server's grpc.health.v1 status; exit 0 if SERVING")
    health.add_argument("address", nargs="?", help="HOST:PORT of any of our servers (default --server)")
    health.add_argument("--wait", type=float, default=0, metavar="S",
                        help="wait up to S seconds for SERVING")
    health.set_defaults(run=cmd_health)
    return parser


def _session_file(server: str) -> Path:
    """Where the CLI keeps the consistency token of its newest write to
    `server`, so that `imgsearch search` right after `imgsearch ingest` sees
    what was ingested, even on a Milvus server (whose token-less reads may
    lag a few seconds)."""
    state = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return state / "imgsearch" / f"{hashlib.sha256(server.encode()).hexdigest()[:16]}.token"


def _read_token(path: Path) -> bytes:
    try:
        return bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError):
        return b""


def _save_token(path: Path, token: bytes) -> None:
    """Best effort: a CLI that cannot write its state still did its work."""
    if token <= _read_token(path):  # tokens order as bytes; keep the newest
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(token.hex())
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        token = Path(args.token_file).read_text().strip() if args.token_file else \
            os.environ.get("IMGSEARCH_TOKEN", "")
        args.security = Security(args.tls_ca, args.tls_cert, args.tls_key, token)
        session = _session_file(args.server)
        with SearchClient(args.server, timeout_s=args.timeout, security=args.security) as client:
            client.consistency_token = _read_token(session)
            try:
                return args.run(client, args)
            finally:
                _save_token(session, client.consistency_token)
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {printable(exc.details() or '')}", file=sys.stderr)
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            print(f"is the search service running at {args.server}? (--server HOST:PORT; "
                  "--tls-ca if it serves TLS)", file=sys.stderr)
        elif exc.code() == grpc.StatusCode.UNAUTHENTICATED:
            print("set IMGSEARCH_TOKEN or pass --token-file", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:  # e.g. an unreadable file, token or certificate
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
