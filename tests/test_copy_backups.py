"""Bringing copy locations up to date: `dbops backups sync` and the copy-backups flow share one plan (the
primary's verified backups the copy's retention keeps, minus what the copy holds verified)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from deployments.cli import main
from flows.core.base_catalog import read_base_catalog
from flows.core.base_layout import base_manifest_key
from flows.core.catalog import read_catalog
from flows.core.copy_plan import read_primary, wanted_backups
from flows.core.layout import manifest_key
from flows.core.localstore import LocalObjectStore
from flows.core.locations import StorageLocation
from flows.core.objectstore import ObjectStore
from flows.core.retention import RetentionPolicy
from flows.core.s3store import S3ObjectStore
from tests.conftest import make_local_block, make_s3_block
from tests.harness.copies import base_backup, dump_backup
from tests.harness.factories import DB, PREFIX
from tests.harness.runs import artifact_table, failure_message
from tests.harness.s3 import S3Endpoint

pytestmark = pytest.mark.usefixtures("prefect_api")

NOW = datetime.now(UTC).replace(microsecond=0)


def manifests_in(store: ObjectStore) -> set[str]:
    """Manifest keys of the backups the catalogs see in a location (dumps and base backups)."""
    dumps = {manifest_key(b.stem) for b in read_catalog(store, PREFIX, DB).backups}
    bases = {base_manifest_key(b.stem) for b in read_base_catalog(store, PREFIX, DB).backups}
    return dumps | bases


@pytest.fixture
def primary(s3: S3Endpoint, bucket: str, unique: str) -> tuple[str, S3ObjectStore]:
    """An S3 primary holding five verified dumps (0-4 days old), one unverified dump and two base
    backups."""
    slug = make_s3_block(s3, f"primary-{unique}", bucket, folder="dbops")
    store = S3ObjectStore(s3.client(), bucket, "dbops")
    for days in range(5):
        dump_backup(store, f"dump {days}".encode() * 100, when=NOW - timedelta(days=days, hours=1))
    dump_backup(store, b"never verified", verified=False, when=NOW - timedelta(minutes=30))
    for days in (1, 3):
        base_backup(store, f"tar {days}".encode() * 100, when=NOW - timedelta(days=days, hours=2))
    return slug, store


def test_sync_fills_a_new_copy_with_exactly_the_retained_backups_then_copies_only_what_is_new(
    primary: tuple[str, S3ObjectStore], tmp_path: Path, unique: str, capsys: pytest.CaptureFixture[str]
) -> None:
    slug, store = primary
    nas_slug = make_local_block(f"nas-{unique}", tmp_path / "nas")
    nas = LocalObjectStore(tmp_path / "nas")
    policy = RetentionPolicy(keep_last=2)
    retained = {w.manifest_key for w in wanted_backups(read_primary(store, PREFIX, DB, "both"), policy, NOW)}
    assert len(retained) == 4  # the two newest verified dumps, and both base backups
    sync = ["backups", "sync", "--database", DB, "--storage", f"{slug},{nas_slug}", "--prefix", PREFIX]
    sync += ["--retention", '{"keep_last": 2}']

    assert main(sync) == 0
    assert manifests_in(nas) == retained
    first = {info.key: info.last_modified for info in nas.list("")}

    capsys.readouterr()
    assert main(sync) == 0
    assert "copied (" not in capsys.readouterr().out
    assert {info.key: info.last_modified for info in nas.list("")} == first  # nothing written again

    newest = dump_backup(store, b"tonight" * 100, when=NOW - timedelta(minutes=5))
    assert main(sync) == 0
    out = capsys.readouterr().out
    assert out.count("copied (streamed)") == 1
    assert f"copied (streamed) {newest}" in out
    assert newest in manifests_in(nas)


def test_sync_dry_run_copies_nothing_and_names_what_it_would_copy(
    primary: tuple[str, S3ObjectStore], tmp_path: Path, unique: str, capsys: pytest.CaptureFixture[str]
) -> None:
    slug, _ = primary
    nas_slug = make_local_block(f"nas-{unique}", tmp_path / "nas")
    sync = ["backups", "sync", "--database", DB, "--storage", f"{slug},{nas_slug}", "--prefix", PREFIX]
    assert main([*sync, "--dry-run", "--kinds", "base"]) == 0
    out = capsys.readouterr().out
    assert out.count(f"{nas_slug}: would copy prod/imagemanager/base/") == 2
    assert "would copy 2" in out  # the table's cell
    assert list(LocalObjectStore(tmp_path / "nas").list("")) == []


def test_sync_with_only_the_primary_says_to_name_a_copy(
    primary: tuple[str, S3ObjectStore], capsys: pytest.CaptureFixture[str]
) -> None:
    slug, _ = primary
    assert main(["backups", "sync", "--database", DB, "--storage", slug, "--prefix", PREFIX]) == 1
    assert "names only the primary" in capsys.readouterr().err


def test_the_flow_fills_a_good_copy_and_fails_naming_the_one_whose_bucket_is_missing(
    primary: tuple[str, S3ObjectStore], s3: S3Endpoint, unique: str
) -> None:
    from flows.copy_backups import copy_backups

    slug, store = primary
    eu_bucket = s3.create_bucket(f"eu-{unique}")
    eu = make_s3_block(s3, f"eu-{unique}", eu_bucket, folder="eu")
    gone = make_s3_block(s3, f"gone-{unique}", f"no-bucket-{unique}")
    state = copy_backups(
        database=DB,
        storage=[slug, gone, StorageLocation(block=eu, retention=RetentionPolicy(keep_last=1))],
        prefix=PREFIX,
        return_state=True,
    )
    assert state.is_failed()
    message = failure_message(state)
    assert f"copy location(s) {gone} not brought up to date (the primary is untouched)" in message
    assert f"S3 bucket 'no-bucket-{unique}' does not exist" in message
    eu_store = S3ObjectStore(s3.client(), eu_bucket, "eu")
    wanted = wanted_backups(read_primary(store, PREFIX, DB, "both"), RetentionPolicy(keep_last=1), NOW)
    assert manifests_in(eu_store) == {w.manifest_key for w in wanted}
    rows = {row["location"]: row for row in artifact_table(f"copy-backups-{DB}")}
    assert rows[eu]["copied"] == "2"
    assert rows[eu]["failed"] == ""
    assert "does not exist" in rows[gone]["failed"]


def test_the_flow_with_only_the_primary_completes_with_nothing_to_do(
    primary: tuple[str, S3ObjectStore],
) -> None:
    from flows.copy_backups import copy_backups

    slug, _ = primary
    report = copy_backups(database=DB, storage=slug, prefix=PREFIX)
    assert report.locations == []
    assert artifact_table(f"copy-backups-{DB}") == []


def test_a_corrupt_primary_backup_is_not_copied_the_others_are_and_the_run_fails_naming_the_location(
    primary: tuple[str, S3ObjectStore], tmp_path: Path, unique: str
) -> None:
    from flows.copy_backups import copy_backups

    slug, store = primary
    newest = read_catalog(store, PREFIX, DB).newest()
    assert newest is not None
    body = store.get_bytes(newest.manifest.dump_key)
    store.put_bytes(newest.manifest.dump_key, body[:-1] + bytes([body[-1] ^ 1]))  # same size, one bit
    nas_slug = make_local_block(f"nas-{unique}", tmp_path / "nas")
    state = copy_backups(database=DB, storage=f"{slug},{nas_slug}", prefix=PREFIX, return_state=True)
    assert state.is_failed()
    message = failure_message(state)
    assert f"copy location(s) {nas_slug} not brought up to date" in message
    assert "1 backup(s) not copied" in message
    assert "does not match its manifest" in message
    copied = manifests_in(LocalObjectStore(tmp_path / "nas"))
    assert len(copied) == 6  # four older verified dumps and two base backups
    assert manifest_key(newest.stem) not in copied
    (row,) = artifact_table(f"copy-backups-{DB}")
    assert row["copied"] == "6"
