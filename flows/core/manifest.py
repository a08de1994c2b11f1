"""The backup manifest: what a person (or the restore flow) needs to trust and restore a dump.

Versioned JSON, uploaded after the dump and its verification, so its presence means "this is a backup".
It never contains a password: connection details are reduced to host, port and database name.
"""

from __future__ import annotations

import builtins
import json
from typing import TYPE_CHECKING, Literal

from pydantic import AwareDatetime, BaseModel, Field, ValidationError

from flows.core.compression import Compression
from flows.core.copy_record import CopyRecord
from flows.core.errors import ManifestUnreadable

if TYPE_CHECKING:
    from flows.core.objectstore import ObjectStore

FORMAT_VERSION = 1

# How a stored dump is read back: list (pg_restore --list), full (also re-hash every byte), none (skip).
VerifyMethod = Literal["list", "full", "none"]


class Verification(BaseModel):
    method: VerifyMethod
    verified_at: AwareDatetime | None = None
    detail: str = ""


class Manifest(BaseModel):
    format_version: int = FORMAT_VERSION
    database: str = Field(description="Database name as the server knows it.")
    server: str = Field(description="host:port the dump was taken from.")
    server_version: str
    pg_dump_version: str
    # Aware only: a timestamp without a zone cannot be placed in a UTC day, nor compared with the others.
    started_at: AwareDatetime
    ended_at: AwareDatetime
    dump_key: str
    bytes: int = Field(description="Size of the stored object.")
    raw_bytes: int = Field(description="Size of pg_dump's own output before our compression.")
    sha256: str = Field(description="SHA-256 of the stored object, as stored.")
    compression: Compression
    compression_level: int
    format: Literal["custom"] = "custom"
    dump_options: list[str]
    alembic_revision: str | None = None
    row_estimates: dict[str, int] = Field(
        default_factory=dict, description="Live-tuple count per table from the statistics (n_live_tup)."
    )
    planner_estimates: dict[str, int] = Field(
        default_factory=dict, description="The planner's reltuples per table (-1: never analysed)."
    )
    exact_row_counts: dict[str, int] = Field(
        default_factory=dict,
        description="count(*) of the small tables, read in the snapshot pg_dump dumped (--snapshot).",
    )
    globals_key: str | None = None
    flow_run_id: str | None = None
    verified: bool = False
    verification: Verification = Field(default_factory=lambda: Verification(method="none"))
    dbops_version: str = ""
    # the contract's name; it hides pydantic v1's deprecated BaseModel.copy (use model_copy)
    copy: CopyRecord | None = Field(  # type: ignore[assignment]
        default=None, description="Set in a copy location only: where and how this backup was copied."
    )

    def to_json(self) -> builtins.bytes:  # builtins: the field `bytes` shadows the type in this class
        return (self.model_dump_json(indent=2) + "\n").encode()

    @classmethod
    def from_json(cls, data: builtins.bytes) -> Manifest:
        return cls.model_validate(json.loads(data))


def why_invalid(exc: Exception) -> str:
    """The first problem of an invalid JSON document in a few words, e.g. `ended_at: Input should have
    timezone info (and 2 more)`; pydantic's own first line only says how many errors there are."""
    if isinstance(exc, ValidationError):
        errors = exc.errors()
        first = errors[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "document"
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        return f"{where}: {first.get('msg', 'invalid')}{more}"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def read_manifest(store: ObjectStore, key: str) -> Manifest:
    """The manifest stored at `key`; an object there that is not one (not JSON, another schema) is a
    ManifestUnreadable naming the object, never a bare JSON or pydantic error."""
    data = store.get_bytes(key)
    try:
        return Manifest.from_json(data)
    except (ValueError, ValidationError) as exc:
        raise ManifestUnreadable(
            f"{store.url}/{key} is not a readable dbops manifest ({why_invalid(exc)}); nothing was replaced: "
            "look at the object, then fix or remove it",
            key=key,
        ) from None
