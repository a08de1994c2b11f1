"""db_health's checks against a real PostgreSQL (the session cluster, a database per test): each check
fires on the real condition it is about, and a healthy database has nothing to say."""

from __future__ import annotations

import threading
from datetime import date

import psycopg
import pytest

from flows.core.health import Check
from flows.core.health.database import HealthReport, inspect_database
from flows.core.health.history import SizeHistory, sparkline
from flows.core.health.queries import ENABLE
from flows.core.health.report import render
from flows.core.health.thresholds import SEED_PRESCRIBED, HealthThresholds
from tests.harness.factories import churn_table
from tests.harness.pg import PgCluster, wait_until


@pytest.fixture
def db(pg: PgCluster, unique: str) -> str:
    name = f"health_{unique}"
    pg.create_database(name)
    pg.sql("CREATE TABLE items (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, x int)", name)
    pg.sql("INSERT INTO items (x) SELECT g FROM generate_series(1, 10) g", name)
    return name


def inspect(
    pg: PgCluster, db: str, user: str | None = None, password: str | None = None, **kw: object
) -> HealthReport:
    kw.setdefault("prescribed", [])
    conninfo = pg.conninfo(db, user=user, password=password)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        return inspect_database(conn, database=db, where=f"{pg.host}:{pg.port}/{db}", local_host=True, **kw)  # type: ignore[arg-type]


def checks(report: HealthReport) -> dict[str, Check]:
    return {c.name: c for c in report.checks}


def test_a_healthy_database_has_no_warning_and_says_how_to_enable_top_queries(pg: PgCluster, db: str) -> None:
    report = inspect(pg, db)
    assert [c for c in report.checks if c.status in ("warning", "critical")] == []
    assert report.status == "ok"
    found = checks(report)
    assert found[f"size {db}"].status == "ok"
    assert "growth not known yet" in found[f"size {db}"].figure
    assert report.database_bytes
    assert report.database_bytes > 1_000_000
    assert "public.items" in [n for n, _ in report.largest_tables]
    assert found["disk of the data directory"].status == "ok"  # the test runs on the database host
    top = found["top queries"]
    assert top.status == "skipped"
    assert top.figure == "pg_stat_statements is not installed"
    assert top.action == ENABLE
    text = render(report)
    assert text.splitlines()[0].startswith(f"**{db}: OK**")
    assert "Nothing to do" in text
    assert [line for line in text.splitlines() if "pg_stat_statements" in line] == [
        "| top queries | skipped | pg_stat_statements is not installed |",
        f"- top queries: pg_stat_statements is not installed; {ENABLE}",
    ]


def test_pg_stat_statements_created_but_not_preloaded_is_one_skipped_line(pg: PgCluster, db: str) -> None:
    pg.sql("CREATE EXTENSION pg_stat_statements", db)
    top = checks(inspect(pg, db))["top queries"]
    assert top.status == "skipped"
    assert top.figure == "pg_stat_statements is not loaded"
    assert top.action == ENABLE


def test_a_session_idle_in_transaction_and_the_oldest_transaction_are_reported(
    pg: PgCluster, db: str
) -> None:
    with psycopg.connect(pg.conninfo(db), autocommit=False, application_name="forgetful") as idle:
        idle.execute("SELECT 1")
        pid = idle.info.backend_pid
        wait_until(
            lambda: (
                pg.sql("SELECT state FROM pg_stat_activity WHERE pid = %s", db, (pid,))
                == [("idle in transaction",)]
            ),
            what="the session to be idle in transaction",
        )
        t = HealthThresholds(warn_idle_in_transaction_seconds=0, warn_transaction_seconds=0)
        found = checks(inspect(pg, db, thresholds=t))
    idle_check = found["idle in transaction"]
    assert idle_check.status == "warning"
    assert f"pid {pid} postgres (forgetful)" in idle_check.message
    assert "hold back vacuum" in idle_check.message
    assert f"pg_terminate_backend({pid})" in idle_check.action
    assert found["oldest transaction"].status == "warning"
    assert f"pid {pid}" in found["oldest transaction"].figure


def test_a_blocked_lock_names_its_blocker_and_a_query_hitting_statement_timeout_fails_only_its_check(
    pg: PgCluster, db: str
) -> None:
    holder = psycopg.connect(pg.conninfo(db), autocommit=False)
    holder.execute("LOCK TABLE items IN ACCESS EXCLUSIVE MODE")
    blocker = holder.info.backend_pid
    waiter = psycopg.connect(pg.conninfo(db), autocommit=True)
    thread = threading.Thread(target=lambda: waiter.execute("SELECT count(*) FROM items").fetchone())
    thread.start()
    try:
        wait_until(
            lambda: (
                pg.sql(
                    "SELECT 1 FROM pg_stat_activity WHERE pid = %s AND "
                    "cardinality(pg_blocking_pids(pid)) > 0",
                    db,
                    (waiter.info.backend_pid,),
                )
                != []
            ),
            what="the second session to wait for the lock",
        )
        t = HealthThresholds(warn_blocked_seconds=0)
        report = inspect(pg, db, thresholds=t, statement_timeout=1)
    finally:
        holder.rollback()
        holder.close()
        thread.join(timeout=30)
        waiter.close()
    found = checks(report)
    blocked = found["blocked sessions"]
    assert blocked.status == "warning"
    assert "waits" in blocked.figure
    assert f"for pid {blocker}" in blocked.figure
    assert f"blocked by pid {blocker} (idle in transaction" in blocked.message
    assert f"pg_terminate_backend({blocker})" in blocked.action
    # the size query reads every table's size, so it waits on the same lock: cancelled, its own failure
    size = found["size"]
    assert size.status == "critical"
    assert "did not finish within 1 s" in size.message
    assert report.first_critical() == size
    # ... and every other group still ran
    for name in (
        "connections",
        "sequences",
        "dead rows",
        "unused indexes",
        "cache hit ratio",
        "replication slots",
    ):
        assert found[name].status == "ok", found[name]


def test_a_sequence_at_90_percent_and_an_integer_key_fed_by_a_bigint_sequence(pg: PgCluster, db: str) -> None:
    pg.sql("CREATE SEQUENCE tickets AS integer", db)
    pg.sql("SELECT setval('tickets', 1932735283)", db)
    pg.sql("CREATE TABLE images (id integer GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, name text)", db)
    pg.sql("ALTER SEQUENCE images_id_seq AS bigint", db)
    pg.sql("SELECT setval('images_id_seq', 1717986918)", db)
    found = checks(inspect(pg, db))
    seq = found["sequences"]
    assert seq.status == "critical"
    assert seq.message == "sequence public.tickets has used 90.0% of its integer range"
    assert "ALTER SEQUENCE public.tickets AS bigint" in seq.action
    key = found["integer keys"]
    assert key.status == "warning"
    assert "public.images.id (integer) 80.0% of 2,147,483,647 (sequence bigint)" in key.figure
    assert "ALTER TABLE public.images ALTER COLUMN id TYPE bigint" in key.action


def test_a_table_with_many_dead_rows_is_flagged_for_vacuum(pg: PgCluster, db: str) -> None:
    churn_table(pg, db)
    report = inspect(pg, db)
    dead = checks(report)["dead rows"]
    assert dead.status == "critical"
    assert dead.message.startswith(
        "dead rows past 2x the autovacuum trigger in 1 table, the most in public.churn (20,000)"
    )
    assert "autovacuum is off for public.churn" in dead.message
    assert dead.figure == (
        "public.churn 20,000 dead / 0 live (trigger 50, autovacuum off, last vacuumed never)"
    )
    assert "vacuum=true" in dead.action
    assert report.vacuum_tables == [("public", "churn")]
    assert checks(report)["statistics (autoanalyze)"].status == "warning"


def test_unused_and_duplicate_indexes_and_a_missing_prescribed_index(pg: PgCluster, db: str) -> None:
    pg.sql(
        "CREATE TABLE data_instances (id bigint PRIMARY KEY, project_id bigint, deleted_at timestamptz)", db
    )
    pg.sql("INSERT INTO data_instances SELECT g, g % 10, NULL FROM generate_series(1, 5000) g", db)
    pg.sql("CREATE INDEX by_project ON data_instances (project_id)", db)
    pg.sql("CREATE INDEX by_project_again ON data_instances (project_id)", db)
    pg.sql("CREATE INDEX idx_images_deleted ON data_instances (project_id, deleted_at)", db)  # not partial
    t = HealthThresholds(min_unused_index_bytes=0)
    found = checks(inspect(pg, db, thresholds=t, prescribed=list(SEED_PRESCRIBED)))
    unused = found["unused indexes"]
    assert unused.status == "warning"
    assert "public.by_project on public.data_instances" in unused.figure
    assert "public.data_instances_pkey" not in unused.figure  # a constraint's index is not "unused"
    dup = found["duplicate indexes"]
    assert dup.status == "warning"
    assert "public.by_project and public.by_project_again on public.data_instances" in dup.message
    assert dup.action == "keep public.by_project and DROP INDEX CONCURRENTLY public.by_project_again"
    prescribed = found["prescribed indexes"]
    assert prescribed.status == "warning"
    assert prescribed.figure.startswith(
        "0 of 4 present and valid: idx_projects_meta_group is missing on projects"
    )
    assert "idx_images_project is missing on data_instances" in prescribed.figure
    assert "public.idx_images_deleted is not partial" in prescribed.figure
    assert found["invalid indexes"].status == "ok"


def test_an_inactive_replication_slot_is_a_warning_and_critical_by_the_wal_it_keeps(
    pg: PgCluster, db: str, unique: str
) -> None:
    slot = f"gone_{unique}"
    pg.sql("SELECT pg_create_physical_replication_slot(%s, true)", params=(slot,))
    try:
        pg.sql("CREATE TABLE wal_maker AS SELECT g FROM generate_series(1, 10000) g", db)
        found = checks(inspect(pg, db))
        assert found["replication slots"].status == "warning"
        assert found["replication slots"].message.startswith(
            f"replication slot {slot} is inactive and keeps "
        )
        assert f"pg_drop_replication_slot('{slot}')" in found["replication slots"].action
        critical = checks(inspect(pg, db, thresholds=HealthThresholds(critical_slot_bytes=1024)))
        assert critical["replication slots"].status == "critical"
    finally:
        pg.sql("SELECT pg_drop_replication_slot(%s)", params=(slot,))


def test_old_relfrozenxid_against_a_lowered_threshold(pg: PgCluster, db: str) -> None:
    with pg.connect(db) as conn:
        for _ in range(30):  # each autocommit statement that asks for one consumes a transaction ID
            conn.execute("SELECT txid_current()")
    t = HealthThresholds(warn_freeze_age_factor=10 / 200_000_000)  # 10 transactions with the default 200M
    found = checks(inspect(pg, db, thresholds=t))
    assert found[f"wraparound (tables of {db})"].status == "warning"
    assert "since the last freeze" in found[f"wraparound (tables of {db})"].message
    assert found["wraparound (databases)"].status == "warning"
    critical = checks(inspect(pg, db, thresholds=t.model_copy(update={"critical_xid_age": 20})))
    assert critical["wraparound (databases)"].status == "critical"
    assert "VACUUM (FREEZE" in critical["wraparound (databases)"].action


def test_a_role_without_pg_monitor_gets_skipped_checks_with_the_grant_not_a_crash(
    pg: PgCluster, db: str, unique: str
) -> None:
    role = f"watcher_{unique}"
    pg.create_role(role, "pw-watch")
    report = inspect(pg, db, user=role, password="pw-watch")
    assert report.has_monitor is False
    assert report.role == role
    found = checks(report)
    for name in (
        "long-running queries",
        "idle in transaction",
        "oldest transaction",
        "blocked sessions",
        "standby lag",
    ):
        assert found[name].status == "skipped", name
        assert found[name].action == f"GRANT pg_monitor TO {role}", name
    hidden = found["sequences not readable"]
    assert hidden.status == "skipped"
    assert hidden.action == f"GRANT SELECT ON ALL SEQUENCES IN SCHEMA public TO {role}"
    assert found["disk of the data directory"].status == "skipped"
    assert "needs pg_monitor" in found["disk of the data directory"].figure
    assert found[f"size {db}"].status == "ok"
    assert found["connections"].status == "ok"
    pg.sql(f"GRANT pg_monitor TO {role}")
    assert checks(inspect(pg, db, user=role, password="pw-watch"))["idle in transaction"].status == "ok"


def test_size_history_growth_and_sparkline() -> None:
    history = SizeHistory()
    for day in range(1, 80):
        history = history.record(
            date(2026, 9, 1).fromordinal(date(2026, 9, 1).toordinal() + day), 1_000 * day
        )
    assert len(history.days) == 60  # the last 60 days only
    assert history.growth_per_day() == pytest.approx(1_000)
    today = max(date.fromisoformat(d) for d in history.days)
    assert sparkline(history.last_days(today)) == "▁▂▂▃▃▄▄▅▅▆▆▇▇█"
    assert len(history.to_value()) < 4800
    assert SizeHistory.from_value(history.to_value()) == history
    assert SizeHistory.from_value("not json") == SizeHistory()
    assert sparkline([None, 5, None, 5]) == " ▁ ▁"
    assert SizeHistory().record(today, 1).growth_per_day() is None


def test_top_queries_from_pg_stat_statements_when_it_is_loaded(unique: str) -> None:
    from tests.harness.pg import pg_cluster

    with pg_cluster(settings={"shared_preload_libraries": "'pg_stat_statements'"}) as own:
        own.create_database("stats")
        own.sql("CREATE EXTENSION pg_stat_statements", "stats")
        for _ in range(3):
            own.sql("SELECT count(*) FROM generate_series(1, 20000)", "stats")
        report = inspect(own, "stats")
    top = checks(report)["top queries"]
    assert top.status == "ok"
    assert " calls (mean " in top.figure
    assert len(report.top_queries) == 10 or len(report.top_queries) >= 2
    assert any("generate_series" in str(q["query"]) and q["calls"] == 3 for q in report.top_queries)


def test_a_long_running_query_is_reported_with_its_pid(pg: PgCluster, db: str) -> None:
    sleeper = psycopg.connect(pg.conninfo(db), autocommit=True)
    pid = sleeper.info.backend_pid
    errors: list[BaseException] = []

    def sleep() -> None:
        try:
            sleeper.execute("SELECT pg_sleep(60)")
        except psycopg.errors.QueryCanceled as exc:  # cancelled below, as the action says
            errors.append(exc)

    thread = threading.Thread(target=sleep)
    thread.start()
    try:
        wait_until(
            lambda: pg.sql("SELECT state FROM pg_stat_activity WHERE pid = %s", db, (pid,)) == [("active",)],
            what="the query to be running",
        )
        found = checks(inspect(pg, db, thresholds=HealthThresholds(warn_active_seconds=0)))
    finally:
        pg.sql("SELECT pg_cancel_backend(%s)", db, (pid,))
        thread.join(timeout=30)
        sleeper.close()
    long = found["long-running queries"]
    assert long.status == "warning"
    assert f"pid {pid}" in long.message
    assert "SELECT pg_sleep(60)" in long.figure
    assert long.action.endswith(f"SELECT pg_cancel_backend({pid})")
    assert len(errors) == 1


def test_an_invalid_index_left_by_a_failed_concurrent_build(pg: PgCluster, db: str) -> None:
    pg.sql("CREATE TABLE twins (x int)", db)
    pg.sql("INSERT INTO twins VALUES (1), (1)", db)
    with pytest.raises(psycopg.errors.UniqueViolation):
        pg.sql("CREATE UNIQUE INDEX CONCURRENTLY twins_x ON twins (x)", db)
    invalid = checks(inspect(pg, db))["invalid indexes"]
    assert invalid.status == "warning"
    assert invalid.message.startswith(
        "1 invalid index (a failed concurrent build), public.twins_x on public.twins"
    )
    assert invalid.action.startswith("DROP INDEX CONCURRENTLY public.twins_x")


def test_the_judges_of_connections_disk_standbys_cache_and_autovacuum_workers() -> None:
    from flows.core.health.cache import CacheFigures, DatabaseIo, check_hit_ratio, check_temp_files
    from flows.core.health.connections import ConnectionFigures, check_connections
    from flows.core.health.replication import Standby, check_standbys
    from flows.core.health.size import DiskFigures, check_disk
    from flows.core.health.thresholds import GIB
    from flows.core.health.vacuum import VacuumFigures, check_workers

    t = HealthThresholds()
    conns = ConnectionFigures(100, 3, [("active", "api", 60), ("idle", "api", 20)])
    assert check_connections(conns, t).status == "warning"
    assert check_connections(conns, t).figure.startswith(
        "80 of 97 in use (82%; max_connections 100 - 3 reserved)"
    )
    assert check_connections(ConnectionFigures(100, 3, [("idle", "api", 95)]), t).status == "critical"

    disk = DiskFigures("/data", total_bytes=1000 * GIB, free_bytes=300 * GIB)
    assert check_disk(disk, None, t).status == "ok"
    assert check_disk(disk, 20 * GIB, t).status == "warning"  # full in 15 days
    assert check_disk(disk, 60 * GIB, t).status == "critical"  # full in 5 days
    assert "fills in about 5 days" in check_disk(disk, 60 * GIB, t).message
    assert check_disk(DiskFigures("/data", 1000 * GIB, 40 * GIB), None, t).status == "critical"  # 4 % free
    unreadable = check_disk(DiskFigures("/data", unreadable="dbops runs on another host"), 1.0, t)
    assert unreadable.status == "skipped"
    assert "another host" in unreadable.figure

    assert check_standbys([Standby("replica1", "10.0.0.2", "streaming", 0.5)], t).status == "ok"
    lagging = check_standbys([Standby("replica1", "10.0.0.2", "streaming", 120.0)], t)
    assert lagging.status == "warning"
    assert lagging.message == "standby replica1 replays 120 s behind"
    assert check_standbys([Standby("", "10.0.0.2", "streaming", 1000.0)], t).status == "critical"

    cold = CacheFigures([DatabaseIo("imagemanager", 900_000, 100_000, 10, 50 * GIB, 86400.0)], [])
    assert check_hit_ratio(cold, t, "imagemanager").status == "warning"
    assert "finds 90.0% of its blocks" in check_hit_ratio(cold, t, "imagemanager").message
    assert check_hit_ratio(cold, t, "other").status == "ok"  # another database's cache is its own run's
    few = CacheFigures([DatabaseIo("imagemanager", 900, 100, 0, 0, 86400.0)], [])
    assert check_hit_ratio(few, t, "imagemanager").status == "ok"  # too few reads to judge
    assert check_temp_files(cold, t, "imagemanager").status == "warning"  # 50 GiB in one day

    busy = VacuumFigures([], {"autovacuum": "on", "autovacuum_max_workers": "3"}, 3)
    assert check_workers(busy).status == "warning"
    assert "all 3 autovacuum workers are busy" in check_workers(busy).message
    off = VacuumFigures([], {"autovacuum": "off", "autovacuum_max_workers": "3"}, 0)
    assert check_workers(off).status == "warning"
    assert "autovacuum is off" in check_workers(off).message
