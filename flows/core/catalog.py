"""What backups exist: one listing of a database's dumps folder, with every manifest read.

Only a dump with a manifest is a backup. Dumps without one are orphans (a run that died, or one still
in progress: hence the age threshold before anything removes them). Manifests are read concurrently,
because a few years of nightly backups is thousands of small objects.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from pydantic import ValidationError

from flows.core.layout import Listing, dumps_prefix, group_listing
from flows.core.manifest import Manifest
from flows.core.objectstore import ObjectStore


@dataclass
class Backup:
    stem: str
    manifest: Manifest
    keys: list[str]  # every object of this backup: dump, manifest, globals, sidecars


@dataclass
class Catalog:
    backups: list[Backup]  # newest first (by manifest end time)
    orphans: list[tuple[str, list[str], datetime]]  # (stem, keys, dump last-modified)
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (manifest key, why)

    def newest(self, verified_only: bool = True) -> Backup | None:
        for b in self.backups:
            if b.manifest.verified or not verified_only:
                return b
        return None

    def stale_orphans(
        self, now: datetime, min_age: timedelta = timedelta(days=1)
    ) -> list[tuple[str, list[str]]]:
        """Orphans old enough that no running dump can still own them."""
        return [(stem, keys) for stem, keys, modified in self.orphans if now - modified > min_age]


def read_catalog(store: ObjectStore, prefix: str, database: str, workers: int = 16) -> Catalog:
    listing: Listing = group_listing(store.list(dumps_prefix(prefix, database)))

    def read(stem: str) -> tuple[str, Manifest | None, str]:
        key = listing.manifests[stem]
        try:
            return stem, Manifest.from_json(store.get_bytes(key)), ""
        except (ValueError, ValidationError) as exc:
            return stem, None, f"unreadable manifest: {str(exc).splitlines()[0]}"

    backups: list[Backup] = []
    unreadable: list[tuple[str, str]] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for stem, manifest, why in pool.map(read, list(listing.manifests)):
            if manifest is None:
                unreadable.append((listing.manifests[stem], why))
                continue
            backups.append(Backup(stem, manifest, sorted(listing.objects[stem])))
    backups.sort(key=lambda b: (b.manifest.ended_at, b.stem), reverse=True)
    orphans = [(stem, sorted(listing.objects[stem]), listing.dump_times[stem]) for stem in listing.orphans]
    return Catalog(backups, orphans, unreadable)


def deletion_order(keys: Iterable[str]) -> tuple[list[str], list[str]]:
    """Manifests first, then the rest: a crash in between leaves an orphan dump, never a manifest that
    points at nothing (which restore would take for a backup)."""
    keys = list(keys)
    manifests = [k for k in keys if k.endswith(".manifest.json")]
    rest = [k for k in keys if not k.endswith(".manifest.json")]
    return manifests, rest


# -- sidecars (added for restore drills) -------------------------------------------------------------------

DRILL_SUFFIX = ".drill.json"


def drill_key(stem: str) -> str:
    """`<stem>.drill.json`: the last restore drill of this backup (written by restore_drill)."""
    return stem + DRILL_SUFFIX


def read_sidecars(store: ObjectStore, catalog: Catalog, suffix: str, workers: int = 16) -> dict[str, bytes]:
    """stem -> content of `<stem><suffix>` for the backups that have one, read concurrently."""
    wanted = [(b.stem, b.stem + suffix) for b in catalog.backups if b.stem + suffix in b.keys]

    def read(item: tuple[str, str]) -> tuple[str, bytes]:
        return item[0], store.get_bytes(item[1])

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(pool.map(read, wanted))
