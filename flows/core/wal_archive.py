"""The WAL archive as an object store: where segments are, what a window of them holds, incrementally.

Recognised layouts (the prefix is the folder that holds the WAL files or their per-log folders):
  plain `archive_command = 'cp %p DIR/%f'`  DIR/000000010000000A000000FE[.gz|.zst|.lz4|.br]
  WAL-G                                      PREFIX/wal_005/000000010000000A000000FE.lz4
  pgBackRest                                 REPO/archive/STANZA/15-1/000000010000000A/
                                                 000000010000000A000000FE-<sha1>.gz
  barman-cloud                               PREFIX/SERVER/wals/000000010000000A/000000010000000A000000FE.gz
History files sit beside them (`00000002.history`, compressed or not). Listing goes one log id at a time
(`TTTTTTTTXXXXXXXX` prefixes, see wal.log_prefixes), so a check reads what is newer than the last
verified segment plus at most the rest of one log id, never the whole archive.
"""

from __future__ import annotations

import gzip
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

from pydantic import BaseModel, Field, model_validator

from flows.core.errors import UnsupportedCompression, WalArchiveError
from flows.core.health import Check
from flows.core.objectstore import ObjectStore
from flows.core.wal import (
    HISTORY_RE,
    WAL_FILE_RE,
    Lineage,
    WalListing,
    WalPosition,
    find_gaps,
    history_name,
    log_prefixes,
    parse_history,
    parse_wal_name,
    scan_keys,
    segment_name,
)
from flows.core.wal_server import CheckState, ServerSnapshot, wal_position


def _join(prefix: str, name: str) -> str:
    prefix = prefix.strip("/")
    return f"{prefix}/{name}" if prefix else name


@dataclass
class ListingStats:
    requests: int = 0
    keys: int = 0


@dataclass
class WalArchive:
    """One archive location: a store and the prefix that holds the WAL files."""

    store: ObjectStore
    prefix: str = ""
    stats: ListingStats = field(default_factory=ListingStats)

    @property
    def url(self) -> str:
        return f"{self.store.url}/{self.prefix.strip('/')}".rstrip("/")

    def _list(self, prefix: str) -> Iterator[str]:
        self.stats.requests += 1
        for info in self.store.list(_join(self.prefix, prefix)):
            self.stats.keys += 1
            yield info.key

    def find(self, name: str) -> str | None:
        """The key holding WAL file `name` (any layout, any compression suffix), or None."""
        places = [name] if HISTORY_RE.match(name) else [name, f"{name[:16]}/{name}"]  # flat, per-log folder
        for place in places:
            for key in self._list(place):
                base = key.rsplit("/", 1)[-1]
                m = WAL_FILE_RE.match(base) or HISTORY_RE.match(base)
                if m and m["name"] == name:
                    return key
        return None

    def list_window(self, tlis: list[int], first: int, last: int, segment_size: int) -> WalListing:
        """Segments of the given timelines with numbers first..last: one listing per (timeline, log id)."""
        keys: list[str] = []
        for tli in tlis:
            for prefix in log_prefixes(tli, first, last, segment_size):
                for key in self._list(prefix):
                    keys.append(key)
        listing = scan_keys(keys, segment_size)
        for tli, segnos in listing.segments.items():
            listing.segments[tli] = {s for s in segnos if first <= s <= last}
        return listing

    def read_history(self, tli: int) -> tuple[str, str] | None:
        """(key, text) of timeline `tli`'s history file, or None when the archive has none."""
        key = self.find(history_name(tli))
        if key is None:
            return None
        try:
            return key, decompress(key, self.store.get_bytes(key)).decode()
        except (OSError, EOFError, UnicodeDecodeError, ValueError) as exc:
            if isinstance(exc, WalArchiveError):
                raise
            raise WalArchiveError(
                f"timeline history file {self.url}/{key} cannot be read ({type(exc).__name__}: {exc}); "
                f"copy a good {history_name(tli)} there from the server's pg_wal"
            ) from exc

    def lineage(self, tli: int, segment_size: int) -> tuple[Lineage, str | None]:
        """The timelines a restore follows to reach `tli`, from its history file; and a problem, if any."""
        if tli <= 1:
            return Lineage.single(tli), None
        found = self.read_history(tli)
        if found is None:
            return Lineage.single(tli), (
                f"timeline history file {history_name(tli)} is not in {self.url}, so a restore cannot follow "
                f"the switch to timeline {tli}; copy it there from the server's pg_wal"
            )
        return Lineage.from_history(tli, parse_history(found[1]), segment_size), None


def decompress(key: str, data: bytes) -> bytes:
    """History files are small; what WAL-G or barman-cloud compressed is read back here."""
    if key.endswith(".gz"):
        return gzip.decompress(data)
    if key.endswith(".zst"):
        import zstandard

        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    if key.endswith(".bz2"):
        import bz2

        return bz2.decompress(data)
    if key.endswith((".xz", ".lzma")):
        import lzma

        return lzma.decompress(data)
    if key.endswith((".lz4", ".br", ".snappy")):
        raise UnsupportedCompression(
            f"{key}: reading {key.rsplit('.', 1)[-1]} needs a library dbops does not install; store the "
            "archive's history files uncompressed or with gzip, zstd, bzip2 or xz"
        )
    return data


def wait_for(
    find: Callable[[], str | None],
    timeout: float,
    interval: float = 0.25,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[str | None, float]:
    """Poll `find` until it returns a key or `timeout` seconds pass: (key or None, seconds waited)."""
    start = clock()
    while True:
        key = find()
        waited = clock() - start
        if key is not None or waited >= timeout:
            return key, waited
        time.sleep(min(interval, max(timeout - waited, 0.01)))


# -- the contents check -------------------------------------------------------------------------------------


class ArchiveLocation(BaseModel):
    """Where archive_command puts WAL: a storage block (+ prefix) or a directory on this machine."""

    storage: str | None = Field(
        default=None,
        description="Storage block slug holding the archive: s3-bucket/NAME or local-file-system/NAME. "
        "Leave empty when the archive is a local directory.",
    )
    prefix: str = Field(
        default="",
        description="Folder inside the storage that holds the WAL files: for WAL-G PREFIX/wal_005, for "
        "pgBackRest archive/STANZA/15-1, for barman-cloud SERVER/wals; empty for the storage's root.",
    )
    directory: str | None = Field(
        default=None,
        description="A directory archive_command copies to, e.g. /var/lib/postgresql/wal_archive for "
        "archive_command = 'cp %p /var/lib/postgresql/wal_archive/%f'. Leave empty when using storage.",
    )

    @model_validator(mode="after")
    def _one_place(self) -> ArchiveLocation:
        if bool(self.storage) == bool(self.directory):
            raise ValueError("give the archive as either storage (a block slug, with a prefix) or directory")
        return self

    def describe(self) -> str:
        return self.directory or f"{self.storage}:{self.prefix or '/'}"


FullVerify = Literal["auto", "always", "never"]

#: how often `auto` re-verifies the whole window: a hole made behind the watermark is found within a day
FULL_VERIFY_EVERY = timedelta(hours=24)


def full_verify_due(
    mode: FullVerify, state: CheckState, now: datetime, every: timedelta = FULL_VERIFY_EVERY
) -> tuple[bool, str]:
    """Whether this run re-lists the whole window instead of only what is newer than the watermark, and why.

    Incremental runs never look behind the last verified segment, so a segment deleted after a run saw it
    would stay unnoticed for ever; a periodic full pass bounds that to `every`.
    """
    if state.verified_through is None:
        return True, "no remembered position"
    if mode == "always":
        return True, "asked for (full_verify=always)"
    if mode == "never":
        return False, "full_verify=never"
    if state.full_verified_at is None:
        return True, "no full verification recorded"
    age = now - state.full_verified_at
    if age >= every:
        return True, f"last full verification {age.total_seconds() / 3600:.0f} h ago"
    return False, f"last full verification {age.total_seconds() / 3600:.1f} h ago"


class ContentsResult(BaseModel):
    checks: list[Check]
    full: bool = Field(default=False, description="The whole window was listed, not only new segments.")
    window_first: int | None = Field(
        default=None, description="First segment of the window this check answers for (None: unknown)."
    )
    first: int | None = None
    last: int | None = None
    missing: list[str] = Field(default_factory=list)
    missing_count: int = 0
    verified_through: int | None = None
    tli: int | None = None
    list_requests: int = 0
    listed_keys: int = 0
    total_list_requests: int = Field(
        default=0, description="Every listing this check made: window, last archived file, history."
    )


def window_end(archived: WalPosition | None, lineage: Lineage) -> int | None:
    """The last segment that must be in the archive: the last one the archiver reports as archived."""
    if archived is None:
        return None
    if archived.kind in ("segment", "partial"):
        return archived.segno
    if archived.kind == "backup":
        return archived.segno - 1
    first, _ = lineage.ranges.get(archived.tli, (None, None))  # a history file: just before the switch
    return None if first is None else first - 1


def check_contents(
    archive: WalArchive,
    snap: ServerSnapshot,
    state: CheckState,
    window_segments: int,
    max_names: int = 50,
    full: bool = False,
    oldest_needed_segment: str | None = None,
    why: str = "",
) -> ContentsResult:
    """The last archived file is in the archive, and no segment is missing since the last verified one.

    `full`: list the whole window this check answers for, not only what is newer than the watermark, so a
    segment deleted behind it is found. The window starts at `oldest_needed_segment` when given (the start
    WAL of the oldest kept base backup: every segment from there on is needed; the base-backup work passes
    it), else `window_segments` back from the last archived one, never before where the archive began.
    """
    before = archive.stats.requests
    result = _check_contents(archive, snap, state, window_segments, max_names, full, oldest_needed_segment)
    result.total_list_requests = archive.stats.requests - before
    result.checks.append(_listing_check(result, why))
    return result


def _listing_check(result: ContentsResult, why: str) -> Check:
    """What this run read: full or incremental, and how many listings it cost (the bound the bench keeps)."""
    kind = "full re-verify" if result.full else "incremental"
    return Check(
        name="listing",
        status="ok",
        figure=f"{kind}{f' ({why})' if why else ''}: {result.total_list_requests} list request(s) "
        f"({result.list_requests} for the window), {result.listed_keys} key(s)",
    )


def _check_contents(
    archive: WalArchive,
    snap: ServerSnapshot,
    state: CheckState,
    window_segments: int,
    max_names: int,
    full: bool,
    oldest_needed_segment: str | None,
) -> ContentsResult:
    size = snap.settings.segment_size
    last_name = snap.archiver.last_archived_wal
    archived = wal_position(last_name, size)
    if archived is None or last_name is None:
        return ContentsResult(
            checks=[Check(name="contents", status="ok", figure="nothing archived yet")],
        )
    checks: list[Check] = []
    key = archive.find(last_name)
    if key is None:
        checks.append(
            Check(
                name="last archived",
                status="critical",
                figure=f"{last_name} missing",
                message=f"PostgreSQL reports {last_name} as archived but it is not in {archive.url}; "
                "archive_command reports success without storing the file there (or the archive location "
                "given to this check is not where it writes): fix one of them",
            )
        )
    else:
        checks.append(Check(name="last archived", status="ok", figure=key))
    tli = snap.position.tli if snap.position else archived.tli
    lineage, problem = archive.lineage(tli, size)
    if problem:
        checks.append(
            Check(name="timeline history", status="critical", figure=history_name(tli), message=problem)
        )
    elif tli > 1:
        checks.append(
            Check(
                name="timeline history",
                status="ok",
                figure=f"{history_name(tli)}: timelines {lineage.timelines}",
            )
        )
    end = window_end(archived, lineage)
    if end is None or end < 1:
        checks.append(Check(name="gaps", status="ok", figure="no complete segment archived yet"))
        return ContentsResult(checks=checks, tli=tli)
    same_size = state.segment_size == size
    through = state.verified_through
    resumed = not full and through is not None and same_size and through <= end
    start = through + 1 if resumed and through is not None else max(end - window_segments + 1, 1)
    # where the archive began, as a previous full pass found it: a hole there is a hole, not the beginning
    known_from = state.verified_from if same_size else None
    if known_from is not None and known_from > end:  # a new cluster: forget the old one's archive start
        known_from = None
    if oldest_needed_segment is not None and not resumed:
        start = parse_wal_name(oldest_needed_segment, size).segno  # a kept base backup needs all from here
    elif known_from is not None and not resumed:
        start = max(start, known_from)
    before = (archive.stats.requests, archive.stats.keys)
    full = not resumed
    if start > end:
        checks.append(
            Check(name="gaps", status="ok", figure=f"no new segment since {segment_name(tli, end, size)}")
        )
        return ContentsResult(
            checks=checks,
            first=start,
            last=end,
            verified_through=end,
            tli=tli,
            full=full,
            window_first=known_from,
        )
    tlis = [t for t in lineage.timelines if _overlaps(lineage.ranges[t], start, end)]
    listing = archive.list_window(tlis, start, end, size)
    if full and oldest_needed_segment is None and known_from is None:
        # first pass: the archive begins where archiving was switched on, not at segment 1
        held = [min(s) for t, s in listing.segments.items() if s and t in lineage.ranges]
        start = max(start, min(held, default=end))
    gaps = find_gaps(listing, start, end, lineage, size, max_names=max_names)
    window = f"{segment_name(lineage.responsible(start), start, size)}..{segment_name(tli, end, size)}"
    if gaps.ok:
        checks.append(
            Check(name="gaps", status="ok", figure=f"{gaps.checked} segment(s) {window} all present")
        )
    else:
        shown = ", ".join(gaps.missing_names[:10]) + (" ..." if len(gaps.missing) > 10 else "")
        checks.append(
            Check(
                name="gaps",
                status="critical",
                figure=f"{len(gaps.missing)} missing in {window}",
                message=f"{len(gaps.missing)} WAL segment(s) are missing from {archive.url} ({shown}), "
                f"so no restore can replay past {gaps.missing_names[0]}; copy them back from pg_wal if "
                "they are still there, otherwise take a new base backup now",
            )
        )
    return ContentsResult(
        checks=checks,
        first=start,
        last=end,
        missing=gaps.missing_names,
        missing_count=len(gaps.missing),
        # a hole found by a full pass moves the watermark back to it, so incremental runs keep reporting it
        verified_through=gaps.verified_through
        if gaps.verified_through >= start or full
        else state.verified_through,
        tli=tli,
        list_requests=archive.stats.requests - before[0],
        listed_keys=archive.stats.keys - before[1],
        full=full,
        window_first=start if full else known_from,
    )


def _overlaps(rng: tuple[int, int | None], start: int, end: int) -> bool:
    first, last = rng
    return first <= end and (last is None or last >= start)
