"""wal_archive_check end to end: real clusters archiving with a real archive_command, a real Prefect API,
the moto S3 server over HTTP. Faults are injected, never mocked: `false` as archive_command, a read-only
archive directory, a deleted segment, archive_mode off, a real promotion to timeline 2."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from psycopg import sql

from flows.core.postgres import scalar
from flows.core.wal_archive import ArchiveLocation
from flows.core.wal_server_checks import Thresholds
from flows.wal_archive_check import CheckOptions, wal_archive_check
from tests.conftest import make_s3_block
from tests.harness.basebackup import (
    archiver,
    archiving_cluster,
    database_block,
    server_owned,
    switch_and_wait_archived,
    switch_wal,
)
from tests.harness.pg import PgCluster, free_port, wait_until
from tests.harness.runs import artifact, artifact_table, failure_message
from tests.harness.s3 import S3Endpoint

pytestmark = pytest.mark.usefixtures("prefect_api")


def artifact_rows(database: str) -> dict[str, dict]:
    from flows.tasks.common import artifact_key

    return {row["check"]: row for row in artifact_table(artifact_key("wal-archive-check", database))}


def options(unique: str, **kw: Any) -> CheckOptions:
    return CheckOptions(state_variable=f"wal-test-{unique}", **kw)


@pytest.fixture(scope="module")
def healthy() -> Iterator[tuple[PgCluster, Path]]:
    with archiving_cluster() as (cluster, archive):
        switch_and_wait_archived(cluster, 3)
        yield cluster, archive


@pytest.fixture(scope="module")
def broken() -> Iterator[tuple[PgCluster, Path]]:
    with archiving_cluster("false") as (cluster, archive):
        yield cluster, archive


# -- healthy archiving --------------------------------------------------------------------------------------


def test_healthy_archiving_completes_with_every_check_ok(healthy, unique: str) -> None:
    cluster, archive = healthy
    db = database_block(cluster, f"wal-{unique}")
    last = switch_and_wait_archived(cluster)[-1]
    report = wal_archive_check(
        database=db, archive=ArchiveLocation(directory=str(archive)), options=options(unique)
    )
    assert report.status == "ok", [c for c in report.checks if c.status != "ok"]
    assert report.segment_size == 1024 * 1024
    assert report.last_archived_wal == last
    assert report.verified_through == last
    checks = {c.name: c for c in report.checks}
    assert checks["archive_mode"].figure == "on"
    assert "cp %p" in checks["archive_command"].figure
    assert checks["pending segments"].figure.startswith("0 segment(s)")
    assert checks["backlog"].figure.startswith("0 .ready")
    assert checks["standbys"].figure == "none connected"
    rows = artifact_rows(db)
    assert rows["gaps"]["status"] == "ok"
    assert "all present" in rows["gaps"]["figure"]


def test_next_run_lists_only_the_log_of_new_segments(healthy, unique: str) -> None:
    cluster, archive = healthy
    db = database_block(cluster, f"wal-{unique}")
    location = ArchiveLocation(directory=str(archive))
    first = wal_archive_check(database=db, archive=location, options=options(unique))
    new = switch_and_wait_archived(cluster, 2)
    second = wal_archive_check(database=db, archive=location, options=options(unique))
    assert second.status == "ok"
    assert second.verified_through == new[-1]
    gaps = next(c for c in second.checks if c.name == "gaps")
    assert gaps.figure.startswith("2 segment(s)"), gaps.figure  # only the two new ones were checked
    assert second.list_requests == 1
    assert first.list_requests == 1  # one log id: one listing


def test_active_probe_sees_the_switched_segment_in_the_archive(healthy, unique: str) -> None:
    cluster, archive = healthy
    db = database_block(cluster, f"wal-{unique}")
    before = archiver(cluster)["archived_count"]
    report = wal_archive_check(
        database=db, archive=ArchiveLocation(directory=str(archive)), active=True, options=options(unique)
    )
    probe = next(c for c in report.checks if c.name == "probe")
    assert probe.status == "ok"
    assert "archived in" in probe.figure
    assert archiver(cluster)["archived_count"] > before
    walfile = probe.figure.split()[0]
    assert (archive / walfile).is_file()
    restore_points = cluster.sql("SELECT count(*) FROM pg_ls_waldir()")  # the server is still fine
    assert restore_points[0][0] > 0


def test_deleted_segment_is_reported_as_a_gap_with_its_name(healthy, unique: str) -> None:
    cluster, archive = healthy
    db = database_block(cluster, f"wal-{unique}")
    location = ArchiveLocation(directory=str(archive))
    wal_archive_check(database=db, archive=location, options=options(unique))  # remembers where it is
    names = switch_and_wait_archived(cluster, 3)
    victim = archive / names[1]
    kept = victim.with_name(victim.name + ".aside")
    victim.rename(kept)
    try:
        state = wal_archive_check(database=db, archive=location, options=options(unique), return_state=True)
        assert state.is_failed()
        message = failure_message(state)
        assert names[1] in message
        assert "1 WAL segment(s) are missing" in message
        assert "new base backup" in message
        rows = artifact_rows(db)
        assert rows["gaps"]["status"] == "critical"
        from flows.tasks.common import artifact_key
        from tests.harness.runs import artifact

        latest = artifact(artifact_key("wal-archive-check", db))
        assert (latest.description or "").startswith(f"**Failed**: {message}")
        # the next run still looks from before the gap: the gap is not forgotten
        assert wal_archive_check(
            database=db, archive=location, options=options(unique), return_state=True
        ).is_failed()
    finally:
        kept.rename(victim)
    report = wal_archive_check(database=db, archive=location, options=options(unique))
    assert report.status == "ok"
    assert report.verified_through == names[-1]


def test_segment_deleted_behind_the_watermark_is_found_by_the_daily_or_asked_for_full_verify(
    healthy, unique: str
) -> None:
    from prefect.variables import Variable

    cluster, archive = healthy
    db = database_block(cluster, f"wal-{unique}")
    location = ArchiveLocation(directory=str(archive))
    names = switch_and_wait_archived(cluster, 3)
    first = wal_archive_check(database=db, archive=location, options=options(unique))
    assert first.full_verify
    assert artifact_rows(db)["listing"]["figure"].startswith("full re-verify")
    assert wal_archive_check(database=db, archive=location, options=options(unique)).status == "ok"
    victim = archive / names[1]  # verified by both runs: behind the watermark
    kept = victim.with_name(victim.name + ".aside")
    victim.rename(kept)
    try:
        report = wal_archive_check(database=db, archive=location, options=options(unique))
        assert report.status == "ok"
        assert not report.full_verify  # incremental: it looks past the watermark
        assert artifact_rows(db)["listing"]["figure"].startswith("incremental (last full verification 0.0 h")
        remembered = json.loads(str(Variable.get(f"wal-test-{unique}")))

        state = wal_archive_check(
            database=db, archive=location, full_verify="always", options=options(unique), return_state=True
        )
        assert state.is_failed()
        assert names[1] in failure_message(state)
        listing = artifact_rows(db)["listing"]["figure"]
        assert listing.startswith("full re-verify (asked for (full_verify=always)): ")
        assert "list request(s)" in listing

        # auto: the last full verification was 25 h ago (written into the state, not waited for)
        remembered["full_verified_at"] = (datetime.now(UTC) - timedelta(hours=25)).isoformat()
        Variable.set(f"wal-test-{unique}", json.dumps(remembered), overwrite=True)
        state = wal_archive_check(database=db, archive=location, options=options(unique), return_state=True)
        assert state.is_failed()
        assert names[1] in failure_message(state)
        listing = artifact_rows(db)["listing"]["figure"]
        assert listing.startswith("full re-verify (last full verification 25 h")
    finally:
        kept.rename(victim)
    report = wal_archive_check(database=db, archive=location, options=options(unique))
    assert report.status == "ok"
    assert report.verified_through is not None


def test_secret_in_archive_command_never_reaches_the_report_or_the_artifact(healthy, unique: str) -> None:

    from flows.tasks.common import artifact_key

    cluster, archive = healthy
    command = f"AWS_SECRET_ACCESS_KEY=abcd1234 cp %p {archive}/%f"

    def archive_command_is(value: str) -> bool:
        with cluster.connect() as conn:
            return scalar(conn, "SELECT current_setting('archive_command')") == value

    def set_archive_command(value: str) -> None:
        with cluster.connect() as conn:
            conn.execute(sql.SQL("ALTER SYSTEM SET archive_command = {}").format(sql.Literal(value)))
            conn.execute("SELECT pg_reload_conf()")
        wait_until(lambda: archive_command_is(value), what="archive_command reloaded")

    set_archive_command(command)
    try:
        db = database_block(cluster, f"wal-secret-{unique}")
        report = wal_archive_check(
            database=db, archive=ArchiveLocation(directory=str(archive)), active=True, options=options(unique)
        )
        assert report.status == "ok"  # the command still archives: only what is shown changed
        figure = next(c for c in report.checks if c.name == "archive_command").figure
        assert figure == f"AWS_SECRET_ACCESS_KEY=******** cp %p {archive}/%f"
        shown = json.dumps(artifact(artifact_key("wal-archive-check", db)).data)
        assert "AWS_SECRET_ACCESS_KEY=********" in shown
        assert "abcd1234" not in shown
        assert "abcd1234" not in report.model_dump_json()
    finally:
        set_archive_command(f"cp %p {archive}/%f")


def test_role_with_only_pg_monitor_can_run_the_check(healthy, unique: str) -> None:
    cluster, archive = healthy
    role, password = f"mon_{unique}", f"pw-{unique}"
    cluster.create_role(role, password)
    with cluster.connect() as conn:
        conn.execute(sql.SQL("GRANT pg_monitor TO {}").format(sql.Identifier(role)))
    db = database_block(cluster, f"wal-mon-{unique}", user=role, password=password)
    report = wal_archive_check(
        database=db, archive=ArchiveLocation(directory=str(archive)), options=options(unique)
    )
    checks = {c.name: c for c in report.checks}
    assert report.status == "ok"
    assert checks["backlog"].status == "ok"
    assert checks["gaps"].status == "ok"


def test_role_without_pg_monitor_is_told_which_role_to_grant(healthy, unique: str) -> None:
    cluster, archive = healthy
    role, password = f"plain_{unique}", f"pw-{unique}"
    cluster.create_role(role, password)
    db = database_block(cluster, f"wal-plain-{unique}", user=role, password=password)
    report = wal_archive_check(
        database=db, archive=ArchiveLocation(directory=str(archive)), options=options(unique)
    )
    backlog = next(c for c in report.checks if c.name == "backlog")
    assert backlog.status == "warning"
    assert f"GRANT pg_monitor TO {role}" in backlog.message
    assert report.status == "warning"  # a warning leaves the run Completed
    state = wal_archive_check(
        database=db,
        archive=ArchiveLocation(directory=str(archive)),
        active=True,
        options=options(unique),
        return_state=True,
    )
    assert state.is_failed()
    assert "GRANT EXECUTE ON FUNCTION pg_switch_wal()" in failure_message(state)


def test_s3_archive_in_pgbackrest_layout_with_gzip(healthy, s3: S3Endpoint, bucket: str, unique: str) -> None:
    """Segments uploaded into the S3 endpoint as pgBackRest stores them: per-log folders, SHA-1, .gz."""
    cluster, archive = healthy
    db = database_block(cluster, f"wal-{unique}")
    switch_and_wait_archived(cluster)
    client = s3.client()
    prefix = "archive/main/15-1"
    uploaded = []
    for path in sorted(archive.iterdir()):
        if path.name.endswith(".aside"):
            continue
        data = path.read_bytes()
        key = f"pg/{prefix}/{path.name[:16]}/{path.name}-{hashlib.sha1(data).hexdigest()}.gz"
        client.put_object(Bucket=bucket, Key=key, Body=gzip.compress(data, compresslevel=1))
        uploaded.append(key)
    storage = make_s3_block(s3, f"s3-{unique}", bucket, folder="pg")
    location = ArchiveLocation(storage=storage, prefix=prefix)
    report = wal_archive_check(database=db, archive=location, options=options(unique))
    assert report.status == "ok", [c for c in report.checks if c.status != "ok"]
    assert report.archive == f"{storage}:{prefix}"
    client.delete_object(Bucket=bucket, Key=uploaded[-2])
    state = wal_archive_check(
        database=db, archive=location, options=options(f"{unique}-2"), return_state=True
    )
    assert state.is_failed()
    assert uploaded[-2].rsplit("/", 1)[-1][:24] in failure_message(state)


def test_archive_directory_missing_on_the_worker_fails_with_what_to_fix(
    healthy, tmp_path: Path, unique: str
) -> None:
    cluster, _ = healthy
    db = database_block(cluster, f"wal-{unique}")
    missing = tmp_path / "not-mounted"
    state = wal_archive_check(
        database=db,
        archive=ArchiveLocation(directory=str(missing)),
        options=options(unique),
        return_state=True,
    )
    message = failure_message(state)
    assert str(missing) in message
    assert "does not exist or is not readable" in message


# -- broken archiving ----------------------------------------------------------------------------------------


def test_failing_archive_command_fails_naming_failed_count_and_last_failed_wal(broken, unique: str) -> None:
    cluster, archive = broken
    db = database_block(cluster, f"wal-{unique}")
    name = switch_wal(cluster)
    wait_until(lambda: archiver(cluster)["failed_count"] > 0, what="archive_command to fail")
    state = wal_archive_check(
        database=db,
        archive=ArchiveLocation(directory=str(archive)),
        options=options(unique),
        return_state=True,
    )
    assert state.is_failed()
    message = failure_message(state)
    stats = archiver(cluster)
    assert "archive_command is failing" in message
    assert "failed_count=" in message
    assert f"last_failed_wal={stats['last_failed_wal']}" in message
    assert stats["last_failed_wal"] <= name  # the oldest waiting segment is retried first


def test_active_probe_times_out_clearly_when_archiving_is_broken(broken, unique: str) -> None:
    cluster, archive = broken
    db = database_block(cluster, f"wal-{unique}")
    state = wal_archive_check(
        database=db,
        archive=ArchiveLocation(directory=str(archive)),
        active=True,
        options=options(unique, probe_timeout_seconds=2),
        return_state=True,
    )
    assert state.is_failed()
    probe = artifact_rows(db)["probe"]
    assert probe["status"] == "critical"
    assert "not archived after 2 s" in probe["figure"]
    assert "did not reach" in probe["what to do"]
    assert "within 2 s" in probe["what to do"]


def test_read_only_archive_directory_fails_the_run(broken, tmp_path: Path, unique: str) -> None:
    cluster, _ = broken
    readonly = Path(tempfile.mkdtemp(prefix="dbops-ro-"))
    try:
        os.chmod(readonly, 0o755)
        server_owned(readonly)
        os.chmod(readonly, 0o555)  # the postgres user owns it but may not write into it
        cluster.set(archive_command=f"cp %p {readonly}/%f")
        cluster.sql("SELECT pg_stat_reset_shared('archiver')")
        switch_wal(cluster)
        wait_until(
            lambda: archiver(cluster)["failed_count"] > 0, what="cp into a read-only directory to fail"
        )
        db = database_block(cluster, f"wal-{unique}")
        state = wal_archive_check(
            database=db,
            archive=ArchiveLocation(directory=str(readonly)),
            options=options(unique),
            return_state=True,
        )
        message = failure_message(state)
        assert "failed_count=" in message
        assert f"last_failed_wal={archiver(cluster)['last_failed_wal']}" in message
        assert not list(readonly.iterdir())
    finally:
        cluster.set(archive_command="false")
        shutil.rmtree(readonly, ignore_errors=True)


def test_stalled_archiver_without_failures_is_critical_on_the_second_run(broken, unique: str) -> None:
    """archive_command hangs (waits for a file that only the test creates): no failure is ever reported."""
    cluster, archive = broken
    gate = archive.parent / f"release-{unique}"
    cluster.set(archive_command=f"while [ ! -e {gate} ]; do sleep 0.1; done; cp %p {archive}/%f")
    cluster.sql("SELECT pg_stat_reset_shared('archiver')")
    try:
        switch_wal(cluster)
        db = database_block(cluster, f"wal-{unique}")
        location = ArchiveLocation(directory=str(archive))
        t = Thresholds(stall_after_seconds=0, max_archive_age_seconds=3600)
        first = wal_archive_check(database=db, archive=location, thresholds=t, options=options(unique))
        stall = next(c for c in first.checks if c.name == "stall")
        assert stall.status == "ok"
        assert "new since the last run" in stall.figure
        state = wal_archive_check(
            database=db, archive=location, thresholds=t, options=options(unique), return_state=True
        )
        message = failure_message(state)
        assert "has waited to be archived" in message
        assert "no newer failure" in message
        assert archiver(cluster)["failed_count"] == 0
    finally:
        server_owned(gate)  # let the hung command finish
        cluster.set(archive_command="false")


def test_archive_mode_off_fails_saying_it_needs_a_restart(unique: str) -> None:
    with archiving_cluster(archive_mode="off") as (cluster, archive):
        db = database_block(cluster, f"wal-{unique}")
        location = ArchiveLocation(directory=str(archive))
        state = wal_archive_check(database=db, archive=location, options=options(unique), return_state=True)
        message = failure_message(state)
        assert "archive_mode is off" in message
        assert "restart" in message
        cluster.set(archive_mode="on")  # set but not applied until a restart
        state = wal_archive_check(database=db, archive=location, options=options(unique), return_state=True)
        assert "set to on but the server was not restarted" in failure_message(state)


# -- standby and timeline switch ---------------------------------------------------------------------------


def base_backup_standby(primary: PgCluster, base_dir: Path) -> PgCluster:
    """pg_basebackup -R into a new data directory, started as a streaming standby on its own port."""
    standby = PgCluster(base_dir=base_dir, port=free_port(), password=primary.password)
    server_owned(base_dir)
    server_owned(standby.socket_dir)
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    done = subprocess.run(
        [
            *prefix,
            str(Path(os.path.realpath(primary.bindir / "initdb")).parent / "pg_basebackup"),
            "-D",
            str(standby.data_dir),
            "-R",
            "-X",
            "stream",
            "-h",
            primary.host,
            "-p",
            str(primary.port),
            "-U",
            primary.superuser,
            "--no-sync",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PGPASSWORD": primary.password},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    with (standby.data_dir / "postgresql.auto.conf").open("a") as f:
        f.write(f"port = {standby.port}\nunix_socket_directories = '{standby.socket_dir}'\n")
    standby.start()
    return standby


def test_standby_and_promotion_to_a_new_timeline(unique: str) -> None:
    with archiving_cluster() as (primary, archive):
        switch_and_wait_archived(primary, 2)
        standby = base_backup_standby(primary, archive.parent / "standby")
        try:
            wait_until(
                lambda: primary.sql("SELECT count(*) FROM pg_stat_replication")[0][0] == 1,
                what="the standby to connect",
            )
            location = ArchiveLocation(directory=str(archive))
            on_primary = wal_archive_check(
                database=database_block(primary, f"wal-p-{unique}"), archive=location, options=options(unique)
            )
            standbys = next(c for c in on_primary.checks if c.name == "standbys")
            assert "streaming" in standbys.figure
            assert "replay lag" in standbys.figure

            sdb = database_block(standby, f"wal-s-{unique}")
            on_standby = wal_archive_check(
                database=sdb, archive=location, active=True, options=options(f"{unique}-s")
            )
            probe = next(c for c in on_standby.checks if c.name == "probe")
            assert probe.status == "skipped"
            assert "standby" in probe.message

            switch_and_wait_archived(primary)
            primary.stop()  # a clean failover: the old primary is gone
            standby.sql("SELECT pg_promote()")
            switch_and_wait_archived(standby, 2)
            assert (archive / "00000002.history").is_file()
            report = wal_archive_check(database=sdb, archive=location, options=options(f"{unique}-t"))
            assert report.timeline == 2, [c for c in report.checks if c.status != "ok"]
            assert report.status == "ok", [c for c in report.checks if c.status != "ok"]
            assert report.verified_through
            assert report.verified_through.startswith("00000002")
            gaps = next(c for c in report.checks if c.name == "gaps")
            window = gaps.figure.split()[2]  # first..last: it starts on timeline 1 and ends on timeline 2
            assert gaps.status == "ok"
            assert window.startswith("00000001")
            assert "..00000002" in window
            assert next(c for c in report.checks if c.name == "timeline history").status == "ok"
        finally:
            standby.stop("immediate")


def test_full_verify_finds_a_segment_deleted_behind_the_watermark_in_s3_pgbackrest_layout(
    s3: S3Endpoint, bucket: str
) -> None:
    """The same hole in S3, pgBackRest's per-log folders: incremental misses it, full finds it."""
    from flows.core.s3store import S3ObjectStore
    from flows.core.wal import segment_name
    from flows.core.wal_archive import WalArchive, check_contents
    from flows.core.wal_server import CheckState
    from tests.harness.factories import MiB, snapshot_at

    client = s3.client()
    prefix = "archive/main/15-1"
    keys = {}
    for segno in range(4090, 4110):  # across the 1 MiB log id boundary at 4096: two per-log folders
        name = segment_name(1, segno, MiB)
        keys[segno] = f"pg/{prefix}/{name[:16]}/{name}-{'0' * 40}.gz"
        client.put_object(Bucket=bucket, Key=keys[segno], Body=gzip.compress(b"wal"))
    archive = WalArchive(S3ObjectStore(client, bucket, "pg"), prefix)
    first = check_contents(archive, snapshot_at(4109), CheckState(), 4096)
    assert first.full
    assert first.missing == []
    assert first.list_requests == 2  # one listing per log id
    state = CheckState(segment_size=MiB, verified_through=4109, verified_from=first.window_first)
    client.delete_object(Bucket=bucket, Key=keys[4095])
    assert check_contents(archive, snapshot_at(4109), state, 4096).missing == []
    full = check_contents(archive, snapshot_at(4109), state, 4096, full=True)
    assert full.missing == [segment_name(1, 4095, MiB)]
    assert full.list_requests == 2
