"""Which indexes are worth rebuilding: catalog estimate first, pgstatindex second, then a plan.

Cheap first, exact second (PITFALLS, "REINDEX CONCURRENTLY"): a catalog estimate of every B-tree's
expected size (reltuples x average key width from pg_stats, at the index's fillfactor) costs one query;
`pgstatindex` reads the whole index, so it runs only on the indexes the estimate flags (or cannot judge),
and only when the pgstattuple extension is installed. The plan is pure: filters, skips and ordering are
decided here from plain rows, without a connection.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import psycopg
from psycopg import sql

from flows.core.errors import VersionMismatch
from flows.core.postgres import one_row, scalar

#: Page layout constants of a B-tree page (src/include/storage/bufpage.h, access/nbtree.h).
PAGE_HEADER = 24  # SizeOfPageHeaderData
BTREE_SPECIAL = 16  # MAXALIGN(sizeof(BTPageOpaqueData))
INDEX_TUPLE_HEADER = 8  # sizeof(IndexTupleData): heap TID + t_info
LINE_POINTER = 4  # sizeof(ItemIdData)
MAXALIGN = 8
BTREE_DEFAULT_FILLFACTOR = 90  # BTREE_DEFAULT_FILLFACTOR, leaf pages

#: Invalid indexes with these names are what a failed REINDEX/CREATE INDEX CONCURRENTLY leaves behind.
LEFTOVER_RE = re.compile(r"_cc(new|old)\d*$")

#: Schemas whose indexes are never touched: system catalogs and TOAST (rebuilt with their table).
SYSTEM_SCHEMAS = ("pg_catalog", "information_schema")

Method = Literal["pgstatindex", "estimate"]
Action = Literal["drop_leftover", "rebuild"]


@dataclass(frozen=True)
class IndexRow:
    """One index as the catalog describes it; `estimated_bloat` is None when the estimate cannot judge."""

    oid: int
    schema: str
    table: str
    name: str
    am: str
    size_bytes: int
    valid: bool
    exclusion: bool = False
    temporary: bool = False
    table_kind: str = "r"
    index_tuples: float = -1
    data_width: float | None = None
    fillfactor: int = BTREE_DEFAULT_FILLFACTOR
    estimated_bloat: float | None = None
    method: Method | None = None

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def qualified_table(self) -> str:
        return f"{self.schema}.{self.table}"

    @property
    def is_leftover(self) -> bool:
        return not self.valid and bool(LEFTOVER_RE.search(self.name))

    @property
    def wasted_bytes(self) -> int:
        if not self.valid:
            return self.size_bytes  # an invalid index is maintained on every write and used by no query
        return int(self.size_bytes * (self.estimated_bloat or 0.0))


@dataclass(frozen=True)
class Selection:
    """Which schemas, tables and index names the run may touch: shell-style patterns (fnmatch)."""

    include_schemas: Sequence[str] = ()
    exclude_schemas: Sequence[str] = ()
    include_tables: Sequence[str] = ()
    exclude_tables: Sequence[str] = ()
    include_indexes: Sequence[str] = ()
    exclude_indexes: Sequence[str] = ()

    def allows(self, row: IndexRow) -> bool:
        def hit(patterns: Sequence[str], *names: str) -> bool:
            return any(fnmatch.fnmatchcase(n, p) for p in patterns for n in names)

        checks = (
            (self.include_schemas, self.exclude_schemas, (row.schema,)),
            (self.include_tables, self.exclude_tables, (row.table, row.qualified_table)),
            (self.include_indexes, self.exclude_indexes, (row.name, row.qualified)),
        )
        for include, exclude, names in checks:
            if include and not hit(include, *names):
                return False
            if hit(exclude, *names):
                return False
        return True


@dataclass(frozen=True)
class Candidate:
    index: IndexRow
    action: Action
    reason: str


@dataclass(frozen=True)
class Skipped:
    index: IndexRow
    reason: str


@dataclass
class ReindexPlan:
    """Leftovers to drop first, then rebuilds, largest estimated waste first; the rest with a reason."""

    candidates: list[Candidate] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    healthy: list[IndexRow] = field(default_factory=list)

    @property
    def leftovers(self) -> list[Candidate]:
        return [c for c in self.candidates if c.action == "drop_leftover"]

    @property
    def rebuilds(self) -> list[Candidate]:
        return [c for c in self.candidates if c.action == "rebuild"]


# -- pure arithmetic --------------------------------------------------------------------------------------


def maxalign(size: float) -> int:
    return int(math.ceil(size / MAXALIGN) * MAXALIGN)


def expected_btree_pages(index_tuples: float, data_width: float, fillfactor: int, block_size: int) -> int:
    """Pages a freshly built B-tree needs: leaf pages at fillfactor, ~1 % internal pages, the metapage."""
    tuple_bytes = maxalign(INDEX_TUPLE_HEADER + data_width) + LINE_POINTER
    usable = (block_size - PAGE_HEADER - BTREE_SPECIAL) * fillfactor / 100
    leaf = math.ceil(max(index_tuples, 0) * tuple_bytes / usable) if index_tuples > 0 else 1
    internal = math.ceil(leaf / 100) if leaf > 1 else 0
    return max(leaf, 1) + internal + 1


def estimated_btree_bloat(
    size_bytes: int, index_tuples: float, data_width: float | None, fillfactor: int, block_size: int
) -> float | None:
    """Wasted fraction of a B-tree from catalog numbers, or None when there are no statistics."""
    if data_width is None or index_tuples < 0 or size_bytes <= 0:
        return None
    actual = size_bytes / block_size
    expected = expected_btree_pages(index_tuples, data_width, fillfactor, block_size)
    return round(max(0.0, 1 - expected / actual), 4)


def pgstatindex_bloat(
    index_size: int,
    leaf_pages: int,
    internal_pages: int,
    avg_leaf_density: float,
    fillfactor: int,
    block_size: int,
) -> float:
    """Wasted fraction from pgstatindex: leaf pages repacked at fillfactor, empty and deleted pages freed."""
    total = index_size / block_size
    if total <= 0:
        return 0.0
    density = 0.0 if avg_leaf_density is None or math.isnan(avg_leaf_density) else avg_leaf_density
    needed = leaf_pages * min(density / fillfactor, 1.0) + internal_pages + 1
    return round(max(0.0, 1 - needed / total), 4)


def check_server_version(version_num: int) -> None:
    """REINDEX CONCURRENTLY exists from 12; 14.0-14.3 could corrupt indexes built concurrently."""
    if version_num < 120000:
        raise VersionMismatch(
            f"PostgreSQL {version_num // 10000} has no REINDEX CONCURRENTLY; upgrade to 12 or newer, "
            "or rebuild indexes in a maintenance window"
        )
    if 140000 <= version_num < 140004:
        raise VersionMismatch(
            f"PostgreSQL 14.{version_num % 100} can corrupt indexes built concurrently (fixed in 14.4); "
            "upgrade to the latest 14.x minor release before running weekly_reindex"
        )


def plan_reindex(
    rows: Iterable[IndexRow],
    *,
    bloat_threshold: float,
    min_index_size: int,
    selection: Selection = Selection(),
) -> ReindexPlan:
    """Decide what to do with each index; rows carry their bloat already measured (or None)."""
    plan = ReindexPlan()
    for row in rows:
        reason = skip_reason(row, min_index_size, selection)
        if reason:
            plan.skipped.append(Skipped(row, reason))
        elif row.is_leftover:
            plan.candidates.append(Candidate(row, "drop_leftover", "invalid leftover of a concurrent build"))
        elif not row.valid:
            plan.candidates.append(Candidate(row, "rebuild", "invalid index"))
        elif row.estimated_bloat is None:
            plan.skipped.append(Skipped(row, "bloat not measurable (no statistics: run ANALYZE)"))
        elif row.estimated_bloat >= bloat_threshold:
            plan.candidates.append(
                Candidate(row, "rebuild", f"{row.estimated_bloat:.0%} wasted ({row.method})")
            )
        else:
            plan.healthy.append(row)
    order = {"drop_leftover": 0, "rebuild": 1}
    plan.candidates.sort(key=lambda c: (order[c.action], -c.index.wasted_bytes, c.index.qualified))
    return plan


def skip_reason(row: IndexRow, min_index_size: int, selection: Selection) -> str | None:
    if row.schema in SYSTEM_SCHEMAS or row.schema.startswith("pg_toast"):
        return "system catalog"
    if row.temporary or row.schema.startswith("pg_temp"):
        return "temporary table"
    if not selection.allows(row):
        return "not selected"
    if row.is_leftover:
        return None  # leftovers are dropped whatever their size
    if row.exclusion:
        return "exclusion constraint (cannot be rebuilt concurrently)"
    if row.am == "brin":
        return "BRIN (skipped: PostgreSQL bug #17205)"
    if row.valid and row.am != "btree" and row.estimated_bloat is None:
        return f"{row.am} index (bloat measured for B-tree only)"
    if not row.valid:
        return None  # an invalid index's size says nothing: a cancelled build leaves it nearly empty
    if row.size_bytes < min_index_size:
        return "under the minimum size"
    return None


def with_bloat(row: IndexRow, bloat: float | None, method: Method | None) -> IndexRow:
    return replace(row, estimated_bloat=bloat, method=method)


# -- catalog queries -------------------------------------------------------------------------------------

INDEX_QUERY = """
WITH idx AS (
    SELECT i.indexrelid, i.indrelid, i.indisvalid, i.indkey,
           ic.relname AS index_name, tc.relname AS table_name, n.nspname AS schema_name,
           am.amname, ic.reltuples::float8 AS index_tuples, pg_relation_size(ic.oid) AS size_bytes,
           tc.relpersistence = 't' AS temporary, tc.relkind AS table_kind,
           coalesce((SELECT substring(opt FROM 'fillfactor=(\\d+)')::int
                     FROM unnest(ic.reloptions) opt WHERE opt LIKE 'fillfactor=%%'), 90) AS fillfactor,
           EXISTS (SELECT 1 FROM pg_constraint con
                   WHERE con.conindid = i.indexrelid AND con.contype = 'x') AS exclusion
    FROM pg_index i
    JOIN pg_class ic ON ic.oid = i.indexrelid
    JOIN pg_class tc ON tc.oid = i.indrelid
    JOIN pg_namespace n ON n.oid = tc.relnamespace
    JOIN pg_am am ON am.oid = ic.relam
    WHERE ic.relkind = 'i'
      AND (%(schema)s::text IS NULL OR (n.nspname = %(schema)s AND ic.relname = %(name)s))
), widths AS (
    SELECT idx.indexrelid,
           sum(coalesce(s.avg_width, CASE WHEN a.attlen > 0 THEN a.attlen END)) AS data_width,
           bool_or(coalesce(s.avg_width, CASE WHEN a.attlen > 0 THEN a.attlen END) IS NULL) AS unknown
    FROM idx
    JOIN pg_attribute a ON a.attrelid = idx.indexrelid AND a.attnum > 0
    LEFT JOIN pg_attribute ta ON ta.attrelid = idx.indrelid AND ta.attnum = idx.indkey[a.attnum - 1]
    LEFT JOIN pg_stats s ON s.schemaname = idx.schema_name AND (
           (ta.attname IS NOT NULL AND s.tablename = idx.table_name AND s.attname = ta.attname)
        OR (ta.attname IS NULL AND s.tablename = idx.index_name AND s.attname = a.attname))
    GROUP BY idx.indexrelid
)
SELECT idx.indexrelid::bigint, idx.schema_name, idx.table_name, idx.index_name, idx.amname,
       idx.size_bytes, idx.indisvalid, idx.exclusion, idx.temporary, idx.table_kind::text,
       idx.index_tuples, CASE WHEN w.unknown THEN NULL ELSE w.data_width END, idx.fillfactor
FROM idx LEFT JOIN widths w USING (indexrelid)
ORDER BY idx.schema_name, idx.table_name, idx.index_name
"""


def block_size(conn: psycopg.Connection) -> int:
    return int(scalar(conn, "SHOW block_size"))


def read_indexes(
    conn: psycopg.Connection, schema: str | None = None, name: str | None = None
) -> list[IndexRow]:
    """Every index of the database (or one, by name) with the catalog bloat estimate for B-trees."""
    bs = block_size(conn)
    rows = []
    for r in conn.execute(INDEX_QUERY, {"schema": schema, "name": name}).fetchall():
        row = IndexRow(
            oid=int(r[0]),
            schema=r[1],
            table=r[2],
            name=r[3],
            am=r[4],
            size_bytes=int(r[5]),
            valid=bool(r[6]),
            exclusion=bool(r[7]),
            temporary=bool(r[8]),
            table_kind=r[9],
            index_tuples=float(r[10]),
            data_width=None if r[11] is None else float(r[11]),
            fillfactor=int(r[12]),
        )
        if row.am == "btree" and row.valid:
            bloat = estimated_btree_bloat(
                row.size_bytes, row.index_tuples, row.data_width, row.fillfactor, bs
            )
            row = with_bloat(row, bloat, "estimate" if bloat is not None else None)
        rows.append(row)
    return rows


def pgstattuple_schema(conn: psycopg.Connection) -> str | None:
    """The schema pgstattuple is installed in, or None when it is not installed in this database."""
    row = conn.execute(
        "SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace "
        "WHERE e.extname = 'pgstattuple'"
    ).fetchone()
    return row[0] if row else None


def measure_with_pgstatindex(conn: psycopg.Connection, schema: str, row: IndexRow) -> IndexRow:
    """Exact leaf density of one B-tree (reads the whole index: only for candidates)."""
    query = sql.SQL(
        "SELECT index_size, leaf_pages, internal_pages, avg_leaf_density "
        "FROM {}.pgstatindex(%s::oid::regclass)"
    ).format(sql.Identifier(schema))
    size, leaf, internal, density = one_row(conn, query, (row.oid,))
    bloat = pgstatindex_bloat(
        int(size), int(leaf), int(internal), float(density), row.fillfactor, block_size(conn)
    )
    return replace(row, size_bytes=int(size), estimated_bloat=bloat, method="pgstatindex")


def measure(
    conn: psycopg.Connection, rows: list[IndexRow], bloat_threshold: float, stattuple_schema: str | None
) -> list[IndexRow]:
    """Confirm with pgstatindex the B-trees whose estimate reaches half the threshold or is unknown."""
    if stattuple_schema is None:
        return rows
    out = []
    for row in rows:
        doubtful = row.estimated_bloat is None or row.estimated_bloat >= bloat_threshold / 2
        if row.am == "btree" and row.valid and doubtful and not row.temporary:
            try:
                row = measure_with_pgstatindex(conn, stattuple_schema, row)
            except (psycopg.errors.InsufficientPrivilege, psycopg.errors.LockNotAvailable):
                pass  # keep the estimate: pgstatindex needs pg_stat_scan_tables and must not queue
            except psycopg.errors.UndefinedTable:
                continue  # dropped since the catalog was read
        out.append(row)
    return out


def index_by_name(conn: psycopg.Connection, schema: str, name: str) -> IndexRow | None:
    """Re-read one index (after a concurrent rebuild its OID and size change; its name stays)."""
    rows = read_indexes(conn, schema, name)
    return rows[0] if rows else None
