"""The drill's checks as plain functions (flows.core.drill), against a real PostgreSQL database."""

from __future__ import annotations

from datetime import UTC, datetime

from flows.core.catalog import Catalog
from flows.core.drill import (
    DrillRecord,
    check_alembic,
    check_row_counts,
    check_tables,
    restored_tables,
    row_count_ok,
    scratch_name,
)
from flows.core.listing import is_stale, staleness_hours
from flows.core.manifest import Manifest
from flows.core.tablenames import TableName, legacy_readings, parse_table_key, resolve_key, table_key
from tests.harness.factories import make_manifest
from tests.harness.pg import PgCluster


def manifest(estimates: dict[str, int], revision: str | None = "0004") -> Manifest:
    return make_manifest(alembic_revision=revision, row_estimates=estimates)


def test_row_counts_are_exact_for_small_tables_and_within_tolerance_for_large() -> None:
    assert row_count_ok(10, 10, 0.1, 1000)
    assert not row_count_ok(10, 11, 0.1, 1000)
    assert row_count_ok(100_000, 109_000, 0.1, 1000)
    assert not row_count_ok(100_000, 111_000, 0.1, 1000)


def test_scratch_name_is_derived_from_the_run_and_leaves_room_for_the_temporary_suffix() -> None:
    name = scratch_name("imagemanager", "3f2a9c1e-aaaa-bbbb")
    assert name.startswith("drill_imagemanager_3f2a9c1e")
    assert len(scratch_name("x" * 80, "3f2a9c1e") + "_restoring_abcdef12") <= 63


def test_checks_on_a_real_database_name_the_table_and_revision_at_fault(pg: PgCluster, unique: str) -> None:
    db = f"chk_{unique}"
    pg.create_database(db)
    pg.sql("CREATE TABLE t (id int)", db)
    pg.sql("INSERT INTO t SELECT generate_series(1, 50)", db)
    pg.sql("CREATE TABLE alembic_version (version_num varchar(32) PRIMARY KEY)", db)
    pg.sql("INSERT INTO alembic_version VALUES ('0004')", db)
    with pg.connect(db) as conn:
        tables = restored_tables(conn)
        good = manifest({"public.t": 50, "public.alembic_version": 1})
        assert check_tables(good, tables).ok
        assert check_row_counts(conn, good, tables).ok
        assert check_alembic(conn, good).ok
        bad = manifest({"public.t": 49, "public.ghost": 3, "public.never": -1}, revision="0003")
        assert "public.ghost" in check_tables(bad, tables).detail
        counts = check_row_counts(conn, bad, tables)
        assert not counts.ok
        assert "public.t: 50 rows, manifest estimated 49" in counts.detail
        assert "0003" in check_alembic(conn, bad).detail
        assert not check_alembic(conn, bad).ok


def test_staleness_is_hours_since_the_newest_backup_ended() -> None:
    assert staleness_hours(Catalog([], [])) is None
    assert is_stale(None, 26)
    assert not is_stale(25.9, 26)
    assert is_stale(26.1, 26)


def test_drill_record_round_trips_and_describes_itself() -> None:
    record = DrillRecord(
        dump_key="k",
        drilled_at=datetime(2026, 3, 1, 3, tzinfo=UTC),
        passed=True,
        rto_seconds=42.4,
        scratch_database="s",
        server="h:1",
    )
    assert DrillRecord.from_json(record.to_json()) == record
    assert record.describe() == "restored and checked at 2026-03-01 03:00Z (RTO 42 s)"


def test_a_large_table_passes_when_either_estimate_agrees_and_fails_when_neither_does(
    pg: PgCluster, unique: str
) -> None:
    db = f"est_{unique}"
    pg.create_database(db)
    pg.sql("CREATE TABLE big (id int)", db)
    pg.sql("INSERT INTO big SELECT generate_series(1, 20000)", db)
    with pg.connect(db) as conn:
        tables = restored_tables(conn)

        def counted(live: int, planner: int) -> bool:
            m = manifest({"public.big": live})
            m.planner_estimates = {"public.big": planner}
            return check_row_counts(conn, m, tables, exact_below=1000).ok

        # a table bulk-loaded and analysed within a second: ANALYZE counted rows whose inserts the
        # statistics added again afterwards, so the live count is doubled; the planner's is right
        assert counted(live=40_000, planner=20_000)
        # a table that grew since its last ANALYZE: the planner lags, the live count is right
        assert counted(live=20_000, planner=14_000)
        assert not counted(live=40_000, planner=14_000)  # rows lost: neither agrees
        m = manifest({"public.big": 40_000})
        m.planner_estimates = {"public.big": 14_000}
        assert (
            "public.big: 20000 rows, manifest estimated 40000 or 14000"
            in check_row_counts(conn, m, tables).detail
        )


def test_table_keys_with_dots_or_quotes_read_back_as_the_same_pair() -> None:
    pairs = [("public", "images"), ("my.schema", "t.x"), ("my", "schema.t"), ('we"ird', "a"), ("s", 'x."y')]
    for schema, table in pairs:
        assert parse_table_key(table_key(schema, table)) == TableName(schema, table)
    assert table_key("public", "images") == "public.images"  # unchanged for every ordinary name
    assert table_key("my.schema", "t.x") == '"my.schema"."t.x"'
    assert table_key("my", "schema.t") == 'my."schema.t"'
    assert parse_table_key("my.schema.t") is None  # an older manifest's key: more than one reading
    assert legacy_readings("my.schema.t") == [TableName("my", "schema.t"), TableName("my.schema", "t")]


def test_old_manifest_key_with_several_dots_is_read_the_way_the_restored_catalog_has_it() -> None:
    catalog = {TableName("my.schema", "t"): "r", TableName("public", "a"): "r"}
    assert resolve_key("my.schema.t", catalog) == TableName("my.schema", "t")
    assert resolve_key('"my.schema".t', catalog) == TableName("my.schema", "t")
    assert resolve_key("public.a", catalog) == TableName("public", "a")
    assert resolve_key("my.schema.u", catalog) is None
    assert resolve_key('"my.schema"."t.x"', catalog) is None


def test_drill_checks_count_tables_with_dots_in_their_names_new_and_old_manifests(
    pg: PgCluster, unique: str
) -> None:
    db = f"chk_{unique}"
    pg.create_database(db)
    pg.sql('CREATE SCHEMA "my.schema"; CREATE TABLE "my.schema"."t.x" (id int)', db)
    pg.sql('INSERT INTO "my.schema"."t.x" SELECT generate_series(1, 5)', db)
    with pg.connect(db) as conn:
        tables = restored_tables(conn)
        assert tables[TableName("my.schema", "t.x")] == "r"
        for key in ('"my.schema"."t.x"', "my.schema.t.x"):  # this dbops's key, and an older dbops's
            m = manifest({key: 5}, revision=None)
            assert check_tables(m, tables).ok, key
            assert check_row_counts(conn, m, tables).ok, key
            m = m.model_copy(update={"exact_row_counts": {key: 4}})
            counts = check_row_counts(conn, m, tables)
            assert not counts.ok
            assert f"{key}: 5 rows, the dump's snapshot had 4" in counts.detail
