"""WAL expiry: after base-backup retention, remove the WAL no kept base backup needs. No Prefect.

Rules, each a reason a segment stays:
- a kept base backup needs every segment from its start_wal on: nothing at or after the oldest kept start
  is removed (segment numbers are LSN positions shared by every timeline, so "older than" is the same
  test on each timeline of the lineage, and on abandoned ones: recovery from a base backup never reads a
  segment numbered below its start);
- `.history` files (and `.backup` labels, and anything that is not a WAL name) are never removed: they are
  tiny and a restore that follows a timeline switch cannot do without them;
- nothing whose object is younger than `wal_keep_days` (mtime) is removed: the cut point is the older of
  "oldest kept start" and "oldest young segment", so the rule holds even for a segment copied back late;
- with no base backup at all (only dumps) nothing is removed unless `wal_max_age_days` is given;
- a listing that fails half way removes nothing (the plan says why);
- only the plain layout (`cp %p DIR/%f`, or a dbops/plain prefix of flat WAL names) is expired: deleting
  inside WAL-G's, pgBackRest's or barman's archive would break that tool's own catalog.

A directory archive is cleaned by PostgreSQL's own `pg_archivecleanup DIR CUT`, which removes every WAL
segment (and .partial) on every timeline whose log/segment part is below CUT's, ignoring the timeline
part and leaving .history and .backup files: exactly this plan. Its `-n` (dry run) list is compared
with the plan before it runs, so a difference (a compressed name, a file copied in meanwhile) stops it.
Storage archives are deleted in batches (objectstore.delete: 1000 keys per S3 DeleteObjects).
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from flows.core.base_catalog import BaseCatalog
from flows.core.base_layout import BaseBackupManifest
from flows.core.chain import ArchiveListingFailed, list_archive
from flows.core.childenv import child_environment
from flows.core.errors import ConfigurationError, DbopsError
from flows.core.pgtools import find_tool
from flows.core.wal import COMPRESSION_SUFFIXES, MIN_SEGMENT_SIZE, WAL_FILE_RE, parse_wal_name, segment_name
from flows.core.wal_archive import WalArchive

DEFAULT_WAL_KEEP_DAYS = 2

#: folders other tools keep their WAL in (see wal_archive.py): never expired by dbops
_FOREIGN_PREFIXES = (
    (re.compile(r"(^|/)wal_\d{3}/?$"), "WAL-G"),
    (re.compile(r"(^|/)archive/[^/]+/\d+-\d+/?$"), "pgBackRest"),
    (re.compile(r"(^|/)wals/?$"), "barman-cloud"),
)

ExpiryStatus = Literal["planned", "deleted", "nothing", "blocked"]


class WalExpiryFailed(DbopsError):
    """pg_archivecleanup or the batched delete failed part way: some planned segments may remain."""


class WalExpiryReport(BaseModel):
    """What WAL expiry planned (and, unless dry_run, did). Never holds a password."""

    archive: str = Field(description="The archive, as ArchiveLocation.describe() or its URL.")
    status: ExpiryStatus = Field(
        description="planned (dry run), deleted, nothing (nothing old enough), blocked (see reason)."
    )
    reason: str = Field(description="One sentence: why this much, or why nothing.")
    dry_run: bool = False
    method: Literal["pg_archivecleanup", "batched delete", "none"] = "none"
    cut: str | None = Field(
        default=None, description="The oldest segment kept (pg_archivecleanup's oldestkeptwalfile)."
    )
    oldest_kept_start: str | None = Field(
        default=None, description="start_wal of the oldest kept base backup (the cut by base backups)."
    )
    youngest_allowed: str | None = Field(
        default=None, description="The oldest too young segment (wal_keep_days), when it sets the cut."
    )
    count: int = Field(default=0, description="Segments planned for removal.")
    bytes: int = 0
    first: str | None = Field(default=None, description="Oldest segment planned for removal.")
    last: str | None = Field(default=None, description="Newest segment planned for removal.")
    deleted: int = Field(default=0, description="Objects actually removed (0 on a dry run).")
    kept_history: int = Field(default=0, description=".history files left in place.")
    # not `keys`: Prefect treats a result with a keys attribute as a mapping
    doomed_keys: list[str] = Field(
        default_factory=list, description="Keys planned for removal, oldest first."
    )

    @property
    def blocked(self) -> bool:
        return self.status == "blocked"


def _blocked(archive: str, reason: str) -> WalExpiryReport:
    return WalExpiryReport(archive=archive, status="blocked", reason=reason)


def foreign_layout(archive: WalArchive, keys: list[str]) -> str | None:
    """Which other tool's archive this looks like, or None for the plain layout."""
    for pattern, tool in _FOREIGN_PREFIXES:
        if pattern.search(archive.prefix.strip("/")):
            return tool
    root = archive.prefix.strip("/")
    for key in keys:
        rel = key[len(root) + 1 :] if root else key
        m = WAL_FILE_RE.match(rel.rsplit("/", 1)[-1])
        if m is None:
            continue
        if "/" in rel:
            return "a per-log folder layout (pgBackRest or barman-cloud)"
        if re.search(r"-[0-9a-f]{40}", rel):
            return "pgBackRest (SHA-1 suffixed names)"
    return None


@dataclass(frozen=True)
class LocationCatalog:
    """The base backups one storage location holds, after its retention: `catalog` None with `error` when
    it could not be read; `gone` the stems a dry run's retention would delete there (still listed)."""

    location: str
    catalog: BaseCatalog | None
    error: str | None = None
    gone: frozenset[str] = frozenset()


@dataclass(frozen=True)
class KeptEverywhere:
    """The base backups kept in any location (the WAL they need stays), or why none can be trusted."""

    manifests: list[BaseBackupManifest]
    blocked: str | None = None


def kept_in_any_location(locations: list[LocationCatalog]) -> KeptEverywhere:
    """Every base backup kept in the primary or in any copy: a copy's older base backups (a longer
    retention off-site) need their WAL as much as the primary's do, and the archive is shared.

    Fails closed: a location whose catalog could not be read, or that holds a manifest that cannot be
    trusted, makes "kept" unknown, so nothing may be expired (`blocked` says why and where).
    """
    manifests: dict[str, BaseBackupManifest] = {}
    for where in locations:
        if where.catalog is None:
            return KeptEverywhere(
                [],
                f"the base backups in {where.location} cannot be listed ({where.error}), so which WAL they "
                "need is unknown; nothing removed until the location can be read",
            )
        if where.catalog.unreadable:
            key, why = where.catalog.unreadable[0]
            return KeptEverywhere(
                [],
                f"base-backup manifest {key} in {where.location} cannot be trusted ({why}), so which WAL it "
                "needs is unknown; fix or remove it",
            )
        for backup in where.catalog.backups:
            if backup.stem not in where.gone:
                manifests.setdefault(backup.stem, backup.manifest)
    return KeptEverywhere(list(manifests.values()))


def plan_expiry(
    archive: WalArchive,
    kept: list[BaseBackupManifest],
    now: datetime,
    wal_keep_days: float = DEFAULT_WAL_KEEP_DAYS,
    wal_max_age_days: float | None = None,
    where: str | None = None,
) -> WalExpiryReport:
    """The segments to remove, and why: fails closed (status blocked, nothing planned) on any doubt."""
    where = where or archive.url
    if wal_keep_days < 0 or (wal_max_age_days is not None and wal_max_age_days < 0):
        raise ConfigurationError("wal_keep_days and wal_max_age_days must be 0 or more days")
    sizes = {m.wal_segment_size for m in kept}
    if len(sizes) > 1:
        return _blocked(where, f"the kept base backups disagree on wal_segment_size {sorted(sizes)}")
    if not kept and wal_max_age_days is None:
        return WalExpiryReport(
            archive=where,
            status="nothing",
            reason="no base backup is kept (only dumps), so no WAL is removed; set wal_max_age_days to "
            "bound the archive anyway",
        )
    # without a base backup the real segment size is unknown: 1 MiB numbering orders every size correctly
    # and gives names back unchanged (segment_name(parse(x)) == x), which is all expiry needs
    size = sizes.pop() if sizes else MIN_SEGMENT_SIZE
    try:
        contents = list_archive(archive, size)
    except ArchiveListingFailed as exc:
        return _blocked(where, f"nothing removed: {exc}")
    foreign = foreign_layout(archive, list(contents.infos))
    if foreign:
        return _blocked(
            where,
            f"{where} looks like {foreign}'s archive; dbops expires only the plain layout (cp %p DIR/%f or "
            "a prefix of flat WAL names), because deleting inside another tool's archive breaks its own "
            "catalog: let that tool expire it (wal-g delete, pgbackrest expire, barman-cloud-backup-delete)",
        )
    segments: list[tuple[int, int, str]] = []  # (segno, tli, key)
    for key in contents.infos:
        m = WAL_FILE_RE.match(key.rsplit("/", 1)[-1])
        if m is None or (m["kind"] and m["kind"] != ".partial"):
            continue  # .history, .backup, anything else: kept
        try:
            pos = parse_wal_name(key, size)
        except ValueError:
            return _blocked(where, f"{key} does not fit {size}-byte segments; nothing removed")
        segments.append((pos.segno, pos.tli, key))
    if not segments:
        return WalExpiryReport(archive=where, status="nothing", reason=f"{where} holds no WAL segment")
    segments.sort()

    cut: int | None = None
    cut_tli = 1
    base_cut: int | None = None
    oldest_kept: str | None = None
    if kept:
        oldest = min(kept, key=lambda m: parse_wal_name(m.start_wal, size).segno)
        base_cut, oldest_kept = parse_wal_name(oldest.start_wal, size).segno, oldest.start_wal
        cut, cut_tli = base_cut, oldest.timeline
    min_age = wal_keep_days if kept else max(wal_keep_days, wal_max_age_days or 0)
    limit = now - timedelta(days=min_age)
    young = [(s, t) for s, t, k in segments if contents.infos[k].last_modified > limit]
    youngest_allowed: str | None = None
    if young and (cut is None or young[0][0] < cut):
        cut, cut_tli = young[0]
        youngest_allowed = segment_name(cut_tli, cut, size)
    if cut is None:  # no base backup and every segment older than wal_max_age_days
        cut, cut_tli = segments[-1][0] + 1, segments[-1][1]
    cut_name = segment_name(cut_tli, cut, size)
    doomed = [(s, t, k) for s, t, k in segments if s < cut]
    kept_history = len(contents.listing.histories)
    if young and youngest_allowed:
        why = f"segments from {youngest_allowed} on are younger than {min_age:g} day(s)"
    elif kept:
        why = f"the oldest kept base backup starts at {oldest_kept}"
    else:
        why = f"no base backup; every segment is older than wal_max_age_days={wal_max_age_days:g}"
    report = WalExpiryReport(
        archive=where,
        status="nothing",
        reason=f"nothing older than {cut_name} to remove ({why})",
        cut=cut_name,
        oldest_kept_start=oldest_kept,
        youngest_allowed=youngest_allowed,
        kept_history=kept_history,
    )
    if not doomed:
        return report
    return report.model_copy(
        update={
            "status": "planned",
            "reason": f"{len(doomed)} segment(s) older than {cut_name} are needed by no kept base backup "
            f"({why})",
            "count": len(doomed),
            "bytes": sum(contents.infos[k].size for _, _, k in doomed),
            "first": _name(doomed[0][2]),
            "last": _name(doomed[-1][2]),
            "doomed_keys": [k for _, _, k in doomed],
        }
    )


def _name(key: str) -> str:
    return key.rsplit("/", 1)[-1]


# -- execution ----------------------------------------------------------------------------------------------


def expire_directory(
    plan: WalExpiryReport, directory: Path, server_version_num: int, bindir: str | None = None
) -> WalExpiryReport:
    """Run `pg_archivecleanup DIR CUT` after checking that its own dry run (-n) removes exactly the plan."""
    if plan.status != "planned" or plan.cut is None:
        return plan
    names = {_name(k) for k in plan.doomed_keys}
    exts = {n[24:].removeprefix(".partial") for n in names}
    exts.discard("")
    if len(exts) > 1 or (exts and not exts <= set(COMPRESSION_SUFFIXES)):
        return _blocked(
            plan.archive,
            f"{directory} mixes WAL file suffixes {sorted(exts)}; pg_archivecleanup handles one (-x), so "
            "nothing was removed",
        )
    tool = find_tool("pg_archivecleanup", server_version_num, bindir)
    args = [str(tool.path)] + (["-x", exts.pop()] if exts else []) + [str(directory), plan.cut]
    dry = _run([args[0], "-n", *args[1:]])
    would = {Path(line.strip()).name for line in dry.splitlines() if line.strip()}
    if would != names:
        extra = sorted(would - names)[:3]
        missing = sorted(names - would)[:3]
        return _blocked(
            plan.archive,
            f"pg_archivecleanup would remove something else than the plan (not planned: {extra}, not "
            f"removed: {missing}); the archive changed since it was listed: nothing removed, run again",
        )
    _run(args)
    left = [n for n in names if (directory / n).exists()]
    if left:
        raise WalExpiryFailed(
            f"pg_archivecleanup left {len(left)} planned segment(s) in {directory} "
            f"(first {sorted(left)[0]}); check the worker's write permission on the directory"
        )
    return plan.model_copy(update={"status": "deleted", "deleted": len(names), "method": "pg_archivecleanup"})


def _run(args: list[str]) -> str:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=600, env=child_environment())
    except (OSError, subprocess.TimeoutExpired) as exc:
        name = Path(args[0]).name
        raise WalExpiryFailed(f"{name} could not run ({exc}); nothing more was removed") from exc
    if done.returncode != 0:
        line = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise WalExpiryFailed(
            f"pg_archivecleanup failed with exit code {done.returncode} ({line}); fix the archive "
            "directory's permissions and run again"
        )
    # pg_archivecleanup -n prints the files it would remove on stdout
    return done.stdout


def expire_store(plan: WalExpiryReport, archive: WalArchive) -> WalExpiryReport:
    """Delete the planned keys in batches (the store sends at most 1000 per S3 DeleteObjects)."""
    if plan.status != "planned":
        return plan
    try:
        deleted = archive.store.delete(plan.doomed_keys)
    except (DbopsError, OSError) as exc:
        raise WalExpiryFailed(
            f"deleting expired WAL from {plan.archive} failed ({exc}); the segments older than {plan.cut} "
            "that remain are still unneeded, run again"
        ) from exc
    return plan.model_copy(update={"status": "deleted", "deleted": deleted, "method": "batched delete"})
