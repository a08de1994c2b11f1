"""Reindex procedures on a real cluster: index sizes, a concurrent build cancelled while it waits (the real
way an INVALID index or a `_ccnew` leftover is born), the size rule's judgements."""

from __future__ import annotations

import threading

import psycopg
from psycopg import sql

from flows.core.bloat import IndexRow, read_indexes
from flows.core.index_baseline import BaselineState, SizeJudgement, judge_sizes, read_index_shapes
from flows.core.postgres import server_version_num
from flows.core.reindex import leftovers_of
from tests.harness.pg import PgCluster, wait_until


def index_size(pg: PgCluster, dbname: str, index: str) -> int:
    return int(pg.sql("SELECT pg_relation_size(%s::regclass)", dbname, (index,))[0][0])


def cancel_while_waiting_for_a_writer(
    pg: PgCluster, dbname: str, table: str, statement: sql.SQL | sql.Composed
) -> None:
    """Run a concurrent index build that waits for an open writer once its index is in the catalog, then
    pg_cancel_backend it: the real way an INVALID index is born."""
    writer = pg.connect(dbname, autocommit=False)
    writer.execute(sql.SQL("LOCK TABLE {} IN ROW EXCLUSIVE MODE").format(sql.Identifier(table)))
    failure: list[BaseException] = []

    def build() -> None:
        with psycopg.connect(pg.conninfo(dbname), autocommit=True, application_name="doomed-build") as c:
            try:
                c.execute(statement)
            except psycopg.Error as exc:
                failure.append(exc)

    def invalid_index_exists() -> bool:
        return bool(
            pg.sql(
                "SELECT count(*) FROM pg_index WHERE NOT indisvalid AND indrelid = %s::regclass",
                dbname,
                (table,),
            )[0][0]
        )

    thread = threading.Thread(target=build)
    thread.start()
    try:
        wait_until(
            lambda: (
                pg.sql(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'doomed-build' "
                    "AND wait_event_type = 'Lock'",
                    dbname,
                )[0][0]
                == 1
                and invalid_index_exists()
            ),
            what="the concurrent build waiting for the open writer after creating its index",
        )
        pg.sql("SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE application_name = 'doomed-build'")
        thread.join(30)
    finally:
        writer.rollback()
        writer.close()
    assert failure
    assert isinstance(failure[0], psycopg.errors.QueryCanceled)


def make_ccnew_leftover(pg: PgCluster, dbname: str, table: str, index: str) -> str:
    """A real failed REINDEX CONCURRENTLY: it waits for an open writer, gets cancelled, leaves `_ccnew`."""
    statement = sql.SQL("REINDEX INDEX CONCURRENTLY {}").format(sql.Identifier(index))
    cancel_while_waiting_for_a_writer(pg, dbname, table, statement)
    names = [n for _, n in leftovers_of(pg.connect(dbname), "public", table)]
    assert names == [f"{index}_ccnew"]
    return names[0]


def judgements(pg: PgCluster, dbname: str, state: BaselineState | None = None) -> dict[str, SizeJudgement]:
    with pg.connect(dbname) as conn:
        rows = read_indexes(conn)
        shapes = read_index_shapes(conn, [r.oid for r in rows], server_version_num(conn))
        return judge_sizes(rows, shapes, state or BaselineState(), 8192)


def bloat_of(row: IndexRow) -> float:
    """The row's estimated bloat, which the test expects to be judged (not None)."""
    assert row.estimated_bloat is not None, f"{row.name}: the estimate could not judge it"
    return row.estimated_bloat
