"""The migrate flow end to end: real PostgreSQL databases for production and staging, local storage and
the moto S3 server for the pre-backup, the application's Alembic in subprocesses, a real Prefect API.

Production starts at 0001_base of tests/fixtures/migrate_app with 2,000 accounts (see
tests/harness/migrate_env.py); 0003 builds a unique index CONCURRENTLY, which fails when production holds
duplicate e-mails.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from prefect import tags
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import StateType
from prefect.flow_runs import resume_flow_run
from prefect.input.actions import read_flow_run_input

from flows.core.alembic_runner import AlembicApp
from flows.migrate import MigrateReport
from tests.conftest import make_s3_block
from tests.harness.factories import conn_params
from tests.harness.migrate_env import (
    HEAD,
    LINT_APP,
    MIGRATE_APP,
    Env,
    backups_in,
    env_fixture,  # noqa: F401 - the env fixture
    has_column,
    log_counts,
    report_table,
    revision,
)
from tests.harness.pg import PgCluster, wait_until
from tests.harness.runs import artifact, failure_message, run_logs
from tests.harness.s3 import S3Endpoint

pytestmark = pytest.mark.usefixtures("prefect_api")


def test_happy_path_from_old_revision_to_head_on_staging_then_production(env: Env, pg: PgCluster) -> None:
    state = env.run()
    assert state.is_completed(), failure_message(state)
    assert state.message == f"applied 2 revision(s): 0001_base → {HEAD}"
    report: MigrateReport = state.result()

    # production: at head, each revision applied exactly once, data kept
    assert revision(pg, env.prod) == HEAD
    assert log_counts(pg, env.prod) == {"0002_nickname up": 1, "0003_email_unique up": 1}
    assert pg.sql("SELECT count(*) FROM accounts", env.prod)[0][0] == 2000
    # staging: refreshed from the backup (old content gone, production's rows there), upgraded, downgraded
    # to the start and upgraded again
    assert revision(pg, env.staging) == HEAD
    assert not pg.sql("SELECT to_regclass('stale_marker')", env.staging)[0][0]
    assert pg.sql("SELECT count(*) FROM accounts", env.staging)[0][0] == 2000
    assert log_counts(pg, env.staging) == {
        "0002_nickname up": 2,
        "0003_email_unique up": 2,
        "0002_nickname down": 1,
        "0003_email_unique down": 1,
    }
    # the rollback point: a verified backup holding the old revision
    manifests = backups_in(env.backups)
    assert len(manifests) == 1
    manifest = json.loads(manifests[0].read_text())
    assert manifest["alembic_revision"] == "0001_base"
    assert manifest["verified"]
    assert report.backup_key == manifest["dump_key"]
    assert report.backup_revision == "0001_base"
    assert [t.revision for t in report.timings] == ["0002_nickname", HEAD]
    for t in report.timings:
        assert t.staging_s
        assert t.staging_again_s
        assert t.production_s
        assert t.attempts == 1

    values = report_table(env.prod)
    assert values["outcome"] == state.message
    assert values["trigger"] == "python (direct flow call)"
    assert values["revisions"] == f"0001_base → {HEAD}"
    assert values["production now at"] == HEAD
    assert values["backup key (rollback point)"] == report.backup_key
    assert len(values["SQL sha256"]) == 64
    assert values["SQL sha256"] == report.sql_sha256
    assert values["lint findings"] == "none"
    assert values["approver"] == "-"
    assert "production" in values[f"revision {HEAD}"]
    assert pg.password not in json.dumps(values)
    sql = artifact(f"migrate-sql-{env.prod}".replace("_", "-"))
    assert "CREATE UNIQUE INDEX CONCURRENTLY accounts_email_key" in str(sql.data)

    # a second run has nothing to do: Completed "already at", no new backup
    again = env.run()
    assert again.is_completed()
    assert again.message == f"already at {HEAD}"
    assert len(backups_in(env.backups)) == 1
    assert log_counts(pg, env.prod) == {"0002_nickname up": 1, "0003_email_unique up": 1}


def test_revision_failing_on_production_data_fails_on_staging_and_production_stays(
    env: Env, pg: PgCluster
) -> None:
    pg.sql("INSERT INTO accounts (email) VALUES ('user7@example.org')", env.prod)  # a duplicate e-mail
    state = env.run()
    message = failure_message(state)
    assert "failed the rehearsal, so production was not touched" in message
    assert "0003_email_unique" in message
    assert "could not create unique index" in message
    # production: still at the old revision, nothing of 0002 or 0003 applied
    assert revision(pg, env.prod) == "0001_base"
    assert log_counts(pg, env.prod) == {}
    assert not has_column(pg, env.prod, "accounts", "nickname")
    # staging met production's data: 0002 went through, 0003 failed there
    assert revision(pg, env.staging) == "0002_nickname"
    values = report_table(env.prod)
    assert values["outcome"].startswith("failed: ")
    assert values["backup key (rollback point)"].endswith(".dump.zst")
    assert values["production now at"] == "unchanged"
    latest = artifact(f"migrate-{env.prod}".replace("_", "-"))
    assert (latest.description or "").startswith(f"**Failed**: {message}")


def test_failing_pre_backup_stops_everything(env: Env, pg: PgCluster, s3: S3Endpoint, unique: str) -> None:
    missing = make_s3_block(s3, f"missing-{unique}", f"no-such-bucket-{unique}")
    state = env.run(storage=missing)
    message = failure_message(state)
    assert message.startswith(f"the pre-backup of '{env.prod_block}' failed, so nothing was migrated")
    assert revision(pg, env.prod) == "0001_base"
    assert log_counts(pg, env.prod) == {}
    # staging was never refreshed nor migrated
    assert pg.sql("SELECT to_regclass('stale_marker') IS NOT NULL", env.staging)[0][0]
    assert revision(pg, env.staging) is None
    assert report_table(env.prod)["backup key (rollback point)"] == "none"


def _paused_run(tag: str) -> UUID | None:
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                tags=FlowRunFilterTags(all_=[tag]),
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED])),
            )
        )
    return runs[0].id if runs else None


def _start_in_thread(env: Env, tag: str, **kw: Any) -> tuple[threading.Thread, dict[str, Any]]:
    box: dict[str, Any] = {}

    def target() -> None:
        with tags(tag):
            box["state"] = env.run(**kw)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def _wait_paused(tag: str, thread: threading.Thread) -> UUID:
    found: list[UUID] = []

    def paused() -> bool:
        if not thread.is_alive():
            raise AssertionError("the run ended before it paused for approval")
        run_id = _paused_run(tag)
        if run_id:
            found.append(run_id)
        return bool(run_id)

    wait_until(paused, timeout=120, interval=0.3, what="the run to pause for approval")
    return found[0]


def test_approval_pause_and_resume_while_a_second_run_fails_fast(
    env: Env, pg: PgCluster, unique: str
) -> None:
    tag = f"approve-{unique}"
    thread, box = _start_in_thread(env, tag, require_approval=True, approval_timeout=300)
    run_id = _wait_paused(tag, thread)
    # the paused run holds the migration lock: a second run fails at once, naming the holder
    t0 = time.monotonic()
    second = env.run()
    message = failure_message(second)
    assert time.monotonic() - t0 < 20
    assert "holds the migration lock" in message
    assert "pid " in message
    assert "dbops-migrate " in message
    assert revision(pg, env.prod) == "0001_base"

    # the form shows the backup key, staging timings and the lint result
    with get_client(sync_client=True) as client:
        paused = client.read_flow_run(run_id).state
    assert paused is not None
    keyset = paused.state_details.run_input_keyset
    assert keyset is not None
    description = str(read_flow_run_input(keyset["description"], flow_run_id=run_id))
    assert "Rollback point (pre-backup): `prod/" in description
    assert "| 0002_nickname |" in description
    assert "Lint: 0 finding(s), none" in description

    resume_flow_run(run_id, run_input={"approve": True, "approver": "alice@example.org", "comment": "CHG-42"})
    thread.join(timeout=120)
    assert box["state"].is_completed(), failure_message(box["state"])
    assert revision(pg, env.prod) == HEAD
    assert log_counts(pg, env.prod) == {"0002_nickname up": 1, "0003_email_unique up": 1}  # once each
    assert report_table(env.prod)["approver"] == "alice@example.org (CHG-42)"


def test_rejected_approval_leaves_production_alone(env: Env, pg: PgCluster, unique: str) -> None:
    tag = f"reject-{unique}"
    thread, box = _start_in_thread(env, tag, require_approval=True, refresh_staging=False)
    run_id = _wait_paused(tag, thread)
    resume_flow_run(run_id, run_input={"approve": False, "approver": "bob"})
    thread.join(timeout=60)
    assert failure_message(box["state"]) == "bob rejected the migration, so production was not touched"
    assert revision(pg, env.prod) == "0001_base"
    assert log_counts(pg, env.prod) == {}
    assert report_table(env.prod)["approver"] == "rejected by bob"
    # refresh_staging=false: staging kept its old content and was migrated from base
    assert revision(pg, env.staging) == HEAD
    assert pg.sql("SELECT to_regclass('stale_marker') IS NOT NULL", env.staging)[0][0]


def test_table_locked_by_another_session_makes_production_retry_then_fail_cleanly(
    env: Env, pg: PgCluster
) -> None:
    # An open transaction that wrote to accounts: pg_dump (ACCESS SHARE) passes, ALTER TABLE cannot.
    blocker = pg.connect(env.prod, autocommit=False)
    try:
        blocker.execute("LOCK TABLE accounts IN ROW EXCLUSIVE MODE")
        # a budget that leaves room for a second attempt even when one Alembic start takes seconds (a
        # loaded CI machine): the assertion is that it retries, not how fast
        state = env.run(lock_timeout="300ms", retry_budget=10)
        message = failure_message(state)
    finally:
        blocker.rollback()
        blocker.close()
    assert "revision 0002_nickname" in message
    assert "waited longer than lock_timeout (300 ms)" in message
    assert "within retry_budget" in message
    assert "the database is at 0001_base" in message
    attempts = int(message.split("(300 ms) ")[1].split(" time")[0])
    assert attempts >= 2  # retried at least once
    assert revision(pg, env.prod) == "0001_base"
    assert log_counts(pg, env.prod) == {}
    assert not has_column(pg, env.prod, "accounts", "nickname")
    assert revision(pg, env.staging) == HEAD  # the rehearsal itself passed
    values = report_table(env.prod)
    assert values["production now at"] == "0001_base"
    assert f"({attempts} attempt(s))" in values["revision 0002_nickname"]


def test_dry_run_plans_lints_and_changes_nothing(env: Env, pg: PgCluster) -> None:
    state = env.run(dry_run=True)
    assert state.is_completed(), failure_message(state)
    planned = f"dry run: would apply 0002_nickname, {HEAD} (0001_base → {HEAD})"
    assert (state.message or "").startswith(planned)
    assert revision(pg, env.prod) == "0001_base"
    assert log_counts(pg, env.prod) == {}
    assert revision(pg, env.staging) is None
    assert pg.sql("SELECT to_regclass('stale_marker') IS NOT NULL", env.staging)[0][0]
    assert backups_in(env.backups) == []
    assert report_table(env.prod)["dry run"] == "true"


@pytest.fixture
def lint_env(env: Env, pg: PgCluster) -> Env:
    """Production at 0001_base of the lint sample (users, orders, audit_log exist)."""
    pg.sql(f'DROP DATABASE "{env.prod}" WITH (FORCE)')
    pg.create_database(env.prod)
    AlembicApp(LINT_APP).upgrade(conn_params(pg, env.prod), "0001_base")
    return env


def test_lint_blocks_and_waivers_let_it_through(lint_env: Env, pg: PgCluster) -> None:
    env = lint_env
    state = env.run(alembic=str(LINT_APP), target="0003_drop_index")
    message = failure_message(state)
    assert message.startswith("the DDL lint found 2 blocking statement(s)")
    assert "0002_create_index:create-index-not-concurrently" in message
    assert "0003_drop_index:drop-index-not-concurrently" in message
    assert "waivers=['create-index-not-concurrently@0002_create_index']" in message
    assert backups_in(env.backups) == []  # stopped before the backup
    assert revision(pg, env.prod) == "0001_base"

    one = env.run(alembic=str(LINT_APP), target="0003_drop_index", waivers=["create-index-not-concurrently"])
    message = failure_message(one)
    assert "found 1 blocking" in message
    assert "0003_drop_index:drop-index-not-concurrently" in message

    both = env.run(
        alembic=str(LINT_APP),
        target="0003_drop_index",
        dry_run=True,
        waivers=[
            "create-index-not-concurrently@0002_create_index",
            "0003_drop_index:drop-index-not-concurrently",
        ],
    )
    assert both.is_completed(), failure_message(both)
    findings = report_table(env.prod)["lint findings"]
    assert "0002_create_index create-index-not-concurrently [waived]" in findings
    assert "0003_drop_index drop-index-not-concurrently [waived]" in findings
    assert revision(pg, env.prod) == "0001_base"

    typo = env.run(alembic=str(LINT_APP), waivers=["create-index-concurrently"])
    assert "names no lint rule" in failure_message(typo)


def _branched_app(tmp_path: Path) -> Path:
    shutil.copytree(MIGRATE_APP, tmp_path / "app", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "app" / "alembic" / "versions" / "0003b_other.py").write_text(
        '"""A second head."""\nrevision = "0003b_other"\ndown_revision = "0002_nickname"\n'
        "branch_labels = None\ndepends_on = None\n\n\ndef upgrade():\n    pass\n\n\n"
        "def downgrade():\n    pass\n"
    )
    return tmp_path / "app" / "alembic.ini"


@pytest.mark.parametrize("case", ["unknown-stamp", "target-behind", "invalid-index", "multiple-heads"])
def test_plan_refuses_with_what_to_do(env: Env, pg: PgCluster, tmp_path: Path, case: str) -> None:
    kw: dict[str, Any] = {}
    if case == "unknown-stamp":
        pg.sql("UPDATE alembic_version SET version_num = '0099_from_the_future'", env.prod)
        expected = ["stamped with revision 0099_from_the_future", "deploy the application version"]
    elif case == "target-behind":
        pg.sql("ALTER TABLE accounts ADD COLUMN nickname text", env.prod)
        pg.sql("UPDATE alembic_version SET version_num = '0002_nickname'", env.prod)
        kw["target"] = "0001_base"
        expected = ["behind the current revision 0002_nickname", "use downgrade"]
    elif case == "invalid-index":
        pg.sql("INSERT INTO accounts (email) VALUES ('user1@example.org')", env.prod)
        with pytest.raises(Exception, match="could not create unique index"):
            pg.sql("CREATE UNIQUE INDEX CONCURRENTLY half_built ON accounts (email)", env.prod)
        expected = ["1 INVALID index(es) (public.half_built)", "DROP INDEX CONCURRENTLY"]
    else:
        kw["alembic"] = str(_branched_app(tmp_path))
        expected = ["has 2 heads", "alembic merge heads"]
    message = failure_message(env.run(**kw))
    for text in expected:
        assert text in message
    assert backups_in(env.backups) == []
    assert pg.password not in message


def test_approval_nobody_gives_times_out_and_leaves_production_alone(env: Env, pg: PgCluster) -> None:
    state = env.run(require_approval=True, approval_timeout=2, refresh_staging=False)
    assert state.is_failed()
    # Once the pause deadline has passed, Prefect's server replaces the flow's own final message with its
    # own; dbops's sentence is in the run's log.
    sentence = (
        "nobody approved the migration within 2 s, so production was not touched; start it again when "
        "someone can approve"
    )
    wait_until(lambda: sentence in run_logs(state), timeout=30, what="dbops's sentence in the run's log")
    assert revision(pg, env.prod) == "0001_base"
    assert log_counts(pg, env.prod) == {}
    assert not has_column(pg, env.prod, "accounts", "nickname")
