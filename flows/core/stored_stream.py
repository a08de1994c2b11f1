"""A client tool's output stored as one object: what pg_dump and pg_basebackup uploads have in common.

Both stream a tool's stdout through a compressor into the store, hashing and counting what is stored on
the way, and report progress as (bytes the tool wrote, bytes stored). Their results share the sizes, the
sha256 and the timing; each adds what only it knows (pg_dump's stderr, the base backup's facts).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import TypedDict

from flows.core.objectstore import ObjectStore
from flows.core.pgtools import ToolRun
from flows.core.streams import hashing


@dataclass
class StoredStream:
    """The stored object: its key, stored and raw (tool output) sizes, sha256, parts and timing."""

    key: str
    bytes: int
    raw_bytes: int
    sha256: str
    parts: int
    started_at: datetime
    ended_at: datetime

    @property
    def seconds(self) -> float:
        return max((self.ended_at - self.started_at).total_seconds(), 1e-6)


class StoredFields(TypedDict):
    """The fields of a `StoredStream` that the upload itself decides (timing is the caller's)."""

    key: str
    bytes: int
    raw_bytes: int
    sha256: str
    parts: int


def put_tool_output(
    store: ObjectStore,
    key: str,
    run: ToolRun,
    body: Iterable[bytes],
    *,
    part_size: int,
    progress: Callable[[int, int], None] | None,
    if_absent: bool,
) -> StoredFields:
    """Store `body` (the tool's output, compressed or not) at `key`, hashing and counting it on the way;
    `progress(raw_bytes, stored_bytes)` is called as parts are stored."""
    digest = hashlib.sha256()
    stored = [0]

    def report(_: int) -> None:
        if progress:
            progress(run.raw_bytes, stored[0])

    put = store.put_stream(
        key, hashing(body, digest, stored), part_size=part_size, progress=report, if_absent=if_absent
    )
    return StoredFields(
        key=key, bytes=put.bytes, raw_bytes=run.raw_bytes, sha256=digest.hexdigest(), parts=put.parts
    )
