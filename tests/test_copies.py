"""Copying one backup to another location: two buckets on the moto S3 server and a real directory.

Server-side within one endpoint and account, streamed otherwise; the main object's sha256 checked against
the manifest; the copy's manifest written last, never when anything failed; copying twice is a no-op.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config

from flows.core.base_catalog import read_base_catalog
from flows.core.catalog import read_catalog
from flows.core.copies import CopyMismatch, CopyRefused, backup_ref, copy_backup, present_and_verified
from flows.core.errors import ConfigurationError, ObjectExists, StorageError
from flows.core.localstore import LocalObjectStore
from flows.core.locations import StorageLocation
from flows.core.manifest import Manifest
from flows.core.objectstore import MiB, ObjectStore, PutResult
from flows.core.s3store import S3ObjectStore
from tests.conftest import make_database_block, make_local_block, make_s3_block
from tests.harness.copies import base_backup, dump_backup
from tests.harness.factories import DB, PREFIX, sample_database
from tests.harness.pg import PgCluster
from tests.harness.s3 import ACCESS_KEY, REGION, SECRET_KEY, S3Endpoint


def s3_store(
    s3: S3Endpoint, bucket: str, root: str = "dbops", *, access_key: str = ACCESS_KEY
) -> S3ObjectStore:
    client = boto3.client(
        "s3",
        endpoint_url=s3.url,
        aws_access_key_id=access_key,
        aws_secret_access_key=SECRET_KEY,
        region_name=REGION,
        config=Config(retries={"max_attempts": 2, "mode": "standard"}),
    )
    return S3ObjectStore(client, bucket, root)


def keys(store: ObjectStore) -> set[str]:
    return {info.key for info in store.list("")}


def without_leases(found: set[str]) -> set[str]:
    return {k for k in found if ".reading-" not in k}


@pytest.fixture
def primary(s3: S3Endpoint, bucket: str) -> S3ObjectStore:
    return s3_store(s3, bucket)


@pytest.fixture
def other_bucket(s3: S3Endpoint, unique: str) -> str:
    return s3.create_bucket(f"copies-{unique}")


def test_same_endpoint_and_account_is_copied_server_side_with_its_sha256_checked(
    s3: S3Endpoint, primary: S3ObjectStore, other_bucket: str
) -> None:
    key = dump_backup(primary)
    copy = s3_store(s3, other_bucket, "offsite")
    report = copy_backup(primary, copy, key, location="s3-bucket/eu")
    assert (report.method, report.skipped, report.location, report.kind) == (
        "server-side",
        False,
        "s3-bucket/eu",
        "dump",
    )
    assert keys(copy) == without_leases(keys(primary))  # same keys, the reader's lease stays behind
    there = Manifest.from_json(copy.get_bytes(key))
    source = Manifest.from_json(primary.get_bytes(key))
    assert hashlib.sha256(copy.get_bytes(there.dump_key)).hexdigest() == source.sha256
    assert there.copy is not None
    assert (there.copy.method, there.copy.sha256_checked, there.copy.source) == (
        "server-side",
        True,
        primary.url,
    )
    assert there.model_copy(update={"copy": None}) == source  # the primary's manifest, plus the record
    assert copy.get_bytes(there.globals_key or "") == primary.get_bytes(source.globals_key or "")


def test_another_account_on_the_same_endpoint_is_streamed(
    s3: S3Endpoint, primary: S3ObjectStore, other_bucket: str
) -> None:
    key = dump_backup(primary)
    copy = s3_store(s3, other_bucket, access_key="another-account-key")
    report = copy_backup(primary, copy, key)
    assert report.method == "streamed"
    assert keys(copy) == without_leases(keys(primary))


def test_s3_to_a_directory_and_a_directory_to_s3_are_streamed(
    s3: S3Endpoint, primary: S3ObjectStore, other_bucket: str, tmp_path: Path
) -> None:
    key = dump_backup(primary, b"x" * (3 * MiB + 17))
    nas = LocalObjectStore(tmp_path)
    to_nas = copy_backup(primary, nas, key)
    assert (to_nas.method, to_nas.bytes > 3 * MiB) == ("streamed", True)
    assert keys(nas) == without_leases(keys(primary))
    assert Manifest.from_json(nas.get_bytes(key)).copy is not None
    back = s3_store(s3, other_bucket)
    from_nas = copy_backup(nas, back, key)
    assert from_nas.method == "streamed"
    assert keys(back) == keys(nas)
    record = Manifest.from_json(back.get_bytes(key)).copy
    assert record is not None
    assert record.source == nas.url
    assert record.method == "streamed"


@pytest.mark.parametrize("same_account", [True, False], ids=["server-side", "streamed"])
def test_a_corrupted_primary_object_is_refused_and_leaves_nothing_in_the_copy(
    s3: S3Endpoint, primary: S3ObjectStore, other_bucket: str, same_account: bool
) -> None:
    key = dump_backup(primary, b"a" * 100_000)
    dump = Manifest.from_json(primary.get_bytes(key)).dump_key
    primary.put_bytes(dump, b"a" * 99_999 + b"b")  # same size, one byte different
    copy = s3_store(s3, other_bucket, access_key=ACCESS_KEY if same_account else "another-account-key")
    with pytest.raises(CopyMismatch, match=r"does not match its manifest \(sha256 .*not copied"):
        copy_backup(primary, copy, key)
    assert keys(copy) == set()
    assert s3.client().list_multipart_uploads(Bucket=other_bucket).get("Uploads", []) == []


def test_a_missing_copy_bucket_is_one_sentence_naming_it(s3: S3Endpoint, primary: S3ObjectStore) -> None:
    key = dump_backup(primary)
    copy = s3_store(s3, "no-such-bucket-for-copies")
    with pytest.raises(StorageError, match="S3 bucket 'no-such-bucket-for-copies' does not exist") as caught:
        copy_backup(primary, copy, key)
    assert "\n" not in str(caught.value)


def test_copying_twice_copies_nothing_the_second_time(
    s3: S3Endpoint, primary: S3ObjectStore, other_bucket: str, tmp_path: Path
) -> None:
    key = dump_backup(primary)
    for copy in (s3_store(s3, other_bucket), LocalObjectStore(tmp_path)):
        first = copy_backup(primary, copy, key)
        written = copy.head(key)
        second = copy_backup(primary, copy, key)
        assert (first.skipped, second.skipped, second.bytes) == (False, True, 0)
        assert copy.head(key) == written  # the manifest was not written again


def test_unverified_unreadable_or_absent_primary_manifests_are_refused(
    s3: S3Endpoint, primary: S3ObjectStore, other_bucket: str
) -> None:
    copy = s3_store(s3, other_bucket)
    key = dump_backup(primary, verified=False)
    with pytest.raises(CopyRefused, match="was not verified; only verified backups are copied"):
        copy_backup(primary, copy, key)
    primary.put_bytes(key, b"{not json")
    with pytest.raises(CopyRefused, match="is not a readable dbops manifest"):
        copy_backup(primary, copy, key)
    primary.delete([key])
    with pytest.raises(CopyRefused, match="does not exist, so there is no backup to copy"):
        copy_backup(primary, copy, key)
    with pytest.raises(ConfigurationError, match="is not the manifest of a dbops dump or base backup"):
        copy_backup(primary, copy, "prod/imagemanager/dumps/notes.txt")
    assert keys(copy) == set()


def test_a_primary_dump_of_another_size_than_its_manifest_is_refused_before_anything_is_written(
    s3: S3Endpoint, primary: S3ObjectStore, other_bucket: str
) -> None:
    key = dump_backup(primary)
    primary.put_bytes(Manifest.from_json(primary.get_bytes(key)).dump_key, b"short")
    copy = s3_store(s3, other_bucket)
    with pytest.raises(CopyRefused, match="is 5 bytes, not 11000 as its manifest says"):
        copy_backup(primary, copy, key)
    assert keys(copy) == set()


def test_another_manifest_already_in_the_copy_is_left_alone(
    s3: S3Endpoint, primary: S3ObjectStore, other_bucket: str
) -> None:
    key = dump_backup(primary)
    copy = s3_store(s3, other_bucket)
    dump_backup(copy, b"other bytes")  # the same name, other bytes
    before = copy.get_bytes(key)
    with pytest.raises(CopyRefused, match="already exists and describes other bytes"):
        copy_backup(primary, copy, key)
    assert copy.get_bytes(key) == before


def test_a_base_backup_is_copied_whole_and_read_by_the_base_catalog_there(
    primary: S3ObjectStore, tmp_path: Path
) -> None:
    key = base_backup(primary)
    assert backup_ref(key).kind == "base"
    nas = LocalObjectStore(tmp_path)
    report = copy_backup(primary, nas, key)
    assert (report.kind, report.method) == ("base", "streamed")
    assert keys(nas) == without_leases(keys(primary))
    catalog = read_base_catalog(nas, PREFIX, DB)
    assert catalog.unreadable == []
    assert [b.stem for b in catalog.backups] == [key.removesuffix(".manifest.json")]
    copied = catalog.backups[0].manifest
    assert copied.copy is not None
    assert present_and_verified(copied)


def test_a_copied_dump_is_a_backup_to_the_catalog_of_the_copy(primary: S3ObjectStore, tmp_path: Path) -> None:
    key = dump_backup(primary)
    nas = LocalObjectStore(tmp_path)
    copy_backup(primary, nas, key)
    catalog = read_catalog(nas, PREFIX, DB)
    newest = catalog.newest()
    assert newest is not None
    assert newest.stem == backup_ref(key).stem
    assert (catalog.orphans, catalog.unreadable, catalog.foreign) == ([], [], [])


def test_a_large_object_is_copied_server_side_in_parts_with_the_targets_storage_class(
    s3: S3Endpoint, primary: S3ObjectStore, other_bucket: str
) -> None:
    body = bytes(range(256)) * (44 * 1024 + 3)  # a little over 11 MiB: three 5 MiB parts
    primary.put_bytes("big/object", body)
    copy = s3_store(s3, other_bucket)
    copy.put_args = {"StorageClass": "STANDARD_IA"}
    result = copy.copy_from(primary, "big/object", len(body), multipart_threshold=MiB, part_size=5 * MiB)
    assert result.parts == 3
    assert copy.get_bytes("big/object") == body
    head: dict[str, Any] = s3.client().head_object(Bucket=other_bucket, Key="dbops/big/object")
    assert head.get("StorageClass") == "STANDARD_IA"


def test_the_primary_is_no_copy_of_itself(primary: S3ObjectStore) -> None:
    key = dump_backup(primary)
    with pytest.raises(ConfigurationError, match="is the primary itself"):
        copy_backup(primary, S3ObjectStore(primary.client, primary.bucket, "dbops/"), key)


@pytest.mark.usefixtures("prefect_api")
def test_a_real_nightly_dump_is_copied_by_the_task_to_a_directory_and_to_a_second_bucket(
    pg: PgCluster, s3: S3Endpoint, bucket: str, other_bucket: str, unique: str, tmp_path: Path
) -> None:
    from flows.nightly_dump import nightly_dump
    from flows.tasks.copies import copy_backup_to

    db = make_database_block(pg, f"db-{unique}", sample_database(pg, f"cp_{unique}", rows=2_000))
    primary = make_s3_block(s3, f"s3-{unique}", bucket, folder="dbops")
    dumped = nightly_dump(database=db, storage=primary, prefix="prod")
    nas = make_local_block(f"nas-{unique}", tmp_path / "nas")
    eu = make_s3_block(s3, f"eu-{unique}", other_bucket, folder="eu")
    to_nas = copy_backup_to(primary, nas, dumped.manifest_key)
    to_eu = copy_backup_to(
        primary, StorageLocation(block=eu, storage_class="STANDARD_IA"), dumped.manifest_key
    )
    assert (to_nas.location, to_nas.method, to_nas.skipped) == (nas, "streamed", False)
    assert (to_eu.location, to_eu.method, to_eu.skipped) == (eu, "server-side", False)
    source = s3_store(s3, bucket)
    ref = backup_ref(dumped.manifest_key)
    for store in (LocalObjectStore(tmp_path / "nas"), s3_store(s3, other_bucket, "eu")):
        assert keys(store) == without_leases(keys(source))
        newest = read_catalog(store, ref.prefix, ref.database).newest()
        assert newest is not None
        assert newest.stem == ref.stem
        assert hashlib.sha256(store.get_bytes(dumped.key)).hexdigest() == dumped.sha256
    head = s3.client().head_object(Bucket=other_bucket, Key=f"eu/{dumped.key}")
    assert head.get("StorageClass") == "STANDARD_IA"  # the copy location's own settings apply
    again = copy_backup_to(primary, nas, dumped.manifest_key)
    assert again.skipped


def test_a_copy_whose_dump_was_deleted_is_repaired_under_its_kept_manifest(
    primary: S3ObjectStore, tmp_path: Path
) -> None:
    key = dump_backup(primary)
    nas = LocalObjectStore(tmp_path)
    copy_backup(primary, nas, key)
    manifest_before = nas.get_bytes(key)
    dump = Manifest.from_json(manifest_before).dump_key
    nas.delete([dump])
    report = copy_backup(primary, nas, key)
    assert (report.repaired, report.skipped) == (True, False)
    assert nas.get_bytes(dump) == primary.get_bytes(dump)
    assert nas.get_bytes(key) == manifest_before


def test_a_copy_that_fails_half_way_leaves_no_manifest_and_removes_what_it_wrote(
    primary: S3ObjectStore, tmp_path: Path
) -> None:
    key = dump_backup(primary)
    source = Manifest.from_json(primary.get_bytes(key))
    assert source.globals_key is not None
    (tmp_path / source.globals_key).mkdir(parents=True)  # a directory where the roles file must go
    nas = LocalObjectStore(tmp_path)
    with pytest.raises(OSError, match="Is a directory"):
        copy_backup(primary, nas, key)
    assert nas.head(key) is None
    assert nas.head(source.dump_key) is None  # written first, removed again
    assert [info.key for info in nas.list("")] == []


class Watching(LocalObjectStore):
    """A real directory store that notes, at each write, which read leases the primary holds."""

    def __init__(self, root: Path, primary: ObjectStore) -> None:
        super().__init__(root)
        self.primary = primary
        self.leases_seen: list[set[str]] = []

    def put_stream(self, key: str, chunks: Iterable[bytes], **kwargs: Any) -> PutResult:
        self.leases_seen.append({i.key for i in self.primary.list("") if ".reading-" in i.key})
        return super().put_stream(key, chunks, **kwargs)


def test_the_primary_backup_carries_a_read_lease_while_it_is_copied_and_none_after(
    primary: S3ObjectStore, tmp_path: Path
) -> None:
    key = dump_backup(primary)
    before = {i.key for i in primary.list("") if ".reading-" in i.key}  # the fixture's own reader
    nas = Watching(tmp_path, primary)
    copy_backup(primary, nas, key, reader="copy-run-7")
    mine = key.removesuffix(".manifest.json") + ".reading-copy-run-7.json"
    assert nas.leases_seen
    assert all(seen == before | {mine} for seen in nas.leases_seen)  # every object copied under the lease
    assert {i.key for i in primary.list("") if ".reading-" in i.key} == before  # released
    assert mine not in keys(nas)


def test_a_server_side_copy_that_must_not_replace_refuses_a_taken_key(
    s3: S3Endpoint, primary: S3ObjectStore, other_bucket: str
) -> None:
    primary.put_bytes("one/object", b"new bytes")
    copy = s3_store(s3, other_bucket)
    assert copy.copy_from(primary, "one/object", 9, if_absent=True).parts == 1
    assert copy.get_bytes("one/object") == b"new bytes"
    primary.put_bytes("one/object", b"other bytes")
    with pytest.raises(ObjectExists, match="already exists"):
        copy.copy_from(primary, "one/object", 11, if_absent=True)
    assert copy.get_bytes("one/object") == b"new bytes"
    assert s3.client().list_multipart_uploads(Bucket=other_bucket).get("Uploads", []) == []
