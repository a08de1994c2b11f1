"""WAL name arithmetic and the pure judges of the archive check: no server, no Prefect."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from flows.core.localstore import LocalObjectStore
from flows.core.wal import (
    BadWalName,
    Lineage,
    WalPosition,
    find_gaps,
    log_prefixes,
    parse_history,
    parse_lsn,
    parse_wal_name,
    scan_keys,
    segment_name,
    walfile_of_lsn,
)
from flows.core.wal_archive import ContentsResult, WalArchive, check_contents, full_verify_due
from flows.core.wal_server import (
    ArchiverStats,
    ArchiveSettings,
    Backlog,
    CheckState,
    ProbeStart,
    ServerSnapshot,
)
from flows.core.wal_server_checks import (
    Thresholds,
    archiver_failing,
    check_settings,
    check_stall,
    judge_probe,
    standby_probe,
)
from tests.harness.factories import MiB, archive_settings, snapshot_at


def test_segment_names_depend_on_wal_segment_size() -> None:
    # 16 MiB: 256 segments per 4 GiB log id; 1 MiB: 4096; 1 GiB: 4
    assert segment_name(1, 0x1FF, 16 * MiB) == "0000000100000001000000FF"
    assert segment_name(1, 0x1FF, 1 * MiB) == "0000000100000000000001FF"
    assert segment_name(3, 5, 1024 * MiB) == "000000030000000100000001"
    for size in (MiB, 16 * MiB, 64 * MiB, 1024 * MiB):
        for segno in (1, 255, 256, 4095, 4096, 123_456):
            assert parse_wal_name(segment_name(2, segno, size), size) == WalPosition(2, segno)


def test_segment_number_too_big_for_the_segment_size_is_rejected() -> None:
    with pytest.raises(BadWalName):
        parse_wal_name("000000010000000000000100", 16 * MiB)  # 16 MiB segments stop at ...FF
    assert parse_wal_name("000000010000000000000100", MiB).segno == 0x100


def test_lsn_to_walfile_matches_pg_walfile_name_at_boundaries() -> None:
    assert parse_lsn("16/B374D848") == 0x16B374D848
    size = 16 * MiB
    assert walfile_of_lsn(1, parse_lsn("0/3000000"), size) == "000000010000000000000002"  # boundary: previous
    assert walfile_of_lsn(1, parse_lsn("0/3000001"), size) == "000000010000000000000003"
    assert walfile_of_lsn(1, parse_lsn("1/0"), size) == "0000000100000000000000FF"


def test_archived_names_of_every_tool_are_recognised() -> None:
    sha = "a" * 40
    keys = [
        "wal/000000010000000000000001",  # cp %p DIR/%f
        "wal/000000010000000000000002.gz",
        "walg/wal_005/000000010000000000000003.lz4",  # WAL-G
        "walg/wal_005/000000010000000000000004.br",
        f"archive/main/15-1/0000000100000000/000000010000000000000005-{sha}.zst",  # pgBackRest
        "srv/wals/0000000100000000/000000010000000000000006.gz",  # barman-cloud
        "wal/000000010000000000000007.partial",
        "wal/000000010000000000000007.00000028.backup",
        "archive/main/15-1/00000002.history",
        "dumps/x.manifest.json",
    ]
    listing = scan_keys(keys, 16 * MiB)
    assert listing.segments == {1: {1, 2, 3, 4, 5, 6, 7}}
    assert listing.histories == {2: "archive/main/15-1/00000002.history"}
    assert listing.other == 1
    assert parse_wal_name("00000002.history").kind == "history"
    assert parse_wal_name(f"000000010000000000000005-{sha}.gz").segno == 5


def test_one_listing_prefix_per_log_id_fits_flat_and_per_log_folder_layouts() -> None:
    assert log_prefixes(1, 250, 260, 16 * MiB) == ["0000000100000000", "0000000100000001"]
    assert log_prefixes(2, 1, 4000, MiB) == ["0000000200000000"]


def test_missing_segment_is_reported_by_name() -> None:
    size = 16 * MiB
    names = [segment_name(1, s, size) + ".gz" for s in range(1, 300) if s not in (7, 256)]
    gaps = find_gaps(scan_keys(names, size), 1, 299, Lineage.single(1), size)
    assert gaps.missing_names == ["000000010000000000000007", "000000010000000100000000"]
    assert gaps.verified_through == 6


def test_timeline_switch_with_history_file_is_not_a_gap() -> None:
    size = MiB
    history = parse_history("1\t0/5A00028\tno recovery target specified\n")
    lineage = Lineage.from_history(2, history, size)
    assert lineage.ranges == {1: (0, 0x5A), 2: (0x5A, None)}
    keys = [segment_name(1, s, size) for s in range(0x50, 0x5A)]
    keys += [segment_name(1, 0x5A, size) + ".partial", "00000002.history"]
    keys += [segment_name(2, s, size) for s in range(0x5A, 0x60)]
    keys += [segment_name(1, s, size) for s in range(0x5B, 0x70)]  # the old primary kept writing: ignored
    gaps = find_gaps(scan_keys(keys, size), 0x50, 0x6F, lineage, size)
    assert gaps.missing_names[:1] == [segment_name(2, 0x60, size)]  # tli 1's copies do not count after 0x5A
    assert find_gaps(scan_keys(keys, size), 0x50, 0x5F, lineage, size).ok


def test_gap_before_a_timeline_switch_is_named_on_the_old_timeline() -> None:
    size = 16 * MiB
    lineage = Lineage.from_history(2, parse_history("1\t0/9000000\tbefore\n"), size)
    keys = [segment_name(1, s, size) for s in (5, 6, 8)] + [segment_name(2, s, size) for s in (9, 10)]
    gaps = find_gaps(scan_keys(keys, size), 5, 10, lineage, size)
    assert gaps.missing_names == ["000000010000000000000007"]


def test_failure_newer_than_success_is_failing_compared_by_timeline_and_segment() -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    size = 16 * MiB

    def stats(archived: str | None, at: datetime | None, failed: str | None, failed_at: datetime | None):
        return ArchiverStats(
            archived_count=1,
            last_archived_wal=archived,
            last_archived_time=at,
            failed_count=1 if failed else 0,
            last_failed_wal=failed,
            last_failed_time=failed_at,
            stats_reset=t0,
        )

    later = t0 + timedelta(minutes=1)
    assert archiver_failing(stats("000000010000000000000009", t0, "00000001000000000000000A", later), size)
    assert not archiver_failing(
        stats("00000001000000000000000A", later, "00000001000000000000000A", t0), size
    )
    # string order would put ...0000000A (tli 1) after ...00000009 of tli 2; by timeline it comes first
    assert not archiver_failing(
        stats("000000020000000000000009", t0, "00000001000000000000000A", later), size
    )
    # a history file failing after a segment succeeded is a real failure
    assert archiver_failing(stats("000000010000000000000009", t0, "00000002.history", later), size)
    assert not archiver_failing(stats("000000010000000000000009", t0, None, None), size)


@pytest.mark.parametrize("command", ["/bin/true", "true", "", "(disabled)", ":"])
def test_noop_archive_command_is_critical(command: str) -> None:
    settings = ArchiveSettings(
        wal_level="replica",
        archive_mode="on",
        archive_command=command,
        segment_size=16 * MiB,
        in_recovery=False,
        server="db:5432",
    )
    check = next(c for c in check_settings(settings) if c.name == "archive_command")
    assert check.status == "critical"
    assert "stores nothing" in check.message


def test_same_oldest_waiting_segment_after_the_stall_time_is_critical() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    t = Thresholds(stall_after_seconds=300)
    name = "000000010000000000000009"
    assert check_stall(name, name, now - timedelta(seconds=600), now, t).status == "critical"
    assert check_stall(name, name, now - timedelta(seconds=60), now, t).status == "ok"
    assert check_stall(name, "000000010000000000000008", now - timedelta(hours=1), now, t).status == "ok"


def test_wal_level_minimal_is_critical_and_archive_library_counts_as_a_command() -> None:
    checks = {c.name: c for c in check_settings(archive_settings(wal_level="minimal"))}
    assert checks["wal_level"].status == "critical"
    assert "wal_level = replica" in checks["wal_level"].message
    library = archive_settings(archive_command="", archive_library="basic_archive")
    checks = {c.name: c for c in check_settings(library)}
    assert checks["archive_command"].status == "ok"
    assert "basic_archive" in checks["archive_command"].figure
    assert checks["archive_timeout"].figure.startswith("0 ")


def test_pending_segments_and_age_are_critical_only_while_wal_waits() -> None:
    from flows.core.wal_server import ServerSnapshot, WalPositionNow
    from flows.core.wal_server_checks import check_lag

    now = datetime(2026, 1, 1, 12, tzinfo=UTC)

    def snap(archived_segno: int, current_segno: int, archived_at: datetime) -> ServerSnapshot:
        size = 16 * MiB
        return ServerSnapshot(
            settings=archive_settings(),
            archiver=ArchiverStats(
                archived_count=1,
                last_archived_wal=segment_name(1, archived_segno, size),
                last_archived_time=archived_at,
                failed_count=0,
                last_failed_wal=None,
                last_failed_time=None,
                stats_reset=None,
            ),
            position=WalPositionNow(lsn=current_segno * size + 42, tli=1, walfile=""),
            backlog=Backlog(ready=0),
            standbys=[],
            user="u",
            taken_at=now,
        )

    t = Thresholds(max_pending_segments=16, warn_pending_segments=4, max_archive_age_seconds=900)
    idle = {c.name: c for c in check_lag(snap(9, 10, now - timedelta(days=2)), t, now)}
    assert idle["pending segments"].status == "ok"
    assert idle["archive age"].status == "ok"  # nothing waits
    behind = {c.name: c for c in check_lag(snap(9, 30, now - timedelta(hours=1)), t, now)}
    assert behind["pending segments"].status == "critical"
    assert "20 complete WAL segments" in behind["pending segments"].message
    assert behind["archive age"].status == "critical"
    assert behind["pending segments"].figure.startswith(f"20 segment(s), {20 * 16 * MiB + 42} bytes")


# -- full re-verification: a hole behind the watermark -------------------------------------------------------


def _archive_dir(tmp_path, segnos: range) -> WalArchive:
    for s in segnos:
        (tmp_path / segment_name(1, s, MiB)).write_bytes(b"")
    return WalArchive(LocalObjectStore(tmp_path), "")


def _next(state: CheckState, result: ContentsResult, when: datetime) -> CheckState:
    return state.model_copy(
        update={
            "segment_size": MiB,
            "verified_through": result.verified_through,
            "verified_from": result.window_first if result.full else state.verified_from,
            "full_verified_at": when if result.full else state.full_verified_at,
        }
    )


def test_full_verify_is_due_once_a_day_on_demand_and_on_the_first_run() -> None:
    now = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
    fresh = CheckState(verified_through=10, full_verified_at=now - timedelta(hours=23))
    stale = fresh.model_copy(update={"full_verified_at": now - timedelta(hours=25)})
    assert full_verify_due("auto", fresh, now) == (False, "last full verification 23.0 h ago")
    assert full_verify_due("auto", stale, now) == (True, "last full verification 25 h ago")
    assert full_verify_due("auto", CheckState(verified_through=10), now)[0]  # state from before this check
    assert full_verify_due("always", fresh, now)[0]
    assert not full_verify_due("never", stale, now)[0]
    assert full_verify_due("never", CheckState(), now)[0]  # nothing remembered: the first run lists all


def test_segment_deleted_behind_the_watermark_is_found_only_by_a_full_verify(tmp_path) -> None:
    archive = _archive_dir(tmp_path, range(100, 201))
    t0 = datetime(2026, 11, 29, tzinfo=UTC)
    first = check_contents(archive, snapshot_at(200), CheckState(), 4096)
    assert first.full
    assert first.window_first == 100
    assert first.verified_through == 200
    state = _next(CheckState(), first, t0)
    (tmp_path / segment_name(1, 150, MiB)).unlink()
    (tmp_path / segment_name(1, 100, MiB)).unlink()  # the oldest one: a hole, not where archiving began
    for s in range(201, 206):
        (tmp_path / segment_name(1, s, MiB)).write_bytes(b"")
    incremental = check_contents(archive, snapshot_at(205), state, 4096)
    assert not incremental.full
    assert incremental.checks[-2].status == "ok"  # [-1] is the listing row
    assert incremental.checks[-1].figure.startswith("incremental")
    state = _next(state, incremental, t0)
    full = check_contents(archive, snapshot_at(205), state, 4096, full=True, why="asked for")
    assert full.full
    assert full.missing == [segment_name(1, 100, MiB), segment_name(1, 150, MiB)]
    assert full.checks[-1].figure.startswith("full re-verify (asked for): ")
    assert full.verified_through == 99  # the watermark goes back to the hole: later runs keep reporting it
    again = check_contents(archive, snapshot_at(205), _next(state, full, t0), 4096)
    assert not again.full
    assert again.missing_count == 2


def test_full_verify_window_is_window_segments_back_or_from_the_oldest_needed_segment(tmp_path) -> None:
    archive = _archive_dir(tmp_path, range(1, 301))
    (tmp_path / segment_name(1, 20, MiB)).unlink()
    state = CheckState(segment_size=MiB, verified_through=300)
    windowed = check_contents(archive, snapshot_at(300), state, 100, full=True)
    assert windowed.first == 201
    assert windowed.missing == []  # 100 back: the old hole is not ours
    needed = check_contents(
        archive, snapshot_at(300), state, 100, full=True, oldest_needed_segment=segment_name(1, 10, MiB)
    )
    assert needed.first == 10
    assert needed.missing == [segment_name(1, 20, MiB)]
    assert needed.list_requests == 1
    assert needed.total_list_requests >= needed.list_requests


def test_active_probe_is_critical_when_the_switched_segment_never_reaches_the_archive() -> None:
    start = ProbeStart(restore_point="dbops-wal-check-x", lsn=0x3000000, walfile="000000010000000000000003")
    missing = judge_probe(start, None, 30.2, 30, "s3://bucket/wal")
    assert missing.status == "critical"
    assert missing.figure == f"{start.walfile} not archived after 30 s"
    assert "dbops-wal-check-x" in (missing.message or "")
    assert "s3://bucket/wal" in (missing.message or "")
    found = judge_probe(start, "wal/000000010000000000000003.gz", 1.25, 30, "s3://bucket/wal")
    assert found.status == "ok"
    assert found.figure == f"{start.walfile} archived in 1.2 s (wal/000000010000000000000003.gz)"
    assert standby_probe().status == "skipped"
