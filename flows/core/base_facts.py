"""What a base backup says about itself: start LSN and timeline from backup_label, the consistency point
from PostgreSQL's backup_manifest (WAL-Ranges), and so the WAL segments it needs."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from flows.core.base_backup_errors import BaseBackupFailed
from flows.core.tar_stream import TarScanner
from flows.core.wal import DEFAULT_SEGMENT_SIZE, parse_lsn, segment_name, segno_of_lsn

TAR_BLOCK = 512
#: backup_label is a few hundred bytes; backup_manifest ~150 bytes per file of the cluster
MAX_CAPTURE = 256 * 1024 * 1024
WAITING_NOTICE = "waiting for required WAL segments to be archived"


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
