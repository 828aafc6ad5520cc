"""Search-service configuration: flags with SEARCH_* environment twins, parsed once."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from imagesearch.flags import (EnvArgumentParser, ServerConfig, at_least, positive_float,
                               positive_int)


@dataclass(frozen=True)
class SearchConfig(ServerConfig):
    embedder: str
    embedder_timeout_s: float
    milvus_uri: str
    data_dir: str
    collection: str
    ingest_batch: int
    stream_idle_s: float
    milvus_timeout_s: float
    milvus_write_kb: int
    hnsw_m: int
    hnsw_ef_construction: int
    hnsw_ef: int
    auth_token_file: str
    embedder_tls_ca: str
    embedder_tls_cert: str
    embedder_tls_key: str
    workers: int
    # Internal, set by the parent of --workers for its workers: its pid, and
    # the Unix socket where it serves the Milvus Lite file (which only one
    # process can open).
    worker_of: int
    worker_lite_uri: str
    # From the environment only, never a flag: a token on a command line is
    # visible to every user of the machine. SEARCH_MILVUS_TOKEN, or
    # SEARCH_MILVUS_USER and SEARCH_MILVUS_PASSWORD.
    milvus_token: str = field(default="", repr=False)

    @property
    def milvus_target(self) -> str:
        """The server URI, or the Milvus Lite file under the data directory."""
        return self.milvus_uri or os.path.join(self.data_dir, "milvus.db")


def build_parser() -> EnvArgumentParser:
    p = EnvArgumentParser(
        prog="python -m search_service", env_prefix="SEARCH_",
        description="Serve text-to-image search over gRPC (imagesearch.v1.ImageSearchService): "
                    "ingest images, search by text or image, delete, stats. Vectors come from "
                    "the embedder service; rows live in Milvus (an embedded Milvus Lite file "
                    "by default, or a server with --milvus-uri). A Milvus token is read from "
                    "SEARCH_MILVUS_TOKEN only.")
    p.server_flags(port=50052)
    p.section("embedder")
    p.env_flag("--embedder", default="localhost:50051", help="embedder service address HOST:PORT")
    p.env_flag("--embedder-timeout-s", default=30.0, type=positive_float,
               help="longest wait for one embedder call; a shorter caller deadline wins")
    p.env_flag("--embedder-tls-ca", default="",
               help="PEM CA that signed the embedder's certificate: call the embedder over TLS")
    p.env_flag("--embedder-tls-cert", default="",
               help="PEM client certificate for mutual TLS with the embedder (needs the key)")
    p.env_flag("--embedder-tls-key", default="", help="PEM private key of --embedder-tls-cert")
    p.section("Milvus")
    p.env_flag("--milvus-uri", default="",
               help="Milvus server URI, e.g. http://localhost:19530; empty: embedded Milvus Lite "
                    "file DATA_DIR/milvus.db")
    p.env_flag("--data-dir", default="./data", help="where the Milvus Lite file lives")
    p.env_flag("--collection", default="images", help="collection used when a request names none")
    p.env_flag("--milvus-timeout-s", default=10.0, type=positive_float,
               help="longest wait for one Milvus call; then UNAVAILABLE")
    p.env_flag("--milvus-write-kb", default=16384, type=at_least(128),
               help="largest Milvus write request, in KiB; keep it under the server's gRPC "
                    "limit (64 MiB by default). A row is at most about 90 KiB")
    p.env_flag("--hnsw-m", default=16, type=positive_int,
               help="HNSW graph degree M, for collections created on a Milvus server (Milvus "
                    "Lite searches exactly and ignores the HNSW flags)")
    p.env_flag("--hnsw-ef-construction", default=200, type=positive_int,
               help="HNSW efConstruction, for collections created on a Milvus server")
    p.env_flag("--hnsw-ef", default=64, type=positive_int,
               help="HNSW search ef on a Milvus server (raised to top_k + offset when lower): "
                    "higher is more accurate and slower")
    p.section("ingest and access")
    p.env_flag("--ingest-batch", default=32, type=positive_int,
               help="most ingest items embedded and written together")
    p.env_flag("--stream-idle-s", default=300.0, type=positive_float,
               help="an Ingest stream that sends no message for this long, or whose caller "
                    "reads none of its results for this long, ends with DEADLINE_EXCEEDED "
                    "(after acknowledging what it stored), so idle streams do not hold memory "
                    "and connections for ever")
    p.env_flag("--auth-token-file", default="",
               help="file of accepted client tokens, one per line; with it (or with the "
                    "SEARCH_AUTH_TOKEN environment variable) every call but health checks needs "
                    "metadata 'authorization: Bearer TOKEN'")
    from search_service.workers import MAX_AUTO_WORKERS, available_cores
    p.env_flag("--workers", default=1, type=at_least(0),
               help="search processes serving --port together (SO_REUSEPORT), each with its own "
                    "Milvus client and embedder channel, supervised by this process (which "
                    "replaces one that dies and serves all their metrics on --metrics-port). 0: "
                    f"one per available core, at most {MAX_AUTO_WORKERS} (here: "
                    f"{min(available_cores(), MAX_AUTO_WORKERS)}). 1: one process, no supervisor. "
                    "With Milvus Lite this process serves the Lite file to the workers")
    p.add_argument("--worker-of", default=0, type=int, help=argparse.SUPPRESS)
    p.add_argument("--worker-lite-uri", default="", help=argparse.SUPPRESS)
    return p


def parse_config(argv: list[str] | None = None) -> SearchConfig:
    args = build_parser().parse_args(argv)
    token = os.environ.get("SEARCH_MILVUS_TOKEN", "")
    if not token and os.environ.get("SEARCH_MILVUS_USER"):
        token = f"{os.environ['SEARCH_MILVUS_USER']}:{os.environ.get('SEARCH_MILVUS_PASSWORD', '')}"
    return SearchConfig(**vars(args), milvus_token=token)
