"""Transaction ID wraparound: age(datfrozenxid) of every database and the oldest tables of this one by
age(relfrozenxid), against autovacuum_freeze_max_age. PostgreSQL stops accepting writes near 2^31
(src/backend/access/transam/varsup.c: xidStopLimit); the critical threshold sits far before it, so there
is time for a VACUUM (FREEZE) of a large table.
"""

from __future__ import annotations

from dataclasses import dataclass

from flows.core.health import Check, Status, judged
from flows.core.health.probe import Probe, count
from flows.core.health.thresholds import HealthThresholds

#: 2^31: the distance at which a transaction ID would wrap around (varsup.c xidWrapLimit).
WRAP_LIMIT = 2**31

DATABASES = "SELECT datname, age(datfrozenxid) FROM pg_database WHERE datallowconn ORDER BY 2 DESC"
TABLES = """
SELECT format('%%I.%%I', n.nspname, c.relname), age(c.relfrozenxid)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'm', 't') AND c.relfrozenxid <> 0
ORDER BY 2 DESC, 1 LIMIT 10
"""


@dataclass
class XidAges:
    freeze_max_age: int
    databases: list[tuple[str, int]]
    tables: list[tuple[str, int]]


def read_xid_ages(probe: Probe) -> XidAges:
    fma = int(probe.rows("SELECT current_setting('autovacuum_freeze_max_age')::bigint")[0][0])
    dbs = [(str(n), int(a)) for n, a in probe.rows(DATABASES)]
    tables = [(str(n), int(a)) for n, a in probe.rows(TABLES)]
    return XidAges(fma, dbs, tables)


def _status(age: int, ages: XidAges, t: HealthThresholds) -> Status:
    if age >= t.critical_xid_age:
        return "critical"
    if age >= ages.freeze_max_age * t.warn_freeze_age_factor:
        return "warning"
    return "ok"


def _limits(ages: XidAges, t: HealthThresholds) -> str:
    return (
        f"autovacuum_freeze_max_age {ages.freeze_max_age:,}, warning at "
        f"{ages.freeze_max_age * t.warn_freeze_age_factor:,.0f}, "
        f"critical at {t.critical_xid_age:,}, writes stop near {WRAP_LIMIT:,}"
    )


def check_databases(ages: XidAges, t: HealthThresholds) -> Check:
    name = "wraparound (databases)"
    figure = "; ".join(f"{d} {a:,}" for d, a in ages.databases[:5]) + f" ({_limits(ages, t)})"
    if not ages.databases:
        return Check(name=name, status="ok", figure="no database to judge")
    db, age = ages.databases[0]
    status = _status(age, ages, t)
    return judged(
        name,
        status,
        figure,
        message=f"database {db} is {age:,} transactions from its last freeze ({age / WRAP_LIMIT:.0%} of the "
        "way to the write stop)",
        action=f"run VACUUM (FREEZE, VERBOSE) on its oldest tables in {db}; look for what stops autovacuum "
        "(long transactions, inactive replication slots, prepared transactions)",
    )


def check_tables(ages: XidAges, t: HealthThresholds, database: str) -> Check:
    name = f"wraparound (tables of {database})"
    if not ages.tables:
        return Check(name=name, status="ok", figure="no table")
    figure = "oldest: " + ", ".join(f"{n} {a:,}" for n, a in ages.tables[:5])
    table, age = ages.tables[0]
    status = _status(age, ages, t)
    if status == "ok":
        return Check(name=name, status="ok", figure=figure)
    over = [n for n, a in ages.tables if _status(a, ages, t) != "ok"]
    return Check(
        name=name,
        status=status,
        figure=figure,
        message=f"{count(len(over), 'table')} past {ages.freeze_max_age * t.warn_freeze_age_factor:,.0f} "
        f"transactions since the last freeze, the oldest {table} at {age:,}",
        action=f"VACUUM (FREEZE, VERBOSE) {table}; then find why autovacuum did not "
        "(autovacuum_freeze_max_age "
        "reached but the anti-wraparound vacuum cannot finish)",
    )


def wraparound_checks(probe: Probe) -> list[Check]:
    ages = read_xid_ages(probe)
    return [check_databases(ages, probe.thresholds), check_tables(ages, probe.thresholds, probe.database)]
