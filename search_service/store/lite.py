"""Milvus Lite, reachable only by this process's user.

pymilvus opens a `*.db` file by starting Milvus Lite's gRPC server inside the
process on a TCP port of 127.0.0.1, with no authentication: any local user
could read and write the rows there, around the search service's tokens.
Here the server listens on a Unix socket in a directory of mode 0700 beside
the file instead, and pymilvus connects to that socket.

Every write to the file goes through one writer. Milvus Lite serves each
call on a thread of its gRPC server, and its write-ahead log takes no lock:
two writes at once (two deletes, an upsert beside a delete) interleave their
records, and recovery after a crash drops everything after the first torn
one, acknowledged or not (docs/reliability.md, "Milvus Lite's write-ahead
log"). So every call of the Milvus API that is not a known read runs under
one lock here. This process is the only one that opens the file (the
--workers parent serves it to its workers through this socket), so the lock
orders the writes of every thread, stream and worker of the deployment.
"""
from __future__ import annotations

import atexit
import logging
import os
import socket
import threading
from concurrent import futures
from pathlib import Path

log = logging.getLogger(__name__)

# The Milvus calls that only read, served side by side. Every other call,
# including any that a later milvus-lite adds, takes the writer lock.
READS = frozenset({
    "CheckHealth", "Connect", "DescribeAlias", "DescribeCollection", "DescribeDatabase",
    "DescribeIndex", "GetCollectionStatistics", "GetCompactionState", "GetFlushState",
    "GetLoadState", "GetLoadingProgress", "GetPartitionStatistics", "GetVersion",
    "HasCollection", "HasPartition", "HybridSearch", "ListAliases", "ListDatabases", "Query",
    "Search", "ShowCollections", "ShowPartitions"})
_MAX_MESSAGE_BYTES = 256 << 20  # as milvus-lite's own server, and Milvus standalone
_SERVER_THREADS = 10


def one_writer(servicer) -> None:
    """Make every call of `servicer` (milvus-lite's MilvusServicer) that is
    not in READS wait for the previous one to end: one writer at a time."""
    lock = threading.Lock()

    def serialised(method):
        def call(request, context):
            with lock:
                return method(request, context)
        return call

    for name in dir(type(servicer)):
        if name[:1].isupper() and name not in READS and callable(getattr(servicer, name)):
            setattr(servicer, name, serialised(getattr(servicer, name)))


def _serve(db, address: str):
    """milvus-lite's gRPC server for `db` on `address`, with one writer."""
    import grpc
    from milvus_lite.adapter.grpc.servicer import MilvusServicer
    from pymilvus.grpc_gen import milvus_pb2_grpc

    # The only synchronous gRPC server in the process, in the --workers
    # parent too. It logs an ERROR traceback for every method milvus-lite
    # lacks (AllocTimestamp, which pymilvus asks while creating an index);
    # pymilvus copes, so it is noise.
    logging.getLogger("grpc._server").setLevel(logging.CRITICAL)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=_SERVER_THREADS),
                         options=[("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
                                  ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES)])
    servicer = MilvusServicer(db)
    one_writer(servicer)
    milvus_pb2_grpc.add_MilvusServiceServicer_to_server(servicer, server)
    server.add_insecure_port(address)
    server.start()
    return server


def _answers(path: Path) -> bool:
    """Whether a process listens on the Unix socket `path`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
            return True
        except OSError:
            return False


class PrivateLite:
    """Milvus Lite serving `db_path` on a Unix socket only its owner can open."""

    def __init__(self, db_path: str) -> None:
        from milvus_lite import MilvusLite

        path = Path(db_path).resolve()
        folder = path.parent / ".milvus-lite"
        folder.mkdir(mode=0o700, exist_ok=True)
        os.chmod(folder, 0o700)  # also when it existed with other modes
        bound = folder / "milvus.sock"
        # A socket left by a killed process is replaced; one that answers
        # belongs to a live process, which owns the file.
        if _answers(bound):
            raise RuntimeError(f"{path} is served by another running process (its socket "
                               f"{bound} answers): one search service per Milvus Lite file")
        bound.unlink(missing_ok=True)
        self._db = MilvusLite(str(path))
        try:
            self._server = _serve(self._db, f"unix:{bound}")
        except BaseException:
            self._db.close()
            raise
        self.uri = f"unix:{bound}"
        self._stopped = False
        atexit.register(self.stop)  # a process that never calls stop still closes the file
        log.info("Milvus Lite %s on %s (mode 0700)", path, folder)

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self._server.stop(grace=None)
            self._db.close()
