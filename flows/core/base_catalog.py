"""Which base backups exist, and expiring them: the dumps' rules, applied to `<prefix>/<database>/base/`.

The same guarantees as flows.core.catalog and flows.core.expiry: only a tar with a dbops manifest is a base
backup; keys that are not exactly this database's base layout and manifests that cannot be read are
reported and left alone; a base backup a recovery is reading (an unexpired or unreadable lease) is kept;
manifests are deleted first, then leases are looked for again, then the tars. The retention planner and
the lease rules are the dumps' own (flows.core.retention, flows.core.catalog.leases_in_use); only the
layout and the manifest type differ.

WAL expiry and the recoverable window can read the kept base backups with `read_base_catalog`.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from pydantic import ValidationError

from flows.core.base_layout import (
    PG_MANIFEST_SUFFIX,
    TAR_SUFFIX,
    BaseBackupManifest,
    base_prefix,
    parse_base_key,
)
from flows.core.catalog import Leases, deletion_order, expired_lease_keys, leases_in_use, read_leases
from flows.core.errors import ConfigurationError, ObjectNotFound
from flows.core.layout import LEASE_MARK, MANIFEST_SUFFIX
from flows.core.manifest import why_invalid
from flows.core.objectstore import IncompleteWrite, ObjectStore
from flows.core.retention import BackupRecord, RetentionPlan, RetentionPolicy, plan_retention
from flows.core.wal import parse_lsn, parse_wal_name, segno_of_lsn

LEFTOVER_AGE = timedelta(days=1)


@dataclass
class BaseBackup:
    stem: str
    manifest: BaseBackupManifest
    keys: list[str]  # tar, PostgreSQL's backup_manifest, dbops manifest, sidecars (never leases)

    @property
    def usable(self) -> bool:
        """Consistent when restored: its WAL is in the tar, or was confirmed in the archive."""
        return self.manifest.wal_included or self.manifest.wal_archived

    @property
    def wal_state(self) -> str:
        if self.manifest.wal_included:
            return "included"
        return "archived" if self.manifest.wal_archived else "not confirmed"


@dataclass
class BaseCatalog:
    backups: list[BaseBackup]  # newest first (by manifest end time)
    orphans: list[tuple[str, list[str], datetime]]  # (stem, keys, tar last-modified): no dbops manifest
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    foreign: list[tuple[str, str]] = field(default_factory=list)
    leases: Leases = field(default_factory=dict)

    @property
    def usable(self) -> list[BaseBackup]:
        """The base backups a recovery can start from, oldest first (the order the chain walks)."""
        return sorted((b for b in self.backups if b.usable), key=lambda b: (b.manifest.ended_at, b.stem))

    def newest(self) -> BaseBackup | None:
        return next((b for b in self.backups if b.manifest.verified), None)

    def in_use(self, now: datetime) -> dict[str, str]:
        return leases_in_use(self.leases, now)


def _stem_time(stem: str) -> datetime:
    return datetime.strptime(stem.rsplit("-", 1)[-1], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)


def why_not_ours(manifest: BaseBackupManifest, stem: str, database: str) -> str:
    """Why this manifest does not describe the base backup at `stem` ("" when it does): a copied or
    hand-edited manifest is never trusted."""
    if manifest.database != database:
        return f"manifest names database {manifest.database!r}, not {database!r}"
    if manifest.tar_key != stem + TAR_SUFFIX:
        return f"manifest names tar {manifest.tar_key!r}, not the one beside it"
    try:
        size = manifest.wal_segment_size
        start = parse_wal_name(manifest.start_wal, size)
        stop = parse_wal_name(manifest.stop_wal, size)
        start_lsn, stop_lsn = parse_lsn(manifest.start_lsn), parse_lsn(manifest.stop_lsn)
    except ValueError as exc:  # BadWalName, a bad LSN or segment size
        return f"manifest has an invalid WAL position ({exc})"
    if stop.segno < start.segno or stop_lsn < start_lsn:
        return f"manifest stops ({manifest.stop_wal}) before it starts ({manifest.start_wal})"
    if start.segno != segno_of_lsn(start_lsn, size):
        return f"manifest start_wal {manifest.start_wal} does not hold start_lsn {manifest.start_lsn}"
    if manifest.ended_at < manifest.started_at:
        return "manifest ends before it starts"
    return ""


def read_base_catalog(store: ObjectStore, prefix: str, database: str, workers: int = 16) -> BaseCatalog:
    """One listing of the base folder, every dbops manifest read (concurrently). A manifest that cannot be
    read, or does not describe the tar beside it, is reported and never trusted; a listing error
    propagates (nobody can tell what exists then)."""
    manifests: dict[str, str] = {}
    objects: dict[str, list[str]] = {}
    tars: dict[str, datetime] = {}
    lease_keys: dict[str, list[str]] = {}
    foreign: list[tuple[str, str]] = []
    for info in store.list(base_prefix(prefix, database)):
        parsed = parse_base_key(info.key, prefix, database)
        if parsed is None:
            if ".partial-" not in info.key:  # a local upload in progress
                foreign.append((info.key, "not in this database's base-backup layout"))
            continue
        stem, rest = parsed
        if rest.startswith(LEASE_MARK):
            lease_keys.setdefault(stem, []).append(info.key)
            continue
        objects.setdefault(stem, []).append(info.key)
        if rest == MANIFEST_SUFFIX:
            manifests[stem] = info.key
        elif rest == TAR_SUFFIX:
            tars[stem] = info.last_modified

    def read(stem: str) -> tuple[str, BaseBackupManifest | None, str]:
        try:
            return stem, BaseBackupManifest.from_json(store.get_bytes(manifests[stem])), ""
        except ObjectNotFound:
            return stem, None, "vanished"
        except (ValueError, ValidationError) as exc:
            return stem, None, f"unreadable manifest ({why_invalid(exc)}); left alone, fix or remove it"

    backups: list[BaseBackup] = []
    unreadable: list[tuple[str, str]] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for stem, manifest, why in pool.map(read, list(manifests)):
            if manifest is None:
                if why != "vanished":
                    unreadable.append((manifests[stem], why))
                continue
            other = why_not_ours(manifest, stem, database)
            if other:
                unreadable.append((manifests[stem], f"{other}; not trusted, left alone"))
                continue
            if stem not in tars:
                unreadable.append((manifests[stem], f"its tar {stem + TAR_SUFFIX} is missing; not a backup"))
                continue
            backups.append(BaseBackup(stem, manifest, sorted(objects[stem])))
    backups.sort(key=lambda b: (b.manifest.ended_at, b.stem), reverse=True)
    orphans = [
        (stem, sorted(objects[stem]), modified) for stem, modified in tars.items() if stem not in manifests
    ]
    return BaseCatalog(backups, orphans, unreadable, sorted(foreign), read_leases(store, lease_keys))


def plan_base_retention(catalog: BaseCatalog, policy: RetentionPolicy, now: datetime) -> RetentionPlan:
    records = [BackupRecord(b.stem, b.manifest.ended_at, b.manifest.verified) for b in catalog.backups]
    return plan_retention(records, policy, now)


@dataclass
class BaseCleanup:
    """What one base-backup retention run deletes, and what it leaves alone on purpose."""

    expired: dict[str, list[str]]
    in_use: dict[str, str]
    orphans: dict[str, list[str]]
    expired_leases: list[str]
    incomplete: list[IncompleteWrite]
    foreign: list[tuple[str, str]]
    unreadable: list[tuple[str, str]]
    deleted_objects: int = 0
    kept_after_recheck: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = (
            f"{len(self.expired)} expired base backup(s), {len(self.orphans)} stale orphan(s), "
            f"{len(self.expired_leases)} expired lease(s), {len(self.incomplete)} incomplete upload(s)"
        )
        if self.in_use:
            text += f"; {len(self.in_use)} expired base backup(s) kept because a recovery reads them"
        if self.foreign or self.unreadable:
            text += f"; left alone: {len(self.foreign)} foreign, {len(self.unreadable)} unreadable"
        return text


def plan_base_cleanup(
    store: ObjectStore, catalog: BaseCatalog, plan: RetentionPlan, now: datetime, prefix: str, database: str
) -> BaseCleanup:
    """What `carry_out_base` would delete; only reads, so a dry run shows exactly this."""
    newest = catalog.newest()
    if newest is not None and newest.stem in {r.stem for r in plan.delete}:  # the planner guarantees this
        raise ConfigurationError(
            f"retention planned to delete the newest base backup {newest.stem}; refusing"
        )
    keys_of = {b.stem: b.keys for b in catalog.backups}
    in_use_now = catalog.in_use(now)
    cutoff = now - LEFTOVER_AGE
    incomplete = []
    for write in store.incomplete_writes(base_prefix(prefix, database)):
        parsed = parse_base_key(write.key, prefix, database)
        if parsed is not None and write.started < cutoff and _stem_time(parsed[0]) < cutoff:
            incomplete.append(write)
    return BaseCleanup(
        expired={r.stem: keys_of[r.stem] for r in plan.delete if r.stem not in in_use_now},
        in_use={r.stem: in_use_now[r.stem] for r in plan.delete if r.stem in in_use_now},
        orphans={
            stem: keys
            for stem, keys, modified in catalog.orphans
            if now - modified > LEFTOVER_AGE and stem not in in_use_now
        },
        expired_leases=expired_lease_keys(catalog.leases, now),
        incomplete=incomplete,
        foreign=list(catalog.foreign),
        unreadable=list(catalog.unreadable),
    )


def _ours(keys: list[str], prefix: str, database: str) -> list[str]:
    for key in keys:
        if parse_base_key(key, prefix, database) is None:
            raise ConfigurationError(
                f"base-backup retention was about to delete {key!r}, which is not a base backup object of "
                f"{database!r}; nothing more was deleted, report this as a dbops bug"
            )
    return keys


def carry_out_base(store: ObjectStore, cleanup: BaseCleanup, prefix: str, database: str) -> BaseCleanup:
    """Manifests first, then a fresh look for leases, then tars and PostgreSQL's backup_manifests."""
    manifests, rest = deletion_order(k for keys in cleanup.expired.values() for k in keys)
    deleted = store.delete(_ours(manifests, prefix, database))
    if cleanup.expired:
        known_expired = set(cleanup.expired_leases)
        leased = set()
        for info in store.list(base_prefix(prefix, database)):
            parsed = parse_base_key(info.key, prefix, database)
            if (
                parsed is not None
                and parsed[1].startswith(LEASE_MARK)
                and parsed[0] in cleanup.expired
                and info.key not in known_expired
            ):
                leased.add(parsed[0])
        if leased:
            cleanup.kept_after_recheck = sorted(leased)
            rest = [
                k for stem, keys in cleanup.expired.items() if stem not in leased for k in keys if k in rest
            ]
    rest += [k for keys in cleanup.orphans.values() for k in keys]
    rest += cleanup.expired_leases
    deleted += store.delete(_ours(rest, prefix, database))
    deleted += store.discard_incomplete(cleanup.incomplete)
    cleanup.deleted_objects = deleted
    return cleanup


__all__ = [
    "PG_MANIFEST_SUFFIX",
    "BaseBackup",
    "BaseCatalog",
    "BaseCleanup",
    "carry_out_base",
    "plan_base_cleanup",
    "plan_base_retention",
    "read_base_catalog",
]
