"""Storage lists: the primary and its copies, refused when two names are one place."""

from __future__ import annotations

from pathlib import Path

import pytest

from blocks.storage import load_locations
from flows.core.errors import ConfigurationError
from flows.core.localstore import LocalObjectStore
from flows.core.locations import StorageList, StorageLocation, check_distinct, parse_locations
from flows.core.retention import RetentionPolicy
from tests.conftest import make_s3_block
from tests.harness.s3 import S3Endpoint


def test_a_comma_separated_string_is_the_primary_then_the_copies() -> None:
    locations = parse_locations(" s3-bucket/a , local-file-system/nas ")
    assert [loc.block for loc in locations] == ["s3-bucket/a", "local-file-system/nas"]


def test_list_items_may_carry_their_own_settings() -> None:
    locations = parse_locations(
        [
            "s3-bucket/a",
            StorageLocation(block="s3-bucket/eu", retention=RetentionPolicy(keep_monthly=12), sse="AES256"),
        ]
    )
    assert locations[0].retention is None
    assert locations[1].retention == RetentionPolicy(keep_monthly=12)
    assert locations[1].put_args() == {"ServerSideEncryption": "AES256"}


@pytest.mark.parametrize(
    ("storage", "says"),
    [
        ("", "storage is empty"),
        ([], "storage is empty"),
        ("s3-bucket/a,s3-bucket/a", "lists s3-bucket/a twice"),
        ("backups", "not a block slug"),
        ("gcs-bucket/x", "not a supported block type"),
    ],
)
def test_bad_storage_lists_are_refused_with_a_sentence(storage: StorageList, says: str) -> None:
    with pytest.raises(ConfigurationError, match=says):
        parse_locations(storage)


def test_s3_settings_on_a_directory_or_a_key_without_kms_are_refused() -> None:
    with pytest.raises(ValueError, match="S3 only"):
        StorageLocation(block="local-file-system/nas", storage_class="STANDARD_IA")
    with pytest.raises(ValueError, match="needs sse=aws:kms"):
        StorageLocation(block="s3-bucket/a", sse_kms_key_id="k")


def test_same_or_nested_places_under_two_names_are_refused() -> None:
    check_distinct([("s3-bucket/a", "s3://h:1/b/x"), ("s3-bucket/b", "s3://h:1/b/xy")])  # siblings are fine
    check_distinct([("s3-bucket/a", "s3://h:1/b/x"), ("s3-bucket/b", "s3://h:2/b/x")])  # other endpoint
    with pytest.raises(ConfigurationError, match="same place"):
        check_distinct([("s3-bucket/a", "s3://h:1/b/x"), ("s3-bucket/b", "s3://h:1/b/x/")])
    with pytest.raises(ConfigurationError, match="is inside"):
        check_distinct([("s3-bucket/a", "s3://h:1/b"), ("s3-bucket/b", "s3://h:1/b/copy")])


def test_a_directory_reached_through_a_symlink_is_the_same_place(tmp_path: Path) -> None:
    real = tmp_path / "nas"
    real.mkdir()
    (tmp_path / "alias").symlink_to(real)
    a, b = LocalObjectStore(real), LocalObjectStore(tmp_path / "alias")
    with pytest.raises(ConfigurationError, match="same place"):
        check_distinct([("local-file-system/a", a.identity), ("local-file-system/b", b.identity)])


def test_load_locations_compares_blocks_by_what_they_point_at(prefect_api: object, tmp_path: Path) -> None:
    from prefect.filesystems import LocalFileSystem

    (tmp_path / "one").mkdir()
    LocalFileSystem(basepath=str(tmp_path / "one")).save("loc-one", overwrite=True)
    LocalFileSystem(basepath=str(tmp_path / "one" / ".")).save("loc-two", overwrite=True)
    with pytest.raises(ConfigurationError, match="same place"):
        load_locations(["local-file-system/loc-one", "local-file-system/loc-two"])
    (tmp_path / "other").mkdir()
    LocalFileSystem(basepath=str(tmp_path / "other")).save("loc-three", overwrite=True)
    opened = load_locations("local-file-system/loc-three,local-file-system/loc-one")
    assert [loc.slug for loc in opened] == ["local-file-system/loc-three", "local-file-system/loc-one"]


def test_two_s3_blocks_on_one_bucket_and_folder_are_one_place(
    s3: S3Endpoint, bucket: str, unique: str
) -> None:
    one = make_s3_block(s3, f"one-{unique}", bucket, "backups")
    two = make_s3_block(s3, f"two-{unique}", bucket, "backups/")
    with pytest.raises(ConfigurationError, match="same place"):
        load_locations([one, two])
    other = make_s3_block(s3, f"three-{unique}", bucket, "backups-eu")
    opened = load_locations([one, StorageLocation(block=other, storage_class="STANDARD_IA")])
    assert opened[1].store.identity.endswith(f"/{bucket}/backups-eu")
