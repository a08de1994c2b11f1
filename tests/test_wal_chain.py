"""The chain of base backups and WAL: expiry, the recoverable window, and the WAL check's full window.

One real cluster archives every segment twice, with a real archive_command: `cp %p DIR/%f` (the seed's
directory archive) and `curl -T %p` into the moto S3 server. Two real base backups (pg_basebackup -Ft -D -)
are filed with their manifests per flows/core/base_layout.py. Each test works on its own copy of the
archive (a directory copy keeping mtimes, or a server-side S3 copy), so tests never see each other's
deletions. Faults are real: a WAL file vanishing between readdir and stat, the S3 server killed mid-listing,
a deleted segment.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import boto3
import pytest
from botocore.config import Config

from deployments.cli import main
from flows.core.base_catalog import read_base_catalog
from flows.core.base_layout import BaseBackupManifest
from flows.core.chain import NotRecoverable, pick_base_backup, recoverable_window
from flows.core.localstore import LocalObjectStore
from flows.core.objectstore import ObjectInfo
from flows.core.s3store import S3ObjectStore
from flows.core.wal import parse_wal_name
from flows.core.wal_archive import ArchiveLocation, WalArchive
from flows.core.wal_expiry import WalExpiryReport, expire_directory, expire_store, plan_expiry
from flows.restore import list_backups
from flows.tasks.wal_expiry import expire_wal
from flows.wal_archive_check import CheckOptions, wal_archive_check
from tests.conftest import make_local_block, make_s3_block
from tests.harness.basebackup import (
    SMALL_SEGMENTS,
    database_block,
    server_owned,
    switch_and_wait_archived,
    take_base_backup,
)
from tests.harness.pg import PgCluster, pg_cluster
from tests.harness.runs import failure_message
from tests.harness.s3 import ACCESS_KEY, REGION, SECRET_KEY, S3Endpoint, s3_endpoint

pytestmark = pytest.mark.usefixtures("prefect_api")

DB = "postgres"  # base backups are filed under the block's database name
PREFIX = "prod"
SIZE = 1024 * 1024


@dataclass
class Chain:
    cluster: PgCluster
    archive: Path  # the directory archive_command copies to (never modified by tests)
    bucket: str  # the S3 archive: keys wal/<segment>
    backups: Path  # a local store holding the two base backups under prod/postgres/base/
    b1: BaseBackupManifest
    b2: BaseBackupManifest


@pytest.fixture(scope="module")
def chain(s3: S3Endpoint) -> Iterator[Chain]:
    tmp = Path(tempfile.mkdtemp(prefix="dbops-chain-"))
    os.chmod(tmp, 0o755)
    archive = server_owned(tmp / "wal_archive")
    bucket = s3.create_bucket(f"chain-{os.getpid()}-{int(time.time())}")
    command = f"cp %p {archive}/%f && curl -sf -T %p {s3.url}/{bucket}/wal/%f"
    conf = {"wal_level": "replica", "archive_mode": "on", "archive_command": f"'{command}'"}
    backups = tmp / "backups"
    backups.mkdir()
    store = LocalObjectStore(backups)
    try:
        with pg_cluster(conf, base_dir=tmp, initdb_args=SMALL_SEGMENTS) as cluster:
            switch_and_wait_archived(cluster, 3)
            b1 = take_base_backup(cluster, store, PREFIX, DB, archive)
            switch_and_wait_archived(cluster, 3)
            b2 = take_base_backup(cluster, store, PREFIX, DB, archive)
            switch_and_wait_archived(cluster, 3)
            yield Chain(cluster, archive, bucket, backups, b1, b2)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def segno(name: str) -> int:
    return parse_wal_name(name, SIZE).segno


def segments(directory: Path) -> list[str]:
    """WAL segment files (24 hex digits), oldest first."""
    return sorted(p.name for p in directory.iterdir() if len(p.name) == 24 and p.name.isalnum())


def copy_archive(chain: Chain, tmp_path: Path, age_days: float = 10) -> Path:
    """A private copy of the directory archive, every file `age_days` old (0: keep the real mtimes)."""
    copy = tmp_path / "archive"
    shutil.copytree(chain.archive, copy)
    if age_days:
        old = time.time() - age_days * 86400
        for path in copy.iterdir():
            os.utime(path, (old, old))
    return copy


def expire_copy(copy: Path, kept: list[BaseBackupManifest], *, dry_run: bool = False) -> WalExpiryReport:
    """WAL expiry on a private copy of the directory archive, with the 2-day minimum age and no maximum."""
    return expire_wal(
        archive=ArchiveLocation(directory=str(copy)),
        kept=kept,
        wal_keep_days=2,
        wal_max_age_days=None,
        dry_run=dry_run,
    )


def make_young(path: Path) -> None:
    now = time.time()
    os.utime(path, (now, now))


def utc(ts: float) -> str:
    return f"{datetime.fromtimestamp(ts, UTC):%Y-%m-%d %H:%M:%S}Z"


def t(when: datetime) -> str:
    return f"{when.astimezone(UTC):%Y-%m-%d %H:%M:%S}Z"


# -- WAL expiry on the directory archive (pg_archivecleanup) ------------------------------------------------


def test_expiry_removes_exactly_the_wal_older_than_the_oldest_kept_base_backup(
    chain: Chain, tmp_path: Path
) -> None:
    copy = copy_archive(chain, tmp_path)
    (copy / "00000002.history").write_text("1\t0/9000000\tno recovery target specified\n")
    before = sorted(p.name for p in copy.iterdir())
    cut = chain.b2.start_wal  # retention kept only the newer base backup
    expected_gone = [s for s in segments(copy) if segno(s) < segno(cut)]
    assert chain.b1.start_wal in expected_gone
    assert len(expected_gone) >= 6

    report = expire_copy(copy, [chain.b2])

    assert report.status == "deleted", report.reason
    assert report.method == "pg_archivecleanup", report.reason
    assert report.cut == cut
    assert report.oldest_kept_start == cut
    assert report.deleted == report.count == len(expected_gone)
    assert (report.first, report.last) == (expected_gone[0], expected_gone[-1])
    after = sorted(p.name for p in copy.iterdir())
    assert sorted(set(before) - set(after)) == expected_gone
    # everything the kept base backup needs is still there, each by name, and the history and .backup files
    for name in segments(chain.archive):
        if segno(name) >= segno(cut):
            assert name in after, name
    assert "00000002.history" in after
    assert any(n.endswith(".backup") for n in after)
    assert chain.b2.stop_wal in after


def test_dry_run_returns_the_plan_and_deletes_nothing(chain: Chain, tmp_path: Path) -> None:
    copy = copy_archive(chain, tmp_path)
    before = {p.name: p.stat().st_size for p in copy.iterdir()}
    expected = [s for s in segments(copy) if segno(s) < segno(chain.b1.start_wal)]

    report = expire_copy(copy, [chain.b1, chain.b2], dry_run=True)

    assert report.status == "planned"
    assert report.dry_run
    assert report.deleted == 0
    assert report.cut == chain.b1.start_wal
    assert report.count == len(expected)
    assert (report.first, report.last) == (expected[0], expected[-1])
    assert report.bytes == sum(before[n] for n in expected)
    assert "older than" in report.reason
    assert {p.name: p.stat().st_size for p in copy.iterdir()} == before


def test_wal_keep_days_keeps_segments_younger_than_the_minimum_age(chain: Chain, tmp_path: Path) -> None:
    """A young segment below the base-backup cut moves the cut back to it (the older of the two)."""
    copy = copy_archive(chain, tmp_path)
    below = [s for s in segments(copy) if segno(s) < segno(chain.b2.start_wal)]
    young = below[2]  # e.g. archived late, or copied back by hand
    for name in below[2:]:
        make_young(copy / name)

    report = expire_copy(copy, [chain.b2])

    assert report.status == "deleted", report.reason
    assert report.cut == young
    assert report.youngest_allowed == young
    assert "younger than 2 day(s)" in report.reason
    left = segments(copy)
    assert [s for s in below if s not in left] == below[:2]


def test_expiry_with_a_listing_that_fails_half_way_deletes_nothing(chain: Chain, tmp_path: Path) -> None:
    """A WAL file that vanishes between readdir and stat (a concurrent cleanup) makes the listing fail after
    some files were listed: the plan is blocked and pg_archivecleanup never runs."""
    copy = copy_archive(chain, tmp_path)
    middle = segments(copy)[4]
    os.symlink(copy / "gone-meanwhile", copy / f"{middle}.gz")
    before = sorted(p.name for p in copy.iterdir())

    report = expire_copy(copy, [chain.b2])

    assert report.status == "blocked"
    assert report.deleted == 0
    assert report.count == 0
    assert "listing the WAL archive" in report.reason
    assert "nothing removed" in report.reason
    assert sorted(p.name for p in copy.iterdir()) == before


def test_with_only_dumps_nothing_is_deleted_unless_wal_max_age_days(chain: Chain, tmp_path: Path) -> None:
    copy = copy_archive(chain, tmp_path)
    names = segments(copy)
    for name in names[5:]:
        make_young(copy / name)
    before = sorted(p.name for p in copy.iterdir())
    location = ArchiveLocation(directory=str(copy))

    report = expire_wal(archive=location, kept=[], wal_keep_days=2, wal_max_age_days=None, dry_run=False)
    assert report.status == "nothing"
    assert "only dumps" in report.reason
    assert sorted(p.name for p in copy.iterdir()) == before

    report = expire_wal(archive=location, kept=[], wal_keep_days=2, wal_max_age_days=5, dry_run=False)
    assert report.status == "deleted", report.reason
    assert segments(copy) == names[5:]
    assert report.cut == names[5]


# -- WAL expiry on the S3 archive (batched deletes) ---------------------------------------------------------


def s3_copy(s3: S3Endpoint, chain: Chain, prefix: str) -> list[str]:
    """Server-side copy of the S3 archive under `prefix` (fresh mtimes); returns the segment names."""
    client = s3.client()
    names = []
    for obj in client.list_objects_v2(Bucket=chain.bucket, Prefix="wal/")["Contents"]:
        name = obj["Key"].rsplit("/", 1)[-1]
        client.copy_object(
            Bucket=chain.bucket,
            Key=f"{prefix}/{name}",
            CopySource={"Bucket": chain.bucket, "Key": obj["Key"]},
        )
        names.append(name)
    return sorted(names)


def s3_names(s3: S3Endpoint, bucket: str, prefix: str) -> list[str]:
    resp = s3.client().list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/")
    return sorted(o["Key"].rsplit("/", 1)[-1] for o in resp.get("Contents", []))


def test_s3_archive_expiry_deletes_in_batches_exactly_what_no_kept_base_backup_needs(
    chain: Chain, s3: S3Endpoint, unique: str
) -> None:
    prefix = f"wal-{unique}"
    names = s3_copy(s3, chain, prefix)
    s3.client().put_object(Bucket=chain.bucket, Key=f"{prefix}/00000002.history", Body=b"1\t0/9000000\tx\n")
    storage = make_s3_block(s3, f"s3-{unique}", chain.bucket)
    cut = chain.b2.start_wal
    expected_gone = [n for n in names if len(n) == 24 and segno(n) < segno(cut)]

    report = expire_wal(
        archive=ArchiveLocation(storage=storage, prefix=prefix),
        kept=[chain.b2],
        wal_keep_days=0,  # the copies are seconds old
        wal_max_age_days=None,
        dry_run=False,
    )

    assert report.status == "deleted", report.reason
    assert report.method == "batched delete", report.reason
    assert report.cut == cut
    assert report.deleted == len(expected_gone)
    left = s3_names(s3, chain.bucket, prefix)
    assert sorted((set(names) | {"00000002.history"}) - set(left)) == expected_gone
    assert "00000002.history" in left
    assert chain.b2.start_wal in left
    assert chain.b2.stop_wal in left


def test_s3_archive_of_another_tool_is_refused(chain: Chain, s3: S3Endpoint, unique: str) -> None:
    """pgBackRest's per-log folders: deleting there would break pgBackRest's own catalog."""
    client = s3.client()
    prefix = f"archive/main-{unique}/15-1"
    for name in segments(chain.archive)[:4]:
        client.put_object(Bucket=chain.bucket, Key=f"{prefix}/{name[:16]}/{name}", Body=b"x")
    storage = make_s3_block(s3, f"s3-{unique}", chain.bucket)

    report = expire_wal(
        archive=ArchiveLocation(storage=storage, prefix=prefix),
        kept=[chain.b2],
        wal_keep_days=0,
        wal_max_age_days=None,
        dry_run=False,
    )

    assert report.status == "blocked"
    assert "pgBackRest" in report.reason
    assert "pgbackrest expire" in report.reason
    assert len(client.list_objects_v2(Bucket=chain.bucket, Prefix=prefix)["Contents"]) == 4


class StoppedMidListing(S3ObjectStore):
    """The real S3 store; after the first page the real moto server is killed, so the next page fails."""

    deletes = 0

    def __init__(self, endpoint: S3Endpoint, bucket: str) -> None:
        client = boto3.client(
            "s3",
            endpoint_url=endpoint.url,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
            config=Config(retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=5),
        )
        super().__init__(client, bucket, page_size=3)
        self.s3_endpoint = endpoint

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        for n, info in enumerate(super().list(prefix)):
            if n == 2:
                self.s3_endpoint.process.kill()
                self.s3_endpoint.process.wait(timeout=10)
            yield info

    def delete(self, keys: Iterable[str]) -> int:  # counts, then the real delete
        self.deletes += 1
        return super().delete(keys)


def test_s3_listing_that_fails_half_way_deletes_nothing(chain: Chain) -> None:
    with s3_endpoint() as private:  # its own server: this test kills it
        bucket = private.create_bucket("wal-killed")
        for name in segments(chain.archive)[:8]:
            private.client().put_object(Bucket=bucket, Key=f"wal/{name}", Body=b"x")
        store = StoppedMidListing(private, bucket)
        archive = WalArchive(store, "wal")

        plan = plan_expiry(archive, [chain.b2], datetime.now(UTC), wal_keep_days=0)
        done = expire_store(plan, archive)

    assert plan.status == "blocked"
    assert plan.count == 0
    assert plan.doomed_keys == []
    assert "failed after 3 object(s)" in plan.reason
    assert "nothing removed" in plan.reason
    assert done.status == "blocked"
    assert store.deletes == 0


# -- the recoverable window ---------------------------------------------------------------------------------


def test_listing_prints_the_recoverable_window(
    chain: Chain, tmp_path: Path, unique: str, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = copy_archive(chain, tmp_path, age_days=0)
    last = segments(copy)[-1]
    storage = make_local_block(f"local-{unique}", chain.backups)
    args = ["backups", "list", "--storage", storage, "--prefix", PREFIX, "--database", DB]
    capsys.readouterr()

    assert main([*args, "--archive-dir", str(copy)]) == 0
    out = capsys.readouterr().out
    end = utc((copy / last).stat().st_mtime)  # the last archived segment's mtime
    expected = f"{DB}: recoverable to any moment from {t(chain.b1.ended_at)} to {end}"
    assert expected in out.splitlines()
    assert "base backups:" in out
    assert chain.b1.start_wal in out
    assert chain.b2.tar_key in out
    assert out.count(" archived ") >= 2  # the WAL column of both base backups

    assert main(args) == 0
    assert "recoverable window unknown: no WAL archive was given" in capsys.readouterr().out

    assert main([*args, "--archive-dir", str(copy), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["key"] for r in rows if r.get("kind") == "base"] == [chain.b2.tar_key, chain.b1.tar_key]
    assert rows[-1]["recoverable"] == expected

    # the list-backups flow shows the same line
    list_backups(storage=storage, database=DB, prefix=PREFIX, archive=ArchiveLocation(directory=str(copy)))
    from prefect.artifacts import Artifact

    from flows.tasks.common import artifact_key

    artifact = Artifact.get(artifact_key("backups", DB))
    assert artifact is not None
    assert expected in (getattr(artifact, "description", None) or "")


def test_listing_names_the_hole_that_breaks_the_window(
    chain: Chain, tmp_path: Path, unique: str, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = copy_archive(chain, tmp_path, age_days=0)
    between = [s for s in segments(copy) if segno(chain.b1.stop_wal) < segno(s) < segno(chain.b2.start_wal)]
    hole = between[1]
    before_hole = between[0]
    (copy / hole).unlink()
    storage = make_local_block(f"local-{unique}", chain.backups)
    capsys.readouterr()

    args = ["backups", "list", "--storage", storage, "--prefix", PREFIX, "--database", DB]
    assert main([*args, "--archive-dir", str(copy)]) == 0
    out = capsys.readouterr().out
    last = segments(copy)[-1]
    assert (
        f"{DB}: recoverable to any moment from {t(chain.b1.ended_at)} to "
        f"{utc((copy / before_hole).stat().st_mtime)}: "
        f"segment {hole} is missing from the archive; and from {t(chain.b2.ended_at)} to "
        f"{utc((copy / last).stat().st_mtime)}"
    ) in out


def test_pick_base_backup_for_a_time_or_lsn_target(chain: Chain, tmp_path: Path) -> None:
    copy = copy_archive(chain, tmp_path, age_days=0)
    catalog = read_base_catalog(LocalObjectStore(chain.backups), PREFIX, DB)
    window = recoverable_window(DB, catalog, WalArchive(LocalObjectStore(copy)))
    b1, b2 = chain.b1, chain.b2

    assert pick_base_backup(window, b2.ended_at).base.manifest.label == b2.label
    between = b1.ended_at + (b2.ended_at - b1.ended_at) / 2
    assert pick_base_backup(window, between).base.manifest.label == b1.label
    assert pick_base_backup(window, b2.stop_lsn).base.manifest.label == b2.label
    with pytest.raises(NotRecoverable, match="outside the recoverable window"):
        pick_base_backup(window, b1.ended_at - timedelta(seconds=1))

    # a hole between the two: a target after it can only come from the newer base backup
    hole = next(s for s in segments(copy) if segno(b1.stop_wal) < segno(s) < segno(b2.start_wal))
    (copy / hole).unlink()
    broken = recoverable_window(DB, catalog, WalArchive(LocalObjectStore(copy)))
    assert broken.first_hole == hole
    with pytest.raises(NotRecoverable):
        pick_base_backup(broken, f"0/{segno(hole) * SIZE + 100:X}")
    assert pick_base_backup(broken, b2.ended_at).base.manifest.label == b2.label


def test_unreadable_base_manifest_is_reported_never_trusted(chain: Chain, tmp_path: Path) -> None:
    backups = tmp_path / "backups"
    shutil.copytree(chain.backups, backups)
    store = LocalObjectStore(backups)
    catalog = read_base_catalog(store, PREFIX, DB)
    key = next(k for k in catalog.backups[0].keys if k.endswith(".manifest.json"))
    store.put_bytes(key, b'{"database": "postgres", "start_wal": ')
    other = catalog.backups[1]
    forged = other.manifest.model_copy(update={"database": "imagemanager"})
    store.put_bytes(next(k for k in other.keys if k.endswith(".manifest.json")), forged.to_json())

    again = read_base_catalog(store, PREFIX, DB)
    assert again.backups == []
    problems = dict(again.unreadable)
    assert "unreadable manifest" in problems[key]
    assert any("names database 'imagemanager'" in why for why in problems.values())


# -- the WAL check's full window ----------------------------------------------------------------------------


def test_wal_check_full_verification_starts_at_the_oldest_base_backup(
    chain: Chain, tmp_path: Path, unique: str
) -> None:
    copy = copy_archive(chain, tmp_path, age_days=0)
    db = database_block(chain.cluster, f"chain-{unique}")
    storage = make_local_block(f"local-{unique}", chain.backups)
    narrow = CheckOptions(window_segments=1, state_variable=f"chain-{unique}")

    report = wal_archive_check(
        database=db,
        archive=ArchiveLocation(directory=str(copy)),
        full_verify="always",
        options=narrow,
        backups_storage=storage,
        backups_prefix=PREFIX,
    )
    gaps = next(c for c in report.checks if c.name == "gaps")
    assert report.status == "ok"
    assert gaps.figure.endswith("all present")
    assert f" {chain.b1.start_wal}.." in gaps.figure
    base = next(c for c in report.checks if c.name == "base backups")
    assert base.figure.endswith("the oldest starts at " + chain.b1.start_wal)

    # a segment the oldest base backup needs, far behind the narrow window, is missing: found by name
    needed = next(s for s in segments(copy) if segno(s) == segno(chain.b1.stop_wal) + 1)
    (copy / needed).unlink()
    state = wal_archive_check(
        database=db,
        archive=ArchiveLocation(directory=str(copy)),
        full_verify="always",
        options=CheckOptions(window_segments=1, state_variable=f"chain-{unique}-2"),
        backups_storage=storage,
        backups_prefix=PREFIX,
        return_state=True,
    )
    assert state.is_failed()
    assert needed in failure_message(state)

    # without the base backups the narrow window does not reach it
    report = wal_archive_check(
        database=db,
        archive=ArchiveLocation(directory=str(copy)),
        full_verify="always",
        options=CheckOptions(window_segments=1, state_variable=f"chain-{unique}-3"),
    )
    assert report.status == "ok"


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_pg_archivecleanup_matches_the_plan_across_timelines(tmp_path: Path, suffix: str) -> None:
    """Timeline 2 branched from 1 at segment 6; the kept base backup is on timeline 2 and starts at 7.
    Below 7 every timeline's segments go (no recovery from a base backup reads below its start), the
    .history and .backup files stay, and so does the abandoned rest of timeline 1 (7, 8): exactly what
    PostgreSQL's pg_archivecleanup removes, checked with its own dry run before it runs (-x for .gz)."""
    archive = tmp_path / "archive"
    archive.mkdir()
    old = time.time() - 10 * 86400
    names = [f"00000001000000000000000{n}{suffix}" for n in range(1, 9)]
    names += [f"00000002000000000000000{n}{suffix}" for n in range(6, 10)]
    names += ["000000010000000000000006.partial" + suffix, "00000002.history"]
    names += ["000000020000000000000007.00000028.backup"]
    for name in names:
        (archive / name).write_bytes(b"wal")
        os.utime(archive / name, (old, old))
    base = BaseBackupManifest.model_validate(
        {
            "database": DB,
            "server": "h:5432",
            "system_identifier": "1",
            "server_version": "15.0",
            "server_version_num": 150000,
            "pg_basebackup_version": "15.0",
            "label": "dbops-x",
            "started_at": datetime.now(UTC) - timedelta(days=5),
            "ended_at": datetime.now(UTC) - timedelta(days=5),
            "start_lsn": "0/7000028",
            "stop_lsn": "0/7000100",
            "start_wal": "000000020000000000000007",
            "stop_wal": "000000020000000000000007",
            "timeline": 2,
            "wal_segment_size": SIZE,
            "wal_included": False,
            "wal_archived": True,
            "tar_key": "x.tar.zst",
            "bytes": 1,
            "raw_bytes": 1,
            "sha256": "0" * 64,
        }
    )
    wal = WalArchive(LocalObjectStore(archive))
    plan = plan_expiry(wal, [base], datetime.now(UTC))
    expected = sorted(n for n in names if len(n) >= 24 and n[:24].isalnum() and n[8:24] < "0000000000000007")
    assert plan.status == "planned"
    assert sorted(_names(plan.doomed_keys)) == expected

    done = expire_directory(plan, archive, 150000)

    assert done.status == "deleted", done.reason
    assert done.method == "pg_archivecleanup", done.reason
    assert sorted(p.name for p in archive.iterdir()) == sorted(set(names) - set(expected))
    assert "00000002.history" in names
    assert (archive / "00000002.history").exists()
    assert (archive / f"00000001000000000000000{8}{suffix}").exists()  # abandoned timeline 1, above the cut


def _names(keys: list[str]) -> list[str]:
    return [k.rsplit("/", 1)[-1] for k in keys]


def test_wal_check_fails_closed_when_the_base_backups_cannot_be_listed(
    chain: Chain, tmp_path: Path, unique: str
) -> None:
    """Asked to cover the base backups' WAL but unable to read them: critical, never a narrower "ok"."""
    db = database_block(chain.cluster, f"chain-{unique}")
    gone = tmp_path / "unmounted"
    storage = make_local_block(f"local-{unique}", gone)
    gone.rmdir()

    state = wal_archive_check(
        database=db,
        archive=ArchiveLocation(directory=str(chain.archive)),
        full_verify="always",
        options=CheckOptions(window_segments=1, state_variable=f"chain-{unique}"),
        backups_storage=storage,
        backups_prefix=PREFIX,
        return_state=True,
    )
    message = failure_message(state)
    assert state.is_failed()
    assert "base backups of postgres" in message
    assert "cannot be listed" in message
