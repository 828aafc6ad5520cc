"""What the search service deals in, apart from the wire and the database:
the identity of a model, the limits of what one row holds, and the outcome
of ingesting one image. Imports neither pymilvus nor protobuf, so the
embedder client, validation, ingest and the store all speak it, and only
the servicer turns it into messages."""
from __future__ import annotations

import enum
from dataclasses import dataclass

MAX_URI_LENGTH = 4096  # bytes of a row's uri
MAX_JSON_BYTES = 65536  # Milvus's limit for one JSON value: the most metadata a row holds
MAX_RESULT_WINDOW = 16384  # Milvus's limit on top_k + offset


@dataclass(frozen=True)
class ModelIdentity:
    name: str
    fingerprint: str
    dim: int

    def same(self, other: "ModelIdentity") -> bool:
        """Whether both make the same vectors (names may differ for the same weights)."""
        return (self.fingerprint, self.dim) == (other.fingerprint, other.dim)

    def __str__(self) -> str:
        return f"{self.name!r} ({self.dim}-d, fingerprint {self.fingerprint})"


class Status(enum.IntEnum):
    """An ingested image's fate; the numbers are the wire's (IngestResult.Status)."""
    INSERTED = 1
    ALREADY_PRESENT = 2
    FAILED = 3


@dataclass(frozen=True)
class Outcome:
    """One ingest item's result: `error` says why when FAILED."""
    index: int  # position in the stream, across messages
    id: str  # the image's content id ("" for an empty image)
    uri: str
    status: Status
    error: str = ""


@dataclass(frozen=True)
class Stored:
    """One batch's answer: its items' outcomes, in stream order, and the
    consistency token of a read that sees what it stored."""
    outcomes: list[Outcome]
    token: bytes
