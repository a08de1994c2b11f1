"""What backups exist: one listing of a database's dumps folder, with every manifest read.

Only a dump with a manifest is a backup. Dumps without one are orphans (a run that died, or one still
in progress: hence the age threshold before anything removes them). Manifests are read concurrently,
because a few years of nightly backups is thousands of small objects.

Everything else is left alone and reported, never guessed at: keys that are not exactly this database's
layout (foreign), manifests that cannot be read or that describe another database or object (unreadable,
foreign), objects that vanished between the listing and the read (skipped: someone else deleted them).
One bad object never stops the others from being listed, restored or expired.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from pydantic import ValidationError

from flows.core.errors import ObjectNotFound
from flows.core.layout import DRILL_SUFFIX, KeyListing, dumps_prefix, group_listing, parse_key
from flows.core.leases import Lease, read_lease
from flows.core.manifest import Manifest, why_invalid
from flows.core.objectstore import ObjectStore

__all__ = [
    "DRILL_SUFFIX",
    "Backup",
    "Catalog",
    "deletion_order",
    "drill_key",
    "read_catalog",
    "read_sidecars",
]


@dataclass
class Backup:
    stem: str
    manifest: Manifest
    keys: list[str]  # every object of this backup: dump, manifest, globals, sidecars (never leases)


@dataclass
class Catalog:
    backups: list[Backup]  # newest first (by manifest end time)
    orphans: list[tuple[str, list[str], datetime]]  # (stem, keys, dump last-modified)
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (manifest key, why)
    foreign: list[tuple[str, str]] = field(default_factory=list)  # (key, why it is not ours)
    leftovers: list[tuple[str, list[str]]] = field(default_factory=list)  # sidecars of a deleted backup
    leases: dict[str, list[tuple[str, Lease | str]]] = field(default_factory=dict)  # stem -> (key, lease|why)
    vanished: list[str] = field(default_factory=list)  # manifests deleted between listing and reading

    def newest(self, verified_only: bool = True) -> Backup | None:
        for b in self.backups:
            if b.manifest.verified or not verified_only:
                return b
        return None

    def stale_orphans(
        self, now: datetime, min_age: timedelta = timedelta(days=1)
    ) -> list[tuple[str, list[str]]]:
        """Orphans old enough that no running dump can still own them (and that nobody is reading)."""
        in_use = self.in_use(now)
        return [
            (stem, keys)
            for stem, keys, modified in self.orphans
            if now - modified > min_age and stem not in in_use
        ]

    def in_use(self, now: datetime) -> dict[str, str]:
        """stem -> who reads it, for stems with an unexpired lease (or an unreadable one: fail closed)."""
        return leases_in_use(self.leases, now)

    def expired_leases(self, now: datetime) -> list[str]:
        return expired_lease_keys(self.leases, now)


Leases = dict[str, list[tuple[str, Lease | str]]]  # stem -> (lease key, lease or why it is unreadable)


def leases_in_use(leases: Leases, now: datetime) -> dict[str, str]:
    """stem -> who reads it, for stems with an unexpired lease (or an unreadable one: fail closed).

    Shared by every kind of backup that readers lease (dumps, base backups)."""
    found: dict[str, str] = {}
    for stem, held in leases.items():
        for key, lease in held:
            if isinstance(lease, str):
                found[stem] = f"{key}: {lease}"
            elif lease.expires_at > now:
                found[stem] = f"{lease.purpose} run {lease.run_id} until {lease.expires_at:%Y-%m-%d %H:%M}Z"
    return found


def expired_lease_keys(leases: Leases, now: datetime) -> list[str]:
    return [
        key
        for held in leases.values()
        for key, lease in held
        if not isinstance(lease, str) and lease.expires_at <= now
    ]


def read_leases(store: ObjectStore, lease_keys: dict[str, list[str]]) -> Leases:
    """Read every lease of a listing (stem -> lease keys); a lease released meanwhile is skipped."""
    leases: Leases = {}
    for stem, keys in lease_keys.items():
        for key in keys:
            lease = read_lease(store, key)
            if lease is not None:
                leases.setdefault(stem, []).append((key, lease))
    return leases


def _belongs(manifest: Manifest, stem: str, prefix: str, database: str) -> str:
    """Why this manifest does not describe the backup at `stem` ("" when it does)."""
    if manifest.database != database:
        return f"manifest names database {manifest.database!r}, not {database!r}"
    parsed = parse_key(manifest.dump_key, prefix, database)
    if parsed is None or parsed.kind != "dump" or parsed.stem != stem:
        return f"manifest names dump key {manifest.dump_key!r}, not one beside it"
    return ""


def read_catalog(store: ObjectStore, prefix: str, database: str, workers: int = 16) -> Catalog:
    listing: KeyListing = group_listing(store.list(dumps_prefix(prefix, database)), prefix, database)

    def read(stem: str) -> tuple[str, Manifest | None, str]:
        key = listing.manifests[stem]
        try:
            manifest = Manifest.from_json(store.get_bytes(key))
        except ObjectNotFound:
            return stem, None, "vanished"
        except (ValueError, ValidationError) as exc:
            return stem, None, f"unreadable manifest ({why_invalid(exc)}); left alone, fix or remove it"
        return stem, manifest, ""

    backups: list[Backup] = []
    unreadable: list[tuple[str, str]] = []
    foreign: list[tuple[str, str]] = [
        (key, "not in this database's backup layout") for key in listing.foreign
    ]
    vanished: list[str] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for stem, manifest, why in pool.map(read, list(listing.manifests)):
            key = listing.manifests[stem]
            if manifest is None:
                (vanished.append(key) if why == "vanished" else unreadable.append((key, why)))
                continue
            other = _belongs(manifest, stem, prefix, database)
            if other:
                foreign.append((key, f"{other}; this backup's objects are left alone"))
                continue
            backups.append(Backup(stem, manifest, sorted(listing.objects[stem])))
    backups.sort(key=lambda b: (b.manifest.ended_at, b.stem), reverse=True)
    orphans = [(stem, sorted(listing.objects[stem]), listing.dump_times[stem]) for stem in listing.orphans]
    leftovers = [(stem, sorted(listing.objects[stem])) for stem in listing.leftovers]
    leases = read_leases(store, listing.leases)
    return Catalog(backups, orphans, unreadable, sorted(foreign), leftovers, leases, vanished)


def deletion_order(keys: Iterable[str]) -> tuple[list[str], list[str]]:
    """Manifests first, then the rest: a crash in between leaves an orphan dump, never a manifest that
    points at nothing (which restore would take for a backup)."""
    keys = list(keys)
    manifests = [k for k in keys if k.endswith(".manifest.json")]
    rest = [k for k in keys if not k.endswith(".manifest.json")]
    return manifests, rest


# -- sidecars (added for restore drills) -------------------------------------------------------------------


def drill_key(stem: str) -> str:
    """`<stem>.drill.json`: the last restore drill of this backup (written by restore_drill)."""
    return stem + DRILL_SUFFIX


def read_sidecars(store: ObjectStore, catalog: Catalog, suffix: str, workers: int = 16) -> dict[str, bytes]:
    """stem -> content of `<stem><suffix>` for the backups that have one, read concurrently.

    A sidecar deleted between the listing and the read is skipped.
    """
    wanted = [(b.stem, b.stem + suffix) for b in catalog.backups if b.stem + suffix in b.keys]

    def read(item: tuple[str, str]) -> tuple[str, bytes | None]:
        try:
            return item[0], store.get_bytes(item[1])
        except ObjectNotFound:
            return item[0], None

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return {stem: data for stem, data in pool.map(read, wanted) if data is not None}
