"""One small object-store interface over S3 (any S3-compatible endpoint) and a local directory.

The flows need four things from storage: put a stream, list a prefix, get a stream, delete in batches.
Both implementations keep a stream's memory bounded (part size x upload concurrency for S3, one chunk for
a directory) and leave no partial object behind when the writer fails: S3 multipart uploads are aborted,
local files are written under a temporary name and renamed only when complete.

The implementations are `flows.core.s3store.S3ObjectStore` and `flows.core.localstore.LocalObjectStore`.
"""

from __future__ import annotations

import builtins  # the stores' method `list` shadows the type inside their classes
import secrets
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime

from flows.core.errors import ObjectExists, StorageError

MiB = 1024 * 1024
S3_MIN_PART = 5 * MiB
S3_MAX_PART = 5 * 1024 * MiB
S3_MAX_PARTS = 10_000
DEFAULT_PART_SIZE = 16 * MiB
DELETE_BATCH = 1000  # S3 DeleteObjects accepts at most 1000 keys per request


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    last_modified: datetime


@dataclass(frozen=True)
class IncompleteWrite:
    """A write that never finished: an open S3 multipart upload, or a local `.partial-` file."""

    key: str  # the key it was meant to become
    started: datetime
    handle: str  # S3 upload id, or the temporary file's key


@dataclass(frozen=True)
class PutResult:
    key: str
    bytes: int
    parts: int


def part_size_for(expected_bytes: int | None, *, minimum: int = DEFAULT_PART_SIZE) -> int:
    """A base part size such that a stream of `expected_bytes` fits in well under 10,000 parts.

    Aims at 5,000 parts for the estimate, so an estimate that is off by a factor of several still fits
    (see `part_size_at`, which also grows the size past the estimate). Rounded up to a whole MiB.
    """
    if not expected_bytes or expected_bytes <= 0:
        return minimum
    wanted = -(-expected_bytes // 5_000)
    size = max(minimum, -(-wanted // MiB) * MiB)
    return min(size, S3_MAX_PART)


def part_size_at(part_number: int, base: int) -> int:
    """Size of part `part_number` (1-based): `base` for the first 5,000 parts, then doubling every 1,000.

    S3 parts may differ in size (all but the last at least 5 MiB), so a stream that outgrows its estimate
    still finishes under 10,000 parts: capacity is base x (5,000 + 1,000 x (2+4+8+16+32)) = 67,000 x base.
    """
    if part_number <= 5_000:
        return base
    tier = (part_number - 5_001) // 1_000 + 1
    return min(base * (2**tier), S3_MAX_PART)


class ObjectStore(ABC):
    """Keys are relative to the store's root (an S3 bucket folder or a directory)."""

    #: human-readable location used in messages and manifests, e.g. "s3://bucket/folder"
    url: str

    @property
    @abstractmethod
    def identity(self) -> str:
        """What this place is, whatever block names it: `s3://ENDPOINT/BUCKET/FOLDER` or
        `file:///resolved/dir`; two stores with one identity are one place (see flows.core.locations)."""

    @abstractmethod
    def put_stream(
        self,
        key: str,
        chunks: Iterable[bytes],
        *,
        part_size: int = DEFAULT_PART_SIZE,
        progress: Callable[[int], None] | None = None,
        if_absent: bool = False,
    ) -> PutResult:
        """Store a stream of unknown length; the object appears only when the stream ended cleanly.

        `if_absent`: the object is created only if no object has that key when it appears (S3
        `If-None-Match: *`, a hard link for a directory); otherwise `ObjectExists` and nothing is replaced.
        """

    @abstractmethod
    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> None: ...

    @abstractmethod
    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object under `prefix`, lazily, page by page."""

    @abstractmethod
    def get_stream(self, key: str, chunk_size: int = MiB) -> Iterator[bytes]: ...

    @abstractmethod
    def delete(self, keys: Iterable[str]) -> int:
        """Delete keys in batches of at most 1000; returns how many were deleted."""

    @abstractmethod
    def head(self, key: str) -> ObjectInfo | None: ...

    def get_bytes(self, key: str) -> bytes:
        return b"".join(self.get_stream(key))

    def incomplete_writes(self, prefix: str) -> builtins.list[IncompleteWrite]:
        """Writes under `prefix` that were started and never finished (none by default)."""
        return []

    def discard_incomplete(self, writes: Iterable[IncompleteWrite]) -> int:
        """Abort or remove what `incomplete_writes` found; returns how many were discarded."""
        return 0

    def check_writable(self, prefix: str) -> None:
        """Preflight: write, read back and delete a marker, so a dump never starts into a dead end.

        Also checks that a conditional create of a taken key is refused: dump keys rely on it so that two
        dumps started in the same second never overwrite each other, and a store that silently ignores
        the condition would make that a silent overwrite (fail closed).
        """
        key = f"{prefix.rstrip('/')}/.dbops-write-check-{secrets.token_hex(6)}"
        self.put_bytes(key, b"dbops write check\n", if_absent=True)
        try:
            if self.get_bytes(key) != b"dbops write check\n":
                raise StorageError(f"{self.url}/{key} did not read back what was written; check the storage")
            try:
                self.put_bytes(key, b"dbops second writer\n", if_absent=True)
            except ObjectExists:
                return
            raise StorageError(
                f"{self.url} ignores conditional writes (If-None-Match: *), so two dumps started in the same "
                "second could overwrite each other; use storage that supports them (AWS S3, MinIO 2024+)"
            )
        finally:
            self.delete([key])
