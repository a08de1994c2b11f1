"""Sequences and integer keys near exhaustion: every sequence by the fraction of its range used, and
every serial/identity column by the fraction of its COLUMN type's maximum. An `integer` id fed by a
`bigint` sequence (a column created as serial and a sequence altered AS bigint, or a key copied from
another table) stops at 2,147,483,647 whatever the sequence allows: that is an outage for an image table.

A sequence's last value is readable with SELECT or USAGE on it only (pg_monitor does not give it); the
unreadable ones are a skipped check naming the GRANT.
"""

from __future__ import annotations

from dataclasses import dataclass

from flows.core.health import Check, Status, judged
from flows.core.health.probe import Probe
from flows.core.health.thresholds import HealthThresholds

TYPE_MAX = {"smallint": 32767, "integer": 2147483647, "bigint": 9223372036854775807}

SEQUENCES = """
SELECT format('%%I.%%I', n.nspname, c.relname), n.nspname, format_type(s.seqtypid, NULL), s.seqincrement,
       s.seqmin, s.seqmax, has_sequence_privilege(c.oid, 'SELECT,USAGE'),
       CASE WHEN has_sequence_privilege(c.oid, 'SELECT,USAGE') THEN pg_sequence_last_value(c.oid) END,
       col.tab, col.attname, col.typ
FROM pg_sequence s
JOIN pg_class c ON c.oid = s.seqrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN LATERAL (
    SELECT format('%%I.%%I', tn.nspname, t.relname) AS tab, a.attname::text AS attname,
           format_type(a.atttypid, NULL) AS typ
    FROM pg_depend d
    JOIN pg_class t ON t.oid = d.refobjid
    JOIN pg_namespace tn ON tn.oid = t.relnamespace
    JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
    WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.refclassid = 'pg_class'::regclass
      AND d.deptype IN ('a', 'i') AND d.refobjsubid > 0
    LIMIT 1
) col ON true
"""


@dataclass
class SequenceRow:
    name: str
    schema: str
    data_type: str
    increment: int
    min_value: int
    max_value: int
    readable: bool
    last_value: int | None
    table: str | None = None
    column: str | None = None
    column_type: str | None = None

    @property
    def limit(self) -> int:
        """The largest value a nextval() can still be stored as: the sequence's max or the column's."""
        if self.increment < 0:
            return self.min_value
        column_max = TYPE_MAX.get(self.column_type or "", self.max_value)
        return min(self.max_value, column_max)

    @property
    def column_limited(self) -> bool:
        return self.increment > 0 and TYPE_MAX.get(self.column_type or "", self.max_value) < self.max_value

    @property
    def used(self) -> float:
        if self.last_value is None or self.limit == 0:
            return 0.0
        return max(self.last_value / self.limit, 0.0)

    @property
    def where(self) -> str:
        return f"{self.table}.{self.column} ({self.column_type})" if self.table else self.name


def read_sequences(probe: Probe) -> list[SequenceRow]:
    return [
        SequenceRow(r[0], r[1], r[2], int(r[3]), int(r[4]), int(r[5]), bool(r[6]), r[7], r[8], r[9], r[10])
        for r in probe.rows(SEQUENCES)
    ]


def _status(used: float, t: HealthThresholds) -> Status:
    return (
        "critical"
        if used >= t.critical_sequence_fraction
        else "warning"
        if used >= t.warn_sequence_fraction
        else "ok"
    )


def _describe(s: SequenceRow) -> str:
    return f"{s.name} {s.used:.1%} of {s.limit:,}" + (f" ({s.where})" if s.table else "")


def check_sequences(rows: list[SequenceRow], t: HealthThresholds) -> Check:
    name = "sequences"
    seqs = sorted((s for s in rows if s.readable and not s.column_limited), key=lambda s: -s.used)
    figure = f"{len(seqs)} sequences" + (
        f"; most used: {', '.join(_describe(s) for s in seqs[:3])}" if seqs else ""
    )
    over = [s for s in seqs if _status(s.used, t) != "ok"]
    if not over:
        return Check(name=name, status="ok", figure=figure)
    worst = over[0]
    return Check(
        name=name,
        status=_status(worst.used, t),
        figure=figure,
        message=f"sequence {worst.name} has used {worst.used:.1%} of its {worst.data_type} range"
        + (f" ({len(over)} sequences past {t.warn_sequence_fraction:.0%})" if len(over) > 1 else ""),
        action=f"ALTER SEQUENCE {worst.name} AS bigint (and its column ALTER ... TYPE bigint) "
        "before it runs out",
    )


def check_integer_keys(rows: list[SequenceRow], t: HealthThresholds) -> Check:
    name = "integer keys"
    keys = sorted((s for s in rows if s.readable and s.column_limited), key=lambda s: -s.used)
    if not keys:
        return Check(name=name, status="ok", figure="no serial/identity column narrower than its sequence")
    figure = "; ".join(f"{s.where} {s.used:.1%} of {s.limit:,} (sequence {s.data_type})" for s in keys[:3])
    worst = keys[0]
    status = _status(worst.used, t)
    return judged(
        name,
        status,
        figure,
        message=f"column {worst.where} has used {worst.used:.1%} of its type's maximum "
        f"{worst.limit:,}; inserts "
        "fail when it is reached, whatever its bigint sequence allows",
        action=f"ALTER TABLE {worst.table} ALTER COLUMN {worst.column} TYPE bigint (rewrites the "
        "table: plan it, "
        "or add a bigint column and switch over)",
    )


def check_unreadable(rows: list[SequenceRow], role: str) -> Check | None:
    hidden = [s for s in rows if not s.readable]
    if not hidden:
        return None
    schemas = sorted({s.schema for s in hidden})
    return Check(
        name="sequences not readable",
        status="skipped",
        figure=f"{len(hidden)} sequences hidden from {role}: {', '.join(s.name for s in hidden[:5])}",
        message="",
        action="; ".join(f"GRANT SELECT ON ALL SEQUENCES IN SCHEMA {s} TO {role}" for s in schemas),
    )


def sequence_checks(probe: Probe) -> list[Check]:
    rows = read_sequences(probe)
    checks = [check_sequences(rows, probe.thresholds), check_integer_keys(rows, probe.thresholds)]
    hidden = check_unreadable(rows, probe.role)
    return checks + ([hidden] if hidden else [])
