"""An index judged by its own healthy size (flows.core.index_baseline, no Prefect): the fresh-build estimate
against real PostgreSQL B-trees, the size rule in the plan, and the baselines the flow keeps."""

from __future__ import annotations

import pytest

from flows.core.bloat import IndexRow, plan_reindex, read_indexes
from flows.core.index_baseline import (
    Baseline,
    BaselineState,
    IndexShape,
    SizeJudgement,
    Source,
    apply_size_rule,
    dedup_applies,
    fresh_btree_bytes_per_tuple,
    judge_sizes,
    learn_baselines,
    read_index_shapes,
    record_rebuild,
    state_from_values,
    state_to_values,
    state_variable_name,
)
from flows.core.postgres import server_version_num
from tests.harness.factories import churn, low_cardinality_table
from tests.harness.pg import PgCluster
from tests.harness.reindex import judgements


def test_fresh_low_cardinality_index_is_at_its_estimate_and_churned_one_is_over_twice_it(
    pg: PgCluster, unique: str
) -> None:
    dbname = f"baseline_{unique}"
    pg.create_database(dbname)
    low_cardinality_table(pg, dbname)

    fresh = judgements(pg, dbname)["public.idx_images_deleted"]
    assert fresh.source == "estimate", fresh
    assert 0.8 <= fresh.ratio <= 1.25, fresh

    churn(pg, dbname)
    churned = judgements(pg, dbname)["public.idx_images_deleted"]
    assert churned.ratio >= 2.0, churned
    with pg.connect(dbname) as conn:
        [row] = [r for r in read_indexes(conn) if r.name == "idx_images_deleted"]
    # the density estimate cannot see it: it expects one tuple per row, larger than the churned index
    assert row.estimated_bloat is not None
    assert row.estimated_bloat < 0.3


def test_unique_and_include_indexes_are_estimated_without_deduplication(pg: PgCluster, unique: str) -> None:
    dbname = f"baseline_u_{unique}"
    pg.create_database(dbname)
    pg.sql("CREATE TABLE t (id bigint PRIMARY KEY, k bigint, v int)", dbname)
    pg.sql("INSERT INTO t SELECT g, g % 100, g FROM generate_series(1, 50000) g", dbname)
    pg.sql("CREATE INDEX t_k_incl ON t (k) INCLUDE (v)", dbname)
    pg.sql("CREATE INDEX t_k ON t (k)", dbname)
    pg.sql("CREATE INDEX t_k_nodedup ON t (k) WITH (deduplicate_items = off)", dbname)
    pg.sql("ANALYZE t", dbname)
    with pg.connect(dbname) as conn:
        rows = {r.name: r for r in read_indexes(conn)}
        shapes = read_index_shapes(conn, [r.oid for r in rows.values()], server_version_num(conn))
    assert not shapes[rows["t_pkey"].oid].dedup
    assert not shapes[rows["t_k_incl"].oid].dedup
    assert not shapes[rows["t_k_nodedup"].oid].dedup
    assert shapes[rows["t_k"].oid].dedup
    assert shapes[rows["t_k"].oid].distinct == pytest.approx(100, rel=0.1)
    for name in ("t_pkey", "t_k_incl", "t_k", "t_k_nodedup"):  # every fresh build sits near its estimate
        j = judgements(pg, dbname)[f"public.{name}"]
        assert 0.75 <= j.ratio <= 1.3, (name, j)


# -- pure: the rule, the state ----------------------------------------------------------------------------

MB = 1024 * 1024


def issue_row(size: int, bloat: float = 0.06) -> IndexRow:
    """The issue's figures: 600,000 rows, 85 % leaf density by pgstatindex (6 % wasted at fillfactor 90)."""
    return IndexRow(
        oid=1, schema="public", table="images", name="idx_images_deleted", am="btree", size_bytes=size,
        valid=True, index_tuples=600_000, data_width=8, estimated_bloat=bloat, method="pgstatindex",
    )  # fmt: skip


def kept(bytes_per_tuple: float, source: str = "rebuilt", definition: str = "abc") -> BaselineState:
    baseline = Baseline(
        definition_hash=definition, bytes_per_tuple=bytes_per_tuple, source=source, recorded_at="2026-11-01"
    )
    return BaselineState(indexes={"public.idx_images_deleted": baseline})


SHAPE = {1: IndexShape(oid=1, definition_hash="abc", distinct=500, dedup=True)}


def test_dense_index_at_three_times_its_baseline_is_chosen_by_the_size_rule_naming_both_figures() -> None:
    row = issue_row(int(12.0 * MB))
    plan = plan_reindex([row], bloat_threshold=0.3, min_index_size=10 * MB)
    assert [r.qualified for r in plan.healthy] == ["public.idx_images_deleted"]  # density alone: healthy

    sized = apply_size_rule(plan, judge_sizes([row], SHAPE, kept(4.1 * MB / 600_000), 8192), 2.0)

    [candidate] = sized.rebuilds
    assert candidate.reason.startswith(
        "size: 21.0 B per tuple, 2.9x its baseline 7.2 B (measured after dbops"
    )
    assert "density: 6% wasted (pgstatindex)" in candidate.reason
    assert not sized.healthy


def test_freshly_built_low_cardinality_index_is_left_alone_on_the_first_run() -> None:
    row = issue_row(int(4.1 * MB), bloat=0.05)
    judged = judge_sizes([row], SHAPE, BaselineState(), 8192)
    assert judged["public.idx_images_deleted"].source == "estimate"
    plan = apply_size_rule(plan_reindex([row], bloat_threshold=0.3, min_index_size=MB), judged, 2.0)
    assert not plan.candidates
    assert [r.name for r in plan.healthy] == ["idx_images_deleted"]


def test_churned_index_never_rebuilt_is_chosen_on_the_first_run_by_the_estimate() -> None:
    row = issue_row(int(12.0 * MB))
    judged = judge_sizes([row], SHAPE, BaselineState(), 8192)
    plan = apply_size_rule(plan_reindex([row], bloat_threshold=0.3, min_index_size=MB), judged, 2.0)
    [candidate] = plan.rebuilds
    assert "estimate of a fresh build" in candidate.reason


def test_under_min_index_size_the_size_rule_does_not_apply() -> None:
    row = issue_row(int(12.0 * MB))
    judged = judge_sizes([row], SHAPE, BaselineState(), 8192)
    plan = apply_size_rule(plan_reindex([row], bloat_threshold=0.3, min_index_size=20 * MB), judged, 2.0)
    assert not plan.candidates
    assert plan.skipped[0].reason == "under the minimum size"


def test_a_changed_definition_resets_the_kept_baseline() -> None:
    row = issue_row(int(12.0 * MB))
    judged = judge_sizes([row], SHAPE, kept(30.0, definition="other"), 8192)
    assert judged["public.idx_images_deleted"].source == "estimate"


def test_density_choice_also_shows_the_size_figures() -> None:
    row = issue_row(int(12.0 * MB), bloat=0.5)
    judged = judge_sizes([row], SHAPE, kept(7.0), 8192)
    plan = apply_size_rule(plan_reindex([row], bloat_threshold=0.3, min_index_size=MB), judged, 2.0)
    [candidate] = plan.rebuilds
    assert candidate.reason.startswith("density: 50% wasted (pgstatindex); size: 21.0 B per tuple, 3.0x")


def test_learning_keeps_honest_measurements_lowers_kept_ones_and_forgets_dropped_indexes() -> None:
    def judgement(
        name: str, current: float, baseline: float, source: Source, estimate: float
    ) -> SizeJudgement:
        return SizeJudgement(name, "abc", current, baseline, source, estimate)

    state = BaselineState(
        indexes={
            "public.lowered": Baseline(
                definition_hash="abc", bytes_per_tuple=9.0, source="rebuilt", recorded_at="2026-11-01"
            ),
            "public.dropped": Baseline(
                definition_hash="abc", bytes_per_tuple=9.0, source="rebuilt", recorded_at="2026-11-01"
            ),
        }
    )
    judged = {
        "public.healthy": judgement("public.healthy", 6.9, 7.1, "estimate", 7.1),
        "public.bloated": judgement("public.bloated", 12.0, 7.1, "estimate", 7.1),
        "public.lowered": judgement("public.lowered", 7.5, 9.0, "rebuilt", 7.1),
        "public.chosen": judgement("public.chosen", 6.0, 7.1, "estimate", 7.1),
    }
    present = ["public.healthy", "public.bloated", "public.lowered", "public.chosen"]
    learnt = learn_baselines(state, judged, present, ["public.chosen"], "2026-11-29")
    assert set(learnt.indexes) == {"public.healthy", "public.lowered"}
    assert learnt.indexes["public.healthy"].source == "measured"
    assert learnt.indexes["public.healthy"].bytes_per_tuple == 6.9
    assert learnt.indexes["public.lowered"].bytes_per_tuple == 7.5
    record_rebuild(learnt, "public.chosen", "abc", 4 * MB, 600_000, "2026-11-29")
    assert learnt.indexes["public.chosen"].source == "rebuilt"


def test_state_is_split_under_prefects_value_limit_and_read_back_whole() -> None:
    state = BaselineState(
        indexes={
            f"app_schema.some_rather_long_index_name_{n:04d}": Baseline(
                definition_hash="0123456789ab",
                bytes_per_tuple=7.123,
                source="rebuilt",
                recorded_at="2026-11-29",
            )
            for n in range(300)
        }
    )
    import json

    values = state_to_values(state)
    assert len(values) > 1
    assert values[0]["parts"] == len(values)
    assert all(len(json.dumps(v, separators=(",", ":"))) < 5000 for v in values)
    assert state_from_values(values) == state
    assert state_from_values([{"version": 99, "indexes": {}}, "{}"]) == BaselineState()


def test_state_variable_is_named_after_the_database_identity() -> None:
    assert state_variable_name(7713526889172156228, "imagemanager") == (
        "dbops_reindex_baseline_7713526889172156228_imagemanager"
    )
    odd = state_variable_name(1, "Image.Manager")
    assert odd.startswith("dbops_reindex_baseline_1_image_manager_")
    assert odd != state_variable_name(1, "image_manager")


def test_deduplication_rules_follow_nbtree() -> None:
    assert dedup_applies(150000, False, False, [True], "")
    assert not dedup_applies(120000, False, False, [True], "")  # before 13
    assert not dedup_applies(150000, True, False, [True], "")  # unique
    assert not dedup_applies(150000, False, True, [True], "")  # INCLUDE columns
    assert not dedup_applies(150000, False, False, [True, False], "")  # numeric, jsonb, float: no equalimage
    assert not dedup_applies(150000, False, False, [True], "fillfactor=80,deduplicate_items=off")


def test_estimate_of_a_fresh_build() -> None:
    # unique bigint: one 16-byte tuple + line pointer per row at fillfactor 90
    assert fresh_btree_bytes_per_tuple(1_000_000, 8, None, False, 90, 8192) == pytest.approx(22.4, rel=0.02)
    # 500 projects over 600,000 rows: posting lists, ~7 B per row (the issue's 4.1 MB fresh build)
    dedup = fresh_btree_bytes_per_tuple(600_000, 8, 500, True, 90, 8192)
    assert dedup is not None
    assert 6.0 < dedup < 7.5
    # the 6-byte TIDs dominate: a tenfold underestimated n_distinct moves the estimate by a few per cent
    assert fresh_btree_bytes_per_tuple(600_000, 8, 50, True, 90, 8192) == pytest.approx(dedup, rel=0.05)
    assert fresh_btree_bytes_per_tuple(0, 8, 1, True, 90, 8192) is None
