"""Base backups + the WAL archive → chains, and the recoverable window. Plain Python, no Prefect.

A base backup restores nothing on its own: it needs every WAL segment from its start (or, when the WAL is
inside the tar, from its stop segment) up to the moment recovered to. So the window in which a database
can be brought back is:

    from the end (stop point) of the oldest usable base backup
    to   the time of the last segment reached from it without a hole

"Usable" means the manifest is readable, describes this database's base backup beside it, and promises
its WAL (wal_included, or wal_archived: every segment start..stop was confirmed in the archive before the
manifest was written). A hole (a missing segment) ends the window there; a newer base backup that starts
after the hole opens a second window. The window's end is the archive object's modification time
(ObjectInfo.last_modified) of the last segment in the chain: when archive_command stored it. That is an
upper bound: the segment's last record was written a little earlier (up to archive_timeout), and a
target between the two is past the end of WAL, which recovery reports as "ended before the target".

Point-in-time recovery chooses its base backup on this same window (flows/core/pitr/selection.py), and its
WAL spool restores from `TimelineView`: the listing and PITR cannot disagree about what is recoverable.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

from flows.core.base_catalog import BaseBackup, BaseCatalog
from flows.core.errors import DbopsError
from flows.core.objectstore import ObjectInfo
from flows.core.wal import (
    Lineage,
    WalListing,
    find_gaps,
    parse_lsn,
    parse_wal_name,
    scan_keys,
    segment_name,
)
from flows.core.wal_archive import WalArchive

# -- the archive, listed once -------------------------------------------------------------------------------


class ArchiveListingFailed(DbopsError):
    """The archive could not be listed to the end: nothing that depends on what it holds may be trusted."""


@dataclass
class ArchiveContents:
    """Everything under the archive prefix, decoded, with each WAL file's ObjectInfo."""

    listing: WalListing  # keys=True: WAL name -> key
    infos: dict[str, ObjectInfo]  # key -> info (WAL files and history files)
    segment_size: int
    keys: int  # every key listed, WAL or not

    def info(self, tli: int, segno: int) -> ObjectInfo | None:
        name = segment_name(tli, segno, self.segment_size)
        key = self.listing.keys.get(name) or self.listing.keys.get(name + ".partial")
        return self.infos.get(key) if key else None

    @property
    def newest_tli(self) -> int | None:
        tlis = set(self.listing.segments) | set(self.listing.histories)
        return max(tlis) if tlis else None


def list_archive(archive: WalArchive, segment_size: int) -> ArchiveContents:
    """List the whole archive prefix (every layout's folders), or raise ArchiveListingFailed: a listing that
    stopped half way is never mistaken for a short archive."""
    infos: dict[str, ObjectInfo] = {}
    count = 0
    try:
        for info in _objects(archive):
            count += 1
            infos[info.key] = info
    except (DbopsError, OSError) as exc:
        raise ArchiveListingFailed(
            f"listing the WAL archive {archive.url} failed after {count} object(s) ({exc}); nothing was "
            "decided from a partial listing: fix access to the archive and run again"
        ) from exc
    listing = scan_keys(sorted(infos), segment_size, keep_keys=True)
    for tli, key in listing.histories.items():
        listing.keys[f"{tli:08X}.history"] = key
    return ArchiveContents(listing, infos, segment_size, count)


def _objects(archive: WalArchive) -> Iterator[ObjectInfo]:
    archive.stats.requests += 1
    prefix = archive.prefix.strip("/")
    for info in archive.store.list(prefix + "/" if prefix else ""):
        archive.stats.keys += 1
        yield info


def archive_lineage(archive: WalArchive, contents: ArchiveContents) -> tuple[Lineage, str | None]:
    """The lineage of the newest timeline in the archive (from its .history file), and a problem, if any."""
    tli = contents.newest_tli or 1
    try:
        return archive.lineage(tli, contents.segment_size)
    except (DbopsError, OSError, ValueError) as exc:
        return Lineage.single(tli), f"the history file of timeline {tli} cannot be read ({exc})"


# -- one timeline's view ------------------------------------------------------------------------------------


@dataclass
class TimelineView:
    """The archive as a recovery following `lineage` reads it (recovery_target_timeline=latest): per segment
    the whole copy of the timeline responsible for it, and the history files of the lineage."""

    segment_size: int
    lineage: Lineage
    segments: dict[int, ObjectInfo]  # segno -> the responsible timeline's whole segment
    histories: dict[int, str]  # tli -> key

    def name(self, segno: int) -> str:
        return segment_name(self.lineage.responsible(segno), segno, self.segment_size)

    @property
    def last(self) -> int | None:
        return max(self.segments) if self.segments else None

    @property
    def last_archived_at(self) -> datetime | None:
        """When the last segment was stored (its object's modification time): the drill's RPO point."""
        last = self.last
        return self.segments[last].last_modified if last is not None else None

    def first_archived_at_or_after(self, first: int, through: int, when: datetime) -> int | None:
        """The first segment in first..through stored at or after `when` (the one a time target is in)."""
        stored = self.segments
        found = (s for s in range(first, through + 1) if s in stored and stored[s].last_modified >= when)
        return next(found, None)


def follow(contents: ArchiveContents, lineage: Lineage) -> TimelineView:
    """Keep, per segment, the copy a recovery along `lineage` restores (a .partial is never whole)."""
    size = contents.segment_size
    segments: dict[int, ObjectInfo] = {}
    for tli, found in contents.listing.segments.items():
        if tli not in lineage.ranges:
            continue
        for segno in found:
            if lineage.responsible(segno) != tli:
                continue
            key = contents.listing.keys.get(segment_name(tli, segno, size))
            if key is not None and ".partial" not in key.rsplit("/", 1)[-1]:
                segments[segno] = contents.infos[key]
    histories = {t: k for t, k in contents.listing.histories.items() if t in lineage.ranges}
    return TimelineView(size, lineage, segments, histories)


# -- the recoverable window ---------------------------------------------------------------------------------


@dataclass
class Window:
    """One stretch of time (and WAL) that can be recovered to, from `base` on."""

    base: BaseBackup
    start: datetime  # the base backup's end
    end: datetime  # last_modified of the last segment of the unbroken chain
    start_lsn: int  # the base backup's stop_lsn: consistent from here
    through_segno: int  # the last segment present without a hole
    through_name: str
    hole: str | None = None  # the first missing segment after through_segno, if the chain is broken there
    end_lsn: int = 0  # the first byte after through_segno: a target LSN must be below it

    def covers_time(self, when: datetime) -> bool:
        return self.start <= when <= self.end

    def covers_lsn(self, lsn: int) -> bool:
        return self.start_lsn <= lsn < self.end_lsn

    def holds(self, b: BaseBackup) -> bool:
        """All of `b`'s WAL is part of this window's unbroken chain (`b` may be newer than `base`)."""
        stop = parse_wal_name(b.manifest.stop_wal, b.manifest.wal_segment_size).segno
        return needed_from(b) >= needed_from(self.base) and stop <= self.through_segno


@dataclass
class RecoverableWindow:
    database: str
    windows: list[Window]  # oldest first; more than one only when a hole splits the chain
    broken: list[tuple[BaseBackup, str]] = field(default_factory=list)  # base, why it cannot be recovered
    unknown: str | None = None  # why the window could not be computed at all
    problems: list[str] = field(default_factory=list)  # e.g. a missing history file
    bases: list[BaseBackup] = field(default_factory=list)  # every usable base backup, oldest first
    contents: ArchiveContents | None = None  # the listing the window was computed from
    lineage: Lineage | None = None  # the newest timeline's, which the windows follow

    def view(self) -> TimelineView | None:
        """The archive as a recovery following the windows' lineage reads it (None: never listed)."""
        if self.contents is None or self.lineage is None:
            return None
        return follow(self.contents, self.lineage)

    def window_of(self, b: BaseBackup) -> Window | None:
        """The window whose unbroken chain holds all of `b`'s WAL (None: `b` restores to nothing)."""
        return next((w for w in self.windows if w.holds(b)), None)

    @property
    def first_hole(self) -> str | None:
        return next((w.hole for w in self.windows if w.hole), None)

    def describe(self) -> str:
        """The one line `dbops backups list` prints for the database."""
        if self.unknown is not None:
            return f"{self.database}: recoverable window unknown: {self.unknown}"
        if not self.windows:
            why = "; ".join(f"{b.manifest.label}: {w}" for b, w in self.broken) or "no usable base backup"
            return f"{self.database}: not recoverable to any moment from WAL ({why})"
        parts = []
        for w in self.windows:
            text = f"from {_t(w.start)} to {_t(w.end)}"
            if w.hole:
                text += f": segment {w.hole} is missing from the archive"
            parts.append(text)
        line = f"{self.database}: recoverable to any moment " + "; and ".join(parts)
        if self.problems:
            line += " (" + "; ".join(self.problems) + ")"
        return line


def _t(when: datetime) -> str:
    return f"{when.astimezone(UTC):%Y-%m-%d %H:%M:%S}Z"


def needed_from(b: BaseBackup) -> int:
    """The first segment a recovery from `b` reads from the archive: its start, or its stop segment when
    the WAL up to the stop is in the tar (the tar's copy of the stop segment is cut at the stop)."""
    m = b.manifest
    wal = m.stop_wal if m.wal_included else m.start_wal
    return parse_wal_name(wal, m.wal_segment_size).segno


def recoverable_window(
    database: str, catalog: BaseCatalog, archive: WalArchive | None, contents: ArchiveContents | None = None
) -> RecoverableWindow:
    """Walk the archive from the oldest usable base backup's start forward; a hole ends the window.

    A base backup whose own WAL (start..stop) has a hole is broken and skipped: the window then starts at
    the next one. `contents` may be passed when the caller already listed the archive.
    """
    usable = catalog.usable
    if archive is None:
        return RecoverableWindow(database, [], unknown="no WAL archive was given to the listing")
    if not usable:
        why = "no base backup" if not catalog.backups else "no base backup with its WAL confirmed"
        return RecoverableWindow(database, [], unknown=f"{why}, so the WAL archive restores nothing")
    sizes = {b.manifest.wal_segment_size for b in usable}
    if len(sizes) > 1:
        why = f"base backups disagree on wal_segment_size {sorted(sizes)}"
        return RecoverableWindow(database, [], unknown=why)
    size = sizes.pop()
    try:
        contents = contents or list_archive(archive, size)
    except ArchiveListingFailed as exc:
        return RecoverableWindow(database, [], unknown=str(exc))
    lineage, problem = archive_lineage(archive, contents)
    result = RecoverableWindow(
        database, [], problems=[problem] if problem else [], bases=usable, contents=contents, lineage=lineage
    )
    on_lineage = [s for t, segs in contents.listing.segments.items() if t in lineage.ranges for s in segs]
    last = max(on_lineage, default=-1)
    covered_through = -1  # the chain already walked: a newer base inside it adds nothing
    for b in usable:
        m = b.manifest
        first = needed_from(b)
        stop = parse_wal_name(m.stop_wal, size).segno
        if m.timeline not in lineage.ranges:
            result.broken.append((b, f"its timeline {m.timeline} is not in the archive's lineage"))
            continue
        if first <= covered_through:
            continue
        if last < stop and not m.wal_included:
            result.broken.append((b, f"its stop segment {m.stop_wal} is not in the archive"))
            continue
        hi = max(last, stop)
        window = WalListing(  # find_gaps counts what it is given: only first..hi
            {t: {x for x in segs if first <= x <= hi} for t, segs in contents.listing.segments.items()},
            contents.listing.histories,
            {},
        )
        gaps = find_gaps(window, first, hi, lineage, size, max_names=1)
        through = gaps.verified_through
        if through < stop and not m.wal_included:
            result.broken.append((b, f"segment {gaps.missing_names[0]} of its own WAL is missing"))
            continue
        if through < first:  # wal_included, and nothing after its stop segment in the archive
            end, through = m.ended_at, stop
        else:
            info = _any_copy(contents, lineage, through)
            end = max(info.last_modified, m.ended_at) if info else m.ended_at
        hole = gaps.missing_names[0] if gaps.missing else None
        result.windows.append(
            Window(
                base=b,
                start=m.ended_at,
                end=end,
                start_lsn=parse_lsn(m.stop_lsn),
                through_segno=through,
                through_name=segment_name(lineage.responsible(through), through, size),
                hole=hole,
                end_lsn=(through + 1) * size,
            )
        )
        covered_through = through
    return result


def _any_copy(contents: ArchiveContents, lineage: Lineage, segno: int) -> ObjectInfo | None:
    """The responsible timeline's copy of the segment, else any lineage copy (both hold a switch segment)."""
    for tli in [lineage.responsible(segno), *lineage.timelines]:
        info = contents.info(tli, segno)
        if info is not None:
            return info
    return None


# -- choosing a base backup for a target --------------------------------------------------------------------


class NotRecoverable(DbopsError):
    """The target is outside every recoverable window."""


@dataclass(frozen=True)
class Choice:
    base: BaseBackup
    window: Window


def pick_base_backup(window: RecoverableWindow, target: datetime | str) -> Choice:
    """The base backup a point-in-time recovery to `target` restores: the newest one that ended at or before
    the target and whose WAL chain reaches the target without a hole.

    Contract (PITR relies on it):
    - `target` is an aware datetime (recovery_target_time) or an LSN string like "0/3000060"
      (recovery_target_lsn).
    - The chosen base backup's `ended_at` (time) or `stop_lsn` (LSN) is <= the target: recovery cannot stop
      before the base backup is consistent.
    - Every segment from the base backup's needed start (start_wal, or stop_wal when wal_included) to the
      segment holding the target was in the archive listing `window` was computed from; for a time target
      the last segment of the chain was stored at or after the target (object mtime, an upper bound of the
      WAL's own time: see the module docstring).
    - Among several candidates the newest base backup wins (least WAL to replay). A newer base backup that
      is not the start of a window (it lies inside an older one's chain) also qualifies: it needs only a
      suffix of that chain.
    - Raises NotRecoverable with one sentence naming the window(s) when no base backup qualifies; a window
      that is unknown (no archive, listing failed) raises too: never a guess.
    """
    if window.unknown is not None:
        raise NotRecoverable(f"cannot choose a base backup for {target}: {window.unknown}")
    lsn = parse_lsn(target) if isinstance(target, str) else None
    best: Choice | None = None
    for w in window.windows:
        for b in window.bases:
            if not _reaches(b, w, target, lsn):
                continue
            if best is None or b.manifest.ended_at > best.base.manifest.ended_at:
                best = Choice(b, w)
    if best is not None:
        return best
    ranges = "; ".join(f"{_t(w.start)} to {_t(w.end)}" for w in window.windows) or "none"
    raise NotRecoverable(
        f"{target} is outside the recoverable window of {window.database} ({ranges}); pick a target inside it"
    )


def _reaches(b: BaseBackup, w: Window, target: datetime | str, lsn: int | None) -> bool:
    """`b` ended before the target, and its WAL is a part of window `w`'s unbroken chain up to the target."""
    m = b.manifest
    if not w.holds(b):
        return False
    if lsn is not None:
        return parse_lsn(m.stop_lsn) <= lsn < w.end_lsn
    assert isinstance(target, datetime)
    return m.ended_at <= target <= w.end


__all__ = [
    "ArchiveContents",
    "ArchiveListingFailed",
    "Choice",
    "NotRecoverable",
    "RecoverableWindow",
    "TimelineView",
    "Window",
    "follow",
    "list_archive",
    "needed_from",
    "pick_base_backup",
    "recoverable_window",
]
