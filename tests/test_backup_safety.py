"""Safety of the backup store (issue 10): unique keys, foreign objects, unreadable manifests, confined
paths, leftovers and read leases. Core level against the moto S3 server over HTTP and a real directory;
no Prefect."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from flows.core.catalog import Catalog, read_catalog
from flows.core.compression import Compression
from flows.core.dump import stream_dump
from flows.core.errors import ConfigurationError, ObjectExists, StorageError
from flows.core.expiry import carry_out, plan_cleanup
from flows.core.layout import (
    backup_stem,
    check_location,
    dump_key,
    dumps_prefix,
    globals_key,
    lease_key,
    manifest_key,
    parse_key,
)
from flows.core.leases import BackupGone, Lease, take_lease
from flows.core.listing import list_backups
from flows.core.localstore import LocalObjectStore
from flows.core.objectstore import MiB, ObjectInfo, ObjectStore
from flows.core.pgtools import find_tool
from flows.core.restore_choice import Selector, select_backup
from flows.core.retention import BackupRecord, RetentionPlan, RetentionPolicy, plan_retention
from flows.core.s3store import S3ObjectStore
from tests.harness.factories import DB, NOW, PREFIX, conn_params, manifest_for, sample_database, write_backup
from tests.harness.pg import PgCluster
from tests.harness.s3 import S3Endpoint


def keys(store: ObjectStore) -> set[str]:
    return {o.key for o in store.list("")}


def plan(catalog: Catalog, policy: RetentionPolicy, now: datetime = NOW) -> RetentionPlan:
    records = [BackupRecord(b.stem, b.manifest.ended_at, b.manifest.verified) for b in catalog.backups]
    return plan_retention(records, policy, now)


def expire(store: ObjectStore, policy: RetentionPolicy, now: datetime = NOW):
    catalog = read_catalog(store, PREFIX, DB)
    cleanup = plan_cleanup(store, catalog, plan(catalog, policy, now), now, PREFIX, DB)
    return catalog, carry_out(store, cleanup, PREFIX, DB)


@pytest.fixture
def s3_store(s3: S3Endpoint, bucket: str) -> S3ObjectStore:
    return S3ObjectStore(s3.client(), bucket, "dbops")


@pytest.fixture(params=["s3", "local"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "local":
        return LocalObjectStore(tmp_path)
    return request.getfixturevalue("s3_store")


# -- item 3: two writers never share a key -----------------------------------------------------------------


def test_conditional_put_refuses_a_taken_key_and_keeps_the_first_object(store: ObjectStore) -> None:
    store.put_bytes("a/k", b"first", if_absent=True)
    with pytest.raises(ObjectExists, match="already exists"):
        store.put_bytes("a/k", b"second", if_absent=True)
    with pytest.raises(ObjectExists, match="nothing was replaced"):
        store.put_stream("a/k", iter([b"x" * MiB] * 6), part_size=5 * MiB, if_absent=True)
    assert store.get_bytes("a/k") == b"first"
    if isinstance(store, S3ObjectStore):
        assert store.list_incomplete_uploads() == []  # the loser's multipart upload was aborted


def test_two_dumps_racing_for_one_stem_one_wins_the_other_fails_and_nothing_is_overwritten(
    store: ObjectStore,
) -> None:
    """Both writers passed the "is it free?" check and stream at once; the first to finish owns the key.

    The completes are ordered (B's last part waits until A's upload returned): moto checks If-None-Match
    without a lock, so two completes in the same millisecond both pass there (AWS S3 answers the second
    with 409 ConditionalRequestConflict, mapped to ObjectExists too).
    """
    key = dump_key(backup_stem(PREFIX, DB, NOW), ".zst")
    both_streaming = threading.Barrier(2)
    first_done = threading.Event()
    outcome: dict[str, BaseException | None] = {}

    def body(tag: bytes) -> Iterator[bytes]:
        both_streaming.wait(timeout=30)  # both uploads are open before either finishes
        for _ in range(6):
            yield tag * MiB
        if tag == b"B":
            assert first_done.wait(timeout=60)

    def write(tag: bytes) -> None:
        try:
            store.put_stream(key, body(tag), part_size=5 * MiB, if_absent=True)
            outcome[tag.decode()] = None
        except BaseException as exc:
            outcome[tag.decode()] = exc
        finally:
            if tag == b"A":
                first_done.set()

    threads = [threading.Thread(target=write, args=(tag,)) for tag in (b"A", b"B")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert outcome["A"] is None
    assert isinstance(outcome["B"], ObjectExists), outcome
    assert store.get_bytes(key) == b"A" * (6 * MiB)
    assert keys(store) == {key}  # no partial file, and (S3) no completed second object
    if isinstance(store, S3ObjectStore):
        assert store.list_incomplete_uploads() == []


def test_storage_that_ignores_conditional_writes_is_refused_before_a_dump(
    s3: S3Endpoint, bucket: str
) -> None:
    class IgnoresConditions(S3ObjectStore):
        """An S3-compatible store without If-None-Match support, as some older ones are."""

        def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
            super().put_bytes(key, data)

    S3ObjectStore(s3.client(), bucket).check_writable("prod")
    with pytest.raises(StorageError, match="ignores conditional writes"):
        IgnoresConditions(s3.client(), bucket).check_writable("prod")
    assert keys(S3ObjectStore(s3.client(), bucket)) == set()


# -- item 5: foreign objects are never deleted -------------------------------------------------------------


def test_retention_deletes_expired_backups_and_leaves_every_foreign_object_alone(store: ObjectStore) -> None:
    expired = [write_backup(store, days, globals_file=True) for days in (40, 41)]
    kept = [write_backup(store, days) for days in (1, 2)]
    folder = dumps_prefix(PREFIX, DB)
    other_stem = f"{folder}2026/01/01/otherdb-20260101T020000Z"
    old = NOW - timedelta(days=50)
    old_stem = backup_stem(PREFIX, DB, old)
    misdated = f"{folder}2020/01/02/{DB}-20200101T020000Z.dump.zst"
    foreign = {
        f"{folder}keep-forever/x.dump": b"a person's copy",
        f"{folder}keep-forever/2020/01/01/{DB}-20200101T020000Z.dump.zst": b"nested copy",
        dump_key(other_stem, ".zst"): b"another database",
        manifest_key(other_stem): manifest_for(other_stem, old, database="otherdb").to_json(),
        misdated: b"folder and timestamp disagree",
        # a manifest of this database whose dump key points at another backup's object
        manifest_key(old_stem): manifest_for(old_stem, old, dump=dump_key(expired[0], ".zst")).to_json(),
        dump_key(old_stem, ".zst"): b"the dump beside it",
        old_stem + ".notes.txt": b"a note",
    }
    for key, data in foreign.items():
        store.put_bytes(key, data)

    catalog, done = expire(store, RetentionPolicy(max_age_days=7))

    assert set(done.expired) == set(expired)
    remaining = keys(store)
    assert set(foreign) <= remaining
    assert all(not k.startswith(tuple(expired)) for k in remaining)
    assert {manifest_key(s) for s in kept} <= remaining
    reported = {key for key, _ in catalog.foreign}
    assert reported >= set(foreign) - {dump_key(old_stem, ".zst")}  # its dump stays with its manifest
    assert "names dump key" in dict(catalog.foreign)[manifest_key(old_stem)]


def test_only_exact_layout_keys_of_this_database_parse() -> None:
    folder = dumps_prefix(PREFIX, DB)
    assert parse_key(f"{folder}2026/03/01/{DB}-20260301T020000Z.dump.zst", PREFIX, DB) is not None
    assert parse_key(f"{folder}2026/03/01/{DB}-20260301T020000Z.reading-abc-12.json", PREFIX, DB)
    for key in [
        f"{folder}2026/03/01/{DB}-20260301T020000Z.dump.bak",
        f"{folder}2026/03/02/{DB}-20260301T020000Z.dump",
        f"{folder}x/2026/03/01/{DB}-20260301T020000Z.dump",
        f"{folder}2026/03/01/other-20260301T020000Z.dump",
        f"{folder}2026/03/01/x/{DB}-20260301T020000Z.dump",
        f"other/{DB}/dumps/2026/03/01/{DB}-20260301T020000Z.dump",
    ]:
        assert parse_key(key, PREFIX, DB) is None, key


# -- item 6: one unreadable manifest never stops the others ------------------------------------------------


def test_naive_timestamp_manifest_is_unreadable_reported_and_left_alone_while_the_rest_works(
    s3_store: S3ObjectStore,
) -> None:
    store = s3_store
    good = [write_backup(store, days) for days in (1, 30, 31)]
    naive_stem = write_backup(store, 60, naive=True)

    catalog = read_catalog(store, PREFIX, DB)
    assert [b.stem for b in catalog.backups] == good
    assert [key for key, _ in catalog.unreadable] == [manifest_key(naive_stem)]
    assert "timezone" in catalog.unreadable[0][1].lower()
    assert select_backup(catalog, Selector("latest"), DB).stem == good[0]
    assert select_backup(catalog, Selector("before", before=NOW - timedelta(days=29)), DB).stem == good[1]

    listing = list_backups(store, PREFIX, DB)
    assert [r["key"] for r in listing.rows] == [dump_key(s, ".zst") for s in good]
    assert listing.left_alone[0]["key"] == manifest_key(naive_stem)

    _, done = expire(store, RetentionPolicy(max_age_days=7))
    assert set(done.expired) == set(good[1:])
    assert {manifest_key(naive_stem), dump_key(naive_stem, ".zst")} <= keys(store)
    assert done.unreadable == catalog.unreadable


class VanishingStore(S3ObjectStore):
    """A real S3 store where another actor deletes some objects right after the listing ended."""

    vanish: list[str]

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        yield from super().list(prefix)
        self.delete(self.vanish)


def test_an_object_deleted_between_listing_and_reading_is_skipped(s3: S3Endpoint, bucket: str) -> None:
    store = VanishingStore(s3.client(), bucket, "dbops")
    stems = [write_backup(store, days) for days in (1, 2, 3)]
    store.put_bytes(stems[0] + ".drill.json", b"{}")
    store.vanish = [manifest_key(stems[1]), stems[0] + ".drill.json"]

    catalog = read_catalog(store, PREFIX, DB)
    assert [b.stem for b in catalog.backups] == [stems[0], stems[2]]
    assert catalog.vanished == [manifest_key(stems[1])]
    assert not catalog.unreadable

    store.vanish = [stems[0] + ".drill.json"]
    store.put_bytes(stems[0] + ".drill.json", b"{}")
    listing = list_backups(store, PREFIX, DB)
    assert listing.rows[0]["drilled"] == "never"


# -- item 8: nothing outside the root ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "database", "words"),
    [
        ("../outside", DB, "'..' segment"),
        ("prod/../../x", DB, "'..' segment"),
        ("/abs", DB, "absolute"),
        ("a//b", DB, "empty segment"),
        ("a\\..\\b", DB, "backslash"),
        ("prod", "..", "'..' segment"),
        ("prod", "", "empty segment"),
        ("prod", "a/b", "slash"),
    ],
)
def test_prefix_and_database_names_that_leave_the_layout_are_refused(
    prefix: str, database: str, words: str
) -> None:
    with pytest.raises(ConfigurationError, match=words):
        check_location(prefix, database)


def test_local_store_never_lists_or_writes_outside_its_directory(tmp_path: Path) -> None:
    root = tmp_path / "store"
    root.mkdir()
    outside = tmp_path / "outside" / DB / "dumps" / "2020" / "01" / "01"
    outside.mkdir(parents=True)
    (outside / f"{DB}-20200101T020000Z.dump.zst").write_bytes(b"not yours")
    store = LocalObjectStore(root)
    with pytest.raises(StorageError, match="escapes"):
        list(store.list("../outside/"))
    with pytest.raises(StorageError, match="escapes"):
        store.incomplete_writes("../outside/")
    with pytest.raises(ConfigurationError, match=r"'\.\.' segment"):
        read_catalog(store, "../outside", DB)
    with pytest.raises(ConfigurationError, match=r"'\.\.' segment"):
        read_catalog(store, "", "..")
    assert list(root.iterdir()) == []
    assert (outside / f"{DB}-20200101T020000Z.dump.zst").read_bytes() == b"not yours"


# -- item 9: leftovers and leases --------------------------------------------------------------------------


def test_incomplete_multipart_uploads_older_than_a_day_are_aborted(s3_store: S3ObjectStore) -> None:
    """moto reports every upload as initiated in 2010, so the key's own timestamp (when the dump started)
    is what tells the running upload from the dead one here; both must be older than a day."""
    store = s3_store
    write_backup(store, 1)
    stale = dump_key(backup_stem(PREFIX, DB, NOW - timedelta(days=3)), ".zst")
    running = dump_key(backup_stem(PREFIX, DB, NOW - timedelta(minutes=5)), ".zst")
    theirs = f"{dumps_prefix(PREFIX, DB)}keep-forever/big.dump"
    for key in (stale, running, theirs):
        store.client.create_multipart_upload(Bucket=store.bucket, Key=store.bucket_key(key))

    catalog = read_catalog(store, PREFIX, DB)
    cleanup = plan_cleanup(store, catalog, plan(catalog, RetentionPolicy(keep_last=1)), NOW, PREFIX, DB)
    assert [w.key for w in cleanup.incomplete] == [stale]
    carry_out(store, cleanup, PREFIX, DB)
    assert sorted(store.list_incomplete_uploads()) == sorted([running, theirs])


def test_partial_files_older_than_a_day_are_removed_from_local_storage(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path)
    write_backup(store, 1)
    partials = []
    for days in (3, 2):
        stem = backup_stem(PREFIX, DB, NOW - timedelta(days=days))
        path = tmp_path / f"{stem}.dump.zst"
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial-0a1b2c3d")
        partial.write_bytes(b"half")
        partials.append(partial)
    old, fresh = partials
    past = (NOW - timedelta(days=2)).timestamp()
    os.utime(old, (past, past))  # the other one is still being written (just modified)

    _, done = expire(store, RetentionPolicy(keep_last=1))
    assert [w.handle for w in done.incomplete] == [str(old.relative_to(tmp_path))]
    assert not old.exists()
    assert fresh.exists()


def test_drill_records_and_roles_files_of_a_deleted_backup_are_collected(store: ObjectStore) -> None:
    kept = write_backup(store, 1)
    gone = backup_stem(PREFIX, DB, NOW - timedelta(days=5))
    store.put_bytes(gone + ".drill.json", b"{}")
    store.put_bytes(globals_key(gone), b"roles")
    store.put_bytes(kept + ".drill.json", b"{}")

    _, done = expire(store, RetentionPolicy(keep_last=1))
    assert list(done.leftovers) == [gone]
    assert keys(store) == {dump_key(kept, ".zst"), manifest_key(kept), kept + ".drill.json"}


def test_a_backup_under_an_unexpired_lease_is_kept_and_reported_in_use(store: ObjectStore) -> None:
    write_backup(store, 1)
    leased = write_backup(store, 30)
    expired_lease = write_backup(store, 31)
    lease = take_lease(store, leased, "run-1", "restore drill", timedelta(hours=2), now=NOW)
    old_lease = take_lease(
        store, expired_lease, "run-0", "restore", timedelta(hours=2), now=NOW - timedelta(days=1)
    )

    catalog, done = expire(store, RetentionPolicy(max_age_days=7))
    assert "restore drill run run-1" in done.in_use[leased]
    assert list(done.expired) == [expired_lease]
    remaining = keys(store)
    assert {manifest_key(leased), dump_key(leased, ".zst"), lease} <= remaining
    assert old_lease not in remaining
    assert manifest_key(expired_lease) not in remaining
    assert all(parse_key(k, PREFIX, DB) is not None for k in remaining)
    assert not catalog.foreign  # a lease is neither a backup nor a foreign object
    assert [b.stem for b in catalog.backups].count(leased) == 1


def test_a_lease_taken_after_retention_listed_keeps_the_dump_it_reads(store: ObjectStore) -> None:
    """The race: retention listed (no lease yet), a restore leases and starts, retention deletes."""
    write_backup(store, 1)
    doomed = write_backup(store, 30)
    catalog = read_catalog(store, PREFIX, DB)
    cleanup = plan_cleanup(store, catalog, plan(catalog, RetentionPolicy(max_age_days=7)), NOW, PREFIX, DB)
    assert list(cleanup.expired) == [doomed]

    lease = take_lease(store, doomed, "late-reader", "restore", timedelta(hours=2))
    done = carry_out(store, cleanup, PREFIX, DB)
    assert done.kept_after_recheck == [doomed]
    assert {dump_key(doomed, ".zst"), lease} <= keys(store)


def test_a_reader_whose_backup_was_deleted_after_choosing_it_stops_with_one_sentence(
    store: ObjectStore,
) -> None:
    stem = write_backup(store, 30)
    store.delete([manifest_key(stem)])
    with pytest.raises(BackupGone, match=r"was deleted .* run again"):
        take_lease(store, stem, "r", "restore", timedelta(hours=1))
    assert keys(store) == {dump_key(stem, ".zst")}  # the lease was removed again


def test_lease_key_is_layout_and_its_expiry_is_timezone_aware(store: ObjectStore) -> None:
    stem = write_backup(store, 1)
    key = take_lease(store, stem, "a/b c", "restore", timedelta(hours=1))
    assert key == lease_key(stem, "a/b c")
    parsed = parse_key(key, PREFIX, DB)
    assert parsed is not None
    assert parsed.kind == "lease"
    lease = Lease.from_json(store.get_bytes(key))
    assert lease.expires_at.tzinfo is not None
    assert lease.expires_at - lease.taken_at == timedelta(hours=1)


def test_a_second_pg_dump_into_a_taken_key_is_discarded_and_the_first_stays(
    pg: PgCluster, s3_store: S3ObjectStore, unique: str
) -> None:
    """The dump path asks for the conditional create: what upload_dump turns into a retry on a new name."""
    name = sample_database(pg, f"race_{unique}", rows=500)
    version = int(pg.sql("SHOW server_version_num")[0][0])
    conn = conn_params(pg, name)
    key = dump_key(backup_stem(PREFIX, name, NOW), ".zst")
    tool = find_tool("pg_dump", version)
    first = stream_dump(conn, s3_store, key, tool=tool, compression=Compression.zstd, level=3, if_absent=True)
    with pytest.raises(ObjectExists, match="nothing was replaced"):
        stream_dump(conn, s3_store, key, tool=tool, compression=Compression.zstd, level=1, if_absent=True)
    assert hashlib.sha256(s3_store.get_bytes(key)).hexdigest() == first.sha256
    assert s3_store.list_incomplete_uploads() == []
    assert keys(s3_store) == {key}
