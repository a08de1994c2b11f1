"""Choosing the backup and the target without PostgreSQL or Prefect: core.restore_choice, core.pg_restore."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from flows.core.catalog import Backup, Catalog
from flows.core.database_admin import temporary_name
from flows.core.errors import ConfigurationError
from flows.core.layout import backup_stem, dump_key
from flows.core.pg_restore import NotEnoughSpace, check_disk_space
from flows.core.restore import RestoreRefused
from flows.core.restore_choice import (
    BackupNotFound,
    Selector,
    parse_selector,
    parse_timestamp,
    require_confirmation,
    select_backup,
)
from tests.harness.factories import make_manifest

T0 = datetime(2026, 3, 1, 2, 0, tzinfo=UTC)


def backup(started: datetime, minutes: int = 10) -> Backup:
    stem = backup_stem("prod", "imagemanager", started)
    manifest = make_manifest(
        started_at=started,
        ended_at=started + timedelta(minutes=minutes),
        dump_key=dump_key(stem, ".zst"),
        bytes=10,
        raw_bytes=20,
    )
    return Backup(stem, manifest, [manifest.dump_key, stem + ".manifest.json"])


def catalog(*backups: Backup) -> Catalog:
    return Catalog(sorted(backups, key=lambda b: b.manifest.ended_at, reverse=True), [])


def test_selector_text_forms() -> None:
    assert parse_selector("latest") == Selector("latest") == parse_selector("")
    assert parse_selector("latest before 2026-03-01T14:00:00Z") == Selector(
        "before", before=T0 + timedelta(hours=12)
    )
    assert parse_selector("Latest  Before 2026-03-01 14:00").before == T0 + timedelta(
        hours=12
    )  # naive is UTC
    assert parse_selector("latest before 20260301T140000Z").before == T0 + timedelta(hours=12)
    assert parse_selector("prod/x/dumps/2026/03/01/x-20260301T020000Z.dump.zst").kind == "key"
    assert parse_timestamp("2026-03-01T15:00:00+01:00") == T0 + timedelta(hours=12)
    with pytest.raises(ConfigurationError, match="is not a timestamp"):
        parse_selector("latest before yesterday")


def test_latest_before_takes_the_newest_snapshot_started_before_the_time() -> None:
    days = [backup(T0 + timedelta(days=d)) for d in range(4)]
    # A long dump that started before the cutoff but ended after it still holds data from before it.
    long_one = backup(T0 + timedelta(days=4), minutes=600)
    cat = catalog(*days, long_one)
    cutoff = T0 + timedelta(days=4, hours=1)
    assert select_backup(cat, Selector("before", before=cutoff), "imagemanager") is long_one
    assert select_backup(cat, Selector("before", before=T0 + timedelta(days=2)), "imagemanager") is days[1]
    assert select_backup(cat, Selector("latest"), "imagemanager") is long_one
    with pytest.raises(BackupNotFound, match="oldest one started at 2026-03-01 02:00:00"):
        select_backup(cat, Selector("before", before=T0), "imagemanager")


def test_explicit_key_accepts_dump_key_manifest_key_stem_or_file_name() -> None:
    b = backup(T0)
    other = backup(T0 + timedelta(days=1))
    cat = catalog(b, other)
    name = b.stem.rsplit("/", 1)[-1]
    for key in (b.manifest.dump_key, b.stem + ".manifest.json", b.stem, name, name + ".dump.zst"):
        assert select_backup(cat, Selector("key", key=key), "imagemanager") is b
    with pytest.raises(BackupNotFound, match="not a backup of 'imagemanager' with a manifest"):
        select_backup(cat, Selector("key", key="imagemanager-20990101T000000Z"), "imagemanager")


def test_no_backup_names_the_orphans_that_do_not_count() -> None:
    cat = Catalog([], [("s", ["s.dump.zst"], T0)])
    with pytest.raises(BackupNotFound, match="1 dump\\(s\\) without a manifest are not backups"):
        select_backup(cat, Selector("latest"), "imagemanager")


def test_protected_database_needs_its_exact_name_as_confirm() -> None:
    require_confirmation(False, "imagemanager", "")
    require_confirmation(True, "imagemanager", "imagemanager")
    for wrong in ("", None, "yes", "IMAGEMANAGER", "imagemanager "):
        with pytest.raises(RestoreRefused, match="confirm='imagemanager'"):
            require_confirmation(True, "imagemanager", wrong)


def test_temporary_name_fits_postgres_identifier_limit() -> None:
    assert temporary_name("imagemanager", "ab12cd34") == "imagemanager_restoring_ab12cd34"
    long = temporary_name("x" * 80, "ab12cd34")
    assert len(long.encode()) <= 63
    assert long.endswith("_restoring_ab12cd34")
    assert len(temporary_name("ü" * 40, "ab12cd34").encode()) <= 63


def test_disk_check_refuses_an_archive_larger_than_free_space(tmp_path) -> None:
    assert check_disk_space(tmp_path, 1024) > 0
    with pytest.raises(NotEnoughSpace, match="use jobs=1"):
        check_disk_space(tmp_path, 1 << 60)
