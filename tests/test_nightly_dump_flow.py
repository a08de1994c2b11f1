"""The nightly_dump flow end to end: real PostgreSQL, the moto S3 server over HTTP, a real Prefect API."""

from __future__ import annotations

import hashlib
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prefect import State
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    TaskRunFilter,  # noqa: F401 - used through the client API
)

from flows.core.compression import Compression
from flows.core.layout import DUMP_RE
from flows.core.manifest import Manifest
from flows.core.retention import RetentionPolicy
from flows.nightly_dump import DumpOptions, nightly_dump
from tests.conftest import make_database_block, make_local_block, make_s3_block
from tests.harness.factories import sample_database
from tests.harness.pg import PgCluster
from tests.harness.runs import artifact_table, failure_message, run_logs, saved_database
from tests.harness.s3 import S3Endpoint

pytestmark = pytest.mark.usefixtures("prefect_api")


def task_runs(state: State) -> dict[str, int]:
    """How many times each task ran in the flow run that ended in `state` (run_count counts retries)."""
    flow_run_id = state.state_details.flow_run_id
    assert flow_run_id is not None
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    counts: dict[str, int] = {}
    for run in runs:
        name = run.name.rsplit("-", 1)[0]
        counts[name] = max(counts.get(name, 0), run.run_count)
    return counts


@pytest.fixture
def db(pg: PgCluster, unique: str) -> str:
    name = sample_database(pg, f"im_{unique}")
    return make_database_block(pg, f"db-{unique}", name)


@pytest.fixture
def s3_storage(s3: S3Endpoint, bucket: str, unique: str) -> str:
    return make_s3_block(s3, f"s3-{unique}", bucket, folder="dbops")


def test_dump_lands_in_s3_with_manifest_written_last_and_matching_sha256(
    db: str, s3_storage: str, s3: S3Endpoint, bucket: str, pg: PgCluster
) -> None:
    report = nightly_dump(database=db, storage=s3_storage, prefix="prod")
    assert DUMP_RE.match(report.key)
    assert report.key.endswith(".dump.zst")
    client = s3.client()
    objects = {o["Key"]: o for o in client.list_objects_v2(Bucket=bucket)["Contents"]}
    dump = client.get_object(Bucket=bucket, Key=f"dbops/{report.key}")
    body = dump["Body"].read()
    manifest = Manifest.from_json(
        client.get_object(Bucket=bucket, Key=f"dbops/{report.manifest_key}")["Body"].read()
    )
    assert manifest.sha256 == hashlib.sha256(body).hexdigest() == report.sha256
    assert manifest.bytes == len(body)
    assert manifest.verified
    assert manifest.verification.method == "list"
    assert manifest.alembic_revision == "0004_classifications_image_index"
    assert manifest.row_estimates["public.images"] == 20_000
    assert manifest.flow_run_id
    assert manifest.server_version.startswith("15")
    assert manifest.pg_dump_version.startswith("15")
    # written last: the manifest is never older than the dump it describes
    assert (
        objects[f"dbops/{report.manifest_key}"]["LastModified"]
        >= objects[f"dbops/{report.key}"]["LastModified"]
    )
    assert report.key.startswith(f"prod/{manifest.database}/dumps/{manifest.started_at:%Y/%m/%d}/")
    assert pg.password not in manifest.to_json().decode()
    # no write-check markers or multipart uploads left behind
    assert not [k for k in objects if ".dbops-write-check" in k]
    assert not client.list_multipart_uploads(Bucket=bucket).get("Uploads")


def test_dump_to_local_storage_with_globals(db: str, tmp_path: Path, unique: str) -> None:
    storage = make_local_block(f"local-{unique}", tmp_path / "backups")
    report = nightly_dump(database=db, storage=storage, globals=True, compression=Compression.gzip)
    assert (tmp_path / "backups" / report.key).is_file()
    assert report.key.endswith(".dump")
    manifest = Manifest.from_json((tmp_path / "backups" / report.manifest_key).read_bytes())
    assert manifest.compression == "gzip"
    assert manifest.globals_key
    roles = (tmp_path / "backups" / manifest.globals_key).read_text()
    assert "CREATE ROLE postgres" in roles
    assert "SCRAM-SHA-256" not in roles  # --no-role-passwords


def test_artifact_reports_key_sha_and_retention(db: str, s3_storage: str) -> None:
    report = nightly_dump(database=db, storage=s3_storage, retention=RetentionPolicy(keep_last=3))
    table = artifact_table(f"nightly-dump-{report.database.replace('_', '-')}")
    values = {row["item"]: row["value"] for row in table}
    assert values["key"] == report.key
    assert values["sha256"] == report.sha256
    assert values["retention"].startswith("keep 1 of 1")


def test_wrong_password_fails_on_first_try_and_is_not_logged(
    pg: PgCluster, unique: str, s3_storage: str
) -> None:
    from blocks import PostgresDatabase

    name = sample_database(pg, f"im_{unique}", rows=10)
    secret = "not-the-password-" + unique
    PostgresDatabase(host=pg.host, port=pg.port, database=name, user="postgres", password=secret).save(
        f"bad-{unique}"
    )
    state = nightly_dump(database=f"bad-{unique}", storage=s3_storage, return_state=True)
    assert state.is_failed()
    message = failure_message(state)
    assert "rejected the password" in message
    assert "fix the password" in message
    # the first connection identifies the database for its db:<...> limit; permanent: no retry
    assert task_runs(state)["identify_target"] == 1
    logs = run_logs(state)
    assert secret not in logs
    assert secret not in message


def test_unreachable_database_is_retried_then_fails_clearly(unique: str, s3_storage: str) -> None:
    from blocks import PostgresDatabase
    from tests.harness.pg import free_port

    PostgresDatabase(host="127.0.0.1", port=free_port(), database="x", user="u", password="p").save(
        f"down-{unique}"
    )
    state = nightly_dump(database=f"down-{unique}", storage=s3_storage, return_state=True)
    assert state.is_failed()
    assert "cannot reach PostgreSQL" in failure_message(state)
    # the first connection identifies the database for its db:<...> limit: retried, then one sentence
    assert task_runs(state)["identify_target"] == 1 + int(os.environ["DBOPS_TASK_RETRIES"])


def test_missing_database_fails_fast(pg: PgCluster, unique: str, s3_storage: str) -> None:
    make_database_block(pg, f"nodb-{unique}", f"does_not_exist_{unique}")
    state = nightly_dump(database=f"nodb-{unique}", storage=s3_storage, return_state=True)
    assert "does not exist" in failure_message(state)
    assert task_runs(state)["check_database"] == 1


def test_missing_bucket_fails_fast_naming_it(db: str, s3: S3Endpoint, unique: str) -> None:
    storage = make_s3_block(s3, f"nobucket-{unique}", f"no-such-bucket-{unique}")
    state = nightly_dump(database=db, storage=storage, return_state=True)
    message = failure_message(state)
    assert f"no-such-bucket-{unique}" in message
    assert "does not exist" in message
    assert task_runs(state)["check_storage"] == 1


def test_unknown_block_is_one_sentence(s3_storage: str) -> None:
    state = nightly_dump(database="no-such-block", storage=s3_storage, return_state=True)
    message = failure_message(state)
    assert "postgres-database/no-such-block" in message
    assert "does not exist" in message


def test_negative_retention_is_refused_before_any_work(db: str, s3_storage: str) -> None:
    with pytest.raises(Exception, match="keep_daily must be 0 or more"):
        # what a deployment sends: JSON, which Prefect validates into the parameter's model
        nightly_dump(database=db, storage=s3_storage, retention={"keep_daily": -1})  # type: ignore[call-overload]


def test_out_of_range_compression_level_is_refused(db: str, s3_storage: str) -> None:
    state = nightly_dump(
        database=db, storage=s3_storage, compression="gzip", compression_level=12, return_state=True
    )
    assert "use 0 to 9" in failure_message(state)


def test_retention_expires_old_backups_keeps_newest_and_removes_stale_orphans(
    db: str, tmp_path: Path, unique: str
) -> None:
    root = tmp_path / "backups"
    storage = make_local_block(f"local-{unique}", root)
    first = nightly_dump(database=db, storage=storage, prefix="p")
    # Rewrite the first backup's manifest as if it were 10 days old, and add a stale orphan dump.
    manifest_path = root / first.manifest_key
    m = Manifest.from_json(manifest_path.read_bytes())
    old = m.model_copy(
        update={"ended_at": m.ended_at - timedelta(days=10), "started_at": m.started_at - timedelta(days=10)}
    )
    manifest_path.write_bytes(old.to_json())
    orphan = root / f"p/{m.database}/dumps/2020/01/01/{m.database}-20200101T020000Z.dump.zst"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"partial")
    past = (datetime.now(UTC) - timedelta(days=3)).timestamp()
    os.utime(orphan, (past, past))
    fresh_orphan = root / f"p/{m.database}/dumps/2020/01/02/{m.database}-20200102T020000Z.dump.zst"
    fresh_orphan.parent.mkdir(parents=True)
    fresh_orphan.write_bytes(b"in progress")

    dry = nightly_dump(
        database=db,
        storage=storage,
        prefix="p",
        retention=RetentionPolicy(max_age_days=7),
        retention_dry_run=True,
    )
    assert dry.deleted == [first.key.rsplit(".dump", 1)[0]]
    assert manifest_path.exists()
    assert orphan.exists()

    report = nightly_dump(database=db, storage=storage, prefix="p", retention=RetentionPolicy(max_age_days=7))
    assert not manifest_path.exists()
    assert not (root / first.key).exists()
    assert not orphan.exists()
    assert fresh_orphan.exists()
    assert (root / report.key).exists()
    assert (root / dry.key).exists()


def test_dump_role_without_select_fails_in_preflight_and_changes_nothing(
    pg: PgCluster, db: str, s3_storage: str, unique: str, s3: S3Endpoint, bucket: str
) -> None:
    from blocks import PostgresDatabase

    nightly_dump(database=db, storage=s3_storage)
    before = sorted(o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket)["Contents"])
    # A role that may connect but not read the table: pg_dump fails with "permission denied".
    pg.create_role(f"weak_{unique}", "weakpw")
    dbname = saved_database(db).database
    PostgresDatabase(
        host=pg.host, port=pg.port, database=dbname, user=f"weak_{unique}", password="weakpw"
    ).save(f"weak-{unique}")
    state = nightly_dump(
        database=f"weak-{unique}",
        storage=s3_storage,
        retention=RetentionPolicy(keep_last=1),
        return_state=True,
    )
    message = failure_message(state)
    assert "cannot read 3 tables or sequences" in message
    assert "grant it pg_read_all_data" in message
    assert task_runs(state)["check_database"] == 1
    after = sorted(o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket)["Contents"])
    assert after == before
    assert not s3.client().list_multipart_uploads(Bucket=bucket).get("Uploads")


def test_unverified_dump_does_not_run_retention(db: str, s3_storage: str) -> None:
    nightly_dump(database=db, storage=s3_storage)
    report = nightly_dump(
        database=db, storage=s3_storage, verify="none", retention=RetentionPolicy(keep_last=1)
    )
    assert not report.verified
    assert report.retention.startswith("skipped")
    assert report.deleted == []


def test_implausibly_small_dump_is_discarded(pg: PgCluster, db: str, s3_storage: str) -> None:

    first = nightly_dump(database=db, storage=s3_storage)
    pg.sql("TRUNCATE images", dbname=saved_database(db).database)
    state = nightly_dump(
        database=db,
        storage=s3_storage,
        retention=RetentionPolicy(keep_last=1),
        options=DumpOptions(min_ratio_of_previous=0.5),
        return_state=True,
    )
    assert "of the previous backup" in failure_message(state)
    from blocks.storage import load_store

    stems = {k.key.split(".dump")[0].split(".manifest")[0] for k in load_store(s3_storage).list("")}
    assert stems == {first.key.split(".dump")[0]}


def test_dump_waits_for_the_database_lock_and_gives_up_clearly(db: str, s3_storage: str) -> None:
    from prefect.concurrency.sync import concurrency

    from blocks.postgres import load_database
    from flows.core.identity import limit_name, resolve
    from flows.tasks.common import ensure_concurrency_limit

    name = limit_name(resolve(load_database(db).params()))  # db:<system identifier>:<database>
    ensure_concurrency_limit(name)
    with concurrency(name, occupy=1, strict=True):
        state = nightly_dump(
            database=db, storage=s3_storage, options=DumpOptions(lock_wait_hours=0.0005), return_state=True
        )
    assert f"held {name} ({db})" in failure_message(state)
    assert "upload_dump" not in task_runs(state)


def test_unreachable_s3_endpoint_is_retried_then_fails_clearly(db: str, unique: str) -> None:
    from prefect_aws import AwsCredentials, S3Bucket
    from prefect_aws.client_parameters import AwsClientParameters

    from tests.harness.pg import free_port

    creds = AwsCredentials(
        aws_access_key_id="k",
        aws_secret_access_key="s",
        region_name="us-east-1",
        aws_client_parameters=AwsClientParameters(
            endpoint_url=f"http://127.0.0.1:{free_port()}", config={"retries": {"max_attempts": 1}}
        ),
    )
    S3Bucket(bucket_name="b", credentials=creds).save(f"s3down-{unique}")
    state = nightly_dump(database=db, storage=f"s3-bucket/s3down-{unique}", return_state=True)
    assert "cannot reach the S3 endpoint" in failure_message(state)
    retries = int(os.environ["DBOPS_TASK_RETRIES"])
    assert task_runs(state)["check_storage"] == 1 + retries


def test_an_unreadable_manifest_and_foreign_objects_are_left_alone_while_dump_and_retention_run(
    db: str, s3: S3Endpoint, bucket: str, s3_storage: str, unique: str
) -> None:
    """One manifest without time zones (an older tool) once made every dump fail with a TypeError."""
    from flows.core.s3store import S3ObjectStore
    from tests.harness.factories import write_backup

    name = f"im_{unique}"  # the database the `db` block names
    store = S3ObjectStore(s3.client(), bucket, "dbops")
    expired = write_backup(store, 40, prefix="p", database=name)
    naive = write_backup(store, 60, prefix="p", database=name, naive=True)
    foreign = f"p/{name}/dumps/keep-forever/{name}-20200101T020000Z.dump.zst"
    store.put_bytes(foreign, b"a person's copy")

    report = nightly_dump(
        database=db, storage=s3_storage, prefix="p", retention=RetentionPolicy(max_age_days=7)
    )

    assert report.deleted == [expired]
    left = {o.key for o in store.list(f"p/{name}/")}
    assert {naive + ".manifest.json", naive + ".dump.zst", foreign, report.key} <= left
    assert not any(k.startswith(expired) for k in left)
    assert any(naive + ".manifest.json" in line and "timezone" in line for line in report.left_alone)
    assert any(foreign in line for line in report.left_alone)


def test_prefix_that_leaves_the_storage_folder_is_refused_before_any_work(
    db: str, tmp_path: Path, unique: str
) -> None:
    root = tmp_path / "backups"
    storage = make_local_block(f"local-{unique}", root)
    state = nightly_dump(database=db, storage=storage, prefix="../outside", return_state=True)
    assert "prefix '../outside' contains a '..' segment" in failure_message(state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backups"]
    assert list(root.iterdir()) == []
