"""Which base backup a recovery starts from, and the window the archive can recover.

`choose_base_backup` is the one place that answers "pick the newest base backup that ends before the
target and whose WAL chain reaches it". It is written for point-in-time recovery and is meant to be
unified with the recoverable-window listing (flows/core/chain.py, base-backup work) at merge: keep the
rules here and there the same.

The rules:
- A base backup is usable when every segment from its start WAL to its stop WAL is in the archive (or it
  carries its WAL, -X fetch). Its chain is the run of consecutive archived segments from its start WAL on,
  each read on the timeline the newest history file says is responsible for it.
- time T: the newest usable backup that ended at or before T whose chain holds a segment archived at or
  after T (the object's modification time: WAL written before T was archived by then). A chain that
  ends before T is refused with the window, naming the missing segment when the archive has later ones.
- lsn L: the newest usable backup whose stop LSN is at or before L and whose chain reaches L's segment.
- restore_point: a name has no position the archive can be searched by without reading the WAL itself,
  so the newest usable backup is chosen; a restore point older than it (or behind a gap) makes recovery
  end before the target, and the recovery reports that with the last replayed LSN and the missing
  segment. Give a time or LSN instead when the restore point is older than the newest base backup.
- latest: the newest usable backup whose chain reaches the last archived segment (a gap on the way means
  the end of the archive cannot be reached: refused, naming the segment).
- immediate: the newest usable backup.
Nothing here downloads anything: it reads manifests and lists the archive.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime

from flows.core.base_layout import BaseBackupManifest
from flows.core.objectstore import ObjectInfo, ObjectStore
from flows.core.pitr.errors import RecoveryRefused
from flows.core.pitr.targets import RecoveryTarget
from flows.core.wal import (
    WAL_FILE_RE,
    Lineage,
    history_name,
    parse_lsn,
    segment_name,
    segments_per_log,
    segno_of_lsn,
)
from flows.core.wal_archive import WalArchive

#: how many timelines past a base backup's own are probed for history files (one list call each)
MAX_TIMELINE_PROBES = 64


@dataclass
class ArchivedSegment:
    tli: int
    segno: int
    key: str
    size: int
    archived_at: datetime


@dataclass
class ArchiveScan:
    """What the archive holds from the oldest base backup's start WAL on: one listing per log id."""

    segment_size: int
    lineage: Lineage
    newest_tli: int
    segments: dict[int, ArchivedSegment] = field(default_factory=dict)  # segno -> the responsible copy
    histories: dict[int, str] = field(default_factory=dict)  # tli -> key
    list_requests: int = 0

    def name(self, segno: int) -> str:
        return segment_name(self.lineage.responsible(segno), segno, self.segment_size)

    def chain_end(self, first: int) -> int:
        """The last segment of the unbroken run from `first` on (first - 1 when `first` is missing)."""
        s = first
        while s in self.segments:
            s += 1
        return s - 1

    @property
    def last(self) -> int | None:
        return max(self.segments) if self.segments else None


@dataclass
class Window:
    """The recoverable window: from the oldest usable base backup's end to the end of its chain."""

    start: datetime | None
    end: datetime | None
    end_segment: str | None
    missing: str | None = None  # the first segment missing inside the archive (later ones exist)

    def sentence(self) -> str:
        if self.start is None or self.end is None:
            return "nothing is recoverable yet (no base backup whose WAL is in the archive)"
        start, end = self.start.isoformat(timespec="seconds"), self.end.isoformat(timespec="seconds")
        text = f"recoverable from {start} to {end}"
        if self.missing:
            text += f" (WAL segment {self.missing} is missing from the archive)"
        return text


@dataclass
class Choice:
    """The base backup to restore, the window, and the last segment the recovery is expected to need."""

    manifest: BaseBackupManifest
    window: Window
    scan: ArchiveScan
    end_segno: int | None  # for the ETA: the segment the target is expected in (None: unknown)


def _join(prefix: str, name: str) -> str:
    prefix = prefix.strip("/")
    return f"{prefix}/{name}" if prefix else name


def _list(archive: WalArchive, prefix: str, scan: ArchiveScan) -> Iterator[ObjectInfo]:
    scan.list_requests += 1
    archive.stats.requests += 1
    yield from archive.store.list(_join(archive.prefix, prefix))


def newest_timeline(archive: WalArchive, tli: int) -> tuple[int, dict[int, str]]:
    """The newest timeline descending from `tli` that the archive has a history file for (what
    recovery_target_timeline=latest follows), probing tli+1, tli+2, ... as PostgreSQL does."""
    histories: dict[int, str] = {}
    if tli > 1:
        key = archive.find(history_name(tli))
        if key:
            histories[tli] = key
    newest = tli
    for candidate in range(tli + 1, tli + 1 + MAX_TIMELINE_PROBES):
        key = archive.find(history_name(candidate))
        if key is None:
            break
        histories[candidate] = key
        newest = candidate
    return newest, histories


def scan_archive(archive: WalArchive, first_segno: int, tli: int, segment_size: int) -> ArchiveScan:
    """List the archive from `first_segno` on, one log id at a time, until a log id holds nothing."""
    newest, histories = newest_timeline(archive, tli)
    lineage, _problem = archive.lineage(newest, segment_size)
    scan = ArchiveScan(segment_size, lineage, newest, histories=histories)
    per_log = segments_per_log(segment_size)
    log = first_segno // per_log
    while True:
        found = False
        for t in lineage.timelines:
            for info in _list(archive, f"{t:08X}{log:08X}", scan):
                m = WAL_FILE_RE.match(info.key.rsplit("/", 1)[-1])
                if not m or m["kind"]:  # .partial and .backup are not whole segments
                    continue
                segno = int(m["log"], 16) * per_log + int(m["seg"], 16)
                if segno < first_segno or int(m["tli"], 16) != t:
                    continue
                found = True
                if lineage.responsible(segno) != t:
                    continue
                scan.segments[segno] = ArchivedSegment(t, segno, info.key, info.size, info.last_modified)
        if not found:
            break
        log += 1
    return scan


def _start_segno(m: BaseBackupManifest) -> int:
    return segno_of_lsn(parse_lsn(m.start_lsn), m.wal_segment_size)


def _stop_segno(m: BaseBackupManifest) -> int:
    return segno_of_lsn(parse_lsn(m.stop_lsn), m.wal_segment_size)


def _usable(m: BaseBackupManifest, scan: ArchiveScan) -> bool:
    return m.wal_included or scan.chain_end(_start_segno(m)) >= _stop_segno(m)


def _chain_end(m: BaseBackupManifest, scan: ArchiveScan) -> int:
    start = _stop_segno(m) + 1 if m.wal_included else _start_segno(m)
    end = scan.chain_end(start)
    return max(end, _stop_segno(m)) if m.wal_included else end


def _missing_after(scan: ArchiveScan, end: int) -> str | None:
    """The segment after `end` when the archive holds later ones (a gap), else None (the archive's end)."""
    last = scan.last
    return scan.name(end + 1) if last is not None and last > end + 1 else None


def window_of(usable: list[BaseBackupManifest], scan: ArchiveScan) -> Window:
    if not usable:
        return Window(None, None, None)
    oldest = min(usable, key=lambda m: m.ended_at)
    newest = max(usable, key=lambda m: m.ended_at)
    end = _chain_end(newest, scan)
    seg = scan.segments.get(end)
    return Window(
        start=oldest.ended_at,
        end=seg.archived_at if seg else newest.ended_at,
        end_segment=scan.name(end) if seg else None,
        missing=_missing_after(scan, end),
    )


def choose_base_backup(
    manifests: list[BaseBackupManifest], target: RecoveryTarget, archive: WalArchive, where: str = ""
) -> Choice:
    """The newest base backup that ends before the target and whose WAL chain reaches it (module
    docstring for the rules per target kind); RecoveryRefused with the window otherwise."""
    if not manifests:
        raise RecoveryRefused(
            f"there is no base backup{f' in {where}' if where else ''}; take one (base-backup flow) before "
            "a point-in-time recovery is possible"
        )
    size = manifests[0].wal_segment_size
    first = min(_start_segno(m) for m in manifests)
    scan = scan_archive(archive, first, min(m.timeline for m in manifests), size)
    usable = sorted((m for m in manifests if _usable(m, scan)), key=lambda m: m.ended_at, reverse=True)
    window = window_of(usable, scan)
    if not usable:
        oldest = min(manifests, key=_start_segno)
        raise RecoveryRefused(
            f"no base backup{f' in {where}' if where else ''} has its WAL in {archive.url} (the oldest needs "
            f"{oldest.start_wal}..{oldest.stop_wal}); {window.sentence()}"
        )
    what = target.describe()
    if target.kind in ("immediate", "restore_point"):
        m = usable[0]
        return Choice(
            m, window, scan, _chain_end(m, scan) if target.kind == "restore_point" else _stop_segno(m)
        )
    if target.kind == "latest":
        m = usable[0]
        end = _chain_end(m, scan)
        missing = _missing_after(scan, end)
        if missing:
            raise RecoveryRefused(
                f"{window.sentence()}; {what} cannot be reached: WAL segment {missing} is missing from "
                f"{archive.url} and later segments are there; copy it back from the server's pg_wal if it "
                "is still there, or take a new base backup"
            )
        return Choice(m, window, scan, end)
    if target.kind == "lsn":
        lsn = target.lsn_int
        assert lsn is not None
        need = segno_of_lsn(lsn, size)
        before = [m for m in usable if parse_lsn(m.stop_lsn) <= lsn]
        if not before:
            raise RecoveryRefused(
                f"{window.sentence()}; the target {what} is before the oldest base backup's consistent point "
                f"({min(usable, key=lambda m: m.ended_at).stop_lsn})"
            )
        for m in before:
            if _chain_end(m, scan) >= need:
                return Choice(m, window, scan, need)
        return _refuse_beyond(before[0], scan, window, what, archive)
    assert target.time is not None
    when = target.time
    before = [m for m in usable if m.ended_at <= when]
    if not before:
        raise RecoveryRefused(
            f"{window.sentence()}; the target {what} is before the oldest base backup with its WAL "
            "archived ended"
        )
    for m in before:
        end = _chain_end(m, scan)
        start = _start_segno(m)
        reached = next(
            (s for s in range(start, end + 1) if s in scan.segments and scan.segments[s].archived_at >= when),
            None,
        )
        if reached is not None:
            return Choice(m, window, scan, reached)
    return _refuse_beyond(before[0], scan, window, what, archive)


def _refuse_beyond(
    m: BaseBackupManifest, scan: ArchiveScan, window: Window, what: str, archive: WalArchive
) -> Choice:
    end = _chain_end(m, scan)
    missing = _missing_after(scan, end)
    if missing:
        raise RecoveryRefused(
            f"{window.sentence()}; the target {what} is past WAL segment {missing}, which is missing from "
            f"{archive.url} while later segments are there, so no base backup's WAL chain reaches it"
        )
    raise RecoveryRefused(
        f"{window.sentence()}; the target {what} is after the last archived segment "
        f"({scan.name(end)}): wait for it to be archived, or choose an earlier target"
    )


def read_base_manifests(
    store: ObjectStore, prefix: str, database: str
) -> tuple[list[BaseBackupManifest], list[str]]:
    """Every dbops base backup of `database` (its manifest.json, written last), and the keys of manifests
    that could not be read (reported, never used: a backup without a readable manifest is not a backup)."""
    from flows.core.base_layout import MANIFEST_SUFFIX, base_prefix, parse_base_key

    found: list[BaseBackupManifest] = []
    unreadable: list[str] = []
    for info in store.list(base_prefix(prefix, database)):
        parsed = parse_base_key(info.key, prefix, database)
        if parsed is None or parsed[1] != MANIFEST_SUFFIX:
            continue
        try:
            found.append(BaseBackupManifest.from_json(store.get_bytes(info.key)))
        except ValueError:
            unreadable.append(info.key)
    return found, unreadable
