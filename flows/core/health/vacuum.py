"""Vacuum and statistics (the seed's VACUUM ANALYZE section): tables whose dead rows exceed their
autovacuum trigger by a margin (autovacuum is not keeping up, or is off for them), tables changed past
their autoanalyze trigger without a recent ANALYZE, and whether every autovacuum worker is busy.

The trigger is PostgreSQL's own (autovacuum.c relation_needs_vacanalyze): threshold + scale_factor x
reltuples, with the table's reloptions over the server settings. The tables flagged here are exactly the
ones db_health's `vacuum=true` runs a plain VACUUM (ANALYZE) on: never VACUUM FULL, which locks the table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from flows.core.health import Check
from flows.core.health.probe import Probe, count
from flows.core.health.thresholds import HealthThresholds

TABLES = """
SELECT s.schemaname, s.relname, s.n_live_tup, s.n_dead_tup, s.n_mod_since_analyze,
       extract(epoch FROM now() - greatest(s.last_autoanalyze, s.last_analyze))::float8,
       extract(epoch FROM now() - greatest(s.last_autovacuum, s.last_vacuum))::float8,
       greatest(c.reltuples, 0)::float8, coalesce(array_to_string(c.reloptions, ','), '')
FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid
WHERE s.n_dead_tup >= %(min)s OR s.n_mod_since_analyze >= %(min)s
"""
SETTINGS = """
SELECT name, setting FROM pg_settings WHERE name IN ('autovacuum', 'autovacuum_max_workers',
  'autovacuum_vacuum_threshold', 'autovacuum_vacuum_scale_factor', 'autovacuum_analyze_threshold',
  'autovacuum_analyze_scale_factor')
"""
WORKERS = "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'autovacuum worker'"


@dataclass
class TableStats:
    schema: str
    table: str
    live: int
    dead: int
    modified: int
    analyzed_seconds_ago: float | None
    vacuumed_seconds_ago: float | None
    reltuples: float
    reloptions: str

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.table}"

    def option(self, name: str) -> str | None:
        m = re.search(rf"(?:^|,){name}=([^,]+)", self.reloptions)
        return m.group(1) if m else None

    @property
    def autovacuum_enabled(self) -> bool:
        return (self.option("autovacuum_enabled") or "on").lower() not in ("off", "false", "0", "no")


@dataclass
class VacuumFigures:
    tables: list[TableStats]
    settings: dict[str, str]
    workers_busy: int

    def _num(self, table: TableStats, name: str) -> float:
        value = table.option(name)
        return float(value if value is not None else self.settings.get(name, "0"))

    def vacuum_trigger(self, t: TableStats) -> float:
        return (
            self._num(t, "autovacuum_vacuum_threshold")
            + self._num(t, "autovacuum_vacuum_scale_factor") * t.reltuples
        )

    def analyze_trigger(self, t: TableStats) -> float:
        return (
            self._num(t, "autovacuum_analyze_threshold")
            + self._num(t, "autovacuum_analyze_scale_factor") * t.reltuples
        )


def read_vacuum(probe: Probe) -> VacuumFigures:
    tables = [
        TableStats(r[0], r[1], int(r[2]), int(r[3]), int(r[4]), r[5], r[6], float(r[7]), r[8])
        for r in probe.rows(TABLES, {"min": min(probe.thresholds.min_dead_tuples, 1_000)})
    ]
    settings = {str(n): str(v) for n, v in probe.rows(SETTINGS)}
    workers = int(probe.rows(WORKERS)[0][0])
    return VacuumFigures(tables, settings, workers)


def flagged_for_vacuum(f: VacuumFigures, t: HealthThresholds) -> list[TableStats]:
    """Tables whose dead rows are past margin x their autovacuum trigger (and the minimum), most first."""
    return sorted(
        (
            s
            for s in f.tables
            if s.dead >= t.min_dead_tuples and s.dead > t.dead_tuple_margin * f.vacuum_trigger(s)
        ),
        key=lambda s: (-s.dead, s.qualified),
    )


def _ago(seconds: float) -> str:
    return f"{seconds / 3600:.0f} h ago" if seconds >= 3600 else f"{seconds / 60:.0f} min ago"


def check_dead_tuples(f: VacuumFigures, t: HealthThresholds) -> Check:
    name = "dead rows"
    flagged = flagged_for_vacuum(f, t)
    if not flagged:
        most = max(f.tables, key=lambda s: s.dead, default=None)
        figure = f"no table past {t.dead_tuple_margin:g}x its autovacuum trigger" + (
            f"; most dead rows: {most.qualified} {most.dead:,}" if most and most.dead else ""
        )
        return Check(name=name, status="ok", figure=figure)
    figure = "; ".join(
        f"{s.qualified} {s.dead:,} dead / {s.live:,} live (trigger {f.vacuum_trigger(s):,.0f}"
        + ("" if s.autovacuum_enabled else ", autovacuum off")
        + ", last vacuumed "
        + (_ago(s.vacuumed_seconds_ago) if s.vacuumed_seconds_ago is not None else "never")
        + ")"
        for s in flagged[:5]
    )
    worst = flagged[0]
    critical = any(s.dead > t.critical_dead_fraction * max(s.live, 1) for s in flagged)
    off = [s.qualified for s in flagged if not s.autovacuum_enabled]
    return Check(
        name=name,
        status="critical" if critical else "warning",
        figure=figure,
        message=f"dead rows past {t.dead_tuple_margin:g}x the autovacuum trigger in "
        f"{count(len(flagged), 'table')}, the most in {worst.qualified} ({worst.dead:,})"
        + (f"; autovacuum is off for {', '.join(off[:3])}" if off else ""),
        action="run db_health with vacuum=true (plain VACUUM (ANALYZE) of exactly these tables), "
        "then look for "
        "what holds autovacuum back (long transactions, autovacuum_vacuum_cost_limit too low)",
    )


def check_statistics(f: VacuumFigures, t: HealthThresholds) -> Check:
    name = "statistics (autoanalyze)"
    limit = t.warn_analyze_age_hours * 3600
    stale = sorted(
        (
            s
            for s in f.tables
            if s.modified > t.dead_tuple_margin * f.analyze_trigger(s)
            and (s.analyzed_seconds_ago is None or s.analyzed_seconds_ago >= limit)
        ),
        key=lambda s: (-s.modified, s.qualified),
    )
    if not stale:
        return Check(
            name=name,
            status="ok",
            figure=f"no changed table without ANALYZE for {t.warn_analyze_age_hours:g} h",
        )
    figure = "; ".join(
        f"{s.qualified} {s.modified:,} rows changed, analyzed "
        + (f"{s.analyzed_seconds_ago / 3600:.0f} h ago" if s.analyzed_seconds_ago is not None else "never")
        for s in stale[:5]
    )
    return Check(
        name=name,
        status="warning",
        figure=figure,
        message=f"{count(len(stale), 'table')} changed past the autoanalyze trigger without an ANALYZE for "
        f"{t.warn_analyze_age_hours:g} h, the most {stale[0].qualified}",
        action=f"ANALYZE {stale[0].qualified} (vacuum=true does it with VACUUM (ANALYZE)); check "
        "that autovacuum is on",
    )


def check_workers(f: VacuumFigures) -> Check:
    name = "autovacuum workers"
    max_workers = int(f.settings.get("autovacuum_max_workers", "3"))
    on = f.settings.get("autovacuum", "on") == "on"
    figure = f"{f.workers_busy} of {max_workers} busy" + ("" if on else "; autovacuum is off")
    if not on:
        return Check(
            name=name,
            status="warning",
            figure=figure,
            message="autovacuum is off for the whole server: dead rows and transaction ID age only grow",
            action="ALTER SYSTEM SET autovacuum = on; SELECT pg_reload_conf()",
        )
    if f.workers_busy >= max_workers:
        return Check(
            name=name,
            status="warning",
            figure=figure,
            message=f"all {max_workers} autovacuum workers are busy: other tables wait their turn",
            action="raise autovacuum_max_workers (restart) or autovacuum_vacuum_cost_limit so they "
            "finish sooner",
        )
    return Check(name=name, status="ok", figure=figure)


def vacuum_checks(probe: Probe) -> list[Check]:
    f = read_vacuum(probe)
    probe.findings.vacuum_tables = [(s.schema, s.table) for s in flagged_for_vacuum(f, probe.thresholds)]
    return [check_dead_tuples(f, probe.thresholds), check_statistics(f, probe.thresholds), check_workers(f)]
