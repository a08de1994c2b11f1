"""Reading pg_basebackup's tar stream as it passes (split from base_backup.py): a small streaming tar
reader (`TarScanner`) keeps `backup_label` and PostgreSQL's `backup_manifest`, and `facts_from` turns them
into the WAL positions a recovery needs (start LSN, timeline, WAL-Ranges). Plain Python, no Prefect.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from flows.core.errors import DbopsError
from flows.core.wal import DEFAULT_SEGMENT_SIZE, parse_lsn, segment_name, segno_of_lsn

TAR_BLOCK = 512
#: backup_label is a few hundred bytes; backup_manifest ~150 bytes per file of the cluster
MAX_CAPTURE = 256 * 1024 * 1024


class BaseBackupFailed(DbopsError):
    """pg_basebackup failed, or its output is not a usable base backup."""


# -- reading the tar stream as it passes -------------------------------------------------------------------


@dataclass
class TarScanner:
    """Follow a tar stream chunk by chunk: member names, the contents of the few members we keep, the end.

    Memory: one partial header plus the captured members (bounded by MAX_CAPTURE); data members are
    skipped by counting, never buffered.
    """

    capture: frozenset[str] = frozenset({"backup_label", "backup_manifest"})
    captured: dict[str, bytes] = field(default_factory=dict)
    members: int = 0
    has_pg_control: bool = False
    wal_files: list[str] = field(default_factory=list)
    ended: bool = False
    _header: bytearray = field(default_factory=bytearray)
    _remaining: int = 0  # data bytes (with padding) of the current member still to come
    _keep: bytearray | None = None
    _keep_size: int = 0
    _keep_name: str = ""
    _long_name: str | None = None
    _pax_path: str | None = None
    _meta: str = ""  # "L" (GNU long name) or "x" (pax header): the member's data describes the next one

    def feed(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        while view:
            if self.ended:
                return  # zero padding after the end-of-archive blocks
            if self._remaining:
                take = min(self._remaining, len(view))
                if self._keep is not None and len(self._keep) < self._keep_size:
                    self._keep += view[: min(take, self._keep_size - len(self._keep))]
                self._remaining -= take
                view = view[take:]
                if not self._remaining:
                    self._member_done()
                continue
            need = TAR_BLOCK - len(self._header)
            self._header += view[:need]
            view = view[need:]
            if len(self._header) == TAR_BLOCK:
                header = bytes(self._header)
                self._header.clear()
                self._start_member(header)

    def _start_member(self, header: bytes) -> None:
        if header == b"\0" * TAR_BLOCK:
            self.ended = True
            return
        if not _checksum_ok(header):
            raise BaseBackupFailed("pg_basebackup's output is not a tar stream (bad header checksum)")
        name = header[0:100].split(b"\0", 1)[0].decode(errors="replace")
        prefix = (
            header[345:500].split(b"\0", 1)[0].decode(errors="replace") if header[257:262] == b"ustar" else ""
        )
        if prefix:
            name = f"{prefix}/{name}"
        size = _octal(header[124:136])
        kind = chr(header[156]) if header[156] else "0"
        if self._long_name is not None:
            name, self._long_name = self._long_name, None
        if self._pax_path is not None:
            name, self._pax_path = self._pax_path, None
        padded = (size + TAR_BLOCK - 1) // TAR_BLOCK * TAR_BLOCK
        self._meta = kind if kind in ("L", "x") else ""
        keep = self._meta or (kind in ("0", "\0") and name.lstrip("./") in self.capture and name.lstrip("./"))
        if keep:
            if size > MAX_CAPTURE:
                raise BaseBackupFailed(
                    f"{name} in pg_basebackup's output is {size} bytes, more than dbops reads"
                )
            self._keep, self._keep_size, self._keep_name = bytearray(), size, name.lstrip("./")
        else:
            self._keep = None
        if not self._meta:
            self.members += 1
            clean = name.lstrip("./")
            if clean == "global/pg_control":
                self.has_pg_control = True
            elif clean.startswith("pg_wal/") and kind in ("0", "\0") and "/" not in clean[7:]:
                self.wal_files.append(clean[7:])
        self._remaining = padded
        if not padded:
            self._member_done()

    def _member_done(self) -> None:
        data = bytes(self._keep) if self._keep is not None else None
        self._keep = None
        if data is None:
            return
        if self._meta == "L":
            self._long_name = data.split(b"\0", 1)[0].decode(errors="replace")
        elif self._meta == "x":
            for m in re.finditer(rb"\d+ path=([^\n]*)\n", data):
                self._pax_path = m.group(1).decode(errors="replace")
        else:
            self.captured[self._keep_name] = data
        self._meta = ""

    def tap(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            self.feed(chunk)
            yield chunk


def _octal(field_: bytes) -> int:
    if field_[0] & 0x80:  # base-256 (GNU) for sizes beyond 8 GiB
        return int.from_bytes(field_[1:], "big")
    text = field_.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _checksum_ok(header: bytes) -> bool:
    stored = _octal(header[148:156])
    computed = sum(header[:148]) + 8 * 32 + sum(header[156:])
    return stored == computed


# -- what the backup says about itself ---------------------------------------------------------------------


@dataclass(frozen=True)
class WalRange:
    timeline: int
    start_lsn: int
    end_lsn: int


@dataclass(frozen=True)
class BackupFacts:
    """What backup_label and backup_manifest say: where the backup starts and where it is consistent."""

    start_lsn: int
    start_wal: str
    timeline: int
    label: str
    ranges: list[WalRange]
    segment_size: int

    @property
    def stop_lsn(self) -> int:
        return self.ranges[-1].end_lsn

    @property
    def stop_timeline(self) -> int:
        return self.ranges[-1].timeline

    @property
    def stop_wal(self) -> str:
        # The segment holding the last byte before stop_lsn (pg_walfile_name's rule): a stop LSN exactly
        # on a segment boundary needs the segment before it, not the empty one after.
        return segment_name(
            self.stop_timeline, segno_of_lsn(self.stop_lsn - 1, self.segment_size), self.segment_size
        )

    def needed_segments(self) -> list[str]:
        """Every WAL file a recovery replays to reach consistency, in order."""
        names: list[str] = []
        for r in self.ranges:
            first = segno_of_lsn(r.start_lsn, self.segment_size)
            last = segno_of_lsn(max(r.end_lsn - 1, r.start_lsn), self.segment_size)
            names += [segment_name(r.timeline, s, self.segment_size) for s in range(first, last + 1)]
        return list(dict.fromkeys(names))


def parse_backup_label(text: str) -> tuple[int, str, int, str]:
    """(start LSN, start WAL file, timeline, label) from backup_label."""
    m = re.search(r"^START WAL LOCATION: ([0-9A-Fa-f]+/[0-9A-Fa-f]+) \(file ([0-9A-F]{24})\)", text, re.M)
    tli = re.search(r"^START TIMELINE: (\d+)", text, re.M)
    label = re.search(r"^LABEL: (.*)$", text, re.M)
    if not m:
        raise BaseBackupFailed("backup_label in pg_basebackup's output has no START WAL LOCATION")
    timeline = int(tli.group(1)) if tli else int(m.group(2)[:8], 16)
    return parse_lsn(m.group(1)), m.group(2), timeline, label.group(1).strip() if label else ""


def parse_wal_ranges(manifest: bytes) -> list[WalRange]:
    try:
        doc = json.loads(manifest)
        ranges = [
            WalRange(int(r["Timeline"]), parse_lsn(r["Start-LSN"]), parse_lsn(r["End-LSN"]))
            for r in doc["WAL-Ranges"]
        ]
    except (ValueError, KeyError, TypeError) as exc:
        raise BaseBackupFailed(
            f"backup_manifest in pg_basebackup's output has no readable WAL-Ranges ({exc})"
        ) from None
    if not ranges:
        raise BaseBackupFailed("backup_manifest in pg_basebackup's output has an empty WAL-Ranges")
    return ranges


def facts_from(scanner: TarScanner, segment_size: int = DEFAULT_SEGMENT_SIZE) -> BackupFacts:
    """Check the stream held what makes it a base backup, and read where it starts and stops."""
    missing = [
        name
        for name, present in (
            ("backup_label", "backup_label" in scanner.captured),
            ("global/pg_control", scanner.has_pg_control),
            ("backup_manifest", "backup_manifest" in scanner.captured),
        )
        if not present
    ]
    if missing or not scanner.ended:
        what = ", ".join(missing) if missing else "the end-of-archive marker"
        raise BaseBackupFailed(
            f"pg_basebackup's tar stream has no {what}; it is not a base backup (pg_basebackup too old for "
            "backup manifests, or --no-manifest given?); nothing was stored"
        )
    start_lsn, start_wal, tli, label = parse_backup_label(
        scanner.captured["backup_label"].decode(errors="replace")
    )
    ranges = parse_wal_ranges(scanner.captured["backup_manifest"])
    return BackupFacts(start_lsn, start_wal, tli, label, ranges, segment_size)
