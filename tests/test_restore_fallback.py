"""Restore, drill and listing over a storage list (issue 15): read from the first intact location, fall
back when the primary's copy is missing or corrupt, and say so. Two buckets on the moto S3 server plus a
local directory; copies are made as the copy contract lays them out (same keys under each store's root)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deployments.cli import main
from flows.core.compression import Compression
from flows.core.copies import copy_backup
from flows.core.copy_record import CopyRecord
from flows.core.errors import ConfigurationError, ObjectNotFound
from flows.core.localstore import LocalObjectStore
from flows.core.objectstore import ObjectStore
from flows.core.pg_restore import Mode
from flows.core.restore_choice import BackupNotFound
from flows.core.restore_sources import (
    NoReadableSource,
    NotInAnyLocation,
    Source,
    check_source,
    choose_first,
    read_with_fallback,
)
from flows.core.s3store import S3ObjectStore
from flows.nightly_dump import nightly_dump
from flows.restore import list_backups, restore
from flows.restore_drill import restore_drill
from tests.conftest import make_database_block, make_local_block, make_s3_block
from tests.harness.factories import content, databases, flip_one_byte_of_row_data, make_manifest, rewrite
from tests.harness.pg import PgCluster
from tests.harness.runs import artifact_table, failure_message
from tests.harness.s3 import S3Endpoint

FOLDER = "dbops"


def copy_all(src: ObjectStore, dst: ObjectStore, keys: list[str] | None = None) -> list[str]:
    """Copy every object (or `keys`) under the same keys, manifests last, as a copy is laid out."""
    keys = keys if keys is not None else [info.key for info in src.list("")]
    ordered = sorted(keys, key=lambda k: k.endswith(".manifest.json"))
    for key in ordered:
        dst.put_bytes(key, src.get_bytes(key))
    return ordered


def local_store(path: Path) -> LocalObjectStore:
    path.mkdir(parents=True, exist_ok=True)
    return LocalObjectStore(path)


def s3_store(s3: S3Endpoint, bucket: str) -> S3ObjectStore:
    return S3ObjectStore(s3.client(), bucket, FOLDER)


def empty_bucket(s3: S3Endpoint, bucket: str) -> None:
    client = s3.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    for key in keys:
        client.delete_object(Bucket=bucket, Key=key)
    assert client.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0


def leases(store: ObjectStore) -> list[str]:
    return [info.key for info in store.list("") if ".reading-" in info.key]


# -- the plain logic, without Prefect ----------------------------------------------------------------------


def test_a_location_with_a_corrupt_object_is_passed_over_and_the_next_one_is_read(tmp_path: Path) -> None:
    primary, copy = local_store(tmp_path / "a"), local_store(tmp_path / "b")
    data = b"the backup's bytes"
    import hashlib

    manifest = make_manifest(dump_key="db/x.dump", bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    for store in (primary, copy):
        store.put_bytes("db/x.dump", data)
        store.put_bytes("db/x.manifest.json", manifest.to_json())
    primary.put_bytes("db/x.dump", b"X" + data[1:])  # same size, other bytes
    sources = [Source("local-file-system/a", primary, primary=True), Source("local-file-system/b", copy)]
    logged: list[str] = []

    def check(source: Source) -> str:
        return check_source(source, "db/x.manifest.json", "db/x.dump", manifest, type(manifest).from_json)[1]

    def attempt(source: Source) -> bytes:
        got = source.store.get_bytes("db/x.dump")
        if hashlib.sha256(got).hexdigest() != manifest.sha256:
            from flows.core.pg_restore import ChecksumMismatch

            raise ChecksumMismatch("db/x.dump does not match its manifest (sha256 ...)")
        return got

    got, source, fallbacks = read_with_fallback(sources, check, attempt, what="backup x", log=logged.append)
    assert got == data
    assert source.name == "local-file-system/b"
    assert [f.describe() for f in fallbacks] == [
        "the primary local-file-system/a: its object failed its sha256 check (db/x.dump does not match its "
        "manifest)"
    ]
    assert "reading backup x from local-file-system/a (the primary) failed" in logged[0]

    # a short object, a missing object, a missing manifest: each a reason, and nothing left to read
    primary.put_bytes("db/x.dump", data[:-1])
    copy.delete(["db/x.manifest.json"])
    assert check(sources[0]) == f"its object is {len(data) - 1} bytes, the manifest says {len(data)}"
    assert check(sources[1]) == "its manifest is missing"
    with pytest.raises(NoReadableSource, match="could not be read from any of its 2 location"):
        read_with_fallback(sources, check, attempt, what="backup x", log=logged.append)
    primary.delete(["db/x.dump"])
    assert check(sources[0]) == "its object is missing"
    primary.put_bytes("db/x.manifest.json", b"{not json")
    assert check(sources[0]).startswith("its manifest is not a readable dbops manifest")
    # a copy whose record says its bytes were not checked does not vouch for them
    record = CopyRecord(source="s3://a", copied_at=manifest.ended_at, method="streamed", sha256_checked=False)
    copy.put_bytes("db/x.manifest.json", manifest.model_copy(update={"copy": record}).to_json())
    assert check(sources[1]) == "its copy was not sha256-checked when it was made"


def test_choosing_takes_the_first_location_holding_a_match_and_says_why_not_the_others(
    tmp_path: Path,
) -> None:
    sources = [
        Source("s3-bucket/a", local_store(tmp_path / "a"), primary=True),
        Source("s3-bucket/b", local_store(tmp_path / "b")),
    ]

    def pick(source: Source) -> str:
        if source.primary:
            raise BackupNotFound("no backups of 'db' in this storage and prefix")
        return "found"

    found, source, skipped = choose_first(sources, pick, (BackupNotFound,))
    assert (found, source.name) == ("found", "s3-bucket/b")
    assert skipped[0].describe() == (
        "the primary s3-bucket/a: no match (no backups of 'db' in this storage and prefix)"
    )

    def nowhere(source: Source) -> str:
        if source.primary:
            raise ObjectNotFound("s3://a: the bucket does not exist")
        raise BackupNotFound("no backup of 'db' was started before 2020-01-01")

    with pytest.raises(NotInAnyLocation) as caught:
        choose_first(sources, nowhere, (BackupNotFound,))
    # the sentence of the location that could be read comes first; then every location tried
    assert str(caught.value).startswith("no backup of 'db' was started before 2020-01-01 (every location")
    assert "the primary s3-bucket/a: cannot be read (s3://a: the bucket does not exist)" in str(caught.value)
    with pytest.raises(BackupNotFound):  # one location: its own error, as before storage lists
        choose_first(sources[1:], nowhere, (BackupNotFound,))


# -- the flows ---------------------------------------------------------------------------------------------


@pytest.fixture
def copy_bucket(s3: S3Endpoint, unique: str) -> str:
    return s3.create_bucket(f"copy-{unique}")


@pytest.fixture
def copy_storage(s3: S3Endpoint, copy_bucket: str, unique: str) -> str:
    return make_s3_block(s3, f"s3-copy-{unique}", copy_bucket, folder=FOLDER)


@pytest.mark.usefixtures("prefect_api")
def test_restore_succeeds_from_the_copy_after_the_primary_bucket_was_emptied_and_says_so(
    pg: PgCluster,
    source: tuple[str, str],
    storage: str,
    copy_storage: str,
    s3: S3Endpoint,
    bucket: str,
    copy_bucket: str,
    unique: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    block, name = source
    dumped = nightly_dump(database=block, storage=storage, prefix="prod")
    copied = copy_backup(s3_store(s3, bucket), s3_store(s3, copy_bucket), dumped.manifest_key)
    assert copied.bytes == dumped.bytes
    empty_bucket(s3, bucket)  # every object of the primary deleted

    target = make_database_block(pg, f"new-{unique}", f"restored_{unique}")
    state = restore(
        storage=[storage, copy_storage],
        source_database=name,
        target=target,
        prefix="prod",
        return_state=True,
    )
    report = state.result()
    assert report.key == dumped.key
    assert report.location == copy_storage
    assert report.fallbacks == [f"the primary {storage}: its manifest is missing"]
    assert content(pg, f"restored_{unique}") == content(pg, name)
    values = {row["item"]: row["value"] for row in artifact_table(f"restore-restored-{unique}")}
    assert values["read from"] == f"{copy_storage} (the primary {storage}: its manifest is missing)"
    log = caplog.text  # the run's log
    assert f"latest of {name} not chosen from the primary {storage}: no match" in log
    assert f"reading backup {dumped.key.rsplit('/', 1)[-1].split('.')[0]} from {copy_storage} (a copy)" in log
    assert leases(s3_store(s3, copy_bucket)) == []  # the read lease was taken and released in the copy


@pytest.mark.usefixtures("prefect_api")
@pytest.mark.parametrize("mode", ["create", "replace"])
def test_a_corrupted_object_in_the_primary_falls_back_to_the_copy_and_restores_the_right_rows(
    pg: PgCluster,
    source: tuple[str, str],
    storage: str,
    copy_storage: str,
    s3: S3Endpoint,
    bucket: str,
    copy_bucket: str,
    unique: str,
    mode: Mode,
) -> None:
    block, name = source
    # Uncompressed, so the changed byte reaches pg_restore as row data: only the sha256 stops it.
    dumped = nightly_dump(database=block, storage=storage, compression=Compression.none)
    copy_all(s3_store(s3, bucket), s3_store(s3, copy_bucket))
    key = f"{FOLDER}/{dumped.key}"
    size = s3.client().head_object(Bucket=bucket, Key=key)["ContentLength"]
    rewrite(s3, bucket, key, flip_one_byte_of_row_data)
    assert s3.client().head_object(Bucket=bucket, Key=key)["ContentLength"] == size  # same key and size
    expected = content(pg, name)
    pg.sql("INSERT INTO images (name) VALUES ('written after the backup')", name)

    # create: a new database (the failed attempt's temporary one dropped); replace: the source itself,
    # its failed attempt rolled back, then replaced from the copy
    target = make_database_block(pg, f"new-{unique}", f"restored_{unique}") if mode == "create" else block
    restored = f"restored_{unique}" if mode == "create" else name
    report = restore(
        storage=f"{storage}, {copy_storage}",
        source_database=name,
        target=target,
        mode=mode,
        confirm=name if mode == "replace" else "",
    )
    assert report.location == copy_storage
    assert len(report.fallbacks) == 1
    assert report.fallbacks[0].startswith(f"the primary {storage}: its object failed its sha256 check")
    assert content(pg, restored) == expected  # the copy's rows: not the flipped one, not the later one
    assert databases(pg, f"{restored}_restoring_%") == []  # the failed attempt was cleaned up
    values = {row["item"]: row["value"] for row in artifact_table(f"restore-{restored.replace('_', '-')}")}
    assert "its object failed its sha256 check" in values["read from"]
    assert values["read from"].startswith(copy_storage)
    assert leases(s3_store(s3, bucket)) == []
    assert leases(s3_store(s3, copy_bucket)) == []


@pytest.mark.usefixtures("prefect_api")
def test_a_backup_whose_object_is_only_in_a_local_directory_copy_is_restored_from_there(
    pg: PgCluster,
    source: tuple[str, str],
    storage: str,
    copy_storage: str,
    s3: S3Endpoint,
    bucket: str,
    copy_bucket: str,
    unique: str,
    tmp_path: Path,
) -> None:
    block, name = source
    dumped = nightly_dump(database=block, storage=storage)
    nas = make_local_block(f"nas-{unique}", tmp_path / "nas")
    copy_all(s3_store(s3, bucket), local_store(tmp_path / "nas"))
    s3.client().delete_object(Bucket=bucket, Key=f"{FOLDER}/{dumped.key}")  # the primary keeps its manifest

    target = make_database_block(pg, f"new-{unique}", f"restored_{unique}")
    report = restore(
        storage=[storage, copy_storage, nas],
        source_database=name,
        target=target,
        backup=dumped.key.rsplit("/", 1)[-1],
    )
    assert report.location == nas
    assert report.fallbacks == [
        f"the primary {storage}: its object is missing",
        f"copy {copy_storage}: its manifest is missing",
    ]
    assert content(pg, f"restored_{unique}") == content(pg, name)

    # nowhere left to read it from: one sentence naming every location and why
    (tmp_path / "nas" / dumped.key).unlink()
    state = restore(
        storage=[storage, copy_storage, nas],
        source_database=name,
        target=make_database_block(pg, f"none-{unique}", f"none_{unique}"),
        return_state=True,
    )
    message = failure_message(state)
    assert "could not be read from any of its 3 location(s)" in message
    assert f"copy {nas}: its object is missing" in message
    assert databases(pg, f"none_{unique}%") == []


@pytest.mark.usefixtures("prefect_api")
def test_the_same_location_listed_twice_or_under_two_names_is_refused(
    source: tuple[str, str], storage: str, s3: S3Endpoint, bucket: str, unique: str
) -> None:
    _, name = source
    state = restore(storage=[storage, storage], source_database=name, target="x", return_state=True)
    assert f"storage lists {storage} twice" in failure_message(state)
    alias = make_s3_block(s3, f"alias-{unique}", bucket, folder=FOLDER)
    state = restore(storage=f"{storage},{alias}", source_database=name, target="x", return_state=True)
    message = failure_message(state)
    assert f"storage blocks {storage} and {alias} are the same place" in message
    with pytest.raises(ConfigurationError, match="twice"):
        list_backups(storage=[storage, storage], database=name)


@pytest.mark.usefixtures("prefect_api")
def test_the_listing_shows_where_each_backup_is_present_and_verified(
    pg: PgCluster,
    source: tuple[str, str],
    storage: str,
    copy_storage: str,
    s3: S3Endpoint,
    bucket: str,
    copy_bucket: str,
    unique: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    block, name = source
    older = nightly_dump(database=block, storage=storage, prefix="prod")
    newer = nightly_dump(database=block, storage=storage, prefix="prod", verify="none")
    nas = make_local_block(f"nas-{unique}", tmp_path / "nas")
    primary = s3_store(s3, bucket)
    copy_all(primary, s3_store(s3, copy_bucket))
    copy_all(primary, local_store(tmp_path / "nas"))
    s3_store(s3, copy_bucket).delete([newer.manifest_key, newer.key])  # the copy lacks the newer backup
    gone = make_s3_block(s3, f"gone-{unique}", f"no-such-bucket-{unique}")
    capsys.readouterr()

    lists = f"{storage},{copy_storage},{nas},{gone}"
    assert main(["backups", "list", "--storage", lists, "--prefix", "prod", "--database", name]) == 0
    out = capsys.readouterr().out
    assert "LOCATIONS" in out
    rows = [line for line in out.splitlines() if "/dumps/" in line and "prod/" in line]
    assert newer.key in rows[0]
    assert f"{storage} unverified, {copy_storage} missing, {nas} unverified, {gone} unreadable" in rows[0]
    assert older.key in rows[1]
    assert f"{storage} ✓, {copy_storage} ✓, {nas} ✓, {gone} unreadable" in rows[1]
    unreadable = [line for line in out.splitlines() if line.startswith(gone)]
    assert len(unreadable) == 1
    assert "location cannot be read:" in unreadable[0]

    monkeypatch.setenv("DBOPS_STORAGE", lists)  # the default of --storage: a comma-separated list
    assert main(["backups", "list", "--prefix", "prod", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)[name]
    assert listed[1]["locations"] == f"{storage} ✓, {copy_storage} ✓, {nas} ✓, {gone} unreadable"
    problems = [row["problem"] for row in listed if row.get("key") == gone]
    assert len(problems) == 1
    assert problems[0].startswith("location cannot be read: ")

    # the flow takes the list too, and shows a backup held only by a copy
    primary.delete([older.manifest_key, older.key])
    flow_rows = list_backups(storage=[storage, copy_storage], database=name, prefix="prod")
    assert [r["key"] for r in flow_rows] == [newer.key, older.key]
    assert flow_rows[1]["locations"] == f"{storage} missing, {copy_storage} ✓"


@pytest.mark.usefixtures("prefect_api")
def test_the_restore_drill_reads_a_list_and_records_the_drill_where_it_read(
    pg: PgCluster,
    source: tuple[str, str],
    storage: str,
    copy_storage: str,
    s3: S3Endpoint,
    bucket: str,
    copy_bucket: str,
) -> None:
    block, name = source
    dumped = nightly_dump(database=block, storage=storage, compression=Compression.none)
    copy_all(s3_store(s3, bucket), s3_store(s3, copy_bucket))
    rewrite(s3, bucket, f"{FOLDER}/{dumped.key}", flip_one_byte_of_row_data)
    report = restore_drill(
        storage=[storage, copy_storage], source_database=name, scratch=block, amcheck=False
    )
    assert report.passed
    assert report.location == copy_storage
    assert "its object failed its sha256 check" in report.fallbacks[0]
    drill = dumped.manifest_key.removesuffix(".manifest.json") + ".drill.json"
    assert s3_store(s3, copy_bucket).head(drill) is not None
    assert s3_store(s3, bucket).head(drill) is None
    assert databases(pg, f"drill_{name}_%") == []


# -- point-in-time recovery: the base backup falls back the same way -----------------------------------


@pytest.mark.usefixtures("prefect_api")
def test_pitr_restore_reads_the_base_backup_from_the_copy_when_the_primarys_is_corrupt(unique: str) -> None:
    import os
    import shutil
    import tempfile

    from blocks import PostgresDatabase
    from flows.core.wal_archive import ArchiveLocation
    from flows.pitr_restore import pitr_restore
    from tests.harness.basebackup import archiving_cluster, switch_and_archive, take_base_backup
    from tests.harness.pg import free_port

    with archiving_cluster() as (cluster, archive_dir):
        cluster.create_database("app")
        cluster.sql("CREATE TABLE t (v text)", "app")
        cluster.sql("INSERT INTO t VALUES ('in the base backup')", "app")
        root = cluster.base_dir.parent
        primary, copy = local_store(root / "primary"), local_store(root / "copy")
        manifest = take_base_backup(cluster, primary, "prod", "app")
        switch_and_archive(cluster)
        copy_all(primary, copy)
        damaged = bytearray(primary.get_bytes(manifest.tar_key))
        damaged[len(damaged) // 2] ^= 0xFF  # same key, same size, other bytes
        primary.put_bytes(manifest.tar_key, bytes(damaged))
        PostgresDatabase(
            host=cluster.host,
            port=cluster.port,
            database="app",
            user=cluster.superuser,
            password=cluster.password,
        ).save(f"pitr-fb-{unique}", overwrite=True)
        a = make_local_block(f"pitr-a-{unique}", root / "primary")
        b = make_local_block(f"pitr-b-{unique}", root / "copy")
        scratch = Path(tempfile.mkdtemp(prefix="dbops-pitr-fb-"))
        os.chmod(scratch, 0o755)  # the server's OS user must reach its data directory inside
        try:
            report = pitr_restore(
                database=f"pitr-fb-{unique}",
                storage=[a, b],
                prefix="prod",
                archive=ArchiveLocation(directory=str(archive_dir)),
                data_directory=str(scratch / "data"),
                immediate=True,
                port=free_port(),
                start=False,
            )
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        assert leases(primary) == []  # the lease of each attempt was taken and released where it read
        assert leases(copy) == []
    assert report.base_backup == manifest.tar_key
    assert report.location == b
    assert report.fallbacks == [
        f"the primary {a}: its object failed its sha256 check (the base backup {manifest.tar_key} does not "
        "match its manifest)"
    ]
    assert report.reached_lsn
    values = {row["item"]: row["value"] for row in artifact_table("pitr-app")}
    assert values["read from"].startswith(f"{b} (the primary {a}: its object failed its sha256 check")
