"""choose_base_backup on a real directory archive (files named as WAL, modification times set): which
base backup a target gets, and the refusals with the window. No server needed."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from flows.core.base_layout import BaseBackupManifest
from flows.core.chain import recoverable_window
from flows.core.localstore import LocalObjectStore
from flows.core.pitr.errors import RecoveryRefused
from flows.core.pitr.selection import choose_base_backup
from flows.core.pitr.targets import parse_target
from flows.core.wal import format_lsn, segment_name
from flows.core.wal_archive import WalArchive
from tests.harness.basebackup import catalog_of

SEG = 1024 * 1024
T0 = datetime(2026, 11, 1, tzinfo=UTC)


def _manifest(start_seg: int, ended: datetime) -> BaseBackupManifest:
    return BaseBackupManifest(
        database="app",
        server="db:5432",
        system_identifier="1",
        server_version="15.18",
        server_version_num=150018,
        pg_basebackup_version="15.18",
        label="l",
        started_at=ended - timedelta(minutes=1),
        ended_at=ended,
        start_lsn=format_lsn(start_seg * SEG + 0x28),
        stop_lsn=format_lsn(start_seg * SEG + 0x100),
        start_wal=segment_name(1, start_seg, SEG),
        stop_wal=segment_name(1, start_seg, SEG),
        timeline=1,
        wal_segment_size=SEG,
        wal_included=False,
        wal_archived=True,
        tar_key=f"prod/app/base/x-{start_seg}.tar.zst",
        bytes=1,
        raw_bytes=1,
        sha256="0" * 64,
    )


def _archive(tmp_path: Path, segments: range, skip: int | None = None) -> WalArchive:
    """Segment s archived at T0 + s minutes."""
    for s in segments:
        if s == skip:
            continue
        path = tmp_path / segment_name(1, s, SEG)
        path.write_bytes(b"")
        when = (T0 + timedelta(minutes=s)).timestamp()
        os.utime(path, (when, when))
    return WalArchive(LocalObjectStore(tmp_path))


OLD = _manifest(2, T0 + timedelta(minutes=2, seconds=10))
NEW = _manifest(10, T0 + timedelta(minutes=10, seconds=10))
BOTH = catalog_of(OLD, NEW)


def test_the_newest_base_backup_ending_before_the_target_is_chosen(tmp_path: Path) -> None:
    archive = _archive(tmp_path, range(2, 20))
    between = parse_target(time=(T0 + timedelta(minutes=6)).isoformat())
    assert choose_base_backup(BOTH, between, archive).manifest is OLD
    after = parse_target(time=(T0 + timedelta(minutes=15)).isoformat())
    assert choose_base_backup(BOTH, after, archive).manifest is NEW
    lsn = parse_target(lsn=format_lsn(7 * SEG))
    assert choose_base_backup(BOTH, lsn, archive).manifest is OLD
    assert choose_base_backup(BOTH, parse_target(latest=True), archive).manifest is NEW


def test_a_hole_is_bridged_by_a_newer_base_backup_and_otherwise_named(tmp_path: Path) -> None:
    archive = _archive(tmp_path, range(2, 20), skip=5)
    after = parse_target(time=(T0 + timedelta(minutes=15)).isoformat())
    assert choose_base_backup(BOTH, after, archive).manifest is NEW  # its chain starts after the hole
    before_new = parse_target(time=(T0 + timedelta(minutes=8)).isoformat())
    with pytest.raises(RecoveryRefused) as err:
        choose_base_backup(BOTH, before_new, archive)
    assert segment_name(1, 5, SEG) in str(err.value)
    assert "recoverable from" in str(err.value)


def test_targets_before_the_oldest_backup_or_after_the_archive_are_refused_with_the_window(
    tmp_path: Path,
) -> None:
    archive = _archive(tmp_path, range(2, 20))
    with pytest.raises(RecoveryRefused, match="before the oldest base backup"):
        choose_base_backup(BOTH, parse_target(time=(T0 + timedelta(minutes=1)).isoformat()), archive)
    with pytest.raises(RecoveryRefused) as err:
        choose_base_backup(BOTH, parse_target(time=(T0 + timedelta(minutes=30)).isoformat()), archive)
    assert "after the last archived segment" in str(err.value)
    assert segment_name(1, 19, SEG) in str(err.value)
    assert "recoverable from 2026-11-01T00:02:10+00:00 to 2026-11-01T00:19:00+00:00" in str(err.value)
    with pytest.raises(RecoveryRefused, match="after the last archived segment"):
        choose_base_backup(BOTH, parse_target(lsn=format_lsn(25 * SEG)), archive)


def test_a_base_backup_whose_own_wal_is_missing_is_not_used(tmp_path: Path) -> None:
    archive = _archive(tmp_path, range(3, 20))  # OLD's start segment (2) was never archived
    target = parse_target(time=(T0 + timedelta(minutes=6)).isoformat())
    with pytest.raises(RecoveryRefused, match="before the oldest base backup"):
        choose_base_backup(BOTH, target, archive)


def test_pitr_refuses_exactly_the_targets_outside_the_window_the_listing_prints(tmp_path: Path) -> None:
    """One window: a target is accepted iff `dbops backups list`'s window (chain.recoverable_window) covers
    it, with a hole splitting it in two."""
    archive = _archive(tmp_path, range(2, 20), skip=5)
    listed = recoverable_window("app", BOTH, archive)
    assert len(listed.windows) == 2
    assert listed.first_hole == segment_name(1, 5, SEG)
    for seconds in range(0, 25 * 60, 20):
        when = T0 + timedelta(seconds=seconds)
        inside = any(w.covers_time(when) for w in listed.windows)
        target = parse_target(time=when.isoformat(), now=T0 + timedelta(hours=1))
        refusal = ""
        try:
            choose_base_backup(BOTH, target, archive)
        except RecoveryRefused as exc:
            refusal = str(exc)
        assert (refusal == "") == inside, when
        if refusal:
            assert "recoverable from 2026-11-01T00:02:10+00:00 to 2026-11-01T00:04:00+00:00 and " in refusal


def test_a_base_backup_whose_wal_was_never_confirmed_is_not_chosen(tmp_path: Path) -> None:
    """The listing does not count a manifest without wal_archived/wal_included: neither does PITR."""
    archive = _archive(tmp_path, range(2, 20))
    unconfirmed = NEW.model_copy(update={"wal_archived": False})
    target = parse_target(time=(T0 + timedelta(minutes=15)).isoformat())
    assert choose_base_backup(catalog_of(OLD, unconfirmed), target, archive).manifest is OLD
    with pytest.raises(RecoveryRefused, match="no base backup with its WAL confirmed"):
        choose_base_backup(catalog_of(unconfirmed), target, archive)
