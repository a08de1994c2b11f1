"""How the WAL archive check copes with a large archive.

    uv run python -m bench.bench_wal [--segments 1000000]

No server is needed: a synthetic archive of N segment names (16 MiB segments, timeline 1, a flat
`cp %p DIR/%f.zst` layout, one segment deleted) is

  a. checked for gaps from its listing: flows.core.wal.scan_keys + find_gaps over all N names, against
     the loop people usually write (sort the names, parse each with a regex, expect the next name);
  b. checked incrementally: flows.core.archive.check_contents with a remembered position over an
     in-memory object store that counts the keys it hands out, against listing the whole prefix
     (what a check without memory, or `aws s3 ls`, has to read);
  c. re-verified in full, as the daily full_verify does: the whole 4096-segment window behind the last
     archived segment, listed again so a segment deleted behind the remembered position is found.

Prints a plain comparison and PASS/FAIL against the targets (gap check under 5 s; the incremental run
reads at most the new keys plus the rest of one log id).
"""

from __future__ import annotations

import argparse
import bisect
import re
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from typing import TypeVar

from flows.core.objectstore import ObjectInfo, ObjectStore, PutResult
from flows.core.wal import Lineage, find_gaps, scan_keys, segment_name, segments_per_log
from flows.core.wal_archive import WalArchive, check_contents
from flows.core.wal_server import (
    ArchiverStats,
    ArchiveSettings,
    Backlog,
    CheckState,
    ServerSnapshot,
    WalPositionNow,
)

SEGMENT = 16 * 1024 * 1024
MAX_GAP_SECONDS = 5.0
NEW_SEGMENTS = 100
WINDOW = 4096  # CheckOptions.window_segments' default
EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


class MemoryStore(ObjectStore):
    """Sorted keys in memory, listed like S3 (lexicographic, by prefix); counts what it hands out."""

    def __init__(self, keys: Iterable[str]) -> None:
        self.keys = sorted(keys)
        self.url = "mem://archive"
        self.listed = 0
        self.requests = 0

    @property
    def identity(self) -> str:
        return self.url

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        self.requests += 1
        i = bisect.bisect_left(self.keys, prefix)
        while i < len(self.keys) and self.keys[i].startswith(prefix):
            self.listed += 1
            yield ObjectInfo(self.keys[i], SEGMENT, EPOCH)
            i += 1

    def head(self, key: str) -> ObjectInfo | None:
        i = bisect.bisect_left(self.keys, key)
        return ObjectInfo(key, SEGMENT, EPOCH) if i < len(self.keys) and self.keys[i] == key else None

    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        bisect.insort(self.keys, key)

    def put_stream(self, key: str, chunks: Iterable[bytes], **kw: object) -> PutResult:
        raise NotImplementedError

    def get_stream(self, key: str, chunk_size: int = 0) -> Iterator[bytes]:
        raise NotImplementedError

    def delete(self, keys: Iterable[str]) -> int:
        raise NotImplementedError


def naive_gaps(names: list[str]) -> list[str]:
    """The usual script: sort, parse every name with a regex, expect the successor of the previous one."""
    pattern = re.compile(r"^([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})")
    per_log = segments_per_log(SEGMENT)
    missing = []
    previous = None
    for name in sorted(names):
        m = pattern.match(name.rsplit("/", 1)[-1])
        if not m:
            continue
        segno = int(m[2], 16) * per_log + int(m[3], 16)
        if previous is not None:
            missing += [segment_name(int(m[1], 16), s, SEGMENT) for s in range(previous + 1, segno)]
        previous = segno
    return missing


T = TypeVar("T")


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def snapshot_at(last_segno: int) -> ServerSnapshot:
    name = segment_name(1, last_segno, SEGMENT)
    return ServerSnapshot(
        settings=ArchiveSettings(
            wal_level="replica",
            archive_mode="on",
            archive_command="cp %p /wal/%f",
            segment_size=SEGMENT,
            in_recovery=False,
            server="bench",
        ),
        archiver=ArchiverStats(
            archived_count=last_segno,
            last_archived_wal=name,
            last_archived_time=EPOCH,
            failed_count=0,
            last_failed_wal=None,
            last_failed_time=None,
            stats_reset=EPOCH,
        ),
        position=WalPositionNow(lsn=(last_segno + 1) * SEGMENT + 100, tli=1, walfile="x"),
        backlog=Backlog(ready=0),
        standbys=[],
        user="bench",
        taken_at=EPOCH,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--segments", type=int, default=1_000_000)
    args = parser.parse_args()
    n = args.segments
    hole = n // 2
    keys = [f"wal/{segment_name(1, s, SEGMENT)}.zst" for s in range(1, n + 1) if s != hole]
    print(f"synthetic archive: {len(keys):,} segment names (16 MiB segments), segment {hole} deleted")

    # a. the gap check over the whole listing
    t_ours, gaps = timed(lambda: find_gaps(scan_keys(keys, SEGMENT), 1, n, Lineage.single(1), SEGMENT))
    t_naive, naive = timed(lambda: naive_gaps(keys))
    assert gaps.missing_names == naive == [segment_name(1, hole, SEGMENT)]
    print("\na. gap check over the full listing")
    print(f"   dbops scan_keys + find_gaps       {t_ours:6.2f} s   found {gaps.missing_names}")
    print(f"   sort + regex + successor loop     {t_naive:6.2f} s   ({t_naive / t_ours:.1f}x slower)")

    # b. incremental: the previous run verified everything up to the last segment; NEW_SEGMENTS arrive
    store = MemoryStore([*keys, f"wal/{segment_name(1, hole, SEGMENT)}.zst"])
    for s in range(n + 1, n + NEW_SEGMENTS + 1):
        store.put_bytes(f"wal/{segment_name(1, s, SEGMENT)}.zst", b"")
    t_full, full = timed(lambda: sum(1 for _ in store.list("wal/")))
    full_requests = -(-int(full) // 1000)  # S3 returns at most 1,000 keys per ListObjectsV2 page
    store.listed = store.requests = 0
    archive = WalArchive(store, "wal")
    state = CheckState(segment_size=SEGMENT, tli=1, verified_through=n)
    t_inc, result = timed(lambda: check_contents(archive, snapshot_at(n + NEW_SEGMENTS), state, 4096))
    gaps_check = next(c for c in result.checks if c.name == "gaps")
    incremental_listed = store.listed
    print(f"\nb. incremental run after {NEW_SEGMENTS} new segments (previous run verified segment {n})")
    print(
        f"   full listing (no memory)          {int(full):>9,} keys  ~{full_requests:,} list requests  "
        f"{t_full:.2f} s"
    )
    print(
        f"   dbops incremental                 {store.listed:>9,} keys  {store.requests} list requests  "
        f"{t_inc:.3f} s   ({gaps_check.figure})"
    )
    print(
        f"   of which new                      {NEW_SEGMENTS:>9,} keys; 1 is the last archived segment's "
        "lookup, the rest the earlier part of the log id holding the last verified segment (< 256 at 16 MiB)"
    )

    # c. the daily full re-verification of the window, after the hole was made behind the watermark
    store.keys.remove(f"wal/{segment_name(1, n + NEW_SEGMENTS - 10, SEGMENT)}.zst")
    store.listed = store.requests = 0
    state = CheckState(segment_size=SEGMENT, tli=1, verified_through=n + NEW_SEGMENTS)
    t_re, again = timed(
        lambda: check_contents(archive, snapshot_at(n + NEW_SEGMENTS), state, WINDOW, full=True)
    )
    print(f"\nc. full re-verify of the {WINDOW:,}-segment window (a segment behind the watermark deleted)")
    print(
        f"   dbops full re-verify              {store.listed:>9,} keys  {store.requests} list requests  "
        f"{t_re:.3f} s   (found {again.missing})"
    )

    per_log = segments_per_log(SEGMENT)
    bound = NEW_SEGMENTS + per_log + 1  # + the last-archived lookup
    full_bound = WINDOW + 2 * per_log + 1  # the window, rounded out to whole log ids, + the lookup
    ok_a = t_ours < MAX_GAP_SECONDS
    ok_b = incremental_listed <= bound and gaps_check.status == "ok"
    hole_found = again.missing == [segment_name(1, n + NEW_SEGMENTS - 10, SEGMENT)]
    ok_c = hole_found and store.listed <= full_bound
    print("\ntargets")
    print(
        f"   gap check over {len(keys):,} names < {MAX_GAP_SECONDS:.0f} s: {t_ours:.2f} s  "
        f"{'PASS' if ok_a else 'FAIL'}"
    )
    print(
        f"   incremental run lists <= new + one log id ({bound}) keys: {incremental_listed}  "
        f"{'PASS' if ok_b else 'FAIL'}"
    )
    print(
        f"   full re-verify lists <= window + two log ids ({full_bound}) keys and finds the hole: "
        f"{store.listed}  {'PASS' if ok_c else 'FAIL'}"
    )
    return 0 if ok_a and ok_b and ok_c else 1


if __name__ == "__main__":
    raise SystemExit(main())
