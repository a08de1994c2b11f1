"""The db_health flow against real PostgreSQL and a real Prefect API: Completed when healthy, Failed with
the first critical's sentence on top of its report, vacuum=true cleaning exactly the flagged table, a
server that goes away mid-run, and `dbops health` printing the same report in the terminal."""

from __future__ import annotations

import threading
from collections.abc import Coroutine

import psycopg
import pytest
from prefect.artifacts import Artifact
from prefect.variables import Variable

from flows.core.health.history import SizeHistory
from flows.db_health import db_health
from tests.conftest import make_database_block
from tests.harness.factories import churn_table
from tests.harness.pg import PgCluster, pg_cluster, wait_until
from tests.harness.runs import failure_message

pytestmark = pytest.mark.usefixtures("prefect_api")


@pytest.fixture
def db(pg: PgCluster, unique: str) -> str:
    name = f"healthflow_{unique}"
    pg.create_database(name)
    pg.sql("CREATE TABLE items (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, x int)", name)
    return name


def artifact_text(db: str) -> tuple[str, str]:
    artifact = Artifact.get(f"db-health-{db.replace('_', '-')}")
    assert artifact is not None
    assert not isinstance(artifact, Coroutine)
    return str(artifact.data), artifact.description or ""


def test_a_healthy_database_completes_with_no_warning_and_keeps_todays_size(pg: PgCluster, db: str) -> None:
    block = make_database_block(pg, f"hb-{db.replace('_', '-')}", db)
    state = db_health(database=block, prescribed_indexes=[], return_state=True)
    assert state.is_completed()
    report = state.result()
    assert report.status == "ok"
    assert report.problems == []
    text, description = artifact_text(db)
    assert text.splitlines()[0].startswith(f"**{db}: OK**")
    assert "Nothing to do" in text
    assert "Size, last 14 days: `             ▁`" in text  # one day kept: the rightmost point
    assert description.startswith(f"**{db}: OK**")
    history = SizeHistory.from_value(Variable.get(f"dbops_health_size_{_sysid(pg)}_{db}"))
    assert list(history.days.values()) == [report.database_bytes]


def _sysid(pg: PgCluster) -> int:
    return int(pg.sql("SELECT system_identifier FROM pg_control_system()")[0][0])


def test_dead_rows_fail_the_run_and_vacuum_true_cleans_exactly_that_table(pg: PgCluster, db: str) -> None:
    churn_table(pg, db)
    block = make_database_block(pg, f"hb-{db.replace('_', '-')}", db)
    state = db_health(database=block, prescribed_indexes=[], return_state=True)
    assert state.is_failed()
    message = failure_message(state)
    assert message.startswith(
        f"{db}: dead rows past 2x the autovacuum trigger in 1 table, the most in public.churn"
    )
    assert "\n" not in message
    text, description = artifact_text(db)
    assert description.startswith(f"**Failed**: {message}")
    assert text.startswith(f"**Failed**: {message}")
    assert "### What to do" in text
    assert "**CRITICAL dead rows**" in text

    report = db_health(database=block, prescribed_indexes=[], vacuum=True)
    assert report.vacuumed == {"public.churn": None}
    dead = pg.sql("SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = 'churn'", db)[0][0]
    assert dead == 0
    assert {c.name: c.status for c in report.checks}["dead rows"] == "ok"
    assert report.status == "ok"
    assert "VACUUM (ANALYZE): public.churn (vacuumed)" in artifact_text(db)[0]


def test_a_server_that_goes_away_mid_run_fails_with_one_sentence(unique: str) -> None:
    with pg_cluster() as own:
        own.create_database("doomed")
        own.sql("CREATE TABLE t (id int)", "doomed")
        block = make_database_block(own, f"doomed-{unique}", "doomed")
        holder = psycopg.connect(own.conninfo("doomed"), autocommit=False)
        holder.execute("LOCK TABLE t IN ACCESS EXCLUSIVE MODE")

        def stop_when_the_size_check_waits() -> None:
            wait_until(
                lambda: (
                    own.sql(
                        "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND pid <> %s",
                        params=(holder.info.backend_pid,),
                    )
                    != []
                ),
                timeout=60,
                what="the health check to wait on the lock",
            )
            own.stop("immediate")

        stopper = threading.Thread(target=stop_when_the_size_check_waits)
        stopper.start()
        try:
            state = db_health(database=block, prescribed_indexes=[], statement_timeout=60, return_state=True)
        finally:
            stopper.join(timeout=90)
            holder.close()
    assert state.is_failed()
    message = failure_message(state)
    assert "\n" not in message
    assert own.host in message
    assert str(own.port) in message
    assert "lost the connection" in message or "cannot reach" in message.lower() or "refused" in message


def test_dbops_health_prints_the_report_without_a_flow_run(
    pg: PgCluster, db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from deployments.cli import main

    block = make_database_block(pg, f"hb-{db.replace('_', '-')}", db)
    assert main(["health", "--database", block, "--no-prescribed"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith(f"**{db}: OK**")
    assert "| top queries | skipped | pg_stat_statements is not installed |" in out
    churn_table(pg, db)
    assert main(["health", "--database", block, "--no-prescribed"]) == 1
    out = capsys.readouterr().out
    assert "**CRITICAL dead rows**" in out
