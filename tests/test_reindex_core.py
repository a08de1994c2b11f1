"""Bloat measurement, candidate planning and one REINDEX CONCURRENTLY against a real PostgreSQL cluster
(flows.core.bloat and flows.core.reindex: no Prefect)."""

from __future__ import annotations

import threading
from typing import Any

import psycopg
import pytest

from flows.core.bloat import (
    IndexRow,
    Selection,
    check_server_version,
    estimated_btree_bloat,
    measure,
    pgstattuple_schema,
    plan_reindex,
    read_indexes,
)
from flows.core.errors import VersionMismatch
from flows.core.reindex import ReindexBusy, leftovers_of, rebuild_index, reindex_advisory_lock
from tests.harness.factories import bloated_database, conn_params
from tests.harness.pg import PgCluster, wait_until
from tests.harness.reindex import bloat_of, index_size, make_ccnew_leftover


@pytest.fixture
def bloated(pg: PgCluster, unique: str) -> str:
    return bloated_database(pg, f"bloat_{unique}")


# -- pure planning ----------------------------------------------------------------------------------------


def row(name: str, **kw: Any) -> IndexRow:
    fields: dict[str, Any] = {
        "oid": 1,
        "schema": "public",
        "table": "t",
        "name": name,
        "am": "btree",
        "size_bytes": 10 << 20,
        "valid": True,
    }
    fields.update(kw)
    return IndexRow(**fields)


def test_plan_drops_leftovers_first_then_rebuilds_largest_waste_first_and_says_why_others_are_skipped() -> (
    None
):
    rows = [
        row("small_bloated", size_bytes=1 << 20, estimated_bloat=0.9, method="estimate"),
        row("big_bloated", size_bytes=100 << 20, estimated_bloat=0.5, method="estimate"),
        row("mid_bloated", size_bytes=20 << 20, estimated_bloat=0.9, method="pgstatindex"),
        row("healthy", estimated_bloat=0.05, method="estimate"),
        row("t_pkey_ccnew", valid=False, size_bytes=8192),
        row("broken_idx", valid=False),
        row("excl", exclusion=True, estimated_bloat=0.9),
        row("brin_idx", am="brin"),
        row("gin_idx", am="gin"),
        row("pg_class_oid_index", schema="pg_catalog", estimated_bloat=0.9),
        row("tmp_idx", schema="pg_temp_3", temporary=True, estimated_bloat=0.9),
        row("nostats", estimated_bloat=None),
        row("other_schema", schema="audit", estimated_bloat=0.9),
    ]
    plan = plan_reindex(
        rows, bloat_threshold=0.3, min_index_size=2 << 20, selection=Selection(exclude_schemas=["audit"])
    )
    # waste: big 50 MiB, mid 18 MiB, broken (invalid: all of it) 10 MiB
    assert [c.index.name for c in plan.candidates] == [
        "t_pkey_ccnew",
        "big_bloated",
        "mid_bloated",
        "broken_idx",
    ]
    assert [c.action for c in plan.candidates] == ["drop_leftover", "rebuild", "rebuild", "rebuild"]
    reasons = {s.index.name: s.reason for s in plan.skipped}
    assert reasons["small_bloated"] == "under the minimum size"
    assert "exclusion" in reasons["excl"]
    assert "BRIN" in reasons["brin_idx"]
    assert "gin" in reasons["gin_idx"]
    assert reasons["pg_class_oid_index"] == "system catalog"
    assert reasons["tmp_idx"] == "temporary table"
    assert "ANALYZE" in reasons["nostats"]
    assert reasons["other_schema"] == "not selected"
    assert [r.name for r in plan.healthy] == ["healthy"]


def test_selection_patterns_match_schema_table_and_index_names() -> None:
    selection = Selection(include_tables=["public.orders*"], exclude_indexes=["*_tmp"])
    assert selection.allows(row("orders_pkey", table="orders"))
    assert selection.allows(row("orders_archive_pkey", table="orders_archive"))
    assert not selection.allows(row("orders_tmp", table="orders"))
    assert not selection.allows(row("users_pkey", table="users"))
    assert not Selection(include_schemas=["app"]).allows(row("orders_pkey"))


def test_catalog_estimate_arithmetic_flags_a_sparse_btree_and_not_a_packed_one() -> None:
    # 100,000 bigint keys pack into ~273 leaf pages at fillfactor 90 (20 bytes per tuple).
    assert estimated_btree_bloat(280 * 8192, 100_000, 8, 90, 8192) == pytest.approx(0.0, abs=0.02)
    assert estimated_btree_bloat(2800 * 8192, 100_000, 8, 90, 8192) == pytest.approx(0.9, abs=0.02)
    assert estimated_btree_bloat(2800 * 8192, -1, 8, 90, 8192) is None  # never vacuumed/analyzed


@pytest.mark.parametrize("version", [140000, 140003, 110020])
def test_postgresql_14_0_to_14_3_and_pre_12_are_refused(version: int) -> None:
    with pytest.raises(VersionMismatch, match=r"14\.4|12 or newer"):
        check_server_version(version)
    check_server_version(140004)
    check_server_version(150007)


# -- against a real cluster -------------------------------------------------------------------------------


def test_mass_deleted_index_is_flagged_by_estimate_and_pgstatindex_while_fresh_one_is_healthy(
    pg: PgCluster, bloated: str
) -> None:
    with pg.connect(bloated) as conn:
        rows = [r for r in read_indexes(conn) if r.schema == "public"]
        by_name = {r.name: r for r in rows}
        assert bloat_of(by_name["items_pkey"]) > 0.6
        assert by_name["items_pkey"].method == "estimate"
        assert bloat_of(by_name["healthy_pkey"]) < 0.15
        exact = {r.name: r for r in measure(conn, rows, 0.3, pgstattuple_schema(conn))}
    assert exact["items_pkey"].method == "pgstatindex"
    assert bloat_of(exact["items_pkey"]) > 0.6
    assert exact["items_code_idx"].method == "pgstatindex"
    assert bloat_of(exact["items_code_idx"]) > 0.6
    assert exact["healthy_pkey"].method == "estimate"  # the estimate cleared it: pgstatindex not needed
    plan = plan_reindex(exact.values(), bloat_threshold=0.3, min_index_size=64 << 10)
    assert {c.index.name for c in plan.rebuilds} == {"items_pkey", "items_code_idx"}
    assert [r.name for r in plan.healthy] == ["healthy_pkey"]


def test_open_transaction_stalls_the_rebuild_which_times_out_drops_its_ccnew_retries_and_names_the_blocker(
    pg: PgCluster, bloated: str
) -> None:
    """An open writer stalls the rebuild after it created `_ccnew`: lock timeout, cleanup, retry, success."""
    blocker = psycopg.connect(pg.conninfo(bloated), autocommit=False, application_name="long-writer")
    blocker.execute("INSERT INTO items VALUES (-1, -1, 'open transaction')")
    blocker_pid = blocker.info.backend_pid
    released: list[int] = []

    def release(attempt: int, result: object) -> None:
        released.append(attempt)
        blocker.rollback()

    before = index_size(pg, bloated, "items_pkey")
    said: list[str] = []
    try:
        result = rebuild_index(
            conn_params(pg, bloated),
            "public",
            "items_pkey",
            lock_timeout_s=1.0,
            retries=2,
            backoff_s=0.05,
            on_retry=release,
            progress=said.append,
            progress_interval=0.2,
        )
    finally:
        blocker.close()
    assert result.status == "rebuilt"
    assert result.attempts == 2
    assert released == [1]
    # While stalled, the progress lines say which phase it is in and whom it waits for.
    assert any(line.startswith("waiting for writers") and str(blocker_pid) in line for line in said), said
    assert result.leftovers_dropped == ["items_pkey_ccnew"]
    assert not result.leftovers_remaining
    [who] = result.blockers
    assert who.pid == blocker_pid
    assert who.application_name == "long-writer"
    assert who.state == "idle in transaction"
    assert who.xact_start.endswith("Z")
    assert not leftovers_of(pg.connect(bloated), "public", "items")
    assert index_size(pg, bloated, "items_pkey") < before / 3


def test_index_locked_for_longer_than_all_retries_fails_without_leaving_an_invalid_index(
    pg: PgCluster, bloated: str
) -> None:
    with psycopg.connect(pg.conninfo(bloated), autocommit=False, application_name="ddl-session") as holder:
        holder.execute("LOCK TABLE items IN SHARE UPDATE EXCLUSIVE MODE")
        result = rebuild_index(
            conn_params(pg, bloated),
            "public",
            "items_code_idx",
            lock_timeout_s=1.0,
            retries=1,
            backoff_s=0.01,
        )
        holder.rollback()
    assert result.status == "failed"
    assert result.attempts == 2
    assert "lock timeout" in (result.error or "")
    assert [b.application_name for b in result.blockers] == ["ddl-session"]
    assert "lock on the table" in result.blockers[0].waiting_for
    assert not leftovers_of(pg.connect(bloated), "public", "items")


def test_cancelled_concurrent_rebuild_leaves_an_invalid_ccnew_that_the_plan_drops(
    pg: PgCluster, bloated: str
) -> None:
    leftover = make_ccnew_leftover(pg, bloated, "items", "items_code_idx")
    with pg.connect(bloated) as conn:
        plan = plan_reindex(read_indexes(conn), bloat_threshold=0.3, min_index_size=1 << 30)
    assert [(c.index.name, c.action) for c in plan.candidates] == [(leftover, "drop_leftover")]


def test_second_reindexer_is_refused_by_the_advisory_lock_naming_the_holder(
    pg: PgCluster, bloated: str
) -> None:
    params = conn_params(pg, bloated)
    with (
        reindex_advisory_lock(params) as first,
        pytest.raises(ReindexBusy, match=f"pid {first.info.backend_pid}, application dbops-reindex"),
        reindex_advisory_lock(params),
    ):
        pass
    with reindex_advisory_lock(params):  # released with the run
        pass


def test_real_catalog_skips_exclusion_brin_temporary_and_system_indexes(pg: PgCluster, bloated: str) -> None:
    pg.sql("CREATE TABLE slots (room int, EXCLUDE USING btree (room WITH =))", bloated)
    pg.sql("CREATE INDEX items_note_brin ON items USING brin (id)", bloated)
    with pg.connect(bloated) as session:
        session.execute("CREATE TEMP TABLE scratch (id int PRIMARY KEY)")
        with pg.connect(bloated) as conn:
            plan = plan_reindex(read_indexes(conn), bloat_threshold=0.3, min_index_size=0)
    reasons = {s.index.name: s.reason for s in plan.skipped}
    assert reasons["slots_room_excl"].startswith("exclusion constraint")
    assert reasons["items_note_brin"].startswith("BRIN")
    assert reasons["scratch_pkey"] == "temporary table"
    assert reasons["pg_class_oid_index"] == "system catalog"
    assert {c.index.name for c in plan.rebuilds} == {"items_pkey", "items_code_idx"}


def test_rebuild_whose_session_is_terminated_still_drops_its_ccnew(pg: PgCluster, bloated: str) -> None:
    """A DBA's pg_terminate_backend (or a network cut) mid-rebuild: the cleanup uses a fresh connection."""
    writer = psycopg.connect(pg.conninfo(bloated), autocommit=False, application_name="long-writer")
    writer.execute("INSERT INTO items VALUES (-1, -1, 'open transaction')")

    def terminate_once_waiting() -> None:
        wait_until(
            lambda: (
                pg.sql(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'dbops-reindex' "
                    "AND wait_event_type = 'Lock'",
                    bloated,
                )[0][0]
                == 1
            ),
            what="the rebuild waiting for the open writer",
        )
        pg.sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'dbops-reindex'"
        )
        writer.rollback()

    killer = threading.Thread(target=terminate_once_waiting)
    killer.start()
    try:
        result = rebuild_index(
            conn_params(pg, bloated), "public", "items_pkey", lock_timeout_s=30, retries=3, backoff_s=0.2
        )
    finally:
        killer.join(30)
        writer.close()
    assert result.status == "failed"
    assert result.attempts == 1
    assert "lost the connection" in (result.error or "")
    assert result.leftovers_dropped == ["items_pkey_ccnew"]
    assert not leftovers_of(pg.connect(bloated), "public", "items")
