"""Tasks of the reindex runbook: find bloated indexes, drop leftovers, rebuild one index, vacuum.

The lock-timeout retries of one REINDEX live in flows.core.reindex (they must drop the attempt's
`_ccnew` before the next one); the Prefect retry policy here only covers an unreachable database.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from prefect import get_run_logger
from prefect.variables import Variable

from blocks.postgres import load_database
from flows.core.bloat import (
    IndexRow,
    ReindexPlan,
    Selection,
    block_size,
    check_server_version,
    index_by_name,
    measure,
    measure_with_pgstatindex,
    pgstattuple_schema,
    plan_reindex,
    read_indexes,
)
from flows.core.errors import IdentityUnknown, UnreadableDocument
from flows.core.identity import system_identifier
from flows.core.index_baseline import (
    BaselineState,
    SizeJudgement,
    apply_size_rule,
    judge_sizes,
    read_index_shapes,
    state_from_values,
    state_to_values,
    state_variable_name,
)
from flows.core.postgres import scalar, server_version_num
from flows.core.reindex import (
    RebuildResult,
    analyze_tables,
    drop_index_concurrently,
    rebuild_index,
    reindex_advisory_lock,
    set_session_timeouts,
    vacuum_analyze,
)
from flows.tasks.common import dbops_task, human_bytes


@dataclass
class Inspection:
    """What the run found: the plan, and how bloat was measured (said in the artifact)."""

    database: str
    where: str
    server_version: str
    stattuple_schema: str | None
    plan: ReindexPlan

    @property
    def method(self) -> str:
        if self.stattuple_schema:
            return "pgstatindex (pgstattuple) on the candidates of a catalog estimate"
        return (
            "catalog estimate only (pgstattuple is not installed: "
            "CREATE EXTENSION pgstattuple for exact numbers)"
        )


@dataclass
class Measured:
    size_bytes: int | None
    bloat: float | None
    tuples: float | None = None


@contextmanager
def reindex_lock(database: str) -> Iterator[None]:
    """The PostgreSQL side of "never two reindexers": a session advisory lock held for the whole run."""
    params = load_database(database).params()
    with reindex_advisory_lock(params) as conn:
        get_run_logger().info(
            "holding the reindex advisory lock on %s (pid %d)", params.where, conn.info.backend_pid
        )
        yield


@dbops_task("find_bloated_indexes")
def find_bloated_indexes(
    database: str,
    bloat_threshold: float,
    min_index_size: int,
    selection: Selection,
    confirm_with_analyze: bool,
    lock_timeout: float,
) -> Inspection:
    """Catalog estimate of every index, pgstatindex on the doubtful ones, then the plan."""
    logger = get_run_logger()
    block = load_database(database)
    params = block.params()
    with block.connect() as conn:
        set_session_timeouts(conn, lock_timeout)  # pgstatindex must not queue behind DDL
        version_num = server_version_num(conn)
        version = str(scalar(conn, "SHOW server_version"))
        check_server_version(version_num)
        schema = pgstattuple_schema(conn)
        rows = measure(conn, read_indexes(conn), bloat_threshold, schema)
        plan = plan_reindex(
            rows, bloat_threshold=bloat_threshold, min_index_size=min_index_size, selection=selection
        )
        if schema is None and confirm_with_analyze and plan.rebuilds:
            # estimates rest on reltuples and pg_stats: refresh them for the candidates' tables and look again
            tables = sorted({(c.index.schema, c.index.table) for c in plan.rebuilds if c.index.valid})
            analyze_tables(params, tables, lock_timeout)
            plan = plan_reindex(
                read_indexes(conn),
                bloat_threshold=bloat_threshold,
                min_index_size=min_index_size,
                selection=selection,
            )
    inspection = Inspection(
        database=params.database,
        where=params.where,
        server_version=version,
        stattuple_schema=schema,
        plan=plan,
    )
    logger.info(
        "%s (PostgreSQL %s): %d leftovers to drop, %d indexes to rebuild, %d not bloated, %s "
        "(system catalogs not counted); "
        "bloat by %s",
        params.where,
        version,
        len(plan.leftovers),
        len(plan.rebuilds),
        len(plan.healthy),
        skipped_summary([s.reason for s in plan.skipped]),
        inspection.method,
    )
    return inspection


# How the log names each reason an index was not considered (the artifact keeps the full reason).
_SKIP_WORDS = {"under the minimum size": "below min size", "not selected": "excluded"}


def skipped_summary(reasons: list[str]) -> str:
    """`10 skipped (7 below min size, 3 excluded)`: the count says why, not only how many."""
    counts: dict[str, int] = {}
    for reason in reasons:
        if reason != "system catalog":
            word = _SKIP_WORDS.get(reason, reason.split(" (")[0])
            counts[word] = counts.get(word, 0) + 1
    if not counts:
        return "0 skipped"
    parts = ", ".join(f"{n} {word}" for word, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    return f"{sum(counts.values())} skipped ({parts})"


@dbops_task("drop_leftover_index")
def drop_leftover_index(
    database: str, index: IndexRow, lock_timeout: float, retries: int, backoff: float
) -> str | None:
    """DROP INDEX CONCURRENTLY an invalid `_ccnew`/`_ccold`; returns the error text, or None when dropped."""
    params = load_database(database).params()
    problem = drop_index_concurrently(
        params, index.schema, index.name, lock_timeout_s=lock_timeout, retries=retries, backoff_s=backoff
    )
    logger = get_run_logger()
    if problem:
        logger.warning("could not drop leftover %s: %s", index.qualified, problem)
    else:
        logger.info("dropped leftover %s (%s)", index.qualified, human_bytes(index.size_bytes))
    return problem


@dbops_task("rebuild_index")
def rebuild_one_index(
    database: str, index: IndexRow, lock_timeout: float, retries: int, backoff: float
) -> RebuildResult:
    """REINDEX INDEX CONCURRENTLY one index, retrying lock timeouts; the blockers are logged by name."""
    logger = get_run_logger()
    params = load_database(database).params()
    logger.info(
        "rebuilding %s on %s (%s, %s)",
        index.qualified,
        index.qualified_table,
        human_bytes(index.size_bytes),
        "invalid" if not index.valid else f"{index.estimated_bloat or 0:.0%} wasted",
    )

    def on_retry(attempt: int, result: RebuildResult) -> None:
        logger.warning(
            "%s: attempt %d failed (%s)%s; dropping its leftover and retrying",
            index.qualified,
            attempt,
            result.error,
            f"; waiting on {result.describe_blockers()}" if result.blockers else "",
        )

    result = rebuild_index(
        params,
        index.schema,
        index.name,
        lock_timeout_s=lock_timeout,
        retries=retries,
        backoff_s=backoff,
        on_retry=on_retry,
        progress=lambda line: logger.info("%s: %s", index.qualified, line),
    )
    if result.status == "rebuilt":
        logger.info("rebuilt %s in %.1f s (%d attempts)", index.qualified, result.seconds, result.attempts)
    else:
        logger.error(
            "%s %s after %d attempts: %s%s",
            index.qualified,
            "was refused" if result.status == "refused" else "could not be rebuilt",
            result.attempts,
            result.error,
            f"; blocked by {result.describe_blockers()}" if result.blockers else "",
        )
    return result


@dbops_task("measure_index")
def measure_index(database: str, index: IndexRow, stattuple_schema: str | None) -> Measured:
    """Size and bloat after the rebuild, by the same method as before."""
    with load_database(database).connect() as conn:
        row = index_by_name(conn, index.schema, index.name)
        if row is None:
            return Measured(size_bytes=None, bloat=None)
        if stattuple_schema and row.am == "btree" and row.valid:
            row = measure_with_pgstatindex(conn, stattuple_schema, row)
    return Measured(row.size_bytes, row.estimated_bloat, row.index_tuples)


@dbops_task("vacuum_analyze")
def vacuum_analyze_tables(
    database: str, tables: list[tuple[str, str]] | None, lock_timeout: float
) -> dict[str, str | None]:
    """VACUUM ANALYZE the given tables, or the whole database with None; failures are warnings."""
    outcome = vacuum_analyze(load_database(database).params(), tables, lock_timeout)
    logger = get_run_logger()
    for table, problem in outcome.items():
        if problem:
            logger.warning("VACUUM ANALYZE %s failed: %s", table, problem)
        else:
            logger.info("VACUUM ANALYZE %s done", table)
    return outcome


# -- size per tuple against each index's baseline (issue 18) ---------------------------------------------


@dataclass
class SizeCheck:
    """The size rule's view of the run: judgements by index, the baselines, and where they are kept."""

    variable: str | None
    state: BaselineState
    judgements: dict[str, SizeJudgement]
    present: list[str]
    problem: str | None = None


def _read_state(name: str) -> BaselineState:
    """The kept baselines. A variable that is not JSON (edited by hand, cut short) stops the run with a
    sentence naming it: judging without it and then saving over it would silently lose every baseline."""
    first = Variable.get(name, default=None)
    if first is None:
        return BaselineState()
    try:
        raw = json.loads(first) if isinstance(first, str) else first
        parts = int(raw.get("parts", 1)) if isinstance(raw, dict) else 1
        values = [raw] + [Variable.get(f"{name}_{n}", default=None) for n in range(2, parts + 1)]
        return state_from_values(v for v in values if v is not None)
    except (ValueError, TypeError, AttributeError) as exc:
        raise UnreadableDocument(
            f"Prefect Variable {name} (index size baselines) is not readable JSON ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); delete it (`prefect variable unset "
            f"{name}` and its _2, _3... parts) to start new baselines, or put back a good copy",
            source=name,
        ) from None


@dbops_task("judge_index_sizes")
def judge_index_sizes(
    database: str, found: Inspection, baseline_ratio: float, confirm_with_analyze: bool, lock_timeout: float
) -> tuple[ReindexPlan, SizeCheck]:
    """Each B-tree's bytes per tuple against its baseline (kept, or a fresh-build estimate); the plan with
    the size rule added. The figure rests on the index's reltuples: an index chosen by size alone is
    judged again after ANALYZE of its table (a table that grew since its last ANALYZE must not look
    bloated). Baselines live in a Prefect Variable per database identity (no DDL on the database);
    without one (no pg_control_system() rights) the estimates still judge and nothing is kept."""
    logger = get_run_logger()
    block = load_database(database)
    with block.connect() as conn:
        version_num, bs = server_version_num(conn), block_size(conn)
        variable, problem = None, None
        try:
            variable = state_variable_name(system_identifier(conn), found.database)
        except IdentityUnknown as exc:
            problem = f"baselines not kept: {exc}"
            logger.warning("%s; judging by fresh-build estimates only", problem)
        state = _read_state(variable) if variable else BaselineState()

        def judge() -> tuple[list[IndexRow], dict[str, SizeJudgement], ReindexPlan]:
            rows = read_indexes(conn)
            btrees = [r.oid for r in rows if r.am == "btree" and r.valid]
            judged = judge_sizes(rows, read_index_shapes(conn, btrees, version_num), state, bs)
            return rows, judged, apply_size_rule(found.plan, judged, baseline_ratio)

        rows, judgements, plan = judge()
        by_size = [c for c in plan.rebuilds if c.reason.startswith("size:")]
        if by_size and confirm_with_analyze:
            tables = sorted({(c.index.schema, c.index.table) for c in by_size})
            analyze_tables(block.params(), tables, lock_timeout)
            rows, judgements, plan = judge()
            by_size = [c for c in plan.rebuilds if c.reason.startswith("size:")]
    logger.info(
        "size per tuple: %d B-trees judged against a baseline (%d kept, %d estimated); %d chosen by size "
        "alone%s",
        len(judgements),
        len([j for j in judgements.values() if j.source != "estimate"]),
        len([j for j in judgements.values() if j.source == "estimate"]),
        len(by_size),
        f" ({', '.join(c.index.qualified for c in by_size[:10])})" if by_size else "",
    )
    present = [r.qualified for r in rows]
    return plan, SizeCheck(
        variable=variable, state=state, judgements=judgements, present=present, problem=problem
    )


@dbops_task("save_index_baselines")
def save_index_baselines(name: str, state: BaselineState) -> None:
    """Write the baselines (split under Prefect's value limit); stale extra parts are deleted."""
    values = state_to_values(state)
    for n, value in enumerate(values, start=1):
        Variable.set(name if n == 1 else f"{name}_{n}", value, overwrite=True)
    n = len(values) + 1
    while Variable.get(f"{name}_{n}", default=None) is not None:
        Variable.unset(f"{name}_{n}")
        n += 1
