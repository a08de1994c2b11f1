"""Issue 19: dbops goes around PgBouncer, never through it.

A real PgBouncer (Debian's package, transaction pooling, tests/harness/pgbouncer.py) stands in front of
the session's test cluster, as in front of `imagemanager` in production. Every flow refuses a block that
points at it, with one sentence, before it changes anything; the same preflights pass on PostgreSQL's own
port and through a plain TCP forward (which gives a real session, like Docker's port mapping).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prefect.logging import disable_run_logger
from prefect.variables import Variable

from blocks import PostgresDatabase
from flows.core.errors import ConfigurationError, ConnectionPoolerInTheWay
from flows.core.pooler import ServerView, connect_direct, route_signals
from flows.core.postgres import ConnParams, connect
from tests.conftest import make_local_block
from tests.harness.factories import sample_database
from tests.harness.forward import tcp_forward
from tests.harness.pg import PgCluster
from tests.harness.pgbouncer import PgBouncer, pgbouncer
from tests.harness.runs import failure_message, saved_database

pytestmark = pytest.mark.usefixtures("prefect_api")

REPO_ROOT = Path(__file__).resolve().parents[1]
MIGRATE_APP = REPO_ROOT / "tests" / "fixtures" / "migrate_app"


def sentence(block: str, bouncer: PgBouncer) -> str:
    return (
        f"database block {block} reaches PostgreSQL through a connection pooler at "
        f"{bouncer.host}:{bouncer.port} (PgBouncer 1.18.0; the server listens on {bouncer.cluster.port}); "
        "dbops needs a real session for pg_dump's snapshot, the migration lock and lock_timeout: point the "
        "block at PostgreSQL itself"
    )


@pytest.fixture(scope="module")
def bouncer(pg: PgCluster) -> Iterator[PgBouncer]:
    """Transaction pooling in front of every database of the test cluster (`* = host=... port=...`)."""
    with pgbouncer(pg, pool_mode="transaction") as running:
        yield running


@dataclass
class Setup:
    pg: PgCluster
    bouncer: PgBouncer
    tag: str
    database: str
    staging: str
    store: str  # holds one backup of `database`, taken directly
    tmp: Path

    def block(self, database: str, port: int | None = None, **fields: Any) -> str:
        name = f"{database.replace('_', '-')}-{port or self.pg.port}-{secrets.token_hex(2)}"
        PostgresDatabase(
            host=self.pg.host,
            port=port or self.pg.port,
            database=database,
            user=self.pg.superuser,
            password=self.pg.password,
            **fields,
        ).save(name, overwrite=True)
        return name

    def pooled(self, database: str, **fields: Any) -> str:
        return self.block(database, self.bouncer.port, **fields)

    def empty_store(self) -> tuple[str, Path]:
        path = self.tmp / f"empty-{secrets.token_hex(3)}"
        return make_local_block(f"empty-{self.tag}-{secrets.token_hex(2)}", path), path


@pytest.fixture(scope="module")
def setup(pg: PgCluster, bouncer: PgBouncer, tmp_path_factory: pytest.TempPathFactory) -> Setup:
    from flows.nightly_dump import nightly_dump

    tag = secrets.token_hex(3)
    database = sample_database(pg, f"pooled_{tag}", rows=500)
    staging = f"pooled_stg_{tag}"
    pg.create_database(staging)
    tmp = tmp_path_factory.mktemp("pooler")
    s = Setup(pg, bouncer, tag, database, staging, "", tmp)
    s.store = make_local_block(f"pooled-backups-{tag}", tmp / "backups")
    nightly_dump(database=s.block(database), storage=s.store)  # direct: the backup restore flows need
    return s


def databases(pg: PgCluster) -> set[str]:
    return {r[0] for r in pg.sql("SELECT datname FROM pg_database")}


def advisory_locks(pg: PgCluster) -> list[tuple]:
    return pg.sql("SELECT pid, objid FROM pg_locks WHERE locktype = 'advisory'")


def files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []


# -- every flow refuses a block that points at PgBouncer ---------------------------------------------------


def run_nightly_dump(s: Setup, store: str) -> tuple[str, Any]:
    from flows.nightly_dump import nightly_dump

    block = s.pooled(s.database)
    return block, nightly_dump(database=block, storage=store, return_state=True)


def run_restore(s: Setup, store: str) -> tuple[str, Any]:
    from flows.restore import restore

    block = s.pooled(f"restored_{s.tag}")
    return block, restore(storage=s.store, source_database=s.database, target=block, return_state=True)


def run_restore_drill(s: Setup, store: str) -> tuple[str, Any]:
    from flows.restore_drill import restore_drill

    block = s.pooled(s.database)
    state = restore_drill(
        storage=s.store, source_database=s.database, scratch=block, amcheck=False, return_state=True
    )
    return block, state


def _migrate(s: Setup, store: str, production: str, staging: str) -> Any:
    from flows.migrate import MigrateOptions, migrate

    return migrate(
        database=production,
        staging_database=staging,
        storage=store,
        alembic=str(MIGRATE_APP),
        options=MigrateOptions(lock_wait_hours=0.01),
        return_state=True,
    )


def run_migrate_production(s: Setup, store: str) -> tuple[str, Any]:
    block = s.pooled(s.database)
    return block, _migrate(s, store, block, s.block(s.staging))


def run_migrate_staging(s: Setup, store: str) -> tuple[str, Any]:
    """The issue's case: staging's refresh went through PgBouncer ("no such database: postgres")."""
    block = s.pooled(s.staging)
    return block, _migrate(s, store, s.block(s.database), block)


def run_weekly_reindex(s: Setup, store: str) -> tuple[str, Any]:
    from flows.weekly_reindex import weekly_reindex

    block = s.pooled(s.database)
    return block, weekly_reindex(database=block, min_index_size=0, bloat_threshold=0.01, return_state=True)


def run_wal_archive_check(s: Setup, store: str) -> tuple[str, Any]:
    from flows.wal_archive_check import CheckOptions, wal_archive_check

    block = s.pooled(s.database)
    state = wal_archive_check(
        database=block,
        archive={"directory": str(s.tmp)},
        options=CheckOptions(state_variable=f"pooled_wal_{s.tag}"),
        return_state=True,
    )
    return block, state


FLOWS: dict[str, Callable[[Setup, str], tuple[str, Any]]] = {
    "nightly_dump": run_nightly_dump,
    "restore": run_restore,
    "restore_drill": run_restore_drill,
    "migrate-production": run_migrate_production,
    "migrate-staging": run_migrate_staging,
    "weekly_reindex": run_weekly_reindex,
    "wal_archive_check": run_wal_archive_check,
}


@pytest.mark.parametrize("flow", FLOWS)
def test_every_flow_refuses_a_block_through_pgbouncer_and_touches_nothing(setup: Setup, flow: str) -> None:
    s = setup
    before = databases(s.pg)
    reindexed_before = s.pg.sql("SELECT relfilenode FROM pg_class WHERE relname = 'images_pkey'", s.database)
    store, store_path = s.empty_store()
    backups_before = files(s.tmp / "backups")

    block, state = FLOWS[flow](s, store)

    assert state.is_failed()
    assert failure_message(state) == sentence(block, s.bouncer)
    assert databases(s.pg) == before  # no restored, temporary or scratch database; staging not dropped
    assert s.pg.sql("SELECT count(*) FROM pg_database WHERE datname = %s", params=(s.staging,)) == [(1,)]
    assert files(store_path) == []  # no dump, no pre-backup
    assert files(s.tmp / "backups") == backups_before  # no drill record
    # no session lock left behind on a pooled server connection (the migration / reindex lock)
    assert advisory_locks(s.pg) == []
    assert s.pg.sql("SELECT relfilenode FROM pg_class WHERE relname = 'images_pkey'", s.database) == (
        reindexed_before
    )
    assert Variable.get(f"pooled_wal_{s.tag}", default=None) is None


# -- the same preflights pass on PostgreSQL's own port and through a plain TCP forward ---------------------


def preflight_check_database(block: str) -> None:
    from flows.tasks.backup import check_database

    check_database.fn(block)


def preflight_check_target_server(block: str) -> None:
    from flows.tasks.restore import check_target_server

    check_target_server.fn(block, "postgres")


def preflight_read_archiver_status(block: str) -> None:
    from flows.tasks.wal import read_archiver_status

    read_archiver_status.fn(block)


def preflight_check_database_route(block: str) -> None:
    from flows.tasks.session import check_database_route

    check_database_route.fn(block)


PREFLIGHTS = {
    "nightly_dump: check_database": preflight_check_database,
    "restore, restore_drill: check_target_server": preflight_check_target_server,
    "wal_archive_check: read_archiver_status": preflight_read_archiver_status,
    "migrate, weekly_reindex: check_database_route": preflight_check_database_route,
}


@pytest.mark.parametrize("route", ["direct", "tcp forward"])
@pytest.mark.parametrize("preflight", PREFLIGHTS)
def test_preflights_pass_on_the_direct_port_and_through_a_plain_tcp_forward(
    setup: Setup, preflight: str, route: str
) -> None:
    with disable_run_logger():
        if route == "direct":
            PREFLIGHTS[preflight](setup.block(setup.database))
        else:
            with tcp_forward(setup.pg.host, setup.pg.port) as port:
                PREFLIGHTS[preflight](setup.block(setup.database, port))


def test_a_tcp_forward_is_recognised_and_said_not_refused(setup: Setup) -> None:
    with tcp_forward(setup.pg.host, setup.pg.port) as port:
        params = saved_database(setup.block(setup.database, port)).params()
        conn, route = connect_direct(params, block="forwarded")
        conn.close()
    assert route.kind == "tcp forward"
    assert route.server_port == setup.pg.port
    assert route.block_port == port
    assert "PostgreSQL itself answered the pooler probe" in route.detail
    conn, route = connect_direct(saved_database(setup.block(setup.database)).params(), block="direct")
    conn.close()
    assert route.kind == "direct"


def test_signals_are_the_server_port_and_the_client_endpoint() -> None:
    view = ServerView(
        port_setting=5432, server_port=5432, client_addr="10.0.0.5", client_port=40000, backend_pid=1
    )
    assert route_signals(view, ("10.0.0.5", 40000), 5432) == []
    assert route_signals(view, ("10.0.0.9", 51000), 5432) == [
        "the server sees the client 10.0.0.5:40000, our socket is 10.0.0.9:51000"
    ]
    assert route_signals(view, ("10.0.0.5", 40000), 6432) == [
        "the server listens on 5432, the block connects to 6432"
    ]
    unix = ServerView(port_setting=5432, server_port=None, client_addr=None, client_port=None, backend_pid=1)
    assert route_signals(unix, None, 5432) == []
    assert route_signals(unix, ("127.0.0.1", 4000), 5432) == [
        "we connect over TCP but the server sees a unix-socket client"
    ]


@pytest.mark.parametrize(
    ("fatal", "pgbouncer"),
    [
        ("not allowed", True),  # a user outside admin_users / stats_users at the console
        ("no such database: postgres", True),
        ("SASL authentication failed", True),
        ("pgbouncer cannot connect to server", True),
        ('database "pgbouncer" does not exist', False),  # PostgreSQL itself
        ('password authentication failed for user "dbops"', False),
        ('role "dbops" is not permitted to log in', False),
    ],
)
def test_pgbouncers_own_refusals_are_told_from_postgresqls(fatal: str, pgbouncer: bool) -> None:
    from flows.core.pooler_refusal import is_pgbouncer_refusal

    text = f'connection failed: connection to server at "10.0.0.1", port 6432 failed: FATAL:  {fatal}'
    assert is_pgbouncer_refusal(text) is pgbouncer


# -- PgBouncer's own login errors, and allow_pooler --------------------------------------------------------


def test_a_login_pgbouncer_refuses_says_pooler_not_server_down(setup: Setup) -> None:
    """The issue's message was "cannot reach PostgreSQL ... no such database: postgres; check that the
    server is up": PgBouncer without a `postgres` entry answered the staging refresh's maintenance login."""
    with pgbouncer(setup.pg, databases={setup.staging: setup.staging}) as named:
        params = ConnParams(
            host=named.host,
            port=named.port,
            database="postgres",
            user=setup.pg.superuser,
            password=setup.pg.password,
        )
        with pytest.raises(ConnectionPoolerInTheWay) as caught:
            connect(params)
    message = str(caught.value)
    assert message.startswith(
        f"the database block for {named.host}:{named.port} reaches PostgreSQL through a "
    )
    assert "PgBouncer answered: no such database: postgres" in message
    assert "check that the server is up" not in message


def test_allow_pooler_does_not_let_transaction_pooling_through(setup: Setup) -> None:
    block = setup.pooled(setup.database, allow_pooler=True)
    with pytest.raises(ConnectionPoolerInTheWay) as caught:
        saved_database(block).connect_direct()
    assert "allow_pooler=true does not help" in str(caught.value)
    assert "a second connection was handed the same backend" in str(caught.value)
    assert advisory_locks(setup.pg) == []  # the probe's lock was released


def test_allow_pooler_accepts_session_pooling_with_a_dedicated_server_session(setup: Setup) -> None:
    with pgbouncer(setup.pg, pool_mode="session") as session_pooler:
        name = f"session-{setup.tag}"
        for allow in (False, True):
            PostgresDatabase(
                host=session_pooler.host,
                port=session_pooler.port,
                database=setup.database,
                user=setup.pg.superuser,
                password=setup.pg.password,
                allow_pooler=allow,
            ).save(name, overwrite=True)
            block = saved_database(name)
            if not allow:
                with pytest.raises(ConnectionPoolerInTheWay, match="through a connection pooler at"):
                    block.connect_direct()
                continue
            conn, route = block.connect_direct()
            with conn:
                assert conn.execute("SELECT count(*) FROM images").fetchone() == (500,)
    assert route.kind == "session pooler (allowed)"
    assert "PgBouncer 1.18.0" in route.detail


# -- dbops setup: the application's URL is refused, PostgreSQL's own is asked for ----------------------------


@pytest.mark.parametrize("where", ["pgbouncer on the line", "port 6432 unreachable"])
def test_dbops_setup_refuses_the_applications_pgbouncer_url(setup: Setup, where: str) -> None:
    from deployments.setup import DatabaseConfig, SetupConfig, run_setup

    name = f"app-url-{secrets.token_hex(3)}"
    port = setup.bouncer.port if where == "pgbouncer on the line" else 6432
    host = setup.pg.host if where == "pgbouncer on the line" else "127.0.0.254"
    url = f"postgresql://{setup.pg.superuser}@{host}:{port}/{setup.database}?connect_timeout=2"
    config = SetupConfig(databases={name: DatabaseConfig(url=url, password_env="PW")})
    with pytest.raises(ConfigurationError) as caught:
        run_setup(config, environ={"PW": setup.pg.password})
    message = str(caught.value)
    assert "not the application's DATABASE_URL" in message
    if where == "pgbouncer on the line":
        assert message.startswith(sentence(name, setup.bouncer))
    else:
        assert message.startswith(f"database {name}: port 6432 is PgBouncer's")
    with pytest.raises(ValueError, match="Unable to find block document"):  # nothing was created
        PostgresDatabase.load(name)


def test_dbops_setup_takes_postgresqls_own_url_and_a_pgbouncer_console_block(setup: Setup) -> None:
    from deployments.setup import DatabaseConfig, SetupConfig, run_setup

    direct, console = f"own-url-{secrets.token_hex(3)}", f"console-{secrets.token_hex(3)}"
    user = setup.pg.superuser
    config = SetupConfig(
        databases={
            direct: DatabaseConfig(
                url=f"postgresql://{user}@{setup.pg.host}:{setup.pg.port}/{setup.database}"
            ),
            console: DatabaseConfig(
                url=f"postgresql://{user}@{setup.bouncer.host}:{setup.bouncer.port}/pgbouncer"
            ),
        }
    )
    for cfg in config.databases.values():
        cfg.password_env = "PW"
    report = run_setup(config, environ={"PW": setup.pg.password})
    assert ("block", f"postgres-database/{direct}", "created") in report.items
    assert ("block", f"postgres-database/{console}", "created") in report.items
