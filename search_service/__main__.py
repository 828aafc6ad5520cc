"""`python -m search_service`: open Milvus, connect to the embedder, serve until SIGTERM."""
from __future__ import annotations

import signal
import sys

# Installed before anything slow (imports, the model, Milvus): as PID 1 in a
# container without an init, a process ignores any signal it has no handler
# for, so SIGTERM during start-up would wait for the model to load. The
# server's own handler replaces this one once it serves.
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

import asyncio
import importlib.util
import logging
import os

import grpc

from imagesearch import tracing
from imagesearch.flags import check_server_flags, exit_startup
from imagesearch.observability import setup_logging
from imagesearch.security import SecurityConfigError, Tokens, channel_credentials
from imagesearch.serving import serve
from imagesearch.v1 import search_pb2, search_pb2_grpc
from search_service import workers
from search_service.config import SearchConfig, parse_config
from search_service.embedder_client import EmbedderPool
from search_service.errors import ServiceError, UnsupportedMilvus
from search_service.readiness import watch_dependencies
from search_service.ingest import IngestSettings
from search_service.servicer import ImageSearchServicer
from search_service.store import HnswParams, MilvusStore, Store
from search_service.store.lite import PrivateLite

log = logging.getLogger("search_service")


async def run(config: SearchConfig, store: MilvusStore,
              credentials: grpc.ChannelCredentials | None, tokens: Tokens) -> None:
    embedder = EmbedderPool(config.embedder, config.embedder_timeout_s,
                              config.max_message_mb << 20, credentials)
    ingest = IngestSettings(batch_size=config.ingest_batch,
                            max_batch_bytes=(config.max_message_mb << 20) // 2,
                            idle_s=config.stream_idle_s)
    servicer = ImageSearchServicer(store, embedder, config.collection, ingest,
                                   config.max_message_mb << 20)
    startup_check = asyncio.create_task(servicer.check_default_collection())
    service_name = search_pb2.DESCRIPTOR.services_by_name["ImageSearchService"].full_name
    try:
        await serve(config, name="search", service_names=[service_name],
                    register=lambda server: search_pb2_grpc.add_ImageSearchServiceServicer_to_server(
                        servicer, server),
                    dependencies=lambda: watch_dependencies(servicer.dependency_problems),
                    tokens=tokens, share_port=bool(config.worker_of))
    finally:
        startup_check.cancel()
        await embedder.close()


def main(argv: list[str] | None = None) -> None:
    config = parse_config(argv)
    setup_logging(config.log_level, config.log_format)
    check_server_flags(config, "search")
    if not config.milvus_uri and importlib.util.find_spec("milvus_lite") is None:
        exit_startup("search: without --milvus-uri (SEARCH_MILVUS_URI) the vectors go to a "
                     "Milvus Lite file, and Milvus Lite is not installed: pip install "
                     "'imagesearch[lite]', or point --milvus-uri at a Milvus server")
    credentials = None
    try:  # every file is read before Milvus is touched
        if config.embedder_tls_ca or config.embedder_tls_cert:
            credentials = channel_credentials(config.embedder_tls_ca, config.embedder_tls_cert,
                                              config.embedder_tls_key)
        tokens = Tokens("SEARCH_AUTH_TOKEN", config.auth_token_file)
    except SecurityConfigError as exc:
        exit_startup(f"search: {exc}")
    if workers.resolve(config.workers) > 1:  # this process supervises; the workers serve
        sys.exit(_supervise(config, sys.argv[1:] if argv is None else argv))
    if config.worker_of:
        workers.follow_parent(config.worker_of)
    tracing.setup("imagesearch-search")
    if not config.milvus_uri:
        os.makedirs(config.data_dir, exist_ok=True)
    milvus = MilvusStore(config.milvus_target, config.milvus_token,
                         timeout_s=config.milvus_timeout_s,
                         max_write_bytes=config.milvus_write_kb << 10,
                         hnsw=HnswParams(config.hnsw_m, config.hnsw_ef_construction,
                                         config.hnsw_ef),
                         lite_server=config.worker_lite_uri)
    try:
        milvus.connect()
    except ServiceError as exc:
        # Neither a local file that cannot be opened nor a Milvus too old heals by itself.
        if milvus.lite or isinstance(exc, UnsupportedMilvus):
            exit_startup(str(exc))
        log.warning("%s; serving anyway and reconnecting on each call", exc)
    log.info("Milvus: %s", milvus.uri)
    store = Store(milvus)
    try:
        asyncio.run(run(config, store, credentials, tokens))
    finally:
        store.close()


def _supervise(config: SearchConfig, argv: list[str]) -> int:
    """--workers N: with Milvus Lite (a file one process opens), this
    process serves it to the workers on its private socket while they run."""
    lite = None
    if not config.milvus_uri:
        os.makedirs(config.data_dir, exist_ok=True)
        try:
            lite = PrivateLite(config.milvus_target)
        except Exception as exc:  # noqa: BLE001 - milvus-lite raises what its storage raises
            exit_startup(f"search: Milvus Lite cannot open {config.milvus_target}: "
                         f"{type(exc).__name__}: {exc}")
    try:
        return workers.supervise(config, argv, lite.uri if lite else "")
    finally:
        if lite is not None:
            lite.stop()


if __name__ == "__main__":
    main()
