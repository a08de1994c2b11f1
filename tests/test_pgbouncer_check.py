"""The PgBouncer check against a real PgBouncer (transaction pooling, pool_size 1): a client holding the
only server connection in a transaction makes a second client wait, and the check says so with figures."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator

import psycopg
import pytest

from blocks import PostgresDatabase
from flows.core.health.pooler import PoolerThresholds, connect_console, judge, read_pgbouncer
from flows.pgbouncer_check import pgbouncer_check
from tests.conftest import make_database_block
from tests.harness.pg import PgCluster, wait_until
from tests.harness.pgbouncer import PgBouncer, pgbouncer
from tests.harness.runs import artifact_table, failure_message, saved_database

pytestmark = pytest.mark.usefixtures("prefect_api")


@pytest.fixture
def small_pool(pg: PgCluster, unique: str) -> Iterator[tuple[PgBouncer, str]]:
    name = f"bounced_{unique}"
    pg.create_database(name)
    with pgbouncer(pg, default_pool_size=1, reserve_pool_size=0, databases={name: name}) as bouncer:
        yield bouncer, name


def admin_block(bouncer: PgBouncer) -> str:
    name = f"pgbouncer-{secrets.token_hex(3)}"
    PostgresDatabase(
        host=bouncer.host,
        port=bouncer.port,
        database="pgbouncer",
        user=bouncer.cluster.superuser,
        password=bouncer.cluster.password,
    ).save(name, overwrite=True)
    return name


class WaitingClient:
    """A client whose query waits for the pool's only server connection, in a thread joined at the end."""

    def __init__(self, bouncer: PgBouncer, database: str) -> None:
        self.conn = bouncer.connect(database)
        self.result: object = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        try:
            self.result = self.conn.execute("SELECT 42").fetchone()
        except BaseException as exc:  # reported by the test, not lost in the thread
            self.error = exc

    def __enter__(self) -> WaitingClient:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.thread.join(timeout=60)
        self.conn.close()
        assert not self.thread.is_alive()


def waiting_clients(bouncer: PgBouncer, database: str) -> int:
    return sum(int(str(p["cl_waiting"])) for p in bouncer.admin("SHOW POOLS") if p["database"] == database)


def artifact_rows(block: str) -> dict[str, dict[str, str]]:
    return {row["check"]: row for row in artifact_table(f"pgbouncer-check-{block}")}


def test_a_pool_with_waiting_clients_is_reported_with_figures_and_fails_the_run(
    pg: PgCluster, small_pool: tuple[PgBouncer, str], unique: str
) -> None:
    bouncer, database = small_pool
    block = admin_block(bouncer)
    direct = make_database_block(pg, f"direct-{unique}", database)
    holder = bouncer.connect(database, autocommit=False)
    holder.execute("SELECT 1")  # a transaction holds the pool's only server connection
    waiter = WaitingClient(bouncer, database)
    with waiter, holder:  # on the way out: the holder lets go (rollback, close), then the waiter is joined
        wait_until(lambda: waiting_clients(bouncer, database) == 1, what="a client waiting in PgBouncer")

        with connect_console(saved_database(block).params()) as console:
            checks = {c.name: c for c in judge(read_pgbouncer(console), None, PoolerThresholds())}
        pool = f"{database}/{pg.superuser}"
        waiting = checks[f"waiting clients {pool}"]
        assert waiting.status in ("warning", "critical")
        assert waiting.figure.startswith("1 waiting, 1 active clients; oldest waiting ")
        assert "wait for a server connection" in waiting.message
        assert "pool_size" in waiting.action
        saturation = checks[f"pool saturation {pool}"]
        assert saturation.status == "critical"
        assert saturation.figure.startswith("1 of 1 server connections busy (pool_size 1 + reserve_pool 0)")
        assert checks["server connections"].status == "skipped"

        state = pgbouncer_check(pgbouncer=block, database=direct, return_state=True)
        assert state.is_failed()
        message = failure_message(state)
        assert message.startswith(f"PgBouncer {block}: pool {pool} has 1 of its 1 server connections busy")
        assert "1 clients waiting" in message
        from tests.harness.runs import artifact

        latest = artifact(f"pgbouncer-check-{block}")
        assert (latest.description or "").startswith(f"**Failed**: {message}")
        rows = artifact_rows(block)
        assert rows[f"waiting clients {pool}"]["status"] in ("warning", "critical")
        assert rows[f"pool saturation {pool}"]["status"] == "critical"
        assert rows["server connections"]["status"] == "ok"
        assert "PgBouncer holds 1 server connections" in rows["server connections"]["figure"]
        assert f"of {60 - 3} connections in use" in rows["server connections"]["figure"]
        assert waiter.result is None  # still waiting: the check did not disturb it
    assert waiter.error is None
    assert waiter.result == (42,)


def test_a_quiet_pool_is_ok(pg: PgCluster, small_pool: tuple[PgBouncer, str], unique: str) -> None:
    bouncer, database = small_pool
    with bouncer.connect(database) as conn:
        conn.execute("SELECT 1")
    block = admin_block(bouncer)
    report = pgbouncer_check(pgbouncer=block, database=make_database_block(pg, f"direct-{unique}", database))
    assert report.status == "ok"
    assert report.pool_mode == "transaction"
    assert report.version == "PgBouncer 1.18.0"
    assert {c.status for c in report.checks} == {"ok"}


def test_the_console_refuses_a_user_outside_stats_users_with_the_fix(
    pg: PgCluster, small_pool: tuple[PgBouncer, str], unique: str
) -> None:
    bouncer, _ = small_pool
    # PostgreSQL itself at the block's address: not PgBouncer
    state = pgbouncer_check(
        pgbouncer=make_database_block(pg, f"notpgb-{unique}", "postgres"), return_state=True
    )
    assert "is PostgreSQL, not PgBouncer" in failure_message(state)
    with pytest.raises(psycopg.OperationalError):  # the harness' sanity: the console needs a known user
        psycopg.connect(host=bouncer.host, port=bouncer.port, dbname="pgbouncer", user="nobody", password="x")


def test_server_connections_are_judged_against_postgresqls_max_connections() -> None:
    from flows.core.health.pooler import PgBouncerSnapshot, ServerLimits, check_server_connections

    pool = {"database": "imagemanager", "user": "app", "sv_active": 40, "sv_idle": 10, "cl_waiting": 0}
    snap = PgBouncerSnapshot(
        version="PgBouncer 1.18.0",
        pools=[pool, {"database": "pgbouncer", "user": "pgbouncer"}],
        stats=[],
        databases=[{"name": "imagemanager", "pool_size": 50, "reserve_pool": 10}],
        config={"default_pool_size": "20", "reserve_pool_size": "0"},
    )
    t = PoolerThresholds()
    quiet = check_server_connections(snap, ServerLimits(200, 3, 60, "db1:5432"), t)
    assert quiet.status == "ok"
    assert quiet.figure == (
        "PgBouncer holds 50 server connections, its pools may open 60; "
        "PostgreSQL db1:5432 has 60 of 197 connections in use"
    )
    too_small = check_server_connections(snap, ServerLimits(50, 3, 20, "db1:5432"), t)
    assert too_small.status == "warning"
    assert too_small.message == "PgBouncer's pools may open 60 server connections, PostgreSQL allows 47"
    full = check_server_connections(snap, ServerLimits(100, 3, 95, "db1:5432"), t)
    assert full.status == "critical"
    assert "95 of 97 connections in use" in full.message
