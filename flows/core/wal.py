"""WAL name arithmetic: segment names, LSNs, timelines and gaps. Pure functions, no I/O.

Modelled on Barman's `xlog.py`. A WAL segment name is `TTTTTTTTXXXXXXXXYYYYYYYY` (timeline, "log" and
"seg" in hex, src/include/access/xlog_internal.h `XLogFileName`); with a segment size S there are
0x100000000 // S segments per log, so the absolute segment number is `log * (0x100000000 // S) + seg`
(`XLogFromFileName`). Everything here takes the segment size as a parameter: 1 MiB to 1 GiB clusters
(`initdb --wal-segsize`) name their files differently from the 16 MiB default.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from flows.core.errors import BadLsn, BadSegmentSize, BadTimelineHistory, BadWalName

#: src/include/pg_config_manual.h DEFAULT_XLOG_SEG_SIZE; initdb --wal-segsize may choose 1 MiB .. 1 GiB
DEFAULT_SEGMENT_SIZE = 16 * 1024 * 1024
MIN_SEGMENT_SIZE = 1024 * 1024
MAX_SEGMENT_SIZE = 1024 * 1024 * 1024
#: XLogSegmentsPerXLogId: one "log" id spans 4 GiB of WAL
LOG_SPAN = 0x100000000

#: suffixes archivers add to compressed segments (gzip, zstd, lz4, brotli, bzip2, xz, lzma, snappy)
COMPRESSION_SUFFIXES = (".gz", ".zst", ".lz4", ".br", ".bz2", ".xz", ".lzma", ".snappy")

_EXT = r"(?:\.(?:gz|zst|lz4|br|bz2|xz|lzma|snappy))?"
_SHA = r"(?:-[0-9a-f]{40})?"  # pgBackRest appends the file's SHA-1 to every archived name
#: what one archived object is called, whatever tool wrote it (basename only; directories vary)
WAL_FILE_RE = re.compile(
    r"^(?P<name>(?P<tli>[0-9A-F]{8})(?P<log>[0-9A-F]{8})(?P<seg>[0-9A-F]{8})"
    r"(?P<kind>\.partial|\.[0-9A-F]{8}\.backup)?)" + _SHA + _EXT + "$"
)
_HEX24 = re.compile(r"[0-9A-F]{24}")
_SIMPLE_EXT = frozenset({""} | set(COMPRESSION_SUFFIXES))
HISTORY_RE = re.compile(r"^(?P<name>(?P<tli>[0-9A-F]{8})\.history)" + _SHA + _EXT + "$")


def check_segment_size(segment_size: int) -> int:
    """Valid sizes are powers of two from 1 MiB to 1 GiB (IsValidWalSegSize)."""
    if not (MIN_SEGMENT_SIZE <= segment_size <= MAX_SEGMENT_SIZE and segment_size & (segment_size - 1) == 0):
        raise BadSegmentSize(
            f"{segment_size} is not a valid wal_segment_size (a power of two, 1 MiB to 1 GiB)"
        )
    return segment_size


def segments_per_log(segment_size: int) -> int:
    return LOG_SPAN // check_segment_size(segment_size)


@dataclass(frozen=True, order=True)
class WalPosition:
    """Where a WAL file sits: timeline and absolute segment number. Ordered by (timeline, segment).

    `kind` is "segment", "partial" (the last segment of a timeline, archived at promotion), "backup"
    (a backup history label) or "history" (a timeline history file, which comes before every segment
    of its timeline: `segno` is -1).
    """

    tli: int
    segno: int
    kind: str = "segment"

    def name(self, segment_size: int) -> str:
        if self.kind == "history":
            return history_name(self.tli)
        return segment_name(self.tli, self.segno, segment_size)


def parse_lsn(text: str) -> int:
    """'16/B374D848' -> int (pg_lsn's text form: two hex halves)."""
    try:
        high, low = text.strip().split("/")
        return (int(high, 16) << 32) | int(low, 16)
    except ValueError:
        raise BadLsn(f"{text!r} is not an LSN like 16/B374D848") from None


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def segment_name(tli: int, segno: int, segment_size: int = DEFAULT_SEGMENT_SIZE) -> str:
    per_log = segments_per_log(segment_size)
    return f"{tli:08X}{segno // per_log:08X}{segno % per_log:08X}"


def history_name(tli: int) -> str:
    return f"{tli:08X}.history"


def segno_of_lsn(lsn: int, segment_size: int = DEFAULT_SEGMENT_SIZE) -> int:
    """The segment holding byte `lsn` (XLByteToSeg)."""
    return lsn // check_segment_size(segment_size)


def walfile_of_lsn(tli: int, lsn: int, segment_size: int = DEFAULT_SEGMENT_SIZE) -> str:
    """pg_walfile_name(): an LSN on a segment boundary belongs to the previous segment (XLByteToPrevSeg)."""
    return segment_name(tli, (lsn - 1) // check_segment_size(segment_size), segment_size)


def parse_wal_name(name: str, segment_size: int = DEFAULT_SEGMENT_SIZE) -> WalPosition:
    """Decode a segment, .partial, .backup or .history name, with or without a compression suffix or
    pgBackRest's SHA-1; directories in front are ignored."""
    base = name.rsplit("/", 1)[-1]
    m = WAL_FILE_RE.match(base)
    if m:
        per_log = segments_per_log(segment_size)
        seg = int(m["seg"], 16)
        if seg >= per_log:
            raise BadWalName(f"{base}: segment part {m['seg']} is too big for {segment_size}-byte segments")
        kind = m["kind"] or ""
        return WalPosition(
            int(m["tli"], 16),
            int(m["log"], 16) * per_log + seg,
            "partial" if kind == ".partial" else "backup" if kind else "segment",
        )
    m = HISTORY_RE.match(base)
    if m:
        return WalPosition(int(m["tli"], 16), -1, "history")
    raise BadWalName(f"{base!r} is not a WAL segment, .partial, .backup or .history file name")


def is_wal_name(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return bool(WAL_FILE_RE.match(base) or HISTORY_RE.match(base))


def log_prefixes(tli: int, first: int, last: int, segment_size: int) -> list[str]:
    """`TTTTTTTTXXXXXXXX` for every log id covering segments first..last: one listing each.

    The same string prefixes a flat archive (`…/000000010000000A000000FE.gz`) and the per-log
    directories of pgBackRest and barman-cloud (`…/000000010000000A/…`), so one listing plan fits all.
    """
    per_log = segments_per_log(segment_size)
    return [f"{tli:08X}{log:08X}" for log in range(first // per_log, last // per_log + 1)]


# -- timelines ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TimelineSwitch:
    """One line of a timeline history file: `parent_tli` ended at `switch_lsn` (src/backend/access/
    transam/timeline.c readTimeLineHistory)."""

    parent_tli: int
    switch_lsn: int
    reason: str = ""


def parse_history(text: str) -> list[TimelineSwitch]:
    """Parse `00000002.history`: "parentTLI<TAB>switchpoint<TAB>reason" lines, comments start with #."""
    switches = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 2)
        if len(parts) < 2:
            raise BadTimelineHistory(f"malformed timeline history line {raw!r}")
        switches.append(
            TimelineSwitch(int(parts[0]), parse_lsn(parts[1]), parts[2] if len(parts) > 2 else "")
        )
    return switches


@dataclass(frozen=True)
class Lineage:
    """The timelines the current one descends from, with the segment range each one is responsible for.

    `ranges[tli] = (first_segno, last_segno)`; the current timeline is open-ended (last is None). At a
    switch segment both the parent (usually as `.partial`) and the child hold a copy: either covers it.
    """

    ranges: dict[int, tuple[int, int | None]]

    @classmethod
    def single(cls, tli: int) -> Lineage:
        return cls({tli: (0, None)})

    @classmethod
    def from_history(cls, tli: int, switches: list[TimelineSwitch], segment_size: int) -> Lineage:
        ranges: dict[int, tuple[int, int | None]] = {}
        start = 0
        for sw in switches:
            end = segno_of_lsn(sw.switch_lsn, segment_size)
            ranges[sw.parent_tli] = (start, end)
            start = end
        ranges[tli] = (start, None)
        return cls(ranges)

    @property
    def timelines(self) -> list[int]:
        return sorted(self.ranges)

    def responsible(self, segno: int) -> int:
        """The timeline a restore reads `segno` from: the newest one whose range starts at or before it."""
        best = min(self.ranges)
        for tli, (first, _) in sorted(self.ranges.items()):
            if first <= segno:
                best = tli
        return best

    def covers(self, tli: int, segno: int) -> bool:
        first, last = self.ranges.get(tli, (0, -1))
        return first <= segno and (last is None or segno <= last)


# -- gaps ---------------------------------------------------------------------------------------------------


@dataclass
class WalListing:
    """What an archive holds, decoded: segment numbers per timeline, history files, unrecognised keys."""

    segments: dict[int, set[int]]
    histories: dict[int, str]  # tli -> key
    keys: dict[str, str]  # WAL name -> key (segments and partials), for reporting
    other: int = 0

    @property
    def count(self) -> int:
        return sum(len(s) for s in self.segments.values())


def scan_keys(
    keys: Iterable[str], segment_size: int = DEFAULT_SEGMENT_SIZE, keep_keys: bool = False
) -> WalListing:
    """Decode object keys into a WalListing; what is not a WAL name (manifests, backups) is only counted.

    Fast path for `<24 hex digits>[.compression]`, nearly all of an archive: one fullmatch and slicing;
    everything else (pgBackRest's SHA-1 suffix, .partial, .backup, .history) goes through the regexes.
    """
    per_log = segments_per_log(segment_size)
    segments: dict[int, set[int]] = {}
    histories: dict[int, str] = {}
    names: dict[str, str] = {}
    other = 0
    hex24 = _HEX24.fullmatch
    simple = _SIMPLE_EXT
    found: set[int] = set()
    last16, base_segno, tli = "", 0, 0  # keys come sorted: reuse the timeline/log decode
    for key in keys:
        base = key[key.rfind("/") + 1 :]
        if (len(base) == 24 or base[24:] in simple) and hex24(base, 0, 24):
            seg = int(base[16:24], 16)
            if seg >= per_log:
                other += 1
                continue
            if base[:16] != last16:
                last16 = base[:16]
                tli, base_segno = int(base[:8], 16), int(base[8:16], 16) * per_log
                found = segments.setdefault(tli, set())
            found.add(base_segno + seg)
            if keep_keys:
                names[base[:24]] = key
            continue
        m = WAL_FILE_RE.match(base)
        if not m:
            h = HISTORY_RE.match(base)
            if h:
                histories[int(h["tli"], 16)] = key
            else:
                other += 1
            continue
        kind = m["kind"]
        if kind and kind != ".partial":  # a .backup label is not a segment
            continue
        tli, log, seg, name = int(m["tli"], 16), int(m["log"], 16), int(m["seg"], 16), m["name"]
        if seg >= per_log:
            other += 1
            continue
        last16 = ""
        segments.setdefault(tli, set()).add(log * per_log + seg)
        if keep_keys:
            names[name] = key
    return WalListing(segments, histories, names, other)


@dataclass(frozen=True)
class GapReport:
    first: int
    last: int
    checked: int
    missing: list[int]  # segment numbers
    missing_names: list[str]  # on the timeline a restore would read them from
    verified_through: int  # the highest segno up to which everything from `first` is present

    @property
    def ok(self) -> bool:
        return not self.missing


def find_gaps(
    listing: WalListing,
    first: int,
    last: int,
    lineage: Lineage,
    segment_size: int = DEFAULT_SEGMENT_SIZE,
    max_names: int = 50,
) -> GapReport:
    """Every segment first..last must be archived on a timeline of the lineage responsible for it.

    Across a switch, the parent's segments up to the switch point and the child's from it on count; a
    segment only on an abandoned timeline does not. Without a history file (lineage of one timeline
    unknown to us) any timeline's copy is accepted.
    """
    if last < first:
        return GapReport(first, last, 0, [], [], last)
    present: set[int] = set()
    known = set(lineage.ranges)
    for tli, segnos in listing.segments.items():
        if tli in known:
            first_ok, last_ok = lineage.ranges[tli]
            lo = max(first, first_ok)
            hi = last if last_ok is None else min(last, last_ok)
            if lo > hi:
                continue
            if lo == first and hi == last and len(lineage.ranges) == 1:
                present |= segnos
            else:
                present.update(s for s in segnos if lo <= s <= hi)
        elif len(known) == 1 and tli > max(known):
            continue  # a newer timeline than the one we check: not ours
        elif len(known) == 1:
            present.update(s for s in segnos if first <= s <= last)
    missing = []
    if len(present) < last - first + 1:
        missing = [s for s in range(first, last + 1) if s not in present]
    through = (missing[0] - 1) if missing else last
    names = [segment_name(lineage.responsible(s), s, segment_size) for s in missing[:max_names]]
    return GapReport(first, last, last - first + 1, missing, names, through)


def ordered_after(first: WalPosition, second: WalPosition) -> bool:
    """Whether WAL file `first` comes after `second` in the server's history: by timeline, then segment; a
    history file comes before the segments of its own timeline. Never compare WAL names as strings."""
    return (first.tli, first.segno) > (second.tli, second.segno)
