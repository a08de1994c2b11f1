"""Indexes: invalid ones (a failed CREATE INDEX CONCURRENTLY: maintained on every write, used by no
query), unused ones (no scan since the statistics were reset, above a size: they cost every write),
duplicates (same table, columns, operator classes, expressions and predicate), and the indexes the
application relies on (the seed prescribes four) present and valid.

Indexes that enforce a constraint (primary key, unique, exclusion) are never called unused: their scans
are not what they are for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from flows.core.health import Check
from flows.core.health.probe import Probe, count
from flows.core.health.size import human
from flows.core.health.thresholds import HealthThresholds, PrescribedIndex

INVALID = """
SELECT format('%%I.%%I', n.nspname, c.relname), format('%%I.%%I', n.nspname, t.relname)
FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_class t ON t.oid = i.indrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE NOT i.indisvalid AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg_toast%%' ORDER BY 1
"""
UNUSED = """
SELECT name, tab, size FROM (
    SELECT format('%%I.%%I', s.schemaname, s.indexrelname) AS name,
           format('%%I.%%I', s.schemaname, s.relname) AS tab, pg_relation_size(s.indexrelid) AS size
    FROM pg_stat_user_indexes s JOIN pg_index i ON i.indexrelid = s.indexrelid
    WHERE s.idx_scan = 0 AND NOT i.indisunique AND NOT i.indisprimary AND NOT i.indisexclusion
      AND i.indisvalid
) u
WHERE size >= %s
ORDER BY size DESC, name
"""
DUPLICATES = """
SELECT d.names, d.tab, (SELECT sum(pg_relation_size(x)) FROM unnest(d.oids) AS x)::bigint AS size
FROM (
    SELECT array_agg(format('%%I.%%I', n.nspname, c.relname) ORDER BY i.indisunique DESC, c.relname) AS names,
           format('%%I.%%I', n.nspname, t.relname) AS tab, array_agg(c.oid) AS oids
    FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_class t ON t.oid = i.indrelid
    JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%%'
    GROUP BY i.indrelid, n.nspname, t.relname, c.relam, i.indkey::text, i.indclass::text,
             i.indcollation::text, coalesce(pg_get_expr(i.indexprs, i.indrelid), ''),
             coalesce(pg_get_expr(i.indpred, i.indrelid), '')
    HAVING count(*) > 1
) d
ORDER BY 3 DESC, 2
"""
PRESCRIBED = """
SELECT c.relname::text, t.relname::text, i.indisvalid, i.indpred IS NOT NULL,
       format('%%I.%%I', n.nspname, c.relname)
FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_class t ON t.oid = i.indrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relname = ANY(%s) AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg_toast%%'
"""


@dataclass
class IndexFigures:
    invalid: list[tuple[str, str]]
    unused: list[tuple[str, str, int]]
    duplicates: list[tuple[list[str], str, int]]
    present: dict[str, tuple[str, bool, bool, str]]  # name -> (table, valid, partial, qualified)


def read_indexes(probe: Probe, prescribed: Sequence[PrescribedIndex]) -> IndexFigures:
    invalid = [(str(a), str(b)) for a, b in probe.rows(INVALID)]
    unused = [
        (str(a), str(b), int(c)) for a, b, c in probe.rows(UNUSED, (probe.thresholds.min_unused_index_bytes,))
    ]
    dups = [(list(a), str(b), int(c)) for a, b, c in probe.rows(DUPLICATES)]
    present: dict[str, tuple[str, bool, bool, str]] = {}
    if prescribed:
        for name, table, valid, partial, qualified in probe.rows(PRESCRIBED, ([p.name for p in prescribed],)):
            present[str(name)] = (str(table), bool(valid), bool(partial), str(qualified))
    return IndexFigures(invalid, unused, dups, present)


def check_invalid(f: IndexFigures) -> Check:
    if not f.invalid:
        return Check(name="invalid indexes", status="ok", figure="none")
    first, table = f.invalid[0]
    return Check(
        name="invalid indexes",
        status="warning",
        figure=", ".join(f"{i} on {t}" for i, t in f.invalid[:5]),
        message=f"{count(len(f.invalid), 'invalid index', 'invalid indexes')} (a failed concurrent build), "
        f"{first} on {table} among them: written on every change, used by no query",
        action=f"DROP INDEX CONCURRENTLY {first}, then create it again CONCURRENTLY (weekly-reindex drops "
        "_ccnew/_ccold leftovers itself)",
    )


def check_unused(f: IndexFigures, t: HealthThresholds) -> Check:
    name = "unused indexes"
    if not f.unused:
        return Check(name=name, status="ok", figure=f"no unused index over {human(t.min_unused_index_bytes)}")
    total = sum(b for _, _, b in f.unused)
    first = f.unused[0]
    return Check(
        name=name,
        status="warning",
        figure=", ".join(f"{i} on {tb} {human(b)}" for i, tb, b in f.unused[:5])
        + f" ({human(total)} in all)",
        message=f"{count(len(f.unused), 'index', 'indexes')} over {human(t.min_unused_index_bytes)} never "
        f"scanned since the statistics were reset ({human(total)}), the largest {first[0]}",
        action=f"check the standbys and the statistics reset time, then DROP INDEX CONCURRENTLY {first[0]}",
    )


def check_duplicates(f: IndexFigures) -> Check:
    name = "duplicate indexes"
    if not f.duplicates:
        return Check(name=name, status="ok", figure="none")
    names, table, _ = f.duplicates[0]
    return Check(
        name=name,
        status="warning",
        figure="; ".join(f"{' = '.join(n)} on {t} ({human(b)})" for n, t, b in f.duplicates[:5]),
        message=f"{count(len(f.duplicates), 'set')} of indexes with the same columns and predicate, "
        f"{' and '.join(names)} on {table} among them",
        action=f"keep {names[0]} and DROP INDEX CONCURRENTLY {', '.join(names[1:])}",
    )


def check_prescribed(f: IndexFigures, prescribed: Sequence[PrescribedIndex]) -> Check:
    name = "prescribed indexes"
    if not prescribed:
        return Check(name=name, status="ok", figure="none prescribed")
    problems: list[str] = []
    for p in prescribed:
        found = f.present.get(p.name)
        if found is None:
            problems.append(f"{p.name} is missing" + (f" on {p.table}" if p.table else ""))
            continue
        table, valid, partial, qualified = found
        if p.table and table != p.table:
            problems.append(f"{qualified} is on {table}, not {p.table}")
        elif not valid:
            problems.append(f"{qualified} is invalid")
        elif p.partial and not partial:
            problems.append(f"{qualified} is not partial")
    figure = f"{len(prescribed) - len(problems)} of {len(prescribed)} present and valid"
    if not problems:
        return Check(name=name, status="ok", figure=figure)
    return Check(
        name=name,
        status="warning",
        figure=figure + ": " + "; ".join(problems),
        message=f"{count(len(problems), 'prescribed index', 'prescribed indexes')} not as the application "
        "expects: "
        f"{'; '.join(problems[:3])}",
        action="run the application's migrations (dbops migrate) or CREATE INDEX CONCURRENTLY it as "
        "the schema "
        "defines it; an invalid one: DROP INDEX CONCURRENTLY and create it again",
    )


def index_checks(probe: Probe, prescribed: Sequence[PrescribedIndex]) -> list[Check]:
    f = read_indexes(probe, prescribed)
    return [
        check_invalid(f),
        check_unused(f, probe.thresholds),
        check_duplicates(f),
        check_prescribed(f, prescribed),
    ]
