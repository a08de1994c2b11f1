"""weekly_reindex: the "rebuild bloated indexes without blocking writers" runbook, as a flow.

1. lock        the db:<database> concurrency limit, and a PostgreSQL advisory lock beside it
2. find        catalog estimate for every index, pgstatindex on the doubtful B-trees, the plan;
               plus each B-tree's bytes per tuple against its own healthy baseline (size rule)
3. leftovers   invalid `_ccnew`/`_ccold` of failed concurrent builds: DROP INDEX CONCURRENTLY
4. rebuild     one REINDEX INDEX CONCURRENTLY at a time, largest waste first, short lock_timeout with
               retries; no new rebuild once the time budget is spent (the rest is deferred)
5. vacuum      VACUUM ANALYZE the rebuilt indexes' tables (and, if asked, the whole database)
6. report      a table artifact; Failed with one sentence naming the index that could not be rebuilt;
               the baselines of rebuilt indexes are kept for the next run
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Annotated

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from pydantic import BaseModel, Field

from flows.core.bloat import Candidate, Selection
from flows.core.index_baseline import learn_baselines, record_rebuild
from flows.core.reindex import RebuildResult, ReindexFailed
from flows.tasks.common import (
    artifact_key,
    completed_state,
    database_lock,
    database_name_of,
    failed_state,
    failure_sentence,
    human_bytes,
    judged_description,
    publish_failure,
)
from flows.tasks.reindex import (
    Inspection,
    SizeCheck,
    drop_leftover_index,
    find_bloated_indexes,
    judge_index_sizes,
    measure_index,
    rebuild_one_index,
    reindex_lock,
    save_index_baselines,
    vacuum_analyze_tables,
)
from flows.tasks.session import check_database_route


class IndexReport(BaseModel):
    index: str = Field(description="schema.index")
    table: str = Field(description="schema.table")
    action: str = Field(
        description="rebuilt, dropped leftover, failed, refused, deferred, would rebuild, would drop"
    )
    reason: str = Field(description="Why it was chosen: wasted fraction and method, or invalid")
    size_before: int = Field(description="Bytes before")
    size_after: int | None = Field(default=None, description="Bytes after (None when not rebuilt)")
    bloat_before: float | None = Field(default=None, description="Estimated wasted fraction before")
    bloat_after: float | None = Field(default=None, description="Estimated wasted fraction after")
    attempts: int = Field(default=0, description="REINDEX attempts (lock timeouts are retried)")
    seconds: float = Field(default=0.0, description="Time spent on this index")
    note: str = Field(default="", description="Error, blocking sessions, leftovers")
    per_tuple_before: float | None = Field(default=None, description="Index bytes per index tuple before")
    per_tuple_after: float | None = Field(default=None, description="Index bytes per index tuple after")
    baseline: float | None = Field(
        default=None, description="Healthy bytes per tuple the size rule compared against (before)"
    )
    baseline_source: str | None = Field(
        default=None, description="rebuilt, measured or estimate: where that baseline came from"
    )

    @property
    def ratio_before(self) -> float | None:
        return (
            None
            if not self.baseline or self.per_tuple_before is None
            else self.per_tuple_before / self.baseline
        )

    @property
    def ratio_after(self) -> float | None:
        return (
            None
            if not self.baseline or self.per_tuple_after is None
            else self.per_tuple_after / self.baseline
        )


class ReindexReport(BaseModel):
    database: str
    server_version: str
    method: str = Field(description="How bloat was measured")
    dry_run: bool
    indexes: list[IndexReport] = Field(default_factory=list)
    healthy: list[str] = Field(default_factory=list, description="Measured and left alone")
    skipped: dict[str, str] = Field(default_factory=dict, description="index -> why it was not considered")
    vacuum: dict[str, str | None] = Field(
        default_factory=dict, description="table -> error, or None when done"
    )
    seconds: float = 0.0

    def with_action(self, *actions: str) -> list[IndexReport]:
        return [i for i in self.indexes if i.action in actions]

    @property
    def bytes_saved(self) -> int:
        return sum(
            i.size_before - (i.size_after or 0) for i in self.with_action("rebuilt", "dropped leftover")
        )

    def summary(self) -> str:
        if self.dry_run:
            return (
                f"dry run on {self.database}: would drop {len(self.with_action('would drop'))} leftovers and "
                f"rebuild {len(self.with_action('would rebuild'))} indexes; {len(self.healthy)} healthy"
            )
        return (
            f"{self.database}: rebuilt {len(self.with_action('rebuilt'))}, dropped "
            f"{len(self.with_action('dropped leftover'))} leftovers, saved {human_bytes(self.bytes_saved)}; "
            f"{len(self.with_action('deferred'))} deferred by the time budget, "
            f"{len(self.with_action('failed'))} failed, {len(self.with_action('refused'))} refused; "
            f"{len(self.healthy)} healthy; {self.seconds:.0f} s"
        )


@flow(name="weekly-reindex", log_prints=True)
def weekly_reindex(
    # Defaults are plain Python defaults, constraints and descriptions live in Annotated: a Field(...) as
    # the default reaches the flow as a FieldInfo object when a deployment run omits the parameter.
    database: Annotated[
        str, Field(description="Name of the PostgresDatabase block (e.g. imagemanager-prod).")
    ],
    bloat_threshold: Annotated[
        float,
        Field(
            gt=0,
            le=1,
            description="Rebuild B-trees whose estimated wasted fraction is at least this (0.3 = 30 %).",
        ),
    ] = 0.3,
    baseline_ratio: Annotated[
        float,
        Field(
            gt=1,
            description="Also rebuild B-trees whose bytes per tuple are at least this many times their "
            "healthy baseline (measured after the last rebuild, or estimated for a fresh build): catches "
            "low-cardinality indexes that deduplication made dense but large.",
        ),
    ] = 2.0,
    min_index_size: Annotated[
        int,
        Field(
            ge=0,
            description="Bytes; smaller indexes are left alone (invalid ones and leftovers are "
            "handled at any size).",
        ),
    ] = 10 * 1024 * 1024,
    time_budget: Annotated[
        float,
        Field(
            ge=0,
            description="Seconds, counted from the first rebuild; no new rebuild starts after that "
            "and the rest is reported as deferred (the running one finishes).",
        ),
    ] = 3 * 3600.0,
    lock_timeout: Annotated[
        float,
        Field(
            gt=0,
            le=600,
            description="Seconds a REINDEX may wait for a lock before it gives up and "
            "retries; writers never wait on the rebuild longer than this.",
        ),
    ] = 5.0,
    lock_retries: Annotated[
        int,
        Field(
            ge=0, le=50, description="Retries of one index after a lock timeout or deadlock, with backoff."
        ),
    ] = 5,
    retry_backoff: Annotated[
        float, Field(ge=0, description="Seconds before the first retry; doubles with every retry.")
    ] = 10.0,
    include_schemas: Annotated[
        list[str], Field(description="Only these schemas (shell patterns, e.g. app_*); empty: all.")
    ] = [],  # noqa: B006 - pydantic copies defaults; Prefect shows them in the form
    exclude_schemas: Annotated[list[str], Field(description="Never these schemas (shell patterns).")] = [],  # noqa: B006
    include_tables: Annotated[
        list[str], Field(description="Only these tables: table or schema.table shell patterns; empty: all.")
    ] = [],  # noqa: B006
    exclude_tables: Annotated[
        list[str], Field(description="Never these tables: table or schema.table shell patterns.")
    ] = [],  # noqa: B006
    include_indexes: Annotated[
        list[str], Field(description="Only these indexes: index or schema.index shell patterns; empty: all.")
    ] = [],  # noqa: B006
    exclude_indexes: Annotated[
        list[str], Field(description="Never these indexes: index or schema.index shell patterns.")
    ] = [],  # noqa: B006
    dry_run: Annotated[
        bool, Field(description="Measure and report what would be dropped and rebuilt; change nothing.")
    ] = False,
    analyze: Annotated[
        bool, Field(description="VACUUM ANALYZE the tables whose indexes were rebuilt.")
    ] = True,
    vacuum_analyze_all: Annotated[
        bool,
        Field(
            description="Also run the plain database-wide VACUUM ANALYZE many runbooks schedule "
            "(SKIP_LOCKED: busy tables are skipped)."
        ),
    ] = False,
    lock_wait_hours: Annotated[
        float, Field(gt=0, description="How long to wait for db:<database> held by another dbops job.")
    ] = 3.0,
) -> ReindexReport:
    """Rebuild bloated and invalid indexes with REINDEX CONCURRENTLY, never blocking writers for longer than
    lock_timeout; drop the leftovers of failed concurrent builds. Fails, naming the index, when one could not
    be rebuilt after its retries; the table artifact has sizes and bloat before and after.

    Args:
        database: Name of the PostgresDatabase block (e.g. imagemanager-prod).
        bloat_threshold: Rebuild B-trees whose estimated wasted fraction is at least this (0.3 = 30 %).
        baseline_ratio: Also rebuild B-trees whose bytes per tuple are at least this many times their
            healthy baseline (measured after the last rebuild, or estimated for a fresh build).
        min_index_size: Bytes; smaller indexes are left alone (invalid ones and leftovers at any size).
        time_budget: Seconds from the first rebuild; no new rebuild starts after that, the rest is deferred.
        lock_timeout: Seconds a REINDEX may wait for a lock before it gives up and retries; writers never
            wait on the rebuild longer than this.
        lock_retries: Retries of one index after a lock timeout or deadlock, with backoff.
        retry_backoff: Seconds before the first retry; doubles with every retry.
        include_schemas: Only these schemas (shell patterns, e.g. app_*); empty: all.
        exclude_schemas: Never these schemas (shell patterns).
        include_tables: Only these tables: table or schema.table shell patterns; empty: all.
        exclude_tables: Never these tables: table or schema.table shell patterns.
        include_indexes: Only these indexes: index or schema.index shell patterns; empty: all.
        exclude_indexes: Never these indexes: index or schema.index shell patterns.
        dry_run: Measure and report what would be dropped and rebuilt; change nothing.
        analyze: VACUUM ANALYZE the tables whose indexes were rebuilt.
        vacuum_analyze_all: Also the database-wide VACUUM ANALYZE many runbooks schedule (SKIP_LOCKED).
        lock_wait_hours: How long to wait for db:<database> held by another dbops job.
    """
    logger = get_run_logger()
    started = time.monotonic()
    published = False  # a judged failure keeps its table: every index with its sizes and note
    try:
        selection = Selection(
            include_schemas=include_schemas,
            exclude_schemas=exclude_schemas,
            include_tables=include_tables,
            exclude_tables=exclude_tables,
            include_indexes=include_indexes,
            exclude_indexes=exclude_indexes,
        )
        check_database_route(database)  # PostgreSQL itself, before the session lock is taken
        with database_lock(database, wait_seconds=lock_wait_hours * 3600), reindex_lock(database):
            found = find_bloated_indexes(
                database,
                bloat_threshold=bloat_threshold,
                min_index_size=min_index_size,
                selection=selection,
                confirm_with_analyze=not dry_run,
                lock_timeout=lock_timeout,
            )
            found.plan, sizes = judge_index_sizes(
                database,
                found,
                baseline_ratio=baseline_ratio,
                confirm_with_analyze=not dry_run,
                lock_timeout=lock_timeout,
            )
            report = ReindexReport(
                database=found.database,
                server_version=found.server_version,
                method=found.method,
                dry_run=dry_run,
                healthy=[r.qualified for r in found.plan.healthy],
                skipped={
                    s.index.qualified: s.reason for s in found.plan.skipped if s.reason != "system catalog"
                },
            )
            if dry_run:
                report.indexes = [_planned(c) for c in found.plan.candidates]
                _add_sizes(report, sizes)
            else:
                report.indexes = [
                    _drop(database, c, lock_timeout=lock_timeout, retries=lock_retries, backoff=retry_backoff)
                    for c in found.plan.leftovers
                ]
                rebuilds = _rebuild_all(
                    database,
                    found,
                    budget=time_budget,
                    lock_timeout=lock_timeout,
                    retries=lock_retries,
                    backoff=retry_backoff,
                )
                report.indexes += rebuilds
                _add_sizes(report, sizes)
                _keep_baselines(report, sizes, [c.index.qualified for c in found.plan.rebuilds])
                done = zip(found.plan.rebuilds, rebuilds, strict=True)
                rebuilt = sorted(
                    {(c.index.schema, c.index.table) for c, line in done if line.action == "rebuilt"}
                )
                if analyze and rebuilt:
                    report.vacuum.update(vacuum_analyze_tables(database, rebuilt, lock_timeout))
                if vacuum_analyze_all:
                    report.vacuum.update(
                        vacuum_analyze_tables(database, tables=None, lock_timeout=lock_timeout)
                    )
        report.seconds = round(time.monotonic() - started, 1)
        _publish(report)
        published = True
        failed = report.with_action("failed")
        if failed:
            raise ReindexFailed(_failure_sentence(report, failed))
        logger.info(report.summary())
        return completed_state(report.summary(), report)
    except Exception as exc:
        if published:
            _publish(report, failure_sentence(exc))  # the sentence on top of the table it judged
            return failed_state(exc)
        return publish_failure(
            artifact_key("weekly-reindex", database_name_of(database)), f"Reindex of {database}", exc
        )


def _failure_sentence(report: ReindexReport, failed: list[IndexReport]) -> str:
    first = failed[0]
    others = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
    attempts = f"{first.attempts} attempt{'s' if first.attempts != 1 else ''}"
    what = "drop the leftover index" if first.reason.startswith("invalid leftover") else "rebuild"
    locked = "lock timeout" in first.note or "deadlock" in first.note or "blocked by" in first.note
    fix = (
        "end the blocking session or raise lock_timeout, then run again"
        if locked
        else "fix the cause above (for a unique index: the duplicate rows), then run again"
    )
    return (
        f"could not {what} {first.index}{others} on {report.database} after {attempts}: {first.note}; "
        f"the other indexes were handled (see the weekly-reindex artifact); {fix}"
    )


def _add_sizes(report: ReindexReport, sizes: SizeCheck) -> None:
    """Size per tuple before and the baseline it was judged against, for every index in the report."""
    for line in report.indexes:
        j = sizes.judgements.get(line.index)
        if j is not None:
            line.per_tuple_before = round(j.bytes_per_tuple, 2)
            line.baseline, line.baseline_source = round(j.baseline, 2), j.source


def _keep_baselines(report: ReindexReport, sizes: SizeCheck, chosen: list[str]) -> None:
    """A rebuilt index's size per tuple right after the rebuild becomes its baseline; healthy indexes teach
    what learn_baselines allows; then the state is saved for the next run."""
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    state = learn_baselines(sizes.state, sizes.judgements, present=sizes.present, chosen=chosen, today=today)
    for line in report.with_action("rebuilt"):
        j = sizes.judgements.get(line.index)
        if j is None or line.size_after is None or line.per_tuple_after is None:
            continue
        tuples = line.size_after / line.per_tuple_after
        record_rebuild(
            state,
            line.index,
            definition=j.definition_hash,
            size_bytes=line.size_after,
            tuples=tuples,
            today=today,
        )
    if sizes.variable is None:
        return
    try:
        save_index_baselines(sizes.variable, state)
    except Exception as exc:  # the rebuilds are done; losing the baselines only costs precision next week
        get_run_logger().warning("could not keep the index baselines in %s: %s", sizes.variable, exc)


def _planned(c: Candidate) -> IndexReport:
    return IndexReport(
        index=c.index.qualified,
        table=c.index.qualified_table,
        action="would drop" if c.action == "drop_leftover" else "would rebuild",
        reason=c.reason,
        size_before=c.index.size_bytes,
        bloat_before=c.index.estimated_bloat,
    )


def _drop(database: str, c: Candidate, lock_timeout: float, retries: int, backoff: float) -> IndexReport:
    started = time.monotonic()
    problem = drop_leftover_index(
        database, c.index, lock_timeout=lock_timeout, retries=retries, backoff=backoff
    )
    return IndexReport(
        index=c.index.qualified,
        table=c.index.qualified_table,
        action="failed" if problem else "dropped leftover",
        reason=c.reason,
        size_before=c.index.size_bytes,
        size_after=None if problem else 0,
        attempts=1,
        seconds=round(time.monotonic() - started, 2),
        note=problem or "DROP INDEX CONCURRENTLY",
    )


def _rebuild_all(
    database: str, found: Inspection, budget: float, lock_timeout: float, retries: int, backoff: float
) -> list[IndexReport]:
    """One index at a time; once the budget is spent, the rest is deferred to the next run."""
    logger = get_run_logger()
    out: list[IndexReport] = []
    phase_start = time.monotonic()
    for c in found.plan.rebuilds:
        line = IndexReport(
            index=c.index.qualified,
            table=c.index.qualified_table,
            action="deferred",
            reason=c.reason,
            size_before=c.index.size_bytes,
            bloat_before=c.index.estimated_bloat,
        )
        out.append(line)
        if time.monotonic() - phase_start >= budget:
            line.note = f"time budget of {budget:.0f} s spent; next run"
            continue
        result: RebuildResult = rebuild_one_index(
            database, c.index, lock_timeout=lock_timeout, retries=retries, backoff=backoff
        )
        line.action, line.attempts, line.seconds = result.status, result.attempts, result.seconds
        notes = [result.error or ""]
        if result.blockers:
            notes.append(f"blocked by {result.describe_blockers()}")
        if result.leftovers_dropped:
            notes.append(f"dropped leftovers {', '.join(result.leftovers_dropped)}")
        if result.leftovers_remaining:
            notes.append(
                f"leftovers still there (the next run drops them): {', '.join(result.leftovers_remaining)}"
            )
        line.note = "; ".join(n for n in notes if n)
        if result.status == "rebuilt":
            after = measure_index(database, c.index, found.stattuple_schema)
            line.size_after, line.bloat_after = after.size_bytes, after.bloat
            if after.size_bytes and after.tuples and after.tuples > 0:
                line.per_tuple_after = round(after.size_bytes / after.tuples, 2)
    deferred = [line.index for line in out if line.action == "deferred"]
    if deferred:
        logger.warning("time budget spent: %d indexes deferred (%s)", len(deferred), ", ".join(deferred[:10]))
    return out


COLUMNS = (
    "index",
    "table",
    "action",
    "reason",
    "size before",
    "size after",
    "bloat before",
    "bloat after",
    "per tuple before",
    "per tuple after",
    "baseline per tuple",
    "ratio to baseline before",
    "ratio to baseline after",
    "attempts",
    "seconds",
    "note",
)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _num(value: float | None, unit: str) -> str:
    return "-" if value is None else f"{value:.1f}{unit}"


def _publish(report: ReindexReport, failure: str | None = None) -> None:
    rows = [
        {
            "index": i.index,
            "table": i.table,
            "action": i.action,
            "reason": i.reason,
            "size before": human_bytes(i.size_before),
            "size after": "-" if i.size_after is None else human_bytes(i.size_after),
            "bloat before": _pct(i.bloat_before),
            "bloat after": _pct(i.bloat_after),
            "per tuple before": _num(i.per_tuple_before, " B"),
            "per tuple after": _num(i.per_tuple_after, " B"),
            "baseline per tuple": "-" if i.baseline is None else f"{i.baseline:.1f} B ({i.baseline_source})",
            "ratio to baseline before": _num(i.ratio_before, "x"),
            "ratio to baseline after": _num(i.ratio_after, "x"),
            "attempts": i.attempts,
            "seconds": i.seconds,
            "note": i.note,
        }
        for i in report.indexes
    ]
    rows += [
        {"index": name, "action": "healthy", "reason": "under the bloat threshold and the baseline ratio"}
        for name in report.healthy[:100]
    ]
    rows += [
        {"index": name, "action": "skipped", "reason": why}
        for name, why in list(report.skipped.items())[:100]
    ]
    rows += [
        {"index": "(vacuum)", "table": table, "action": "VACUUM ANALYZE", "note": problem or "done"}
        for table, problem in report.vacuum.items()
    ]
    rows = [{column: row.get(column, "") for column in COLUMNS} for row in rows]
    create_table_artifact(
        key=artifact_key("weekly-reindex", report.database),
        table=rows,
        description=judged_description(
            f"Reindex of {report.database} (PostgreSQL {report.server_version}): {report.summary()}. "
            f"Bloat measured by {report.method}.",
            failure,
        ),
    )


if __name__ == "__main__":  # pragma: no cover
    import sys

    weekly_reindex(database=sys.argv[1])
