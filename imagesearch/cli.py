"""`imgsearch`: ingest a folder, search by text or image, delete, stats.

Talks to the search service over gRPC; needs neither torch nor Milvus.
"""
from __future__ import annotations

import argparse
import difflib
import hashlib
import importlib.metadata
import json
import os
import re
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import Iterator

import grpc
from tqdm import tqdm

from imagesearch import errors
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


def collect(targets: list[str]) -> tuple[list[Path], int]:
    """The image files named by `targets` (files, or folders walked
    recursively), in order; and how many other files were skipped."""
    paths, skipped = [], 0
    for target in map(Path, targets):
        if target.is_dir():
            found = find_images(target)
            skipped += sum(1 for p in target.rglob("*") if p.is_file()) - len(found)
            paths += found
        elif target.is_file():
            paths.append(target)  # named on purpose: sent whatever its suffix
        else:
            raise FileNotFoundError(f"no such file or folder: {target}")
    return paths, skipped


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
    paths, skipped = collect(args.paths)
    if not paths:
        print(f"error: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in "
              f"{', '.join(args.paths)}", file=sys.stderr)
        return 2
    counts: Counter = Counter()
    unsent: list[tuple[str, str]] = []  # (uri, why) of files never sent
    failures: list[tuple[str, str]] = []  # (uri, why) of items the server refused
    items = _items(paths, client.max_message_bytes - 64 * 1024, unsent)  # room for uri, metadata
    inserted, present = IngestResult.STATUS_INSERTED, IngestResult.STATUS_ALREADY_PRESENT
    try:
        with tqdm(total=len(paths), unit="img", desc="ingest", disable=args.quiet) as bar:
            for result in client.ingest(items, collection=args.collection):
                counts[result.status] += 1
                if result.status == IngestResult.STATUS_FAILED:
                    failures.append((result.uri, result.error))
                if args.json:  # a line per result as it comes, even into a pipe
                    print(json.dumps({"index": result.index, "id": result.id, "uri": result.uri,
                                      "status": result.status.name.lower(),
                                      "error": result.error}),
                          flush=True)
                bar.update(sum(counts.values()) + len(unsent) - bar.n)
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second Ctrl-C ends it at once
        left = len(paths) - sum(counts.values()) - len(unsent)
        print(f"stopped: {counts[inserted]} inserted, {counts[present]} already present, "
              f"{len(failures) + len(unsent)} failed, {left} not stored; run the same command "
              "again to resume (what is stored is found again, not duplicated)", file=sys.stderr)
        return 130
    failures = unsent + failures
    others = f"; {skipped} other files skipped (not {'/'.join(sorted(IMAGE_SUFFIXES))})" \
        if skipped else ""
    print(f"{len(paths)} images: {counts[inserted]} inserted, {counts[present]} already present, "
          f"{len(failures)} failed{others}", file=sys.stderr if args.json else sys.stdout)
    for uri, why in failures:
        print(f"  failed: {printable(uri)}: {printable(why)}", file=sys.stderr if args.json else sys.stdout)
    return 1 if failures else 0


def _print_hits(hits: list[Hit], first_rank: int, as_json: bool) -> None:
    if as_json:
        print(json.dumps([{"rank": rank, "id": h.id, "score": h.score, "uri": h.uri,
                           "metadata": h.metadata} for rank, h in enumerate(hits, first_rank)],
                         indent=2))
        return
    labels = [printable(h.metadata.get("label", "")) for h in hits]
    width = max(map(len, labels), default=0)
    for rank, (hit, label) in enumerate(zip(hits, labels), first_rank):
        print(f"{rank:4d}  {hit.score:+.4f}  {hit.id}  {label:<{width}}  {printable(hit.uri)}")


def _why_empty(client: SearchClient, args: argparse.Namespace, options: dict, search) -> str:
    """Why a search found nothing, as far as the caller can tell."""
    count = client.stats(args.collection).count
    name = args.collection or "the default collection"
    if count == 0:
        return f"no hits: {name} is empty: ingest images first (imgsearch ingest FOLDER)"
    if args.offset >= count:
        return f"no hits: --offset {args.offset} is past the {count} images of {name}"
    filtered = bool(options["where"] or options["uri_prefix"])
    best = search(1, {**options, "min_score": None, "offset": 0})
    if filtered and not best:
        return f"no hits: none of the {count} images of {name} matches the filter"
    if best and args.min_score is not None:  # the filter matched: the threshold removed them
        among = " among the images that match the filter" if filtered else ""
        return (f"no hits: the best score{among} is {best[0].score:.4f}, below --min-score "
                f"{args.min_score}")
    return f"no hits among the {count} images of {name}"


def _local_prefix(prefix: str) -> str:
    """A relative path resolved as ingest stores paths (absolute); a URL or
    an absolute path as given. A trailing slash is kept: it matters."""
    if not prefix or "://" in prefix or prefix.startswith("/"):
        return prefix
    return str(Path(prefix).resolve()) + ("/" if prefix.endswith("/") else "")


def _read_image(path: str) -> bytes | None:
    """The bytes of --image PATH, or None after saying why there are none."""
    image = Path(path)
    if image.is_dir():
        print(f"error: --image {path} is a folder: give one image file (search takes one "
              "query image; `imgsearch ingest` takes folders)", file=sys.stderr)
        return None
    try:
        return image.read_bytes()
    except OSError as exc:
        print(f"error: cannot read --image {path}: {exc.strerror or exc}", file=sys.stderr)
        return None


def cmd_search(client: SearchClient, args: argparse.Namespace) -> int:
    args.query = " ".join(args.query) or None  # unquoted words are one query
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
    options = dict(where=where, uri_prefix=_local_prefix(args.uri_prefix), offset=args.offset,
                   min_score=args.min_score)
    image = None
    if args.image is not None and (image := _read_image(args.image)) is None:
        return 2

    def search(k: int, opts: dict):
        if image is not None:
            return client.search_image(image, k, args.collection, **opts)
        return client.search_text(args.query, k, args.collection, **opts)

    hits = search(args.k, options)
    _print_hits(hits, args.offset + 1, args.json)
    if not hits:
        print(_why_empty(client, args, options, search), file=sys.stderr)
    if args.grid:
        if not hits:
            print(f"no grid written to {args.grid}: there are no hits", file=sys.stderr)
        else:
            labels = None if args.no_labels else [
                f"#{rank} {hit.score:.3f}" for rank, hit in enumerate(hits, args.offset + 1)]
            out = write_grid([h.uri for h in hits], args.grid, labels)
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


def _global_flags(parser: argparse.ArgumentParser, after_command: bool) -> None:
    """The flags every command takes. They go before or after the command;
    given after it (`after_command`), they default to what was given before."""
    def default(value):
        return argparse.SUPPRESS if after_command else value
    parser.add_argument("--server", default=default(os.environ.get("IMGSEARCH_SERVER",
                                                                   DEFAULT_SEARCH_SERVER)),
                        help="search service HOST[:PORT] (env IMGSEARCH_SERVER; default "
                             f"{DEFAULT_SEARCH_SERVER}; port {DEFAULT_SEARCH_SERVER.rsplit(':', 1)[1]} "
                             "when left out)")
    parser.add_argument("--collection", default=default(""),
                        help="collection to use (default: the server's default)")
    parser.add_argument("--timeout", type=float, default=default(60.0),
                        help="seconds to wait for a search, delete or stats call (default 60)")
    parser.add_argument("--tls-ca", default=default(os.environ.get("IMGSEARCH_TLS_CA", "")),
                        metavar="PEM", help="connect with TLS, trusting this CA (env IMGSEARCH_TLS_CA)")
    parser.add_argument("--tls-cert", default=default(os.environ.get("IMGSEARCH_TLS_CERT", "")),
                        metavar="PEM", help="client certificate for mutual TLS (env IMGSEARCH_TLS_CERT)")
    parser.add_argument("--tls-key", default=default(os.environ.get("IMGSEARCH_TLS_KEY", "")),
                        metavar="PEM", help="its private key (env IMGSEARCH_TLS_KEY)")
    parser.add_argument("--token-file", default=default(""), metavar="PATH",
                        help="file holding the token the server requires; or set IMGSEARCH_TOKEN "
                             "(never on the command line)")


_EXAMPLES = {
    "ingest": """examples:
  imgsearch ingest ~/photos                      every image under ~/photos, recursively
  imgsearch ingest a.jpg b.png --collection pets --json""",
    "search": """examples:
  imgsearch search a white dog                   quotes are optional
  imgsearch search a white dog -k 10 --grid dogs.png
  imgsearch search --image query.jpg --filter label=dogs --min-score 0.2""",
    "stats": """example:
  imgsearch stats --collection pets""",
    "delete": """example:
  imgsearch delete ID [ID ...]                   the 64-hex ids that search and ingest --json print""",
    "health": """examples:
  imgsearch health                               the search service at --server
  imgsearch health localhost:50051 --wait 30     the embedder, waiting up to 30 s""",
}


def _version() -> str:
    try:
        return importlib.metadata.version("imagesearch")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _command(sub, name: str, summary: str, run) -> argparse.ArgumentParser:
    """A subcommand: its own arguments first (added by the caller), then the
    connection flags (`_connection`), then examples."""
    parser = sub.add_parser(name, help=summary, description=summary, epilog=_EXAMPLES[name],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(run=run)
    return parser


def _connection(parser: argparse.ArgumentParser) -> None:
    _global_flags(parser.add_argument_group("connection (also accepted before the command)"),
                  after_command=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imgsearch", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"imgsearch {_version()}")
    _global_flags(parser, after_command=False)
    sub = parser.add_subparsers(dest="command", required=True)

    ingest = _command(sub, "ingest", "add image files, and every image under folders, recursively",
                      cmd_ingest)
    ingest.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders to walk")
    ingest.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    ingest.add_argument("--json", action="store_true",
                        help="print one JSON object per image: index, id, uri, status, error")

    search = _command(sub, "search", "nearest images to a text, or to an image with --image",
                      cmd_search)
    search.add_argument("query", nargs="*", help='text to search for, e.g. a white dog (quotes '
                        'optional)')
    search.add_argument("--image", help="search by this image file instead of a text")
    search.add_argument("-k", "--top-k", dest="k", type=int, default=10,
                        help="number of hits (default %(default)s)")
    search.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE",
                        help="only images whose metadata KEY equals VALUE; repeat a key to "
                             "accept any of several values, repeat keys to require all "
                             "(ingest sets label=FOLDER NAME)")
    search.add_argument("--uri-prefix", default="", metavar="PREFIX",
                        help="only images whose uri starts with PREFIX; a relative path is made "
                             "absolute, as ingest stores paths")
    search.add_argument("--offset", type=int, default=0,
                        help="skip this many hits first, for paging (default %(default)s)")
    search.add_argument("--min-score", type=float, metavar="S",
                        help="drop hits with a cosine score below S, in [-1, 1]")
    search.add_argument("--json", action="store_true",
                        help="print a JSON array of {rank, id, score, uri, metadata}, best first")
    search.add_argument("--grid", metavar="PNG",
                        help="also write the hits as a grid of 150x150 thumbnails, 5 per row")
    search.add_argument("--no-labels", action="store_true",
                        help="grid tiles without their rank and score (the tutorial's plain grid)")

    _command(sub, "stats", "image count, dimension and model of a collection", cmd_stats)

    delete = _command(sub, "delete", "remove images by id", cmd_delete)
    delete.add_argument("ids", nargs="+", metavar="ID",
                        help="full image ids, as `search` and `ingest --json` print them")

    health = _command(sub, "health", "print a server's grpc.health.v1 status; exit 0 if SERVING",
                      cmd_health)
    health.add_argument("address", nargs="?", help="HOST:PORT of any of our servers (default --server)")
    health.add_argument("--wait", type=float, default=0, metavar="S",
                        help="wait up to S seconds for SERVING")
    for command in sub.choices.values():
        _connection(command)
    parser.commands = sub.choices  # for _parse: each subcommand's own errors
    return parser


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """The arguments; an unknown flag is refused by its subcommand, with its
    usage and the nearest flag it has."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        command = parser.commands[args.command]
        flags = [flag for flag in command._option_string_actions if flag.startswith("--")]
        near = difflib.get_close_matches(extra[0], flags, n=1, cutoff=0.6)
        command.error(f"unrecognized arguments: {' '.join(extra)}"
                      + (f" (did you mean {near[0]}?)" if near else ""))
    args.server = with_port(args.server)
    return args


def with_port(server: str) -> str:
    """HOST as HOST:50052, the search service's port (gRPC would dial 443);
    HOST:PORT, [v6]:PORT and scheme targets (unix:, dns:) as given."""
    if ":" in server.rsplit("]", 1)[-1]:
        return server
    return f"{server}:{DEFAULT_SEARCH_SERVER.rsplit(':', 1)[1]}"


def _hint(error: errors.ImageSearchError, server: str) -> str:
    """Who failed, and the one next step to try: by the error's type (its
    status code and reason), never by the words of its message."""
    if isinstance(error, errors.EmbedderUnavailable):
        return (f"the search service at {server} works, but its embedder does not answer: start "
                "the embedder, or check the search service's --embedder")
    if isinstance(error, errors.MilvusUnavailable):
        return (f"the search service at {server} works, but Milvus does not answer: start Milvus, "
                "or check the search service's --milvus-uri")
    if isinstance(error, errors.Unavailable):
        return (f"no search service answers at {server}: start one, or pass --server HOST:PORT "
                "(and --tls-ca if it serves TLS)")
    if isinstance(error, errors.Unimplemented):
        return (f"the server at {server} is not a search service (the embedder's port?): the "
                f"search service listens on {DEFAULT_SEARCH_SERVER.rsplit(':', 1)[1]} by default")
    if isinstance(error, errors.Unauthenticated):
        return "set IMGSEARCH_TOKEN or pass --token-file"
    return ""


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
    args = _parse(argv)
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
        error = errors.from_rpc_error(exc)
        print(f"error: {error.status.name}: {printable(error.message)}", file=sys.stderr)
        hint = _hint(error, args.server)
        if hint:
            print(hint, file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:  # e.g. an unreadable file, token or certificate
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # ingest prints its own summary; elsewhere nothing was changed
        return 130


if __name__ == "__main__":
    sys.exit(main())
