"""Where base backups live, and what their manifest promises: the contract between the base-backup flow,
WAL expiry, the recoverable-window listing and point-in-time recovery.

<prefix>/<database>/base/YYYY/MM/DD/<database>-<UTC YYYYMMDDTHHMMSSZ>.tar.zst   pg_basebackup -Ft -D -, zstd
<same stem>.backup_manifest      PostgreSQL's own backup_manifest (plain JSON), for pg_verifybackup
<same stem>.manifest.json        dbops' manifest, uploaded last: without it the tar is not a backup
<same stem>.pitr-drill.json      the last PITR drill that recovered from this base backup
<same stem>.reading-<run>.json   a lease: a recovery is reading this base backup (retention keeps it)

A base backup is of the whole cluster, but it is filed under the block's database name, like the dumps, so
one storage prefix holds everything about one database and the same identity rules apply.
"""

from __future__ import annotations

import builtins
import re
from datetime import UTC, datetime
from typing import Literal

from pydantic import AwareDatetime, BaseModel, Field

from flows.core.copy_record import CopyRecord
from flows.core.layout import LEASE_MARK, MANIFEST_SUFFIX, check_location

BASE_FORMAT_VERSION = 1
TAR_SUFFIX = ".tar.zst"
PG_MANIFEST_SUFFIX = ".backup_manifest"
PITR_DRILL_SUFFIX = ".pitr-drill.json"

BaseVerifyMethod = Literal["list", "full", "none"]

_BASE_RE = re.compile(
    r"^(?P<y>\d{4})/(?P<m>\d{2})/(?P<d>\d{2})/(?P<name>[^/]+)-(?P<ts>\d{8}T\d{6}Z)"
    rf"(?P<rest>{re.escape(TAR_SUFFIX)}|{re.escape(PG_MANIFEST_SUFFIX)}|{re.escape(MANIFEST_SUFFIX)}"
    rf"|{re.escape(PITR_DRILL_SUFFIX)}|{re.escape(LEASE_MARK)}[A-Za-z0-9_-]{{1,64}}\.json)$"
)


def base_prefix(prefix: str, database: str) -> str:
    """The folder holding one database's base backups (checked like the dumps folder)."""
    check_location(prefix, database)
    parts = [p for p in (prefix.strip("/"), database, "base") if p]
    return "/".join(parts) + "/"


def base_stem(prefix: str, database: str, when: datetime) -> str:
    when = when.astimezone(UTC)
    return f"{base_prefix(prefix, database)}{when:%Y/%m/%d}/{database}-{when:%Y%m%dT%H%M%SZ}"


def tar_key(stem: str) -> str:
    return stem + TAR_SUFFIX


def pg_manifest_key(stem: str) -> str:
    return stem + PG_MANIFEST_SUFFIX


def base_manifest_key(stem: str) -> str:
    return stem + MANIFEST_SUFFIX


def pitr_drill_key(stem: str) -> str:
    return stem + PITR_DRILL_SUFFIX


def parse_base_key(key: str, prefix: str, database: str) -> tuple[str, str] | None:
    """(stem, rest) when `key` is exactly a dbops base-backup object of this database, else None (foreign:
    reported, never deleted)."""
    folder = base_prefix(prefix, database)
    if not key.startswith(folder):
        return None
    m = _BASE_RE.match(key[len(folder) :])
    if m is None or m.group("name") != database:
        return None
    rest = m.group("rest")
    return key[: len(key) - len(rest)], rest


class BaseVerification(BaseModel):
    method: BaseVerifyMethod
    verified_at: AwareDatetime | None = None
    detail: str = ""


class BaseBackupManifest(BaseModel):
    """What a recovery needs to trust and use one base backup. Never holds a password."""

    format_version: int = BASE_FORMAT_VERSION
    kind: Literal["base"] = "base"
    database: str = Field(description="The block's database name the backup is filed under.")
    server: str = Field(description="host:port the backup was taken from.")
    system_identifier: str = Field(description="pg_control_system().system_identifier of the cluster.")
    server_version: str = Field(description="e.g. 15.18")
    server_version_num: int = Field(description="e.g. 150018")
    pg_basebackup_version: str
    label: str = Field(description="The --label given to pg_basebackup (dbops-<database>-<ts>).")
    started_at: AwareDatetime
    ended_at: AwareDatetime = Field(description="When pg_basebackup finished (the backup's stop point).")
    start_lsn: str = Field(description="START WAL LOCATION of backup_label, e.g. 0/2000028.")
    stop_lsn: str = Field(description="The LSN at which the backup is consistent (pg_backup_stop's).")
    start_wal: str = Field(description="WAL file name holding start_lsn.")
    stop_wal: str = Field(description="WAL file name holding stop_lsn.")
    timeline: int = Field(ge=1)
    wal_segment_size: int
    wal_included: bool = Field(description="True when taken with -X fetch: consistent without the archive.")
    wal_archived: bool = Field(
        description="True when every segment start_wal..stop_wal was confirmed in the archive before the "
        "manifest was written (always required unless wal_included)."
    )
    tar_key: str
    bytes: int = Field(description="Size of the stored .tar.zst.")
    raw_bytes: int = Field(description="Size of pg_basebackup's tar stream before compression.")
    sha256: str = Field(description="SHA-256 of the stored object, as stored.")
    compression: Literal["zstd"] = "zstd"
    compression_level: int = 3
    pg_manifest_key: str | None = Field(
        default=None, description="Key of PostgreSQL's backup_manifest, for pg_verifybackup."
    )
    database_bytes: int | None = Field(default=None, description="pg_database_size sum at start (ETA).")
    flow_run_id: str | None = None
    verified: bool = False
    verification: BaseVerification = Field(default_factory=lambda: BaseVerification(method="none"))
    dbops_version: str = ""
    # the contract's name; it hides pydantic v1's deprecated BaseModel.copy (use model_copy)
    copy: CopyRecord | None = Field(  # type: ignore[assignment]
        default=None, description="Set in a copy location only: where and how this base backup was copied."
    )

    def to_json(self) -> builtins.bytes:
        return (self.model_dump_json(indent=2) + "\n").encode()

    @classmethod
    def from_json(cls, data: builtins.bytes) -> BaseBackupManifest:
        return cls.model_validate_json(data)
