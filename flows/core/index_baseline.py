"""An index judged by its own healthy size: bytes per tuple now against bytes per tuple when freshly built.

Page density cannot see what B-tree deduplication (PostgreSQL 13+) saves: a fresh build packs the
duplicates of a low-cardinality key into posting lists (~7 bytes per row for a bigint), while entries
that arrive one at a time are deduplicated only lazily, so after ordinary update churn the same index
holds two to three times the bytes per row at a "healthy" leaf density. pg_index_watch's answer, taken
here: remember each index's size per tuple right after it was built, and rebuild when the current figure
is `baseline_ratio` (2.0) times that or more.

Where the baseline comes from, best first:
  rebuilt   measured right after dbops rebuilt the index (REINDEX CONCURRENTLY);
  measured  the index's own figure, kept the first time it was seen no larger than the estimate of a
            fresh build (an honest figure: it cannot hide bloat the estimate would see), and lowered
            whenever the index is seen smaller per tuple (someone rebuilt it by hand);
  estimate  computed each run from the catalog for an index never seen healthy: key width, reltuples
            and n_distinct, with nbtree's build-time posting-list limit (nbtsort.c: a posting list
            tuple is capped at 10 % of a page during CREATE INDEX / REINDEX). It leans large where it
            is unsure (no statistics, several key columns: distinct counts multiplied), so it flags late
            rather than early.

A baseline is keyed by schema.index name plus a hash of pg_get_indexdef(): the name survives REINDEX
CONCURRENTLY (the oid does not), and a changed definition (new columns, predicate, fillfactor,
deduplicate_items) resets it. The state is a small pydantic model; the flow keeps it in Prefect
Variables (see flows.tasks.reindex) split into values under Prefect's 5,000-character limit.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import psycopg
from pydantic import BaseModel, Field

from flows.core.bloat import (
    BTREE_SPECIAL,
    INDEX_TUPLE_HEADER,
    LINE_POINTER,
    MAXALIGN,
    PAGE_HEADER,
    Candidate,
    IndexRow,
    ReindexPlan,
    maxalign,
)

#: sizeof(ItemPointerData): one heap TID in a posting list (storage/itemptr.h).
TID_BYTES = 6
#: nbtsort.c _bt_load(): maxpostingsize = MAXALIGN_DOWN(BLCKSZ * 10 / 100) - sizeof(ItemIdData).
BUILD_POSTING_FRACTION = 0.10
#: Fewer index tuples than this and the figure per tuple is mostly the metapage and root: not judged.
MIN_TUPLES = 1000
#: Prefect refuses Variable values longer than this (prefect.types.MAX_VARIABLE_VALUE_LENGTH = 5000).
VARIABLE_VALUE_LIMIT = 4800
STATE_VERSION = 1

Source = Literal["rebuilt", "measured", "estimate"]


# -- pure arithmetic --------------------------------------------------------------------------------------


def fresh_btree_bytes_per_tuple(
    tuples: float,
    data_width: float | None,
    distinct: float | None,
    dedup: bool,
    fillfactor: int,
    block_size: int,
) -> float | None:
    """Bytes per index tuple of a freshly built B-tree, or None when the catalog cannot say.

    Without deduplication every tuple is MAXALIGN(header + key) plus its line pointer. With it, each
    distinct key becomes posting list tuples of at most 10 % of a page (the build's cap), each holding
    6-byte heap TIDs: `distinct + tuples / per_posting` posting tuples bound the count from above (skew
    makes it larger). The TIDs dominate, so an underestimated n_distinct lowers it only where keys repeat
    a few times each, where deduplication saves little and no churn can reach twice the estimate.
    """
    if tuples <= 0 or data_width is None:
        return None
    key = maxalign(INDEX_TUPLE_HEADER + data_width)
    leaf_bytes = tuples * (key + LINE_POINTER)
    if dedup and distinct is not None and distinct > 0:
        distinct = min(max(distinct, 1.0), tuples)
        max_posting = (int(block_size * BUILD_POSTING_FRACTION) // MAXALIGN) * MAXALIGN - LINE_POINTER
        per_posting = max(1, (max_posting - key) // TID_BYTES)
        postings = min(tuples, distinct + tuples / per_posting)
        # a posting tuple is MAXALIGN(key + TIDs): half an alignment unit lost on average
        dedup_bytes = postings * (key + LINE_POINTER + MAXALIGN / 2) + tuples * TID_BYTES
        leaf_bytes = min(leaf_bytes, dedup_bytes)
    usable = (block_size - PAGE_HEADER - BTREE_SPECIAL) * fillfactor / 100
    leaf = max(1, math.ceil(leaf_bytes / usable))
    internal = math.ceil(leaf / 100) if leaf > 1 else 0
    return (leaf + internal + 1) * block_size / tuples


def definition_hash(definition: str) -> str:
    """Short, stable hash of pg_get_indexdef(): a changed definition must not inherit the old baseline."""
    return hashlib.sha256(definition.encode()).hexdigest()[:12]


DEDUP_OFF = {"off", "false", "no", "0"}


def dedup_applies(
    server_version_num: int, unique: bool, has_include: bool, equalimage: Sequence[bool], reloptions: str
) -> bool:
    """Whether CREATE INDEX deduplicates this B-tree (nbtsort.c: allequalimage, not unique, option on)."""
    if server_version_num < 130000 or unique or has_include or not equalimage or not all(equalimage):
        return False
    match = re.search(r"deduplicate_items=(\w+)", reloptions or "")
    return not (match and match.group(1).lower() in DEDUP_OFF)


# -- the state the flow keeps -----------------------------------------------------------------------------


class Baseline(BaseModel):
    """One index's healthy size per tuple and where it came from."""

    definition_hash: str = Field(description="sha256 of pg_get_indexdef(), first 12 hex digits")
    bytes_per_tuple: float = Field(description="index bytes / index tuples at the time it was recorded")
    source: Literal["rebuilt", "measured"] = Field(description="rebuilt by dbops, or measured as healthy")
    recorded_at: str = Field(description="UTC date it was recorded, YYYY-MM-DD")


class BaselineState(BaseModel):
    """Baselines of one database, keyed by schema.index."""

    version: int = STATE_VERSION
    indexes: dict[str, Baseline] = Field(default_factory=dict)


def state_variable_name(system_identifier: int, database: str) -> str:
    """`dbops_reindex_baseline_<system_identifier>_<database>`: per database identity, not per block, so
    two blocks for one database share it and a physical standby promoted in its place keeps it. A
    database name outside Prefect's alphabet is kept readable and made unique by a hash of the real name.
    """
    name = database.lower()
    if not re.fullmatch(r"[a-z0-9_-]+", name) or name != database:
        name = re.sub(r"[^a-z0-9_-]", "_", name) + "_" + hashlib.sha256(database.encode()).hexdigest()[:8]
    return f"dbops_reindex_baseline_{system_identifier}_{name}"[:255]


def _compact(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


def state_to_values(state: BaselineState, limit: int = VARIABLE_VALUE_LIMIT) -> list[dict]:
    """Split the state into JSON values under `limit` characters each (Prefect caps a Variable's value);
    the first carries the number of parts."""
    parts: list[dict] = []
    current: dict[str, dict] = {}
    for name in sorted(state.indexes):
        entry = state.indexes[name].model_dump()
        trial = {**current, name: entry}
        if current and len(_compact({"version": state.version, "parts": 999, "indexes": trial})) > limit:
            parts.append({"version": state.version, "indexes": current})
            current = {name: entry}
        else:
            current = trial
    parts.append({"version": state.version, "indexes": current})
    parts[0]["parts"] = len(parts)
    return parts


def state_from_values(values: Iterable[object]) -> BaselineState:
    """The inverse of state_to_values; an unreadable part is skipped (its indexes fall back to estimates)."""
    state = BaselineState()
    for value in values:
        raw = json.loads(value) if isinstance(value, str) else value
        if not isinstance(raw, dict) or raw.get("version") != STATE_VERSION:
            continue
        for name, entry in (raw.get("indexes") or {}).items():
            try:
                state.indexes[name] = Baseline.model_validate(entry)
            except ValueError:
                continue
    return state


# -- judging ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IndexShape:
    """What the estimate of a fresh build needs beyond IndexRow: distinct keys, dedup, definition."""

    oid: int
    definition_hash: str
    distinct: float | None
    dedup: bool


@dataclass(frozen=True)
class SizeJudgement:
    """One index's size per tuple against its baseline."""

    index: str
    definition_hash: str
    bytes_per_tuple: float
    baseline: float
    source: Source
    estimate: float | None

    @property
    def ratio(self) -> float:
        return self.bytes_per_tuple / self.baseline if self.baseline > 0 else 0.0

    def describe(self) -> str:
        return (
            f"{self.bytes_per_tuple:.1f} B per tuple, {self.ratio:.1f}x its baseline "
            f"{self.baseline:.1f} B ({SOURCE_WORDS[self.source]})"
        )


SOURCE_WORDS: dict[str, str] = {
    "rebuilt": "measured after dbops rebuilt it",
    "measured": "measured when healthy",
    "estimate": "estimate of a fresh build",
}


def bytes_per_tuple(row: IndexRow) -> float | None:
    if row.index_tuples < MIN_TUPLES or row.size_bytes <= 0:
        return None
    return row.size_bytes / row.index_tuples


def judge_sizes(
    rows: Iterable[IndexRow], shapes: Mapping[int, IndexShape], state: BaselineState, block_size: int
) -> dict[str, SizeJudgement]:
    """Each valid B-tree's size per tuple against its kept baseline (matching definition), else the
    estimate of a fresh build; indexes with too few tuples or no estimate are not judged."""
    out: dict[str, SizeJudgement] = {}
    for row in rows:
        shape = shapes.get(row.oid)
        current = bytes_per_tuple(row)
        if row.am != "btree" or not row.valid or shape is None or current is None:
            continue
        estimate = fresh_btree_bytes_per_tuple(
            row.index_tuples, row.data_width, shape.distinct, shape.dedup, row.fillfactor, block_size
        )
        kept = state.indexes.get(row.qualified)
        source: Source
        if kept is not None and kept.definition_hash == shape.definition_hash and kept.bytes_per_tuple > 0:
            baseline, source = kept.bytes_per_tuple, kept.source
        elif estimate is not None:
            baseline, source = estimate, "estimate"
        else:
            continue
        out[row.qualified] = SizeJudgement(
            row.qualified,
            shape.definition_hash,
            current,
            baseline,
            source,
            estimate,
        )
    return out


def apply_size_rule(
    plan: ReindexPlan, judgements: Mapping[str, SizeJudgement], baseline_ratio: float
) -> ReindexPlan:
    """Add the size-per-tuple rule to a density plan: a healthy (or density-unmeasurable) index at or over
    `baseline_ratio` x its baseline becomes a candidate; every reason then names the rule that chose the
    index with both figures. min_index_size, selection and skips were already applied by plan_reindex."""
    out = ReindexPlan(skipped=[], healthy=[])
    for c in plan.candidates:
        j = judgements.get(c.index.qualified)
        if c.action == "rebuild" and c.index.valid and j is not None:
            c = replace(c, reason=f"density: {c.reason}; size: {j.describe()}")
        out.candidates.append(c)
    for row in plan.healthy:
        j = judgements.get(row.qualified)
        if j is not None and j.ratio >= baseline_ratio:
            density = f"{row.estimated_bloat or 0:.0%} wasted ({row.method})"
            out.candidates.append(
                Candidate(row, "rebuild", f"size: {j.describe()} >= {baseline_ratio:g}x; density: {density}")
            )
        else:
            out.healthy.append(row)
    for s in plan.skipped:
        j = judgements.get(s.index.qualified)
        if s.reason.startswith("bloat not measurable") and j is not None and j.ratio >= baseline_ratio:
            out.candidates.append(
                Candidate(
                    s.index,
                    "rebuild",
                    f"size: {j.describe()} >= {baseline_ratio:g}x; density: not measurable",
                )
            )
        else:
            out.skipped.append(s)

    def waste(c: Candidate) -> int:
        j = judgements.get(c.index.qualified)
        by_size = int(c.index.size_bytes * (1 - 1 / j.ratio)) if j is not None and j.ratio > 1 else 0
        return max(c.index.wasted_bytes, by_size)

    order = {"drop_leftover": 0, "rebuild": 1}
    out.candidates.sort(key=lambda c: (order[c.action], -waste(c), c.index.qualified))
    return out


def learn_baselines(
    state: BaselineState,
    judgements: Mapping[str, SizeJudgement],
    present: Iterable[str],
    chosen: Iterable[str],
    today: str,
) -> BaselineState:
    """What a run learns without rebuilding: an index seen no larger per tuple than its fresh-build
    estimate keeps that figure as its measured baseline; a kept baseline goes down when the index is seen
    smaller; indexes no longer in the catalog are forgotten. Indexes chosen for a rebuild learn nothing
    here (record_rebuild does that after the rebuild)."""
    present = set(present)
    chosen = set(chosen)
    indexes = {name: b for name, b in state.indexes.items() if name in present}
    for name, j in judgements.items():
        if name in chosen:
            continue
        kept = indexes.get(name)
        if kept is not None and kept.definition_hash == j.definition_hash:
            if j.bytes_per_tuple < kept.bytes_per_tuple:
                indexes[name] = kept.model_copy(update={"bytes_per_tuple": round(j.bytes_per_tuple, 3)})
        elif j.estimate is not None and j.bytes_per_tuple <= j.estimate:
            indexes[name] = Baseline(
                definition_hash=j.definition_hash,
                bytes_per_tuple=round(j.bytes_per_tuple, 3),
                source="measured",
                recorded_at=today,
            )
    return BaselineState(indexes=indexes)


def record_rebuild(
    state: BaselineState, index: str, definition: str, size_bytes: int, tuples: float, today: str
) -> float | None:
    """Keep the size per tuple measured right after a rebuild as the index's baseline; returns it."""
    if tuples < MIN_TUPLES or size_bytes <= 0:
        return None
    figure = round(size_bytes / tuples, 3)
    state.indexes[index] = Baseline(
        definition_hash=definition, bytes_per_tuple=figure, source="rebuilt", recorded_at=today
    )
    return figure


# -- catalog ----------------------------------------------------------------------------------------------

SHAPE_QUERY = """
SELECT i.indexrelid::bigint, pg_get_indexdef(i.indexrelid), i.indisunique, i.indnkeyatts < i.indnatts,
       coalesce(array_to_string(c.reloptions, ','), ''), k.n,
       EXISTS (SELECT 1 FROM pg_opclass oc JOIN pg_amproc p
                 ON p.amprocfamily = oc.opcfamily AND p.amproclefttype = oc.opcintype
                AND p.amprocrighttype = oc.opcintype AND p.amprocnum = 4
               WHERE oc.oid = i.indclass[k.n - 1]),
       s.n_distinct::float8, tc.reltuples::float8
FROM pg_index i
JOIN pg_class c ON c.oid = i.indexrelid
JOIN pg_class tc ON tc.oid = i.indrelid
JOIN pg_namespace n ON n.oid = tc.relnamespace
CROSS JOIN LATERAL generate_series(1, i.indnkeyatts) AS k(n)
LEFT JOIN pg_attribute ta
       ON ta.attrelid = i.indrelid AND i.indkey[k.n - 1] <> 0 AND ta.attnum = i.indkey[k.n - 1]
LEFT JOIN pg_attribute ia ON ia.attrelid = i.indexrelid AND ia.attnum = k.n
LEFT JOIN pg_stats s ON s.schemaname = n.nspname AND (
       (ta.attname IS NOT NULL AND s.tablename = tc.relname AND s.attname = ta.attname)
    OR (ta.attname IS NULL AND s.tablename = c.relname AND s.attname = ia.attname))
WHERE i.indexrelid = ANY(%s::oid[])
ORDER BY 1, k.n
"""


def read_index_shapes(
    conn: psycopg.Connection, oids: Sequence[int], server_version_num: int
) -> dict[int, IndexShape]:
    """Definition hash, distinct keys (product of the key columns' n_distinct, None when a column has no
    statistics) and whether a build deduplicates, for the given indexes."""
    columns: dict[int, list[tuple]] = {}
    for r in conn.execute(SHAPE_QUERY, (list(oids),)).fetchall():
        columns.setdefault(int(r[0]), []).append(r)
    shapes: dict[int, IndexShape] = {}
    for oid, cols in columns.items():
        definition, unique, has_include, reloptions = cols[0][1], cols[0][2], cols[0][3], cols[0][4]
        distinct: float | None = 1.0
        for *_, n_distinct, table_tuples in cols:
            if n_distinct is None or distinct is None:
                distinct = None
                continue
            per_column = -n_distinct * max(table_tuples, 0) if n_distinct < 0 else n_distinct
            distinct *= max(per_column, 1.0)
        shapes[oid] = IndexShape(
            oid=oid,
            definition_hash=definition_hash(definition),
            distinct=distinct,
            dedup=dedup_applies(
                server_version_num, bool(unique), bool(has_include), [bool(c[6]) for c in cols], reloptions
            ),
        )
    return shapes
