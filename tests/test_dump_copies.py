"""3-2-1 for the backup flows: the nightly dump and the base backup write to a storage list (primary first,
then copies), copy after the primary is safe, run retention per location, and end Failed naming a copy
that did not land while the primary backup stays verified. Real PostgreSQL, two buckets on the moto S3
server over HTTP plus a local directory, a real Prefect API; faults are real (a closed port, a bucket
that does not exist)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from flows.core.base_catalog import BaseCatalog
from flows.core.base_layout import BaseBackupManifest, BaseVerification, base_prefix
from flows.core.localstore import LocalObjectStore
from flows.core.locations import StorageLocation
from flows.core.manifest import Manifest
from flows.core.retention import RetentionPolicy
from flows.core.wal import segment_name
from flows.core.wal_archive import ArchiveLocation
from flows.core.wal_expiry import LocationCatalog, kept_in_any_location
from flows.nightly_dump import nightly_dump
from tests.conftest import make_database_block, make_local_block, make_s3_block
from tests.harness.basebackup import archiving_cluster, catalog_of
from tests.harness.factories import sample_database
from tests.harness.pg import PgCluster, free_port
from tests.harness.runs import artifact_table, failure_message
from tests.harness.s3 import ACCESS_KEY, REGION, SECRET_KEY, S3Endpoint

PREFIX = "prod"


@pytest.fixture
def db(pg: PgCluster, unique: str) -> str:
    return make_database_block(pg, f"cp-{unique}", sample_database(pg, f"cp_{unique}", rows=300))


@pytest.fixture
def two_buckets(s3: S3Endpoint, unique: str) -> tuple[str, str]:
    return s3.create_bucket(f"primary-{unique}"), s3.create_bucket(f"copy-{unique}")


def bucket_keys(s3: S3Endpoint, bucket: str, folder: str = "") -> dict[str, dict[str, Any]]:
    """Every object of a bucket, keyed relative to the block's folder (the store's root)."""
    found = s3.client().list_objects_v2(Bucket=bucket).get("Contents", [])
    return {o["Key"].removeprefix(f"{folder}/" if folder else ""): o for o in found}


def dir_keys(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def backup_keys(keys: Iterable[str]) -> set[str]:
    """The keys of backups (dumps, globals, manifests), without leases or write checks."""
    return {k for k in keys if "/dumps/" in k and ".reading-" not in k}


def unreachable_s3_block(name: str) -> str:
    """An S3 block on a port where nothing listens: every request is refused (a real network fault)."""
    from prefect_aws import AwsCredentials, S3Bucket
    from prefect_aws.client_parameters import AwsClientParameters

    creds = AwsCredentials(
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name=REGION,
        # botocore's own retries of a refused connection would take seconds; the task's retries remain
        aws_client_parameters=AwsClientParameters(
            endpoint_url=f"http://127.0.0.1:{free_port()}", config={"retries": {"max_attempts": 1}}
        ),
    )
    S3Bucket(bucket_name="nowhere", credentials=creds).save(name, overwrite=True)
    return f"s3-bucket/{name}"


pytestmark = pytest.mark.usefixtures("prefect_api")


# -- the nightly dump ----------------------------------------------------------------------------------------


def test_dump_lands_verified_in_two_buckets_and_a_directory_with_the_same_keys_and_sha256(
    db: str, s3: S3Endpoint, two_buckets: tuple[str, str], tmp_path: Path, unique: str
) -> None:
    first, second = two_buckets
    primary = make_s3_block(s3, f"cp-a-{unique}", first, folder="dbops")
    eu = make_s3_block(s3, f"cp-b-{unique}", second, folder="eu")
    nas = make_local_block(f"cp-nas-{unique}", tmp_path / "nas")
    # the copy bucket's own settings: an infrequent-access class and SSE-S3
    eu_location = StorageLocation(block=eu, storage_class="STANDARD_IA", sse="AES256")

    report = nightly_dump(database=db, storage=[primary, eu_location, nas], prefix=PREFIX, globals=True)

    assert [(r.location, r.role, r.status) for r in report.locations] == [
        (primary, "primary", "written"),
        (eu, "copy", "copied"),
        (nas, "copy", "copied"),
    ]
    assert "server-side" in report.locations[1].detail  # same endpoint and account
    assert "streamed" in report.locations[2].detail  # S3 to a directory
    in_primary = backup_keys(bucket_keys(s3, first, "dbops"))
    in_eu = backup_keys(bucket_keys(s3, second, "eu"))
    in_nas = backup_keys(dir_keys(tmp_path / "nas"))
    assert in_primary == in_eu == in_nas
    assert {report.key, report.manifest_key} <= in_primary
    assert len(in_primary) == 3  # dump, globals, manifest

    client = s3.client()
    original = Manifest.from_json(
        client.get_object(Bucket=first, Key=f"dbops/{report.manifest_key}")["Body"].read()
    )
    copied = [
        Manifest.from_json(client.get_object(Bucket=second, Key=f"eu/{report.manifest_key}")["Body"].read()),
        Manifest.from_json((tmp_path / "nas" / report.manifest_key).read_bytes()),
    ]
    assert original.verified
    assert original.copy is None
    for manifest in copied:
        assert manifest.sha256 == original.sha256 == report.sha256
        assert manifest.dump_key == original.dump_key
        assert manifest.copy is not None
        assert manifest.copy.sha256_checked
    # the copy's manifest is written last there too
    eu_objects = bucket_keys(s3, second, "eu")
    assert eu_objects[report.manifest_key]["LastModified"] >= eu_objects[report.key]["LastModified"]
    head = client.head_object(Bucket=second, Key=f"eu/{report.key}")
    assert head.get("StorageClass") == "STANDARD_IA"
    assert head.get("ServerSideEncryption") == "AES256"
    assert client.head_object(Bucket=first, Key=f"dbops/{report.key}").get("StorageClass") in (
        None,
        "STANDARD",
    )


def test_unreachable_copy_location_fails_the_run_after_the_primary_backup_is_safe(
    db: str, s3: S3Endpoint, two_buckets: tuple[str, str], unique: str
) -> None:
    first, _ = two_buckets
    primary = make_s3_block(s3, f"cp-p-{unique}", first, folder="dbops")
    down = unreachable_s3_block(f"cp-down-{unique}")

    state = nightly_dump(
        database=db,
        storage=f"{primary}, {down}",
        prefix=PREFIX,
        retention=RetentionPolicy(keep_last=2),
        return_state=True,
    )

    assert state.is_failed()
    message = failure_message(state)
    manifests = [k for k in bucket_keys(s3, first, "dbops") if k.endswith(".manifest.json")]
    assert len(manifests) == 1
    manifest = Manifest.from_json(
        s3.client().get_object(Bucket=first, Key=f"dbops/{manifests[0]}")["Body"].read()
    )
    assert manifest.verified
    assert message.startswith(
        f"the backup is safe in s3://{first}/dbops/{manifest.dump_key}; copy to {down} failed: "
    )
    assert "cannot reach" in message or "could not connect" in message.lower(), message
    assert message.endswith("run `dbops backups sync` once it is fixed")
    assert "retrying" not in message  # the task's retries are over by the time this is said
    assert "\n" not in message
    # the report is still published: the primary's rows, then each location's
    rows = {row["item"]: row["value"] for row in artifact_table(f"nightly-dump-cp-{unique}")}
    assert rows["key"] == manifest.dump_key
    assert rows[f"primary {primary}"] == "written"
    assert rows[f"copy {down}"].startswith("failed: cannot reach the S3 endpoint")
    assert rows[f"retention {primary}"].startswith("keep 1 of 1")
    assert rows[f"retention {down}"].startswith("skipped")


def test_copy_bucket_missing_is_one_sentence_naming_it_and_the_primary_is_kept(
    db: str, s3: S3Endpoint, two_buckets: tuple[str, str], unique: str
) -> None:
    first, _ = two_buckets
    primary = make_s3_block(s3, f"cp-p2-{unique}", first)
    missing = f"no-such-bucket-{unique}"
    copy = make_s3_block(s3, f"cp-missing-{unique}", missing)

    state = nightly_dump(database=db, storage=[primary, copy], prefix=PREFIX, return_state=True)

    message = failure_message(state)
    assert message.startswith(f"the backup is safe in s3://{first}/{PREFIX}/"), message
    assert f"copy to {copy} failed: " in message
    assert missing in message
    assert "\n" not in message
    assert any(k.endswith(".manifest.json") for k in bucket_keys(s3, first))


@pytest.mark.parametrize("how", ["the same block twice", "two blocks on one bucket and folder"])
def test_one_place_named_twice_is_refused_before_anything_is_written(
    db: str, s3: S3Endpoint, two_buckets: tuple[str, str], unique: str, how: str
) -> None:
    first, _ = two_buckets
    primary = make_s3_block(s3, f"cp-same-{unique}", first, folder="dbops")
    other = (
        primary if how == "the same block twice" else make_s3_block(s3, f"cp-alias-{unique}", first, "dbops/")
    )

    state = nightly_dump(database=db, storage=[primary, other], prefix=PREFIX, return_state=True)

    message = failure_message(state)
    if how == "the same block twice":
        assert f"storage lists {primary} twice" in message
    else:
        assert f"storage blocks {primary} and {other} are the same place" in message
    assert bucket_keys(s3, first) == {}


def test_each_location_keeps_what_its_own_retention_says(
    db: str, s3: S3Endpoint, two_buckets: tuple[str, str], tmp_path: Path, unique: str
) -> None:
    first, _ = two_buckets
    primary = make_s3_block(s3, f"cp-r-{unique}", first)
    nas = make_local_block(f"cp-rnas-{unique}", tmp_path / "nas")
    storage: list[str | StorageLocation] = [
        primary,
        StorageLocation(block=nas, retention=RetentionPolicy(keep_last=1)),
    ]

    reports = [
        nightly_dump(database=db, storage=storage, prefix=PREFIX, retention=RetentionPolicy(keep_last=3))
        for _ in range(4)
    ]

    stems = [r.manifest_key.removesuffix(".manifest.json") for r in reports]
    in_primary = {
        k.removesuffix(".manifest.json") for k in bucket_keys(s3, first) if k.endswith(".manifest.json")
    }
    in_nas = {
        k.removesuffix(".manifest.json") for k in dir_keys(tmp_path / "nas") if k.endswith(".manifest.json")
    }
    assert in_primary == set(stems[1:])
    assert in_nas == {stems[-1]}
    last = reports[-1].locations
    assert last[0].retention.startswith("keep 3 of 4"), last[0].retention
    assert last[1].retention.startswith("keep 1 of 2"), last[1].retention
    assert last[1].deleted == [stems[-2]]


# -- WAL expiry across locations -----------------------------------------------------------------------------

SEG = 16 * 1024 * 1024
NOW = datetime(2026, 11, 29, 2, 0, tzinfo=UTC)


def base_manifest(start_seg: int, days_ago: int) -> BaseBackupManifest:
    ended = NOW - timedelta(days=days_ago)
    return BaseBackupManifest(
        database="app",
        server="db:5432",
        system_identifier="1",
        server_version="15.18",
        server_version_num=150018,
        pg_basebackup_version="15.18",
        label=f"dbops-app-{start_seg}",
        started_at=ended - timedelta(minutes=1),
        ended_at=ended,
        start_lsn=f"0/{start_seg:X}000028",
        stop_lsn=f"0/{start_seg:X}000100",
        start_wal=segment_name(1, start_seg, SEG),
        stop_wal=segment_name(1, start_seg, SEG),
        timeline=1,
        wal_segment_size=SEG,
        wal_included=False,
        wal_archived=True,
        tar_key=f"prod/app/base/2026/11/{29 - days_ago:02d}/app-{start_seg}.tar.zst",
        bytes=1,
        raw_bytes=1,
        sha256="0" * 64,
        verified=True,
        verification=BaseVerification(method="list"),
    )


def test_wal_a_copys_older_base_backup_needs_is_kept_and_an_unreadable_copy_blocks_expiry() -> None:
    new, old = base_manifest(9, days_ago=0), base_manifest(3, days_ago=20)
    primary = catalog_of(new)  # the primary keeps one base backup, the copy (off-site, longer) two
    copy = catalog_of(new, old)

    kept = kept_in_any_location(
        [LocationCatalog("local-file-system/a", primary), LocationCatalog("s3-bucket/b", copy)]
    )
    assert kept.blocked is None
    assert min(m.start_wal for m in kept.manifests) == old.start_wal
    assert len(kept.manifests) == 2  # one base backup in two places counts once

    # a dry run's would-be deletions in the copy are not kept there
    stem = old.tar_key.removesuffix(".tar.zst")
    dry = kept_in_any_location(
        [LocationCatalog("a", primary), LocationCatalog("b", copy, gone=frozenset({stem}))]
    )
    assert [m.start_wal for m in dry.manifests] == [new.start_wal]

    down = kept_in_any_location(
        [LocationCatalog("a", primary), LocationCatalog("s3-bucket/b", None, error="cannot reach S3 at x")]
    )
    assert down.manifests == []
    assert down.blocked is not None
    assert "s3-bucket/b" in down.blocked
    assert "cannot reach S3 at x" in down.blocked
    assert "nothing removed" in down.blocked

    torn = BaseCatalog([], [], unreadable=[("prod/app/base/x.manifest.json", "not JSON")])
    assert "cannot be trusted" in (
        kept_in_any_location([LocationCatalog("a", primary), LocationCatalog("b", torn)]).blocked or ""
    )


def test_base_backup_is_copied_and_wal_expiry_keeps_what_the_copys_longer_retention_keeps(
    s3: S3Endpoint, unique: str, tmp_path: Path
) -> None:
    from flows.base_backup import BaseBackupOptions, base_backup
    from tests.harness.basebackup import database_block

    bucket = s3.create_bucket(f"base-copy-{unique}")
    primary = make_local_block(f"bb-p-{unique}", tmp_path / "primary")
    copy = make_s3_block(s3, f"bb-c-{unique}", bucket)
    storage: list[str | StorageLocation] = [
        primary,
        StorageLocation(block=copy, retention=RetentionPolicy(keep_last=2)),
    ]
    with archiving_cluster() as (pg, archive):
        db = database_block(pg, f"bb-{unique}")
        location = ArchiveLocation(directory=str(archive))

        def run() -> Any:
            return base_backup(
                database=db,
                storage=storage,
                archive=location,
                retention=RetentionPolicy(keep_last=1),
                wal_keep_days=0,
                options=BaseBackupOptions(wal_timeout_seconds=20),
            )

        first = run()
        second = run()

        def segments() -> list[str]:
            return sorted(p.name for p in archive.iterdir() if len(p.name) == 24 and p.name.isalnum())

        left = segments()
    assert [r.status for r in second.locations] == ["written", "copied"]
    primary_store = LocalObjectStore(tmp_path / "primary")
    in_primary = {i.key for i in primary_store.list(base_prefix("", first.database))}
    in_copy = {o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket).get("Contents", [])}
    assert first.manifest_key not in in_primary  # the primary keeps one
    assert {first.manifest_key, first.key, second.manifest_key, second.key} <= in_copy  # the copy two
    # WAL expiry cut at the copy's older base backup, not at the primary's only one
    assert second.wal_expiry.startswith("deleted: removed") or second.wal_expiry.startswith("nothing"), (
        second.wal_expiry
    )
    assert first.start_wal in left
    assert all(name[8:] >= first.start_wal[8:] for name in left)
