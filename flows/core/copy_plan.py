"""Bringing a copy location up to date with the primary (the copy-backups flow and `dbops backups sync`
share this, so both copy exactly the same backups).

A copy should hold the primary's verified backups that the copy's own retention would keep, planned over
the PRIMARY's catalog (a copy kept 12 months off-site wants the primary's monthly backups, not whatever
the copy happens to hold); without a policy, every verified backup. Of those, the ones the copy lacks (no
manifest there that is present-and-verified with the same sha256) are copied, oldest first, so an
interrupted sync has filled the oldest gap first and the next run carries on where it stopped.

A backup-specific refusal (a corrupt primary object, a foreign manifest in the copy) is recorded and the
next backup is tried; anything else (a missing bucket, a dead endpoint, a retry budget spent) ends that
location's sync: the next backups would fail the same way. A location that failed is named in the run's
one sentence, after every other location was tried.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from flows.core.base_catalog import BaseCatalog, plan_base_retention, read_base_catalog
from flows.core.base_layout import base_manifest_key
from flows.core.catalog import Catalog, read_catalog
from flows.core.copies import CopyReport, present_and_verified
from flows.core.errors import BackupIntegrityError, DbopsError, StorageFault, one_line
from flows.core.layout import manifest_key
from flows.core.objectstore import ObjectStore
from flows.core.retention import RetentionPolicy, plan_from_catalog

Kinds = Literal["dumps", "base", "both"]


class CopiesBehind(StorageFault):
    """One or more copy locations could not be brought up to date; the primary is untouched."""


@dataclass(frozen=True)
class Wanted:
    """A primary backup a copy location should hold."""

    manifest_key: str
    ended_at: datetime
    sha256: str


@dataclass
class PrimaryBackups:
    """The primary's catalogs, read once and planned against for every copy location."""

    dumps: Catalog | None
    bases: BaseCatalog | None


def read_primary(primary: ObjectStore, prefix: str, database: str, kinds: Kinds) -> PrimaryBackups:
    return PrimaryBackups(
        dumps=read_catalog(primary, prefix, database) if kinds in {"dumps", "both"} else None,
        bases=read_base_catalog(primary, prefix, database) if kinds in {"base", "both"} else None,
    )


def wanted_backups(primary: PrimaryBackups, policy: RetentionPolicy | None, now: datetime) -> list[Wanted]:
    """The primary's verified backups that `policy` keeps (all verified ones without a policy), oldest
    first."""
    wanted: list[Wanted] = []
    if primary.dumps is not None:
        keep = {k.record.stem for k in plan_from_catalog(primary.dumps, policy, now).keep} if policy else None
        wanted += [
            Wanted(manifest_key(b.stem), b.manifest.ended_at, b.manifest.sha256)
            for b in primary.dumps.backups
            if present_and_verified(b.manifest) and (keep is None or b.stem in keep)
        ]
    if primary.bases is not None:
        base_plan = plan_base_retention(primary.bases, policy, now) if policy else None
        keep = {k.record.stem for k in base_plan.keep} if base_plan else None
        wanted += [
            Wanted(base_manifest_key(b.stem), b.manifest.ended_at, b.manifest.sha256)
            for b in primary.bases.backups
            if present_and_verified(b.manifest) and (keep is None or b.stem in keep)
        ]
    return sorted(wanted, key=lambda w: (w.ended_at, w.manifest_key))


def held_by(copy: ObjectStore, prefix: str, database: str, kinds: Kinds) -> dict[str, str]:
    """manifest key -> sha256 of every backup present and verified in the copy location (a listing or
    read error propagates: nobody can tell what the copy holds then)."""
    held: dict[str, str] = {}
    if kinds in {"dumps", "both"}:
        for b in read_catalog(copy, prefix, database).backups:
            if present_and_verified(b.manifest) and b.manifest.dump_key in b.keys:
                held[manifest_key(b.stem)] = b.manifest.sha256
    if kinds in {"base", "both"}:
        for base in read_base_catalog(copy, prefix, database).backups:
            if present_and_verified(base.manifest):
                held[base_manifest_key(base.stem)] = base.manifest.sha256
    return held


class CopyPlan(BaseModel):
    """What one copy location lacks."""

    location: str = Field(description="The copy location's block slug.")
    policy: str = Field(description="The retention the wanted backups were chosen by.")
    missing: list[str] = Field(default_factory=list, description="Manifest keys to copy, oldest first.")
    present: list[str] = Field(default_factory=list, description="Wanted and already there, verified.")


def plan_copy(
    primary: PrimaryBackups,
    copy: ObjectStore,
    prefix: str,
    database: str,
    kinds: Kinds,
    policy: RetentionPolicy | None,
    now: datetime,
    location: str,
) -> CopyPlan:
    wanted = wanted_backups(primary, policy, now)
    held = held_by(copy, prefix, database, kinds)
    return CopyPlan(
        location=location,
        policy=policy.model_dump_json(exclude_defaults=True) if policy else "none: every verified backup",
        missing=[w.manifest_key for w in wanted if held.get(w.manifest_key) != w.sha256],
        present=[w.manifest_key for w in wanted if held.get(w.manifest_key) == w.sha256],
    )


class LocationSync(BaseModel):
    """The outcome for one copy location."""

    location: str = Field(description="The copy location's block slug.")
    copied: list[str] = Field(default_factory=list, description="Manifest keys copied in this run.")
    already: list[str] = Field(default_factory=list, description="Wanted and already there, verified.")
    failed: list[str] = Field(default_factory=list, description="`key: why` of each backup not copied.")
    error: str = Field(default="", description="Why this location could not be synced (empty: it was).")
    bytes: int = Field(default=0, description="Bytes copied.")
    would_copy: list[str] = Field(default_factory=list, description="Dry run: what would be copied.")

    @property
    def ok(self) -> bool:
        return not self.error and not self.failed


def sentence_of(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, DbopsError) else one_line(f"{type(exc).__name__}: {exc}")


def sync_location(plan: CopyPlan, copy_one: Callable[[str], CopyReport], *, dry_run: bool) -> LocationSync:
    """Copy what `plan` says is missing with `copy_one(manifest_key)`, oldest first (module docstring)."""
    result = LocationSync(location=plan.location, already=list(plan.present))
    if dry_run:
        result.would_copy = list(plan.missing)
        return result
    for key in plan.missing:
        try:
            report = copy_one(key)
        except BackupIntegrityError as exc:  # this backup only: try the next one
            result.failed.append(f"{key}: {exc}")
            continue
        except Exception as exc:  # the location itself: the next copies would fail the same way
            result.error = sentence_of(exc)
            break
        (result.already if report.skipped else result.copied).append(key)
        result.bytes += report.bytes
    if result.failed and not result.error:
        result.error = f"{len(result.failed)} backup(s) not copied, first {result.failed[0]}"
    return result


def failed_location(location: str, exc: BaseException) -> LocationSync:
    """A location that could not even be planned (unreachable, missing bucket)."""
    return LocationSync(location=location, error=sentence_of(exc))


def check_synced(results: list[LocationSync]) -> None:
    """Raise one sentence naming every location that is behind (after all of them were tried)."""
    behind = [r for r in results if not r.ok]
    if behind:
        first = behind[0]
        names = ", ".join(r.location for r in behind)
        raise CopiesBehind(
            f"copy location(s) {names} not brought up to date (the primary is untouched): {first.location}: "
            f"{first.error}; fix it and run the sync again"
        )


def sync_rows(results: list[LocationSync]) -> list[dict[str, str]]:
    """The report table: one row per copy location."""
    return [
        {
            "location": r.location,
            "copied": str(len(r.copied)) if not r.would_copy else f"would copy {len(r.would_copy)}",
            "already there": str(len(r.already)),
            "failed": r.error or "",
        }
        for r in results
    ]
