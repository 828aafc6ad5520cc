"""Milvus Lite, reachable only by this process's user.

pymilvus opens a `*.db` file by starting Milvus Lite's gRPC server inside the
process on a TCP port of 127.0.0.1, with no authentication: any local user
could read and write the rows there, around the search service's tokens.
Here the server listens on a Unix socket in a directory of mode 0700 beside
the file instead, and pymilvus connects to that socket.
"""
from __future__ import annotations

import atexit
import logging
import os
import socket
from pathlib import Path

log = logging.getLogger(__name__)


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
        from milvus_lite.adapter.grpc.server import start_server_in_thread

        path = Path(db_path).resolve()
        folder = path.parent / ".milvus-lite"
        folder.mkdir(mode=0o700, exist_ok=True)
        os.chmod(folder, 0o700)  # also when it existed with other modes
        name = folder / "milvus.sock"
        # Milvus Lite binds f"{host}:{port}": as a Unix address the ":0" ends
        # up in the file name. A socket left by a killed process is replaced;
        # one that answers belongs to a live process, which owns the file.
        bound = Path(f"{name}:0")
        if _answers(bound):
            raise RuntimeError(f"{path} is served by another running process (its socket "
                               f"{bound} answers): one search service per Milvus Lite file")
        bound.unlink(missing_ok=True)
        self._server, self._db, _ = start_server_in_thread(data_dir=str(path),
                                                           host=f"unix:{name}", port=0)
        self.uri = f"unix:{bound}"
        self._stopped = False
        atexit.register(self.stop)  # a process that never calls stop still closes the file
        log.info("Milvus Lite %s on %s (mode 0700)", path, folder)

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self._server.stop(grace=None)
            self._db.close()
