"""What the nightly dump's and the base backup's reports share: the stored object's figures and whether it
was verified (one model both reports extend), and the retention rows of their table artifacts."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

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


class LocationReport(BaseModel):
    """One location of a run's storage list: the primary (written by the run) or a copy (filled from the
    primary after its manifest), and that location's own retention. The fields retention fills in are
    those of `RetentionReport`, so `apply_retention` runs on a location as on the run's report."""

    location: str = Field(description="The storage block slug, as given in `storage`.")
    url: str = Field(default="", description="Where it is (the store's URL), once it was opened.")
    role: Literal["primary", "copy"]
    status: Literal["written", "pending", "copied", "skipped", "failed"] = Field(
        description="written: the primary; copied: present and verified here; skipped (an unverified "
        "backup is not copied) or failed: see detail."
    )
    detail: str = Field(default="", description="How it was copied, or the one sentence why it failed.")
    verified: bool = Field(
        default=False, description="The backup is present and verified here (retention may run)."
    )
    retention: str = "not run"
    kept: list[str] = Field(default_factory=list)
    deleted: list[str] = Field(default_factory=list)
    orphans_removed: list[str] = Field(default_factory=list)
    in_use: list[str] = Field(default_factory=list)
    left_alone: list[str] = Field(default_factory=list)


def location_rows(locations: list[LocationReport]) -> list[dict[str, Any]]:
    """The per-location rows of a run's table artifact (only when the run has copies)."""
    rows: list[dict[str, Any]] = []
    for loc in locations:
        what = f"{loc.status}: {loc.detail}" if loc.detail else loc.status
        rows.append({"item": f"{loc.role} {loc.location}", "value": what})
        rows.append({"item": f"retention {loc.location}", "value": loc.retention})
    return rows


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
