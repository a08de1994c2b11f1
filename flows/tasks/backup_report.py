"""What the nightly dump's and the base backup's reports share: the stored object's figures and whether it
was verified (one model both reports extend), and the retention rows of their table artifacts."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from flows.core.stored_stream import StoredStream
from flows.tasks.retention import RetentionReport


class StoredBackupReport(BaseModel):
    """The stored object of a backup run: where it is, its sizes and hash, and how it was verified."""

    database: str
    key: str
    manifest_key: str
    bytes: int
    raw_bytes: int
    sha256: str
    seconds: float
    verified: bool
    verification: str


def stored_figures(result: StoredStream, verified: bool, verification: str) -> dict[str, Any]:
    """The `StoredBackupReport` fields a stored backup gives (its manifest says whether and how it was
    verified); all of them are required fields, so a name that does not match fails validation."""
    return {
        "bytes": result.bytes,
        "raw_bytes": result.raw_bytes,
        "sha256": result.sha256,
        "seconds": round(result.seconds, 3),
        "verified": verified,
        "verification": verification,
    }


def retention_rows(report: RetentionReport) -> list[dict[str, Any]]:
    """The retention rows of a backup run's table artifact (the newest 50 of each list)."""
    return [
        {"item": "retention", "value": report.retention},
        {"item": "kept", "value": ", ".join(s.rsplit("/", 1)[-1] for s in report.kept[:50])},
        {"item": "deleted", "value": ", ".join(s.rsplit("/", 1)[-1] for s in report.deleted[:50])},
        {"item": "kept while in use", "value": ", ".join(s.rsplit("/", 1)[-1] for s in report.in_use[:50])},
        {"item": "left alone (foreign or unreadable)", "value": "; ".join(report.left_alone[:50])},
    ]
