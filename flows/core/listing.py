"""The backup listing: one implementation behind the list-backups flow and `dbops backups list`.

A row per backup (time, age, size, compression, verified, last drill, Alembic revision, key), newest
first, then a row per object that was left alone (an unreadable manifest, a foreign object) so a person
sees it. One bad object never breaks the listing: a drill record that cannot be read shows as
"drill record unreadable" on its backup's row.

Base backups get their own rows (time, size, WAL included or archived, verified, WAL range) and the
database one line: the recoverable window (flows/core/chain.py), "recoverable to any moment from <oldest
base backup end> to <last archived segment time>", or where the first hole breaks it. Without a WAL
archive to read the line says the window is unknown, never a guess.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from flows.core.base_catalog import BaseCatalog, read_base_catalog
from flows.core.base_layout import TAR_SUFFIX
from flows.core.catalog import Catalog, read_catalog, read_sidecars
from flows.core.chain import RecoverableWindow, recoverable_window
from flows.core.drill import DrillRecord
from flows.core.errors import StorageError, StorageFault
from flows.core.layout import DRILL_SUFFIX
from flows.core.manifest import why_invalid
from flows.core.objectstore import ObjectStore
from flows.core.restore_sources import verified_here
from flows.core.wal_archive import WalArchive

COLUMNS = ["time", "age", "size", "compression", "verified", "drilled", "alembic", "key"]
BASE_COLUMNS = ["time", "age", "size", "wal", "verified", "start_wal", "stop_wal", "key"]
DRILL_UNREADABLE = "drill record unreadable"


def age_hours(when: datetime, now: datetime | None = None) -> float:
    return ((now or datetime.now(UTC)) - when).total_seconds() / 3600


def staleness_hours(catalog: Catalog, now: datetime | None = None) -> float | None:
    """Hours since the newest backup (with a manifest) ended; None when there is none."""
    newest = catalog.newest(verified_only=False)
    return None if newest is None else round(age_hours(newest.manifest.ended_at, now), 2)


def is_stale(hours: float | None, threshold_hours: float) -> bool:
    return hours is None or hours > threshold_hours


def stale_message(database: str, hours: float | None, threshold_hours: float) -> str:
    if hours is None:
        return f"there is no backup of {database!r} at all; check the nightly-dump deployment and its storage"
    return (
        f"the newest backup of {database!r} is {hours:.1f} h old (threshold {threshold_hours:g} h); "
        "check that the nightly-dump deployment runs and completes"
    )


def read_drill_records(store: ObjectStore, catalog: Catalog) -> dict[str, DrillRecord | str]:
    """stem -> its last drill record, or why that record cannot be read (shown on the row, not raised)."""
    records: dict[str, DrillRecord | str] = {}
    for stem, data in read_sidecars(store, catalog, DRILL_SUFFIX).items():
        try:
            records[stem] = DrillRecord.from_json(data)
        except (ValueError, ValidationError) as exc:
            records[stem] = f"{DRILL_UNREADABLE}: {why_invalid(exc)}"
    return records


def _drilled(drill: DrillRecord | str | None) -> str:
    if drill is None:
        return "never"
    if isinstance(drill, str):
        return DRILL_UNREADABLE
    return drill.describe()


def backup_rows(
    catalog: Catalog, drills: dict[str, DrillRecord | str], now: datetime | None = None
) -> list[dict[str, str]]:
    """One row per backup, newest first: what `dbops backups list` and the list-backups artifact show."""
    rows: list[dict[str, str]] = []
    for b in catalog.backups:
        m = b.manifest
        rows.append(
            {
                "time": f"{m.ended_at.astimezone(UTC):%Y-%m-%d %H:%M:%S}Z",
                "age": f"{age_hours(m.ended_at, now):.1f} h",
                "size": _human(m.bytes),
                "raw": _human(m.raw_bytes),
                "compression": m.compression.value,
                "verified": m.verification.method if m.verified else "no",
                "drilled": _drilled(drills.get(b.stem)),
                "alembic": m.alembic_revision or "-",
                "key": m.dump_key,
            }
        )
    return rows


def base_rows(catalog: BaseCatalog, now: datetime | None = None) -> list[dict[str, str]]:
    """One row per base backup, newest first."""
    rows: list[dict[str, str]] = []
    for b in catalog.backups:  # newest first
        m = b.manifest
        rows.append(
            {
                "kind": "base",
                "time": f"{m.ended_at.astimezone(UTC):%Y-%m-%d %H:%M:%S}Z",
                "age": f"{age_hours(m.ended_at, now):.1f} h",
                "size": _human(m.bytes),
                "raw": _human(m.raw_bytes),
                "wal": b.wal_state,
                "verified": m.verification.method if m.verified else "no",
                "start_wal": m.start_wal,
                "stop_wal": m.stop_wal,
                "key": m.tar_key,
            }
        )
    return rows


def left_alone_rows(catalog: Catalog, base: BaseCatalog | None = None) -> list[dict[str, str]]:
    """Objects no flow touches: unreadable manifests and foreign objects, each with the reason."""
    rows = [{"key": key, "problem": why} for key, why in catalog.unreadable]
    rows += [{"key": key, "problem": f"foreign: {why}"} for key, why in catalog.foreign]
    if base is not None:
        rows += [{"key": key, "problem": why} for key, why in base.unreadable]
        orphan = "base backup without a manifest (failed, or still running): not a backup"
        rows += [{"key": stem + TAR_SUFFIX, "problem": orphan} for stem, _, _ in base.orphans]
        rows += [{"key": key, "problem": f"foreign: {why}"} for key, why in base.foreign]
    return rows


@dataclass
class BackupListing:
    database: str
    catalog: Catalog
    rows: list[dict[str, str]]  # one per backup, newest first
    left_alone: list[dict[str, str]]  # key, problem
    base: BaseCatalog | None = None
    base_rows: list[dict[str, str]] = field(default_factory=list)  # one per base backup, newest first
    window: RecoverableWindow | None = None

    @property
    def window_line(self) -> str:
        """ "recoverable to any moment from .. to ..", the hole that breaks it, or why it is unknown."""
        if self.window is None:
            return f"{self.database}: recoverable window unknown"
        return self.window.describe()

    pitr_drill: str = ""  # the last PITR drill (beside the base backups), when there was one

    def describe(self) -> str:
        text = f"{len(self.rows)} backup(s); {len(self.catalog.orphans)} dump(s) without a manifest"
        if self.base is not None:
            text += f"; {len(self.base_rows)} base backup(s)"
        if self.left_alone:
            text += f"; {len(self.left_alone)} object(s) left alone (unreadable or foreign)"
        if self.pitr_drill:
            text += f"; {self.pitr_drill}"
        return text


def list_backups(
    store: ObjectStore,
    prefix: str,
    database: str,
    now: datetime | None = None,
    archive: WalArchive | None = None,
    *,
    catalog: Catalog | None = None,
    base: BaseCatalog | None = None,
) -> BackupListing:
    """Dumps, base backups and the recoverable window (from `archive`, the WAL archive; None: unknown).
    `catalog` and `base`: this store's catalogs when the caller has read them already."""
    catalog = catalog if catalog is not None else read_catalog(store, prefix, database)
    rows = backup_rows(catalog, read_drill_records(store, catalog), now)
    base = base if base is not None else read_base_catalog(store, prefix, database)
    window = recoverable_window(database, base, archive)
    from flows.core.pitr.drill import describe_pitr_drill, last_pitr_drill

    drill = last_pitr_drill(store, prefix, database)
    return BackupListing(
        database,
        catalog,
        rows,
        left_alone_rows(catalog, base),
        base,
        base_rows(base, now),
        window,
        describe_pitr_drill(drill) if drill else "",
    )


# -- a storage list: where each backup is -------------------------------------------------------------------

LOCATIONS_COLUMN = "locations"


@dataclass
class LocationContents:
    """One location's catalogs, or the sentence saying why it could not be read."""

    name: str
    store: ObjectStore
    catalog: Catalog | None = None
    base: BaseCatalog | None = None
    error: str = ""


def read_location(name: str, store: ObjectStore, prefix: str, database: str) -> LocationContents:
    try:
        return LocationContents(
            name, store, read_catalog(store, prefix, database), read_base_catalog(store, prefix, database)
        )
    except StorageFault as exc:
        return LocationContents(name, store, error=str(exc))


def presence(stem: str, key_of: Callable[[Any], str], places: Sequence[LocationContents], base: bool) -> str:
    """`s3-bucket/a ✓, local-file-system/nas ✓, s3-bucket/eu missing` for one backup (`stem`)."""
    parts: list[str] = []
    for place in places:
        if place.error:
            parts.append(f"{place.name} unreadable")
            continue
        catalog = place.base if base else place.catalog
        found = {b.stem: b for b in catalog.backups} if catalog is not None else {}
        held = found.get(stem)
        if held is None:
            parts.append(f"{place.name} missing")
        elif key_of(held.manifest) not in held.keys:
            parts.append(f"{place.name} object missing")
        elif not verified_here(held.manifest):
            parts.append(f"{place.name} unverified")
        else:
            parts.append(f"{place.name} ✓")
    return ", ".join(parts)


def list_backups_across(
    locations: Sequence[tuple[str, ObjectStore]],
    prefix: str,
    database: str,
    now: datetime | None = None,
    archive: WalArchive | None = None,
) -> BackupListing:
    """The listing of a storage list (the primary first): every backup held in any location, each row
    from the first location that holds it, with the column `locations` saying where it is present and
    verified. A location that cannot be read is one row of `left_alone` and "unreadable" in every row;
    the others are listed all the same. With one location this is `list_backups`."""
    if len(locations) == 1:
        return list_backups(locations[0][1], prefix, database, now, archive)
    places = [read_location(name, store, prefix, database) for name, store in locations]
    readable = [p for p in places if not p.error]
    if not readable:
        raise StorageError(
            f"none of the {len(places)} storage locations could be read: "
            + "; ".join(f"{p.name}: {p.error}" for p in places)
        )
    first = readable[0]
    assert first.catalog is not None
    assert first.base is not None
    listing = list_backups(
        first.store, prefix, database, now, archive, catalog=first.catalog, base=first.base
    )

    rows: list[tuple[datetime, str, dict[str, str]]] = []
    seen: set[str] = set()
    for place in readable:
        assert place.catalog is not None
        own = [b for b in place.catalog.backups if b.stem not in seen]
        seen.update(b.stem for b in own)
        sub = replace(place.catalog, backups=own)
        for b, row in zip(own, backup_rows(sub, read_drill_records(place.store, sub), now), strict=True):
            row[LOCATIONS_COLUMN] = presence(b.stem, lambda m: m.dump_key, places, base=False)
            rows.append((b.manifest.ended_at, b.stem, row))
    rows.sort(key=lambda r: (r[0], r[1]), reverse=True)
    listing.rows = [row for _, _, row in rows]

    base_found: list[tuple[datetime, str, dict[str, str]]] = []
    seen = set()
    for place in readable:
        assert place.base is not None
        own_base = [b for b in place.base.backups if b.stem not in seen]
        seen.update(b.stem for b in own_base)
        for bb, row in zip(own_base, base_rows(replace(place.base, backups=own_base), now), strict=True):
            row[LOCATIONS_COLUMN] = presence(bb.stem, lambda m: m.tar_key, places, base=True)
            base_found.append((bb.manifest.ended_at, bb.stem, row))
    base_found.sort(key=lambda r: (r[0], r[1]), reverse=True)
    listing.base_rows = [row for _, _, row in base_found]

    for place in places:
        if place.error:
            problem = f"location cannot be read: {place.error}"
            listing.left_alone.append({"key": place.name, "problem": problem})
        elif place is not first:
            assert place.catalog is not None
            listing.left_alone += [
                {"key": f"{place.name}: {row['key']}", "problem": row["problem"]}
                for row in left_alone_rows(place.catalog, place.base)
            ]
    return listing


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def format_table(rows: list[dict[str, str]], columns: list[str]) -> str:
    """A plain fixed-width table for terminals."""
    widths = {c: max([len(c)] + [len(r.get(c, "")) for r in rows]) for c in columns}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip()]
    lines += ["  ".join(r.get(c, "").ljust(widths[c]) for c in columns).rstrip() for r in rows]
    return "\n".join(lines)
