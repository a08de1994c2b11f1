"""Cache and I/O: the buffer cache hit ratio of this database (others shown) and of its busiest tables (reads
that miss shared_buffers go to the OS cache or the disk), and temporary files (sorts and hashes that do
not fit work_mem) per day since the statistics were reset. Ratios over too few reads are not judged.
"""

from __future__ import annotations

from dataclasses import dataclass

from flows.core.health import Check
from flows.core.health.probe import Probe
from flows.core.health.size import human
from flows.core.health.thresholds import HealthThresholds

DATABASES = """
SELECT datname, blks_hit, blks_read, temp_files, temp_bytes,
       extract(epoch FROM now() - coalesce(stats_reset, pg_postmaster_start_time()))::float8
FROM pg_stat_database WHERE datname IS NOT NULL ORDER BY blks_hit + blks_read DESC
"""
TABLES = """
SELECT format('%%I.%%I', schemaname, relname), coalesce(heap_blks_hit, 0) + coalesce(idx_blks_hit, 0),
       coalesce(heap_blks_read, 0) + coalesce(idx_blks_read, 0)
FROM pg_statio_user_tables
ORDER BY 2 + 3 DESC, 1 LIMIT 5
"""


@dataclass
class DatabaseIo:
    name: str
    hit: int
    read: int
    temp_files: int
    temp_bytes: int
    seconds: float

    @property
    def ratio(self) -> float | None:
        total = self.hit + self.read
        return self.hit / total if total else None


@dataclass
class CacheFigures:
    databases: list[DatabaseIo]
    tables: list[tuple[str, int, int]]


def read_cache(probe: Probe) -> CacheFigures:
    dbs = [
        DatabaseIo(str(r[0]), int(r[1]), int(r[2]), int(r[3]), int(r[4]), float(r[5] or 0))
        for r in probe.rows(DATABASES)
    ]
    tables = [(str(n), int(h), int(r)) for n, h, r in probe.rows(TABLES)]
    return CacheFigures(dbs, tables)


def _ratio(hit: int, read: int) -> str:
    return f"{hit / (hit + read):.2%}" if hit + read else "no reads"


def check_hit_ratio(f: CacheFigures, t: HealthThresholds, database: str) -> Check:
    name = "cache hit ratio"
    figure = "databases: " + ", ".join(f"{d.name} {_ratio(d.hit, d.read)}" for d in f.databases[:5])
    if f.tables:
        figure += "; busiest tables: " + ", ".join(f"{n} {_ratio(h, r)}" for n, h, r in f.tables)
    # judged for this database (and its tables) only; the other databases are figures: each has its own run
    low = [
        d
        for d in f.databases
        if d.name == database and d.hit + d.read >= t.min_cache_blocks and (d.ratio or 1) < t.warn_hit_ratio
    ]
    low_tables = [
        (n, h, r) for n, h, r in f.tables if h + r >= t.min_cache_blocks and h / (h + r) < t.warn_hit_ratio
    ]
    if not low and not low_tables:
        return Check(name=name, status="ok", figure=figure)
    what = (
        f"database {low[0].name} finds {low[0].ratio:.1%} of its blocks in shared_buffers"
        if low
        else f"table {low_tables[0][0]} finds {_ratio(low_tables[0][1], low_tables[0][2])} of its "
        "blocks in shared_buffers"
    )
    return Check(
        name=name,
        status="warning",
        figure=figure,
        message=f"{what} (below {t.warn_hit_ratio:.0%}): queries wait for the disk",
        action="raise shared_buffers (about 25 % of RAM) or find the queries that read whole tables "
        "(top queries, missing indexes)",
    )


def check_temp_files(f: CacheFigures, t: HealthThresholds, database: str) -> Check:
    name = "temporary files"
    mine = next((d for d in f.databases if d.name == database), None)
    if mine is None:
        return Check(name=name, status="ok", figure="no statistics for this database")
    days = max(mine.seconds / 86400, 1 / 24)
    per_day = mine.temp_bytes / days
    figure = (
        f"{mine.temp_files:,} files, {human(mine.temp_bytes)} since the statistics were reset "
        f"({human(per_day)}/day)"
    )
    if per_day < t.warn_temp_bytes_per_day:
        return Check(name=name, status="ok", figure=figure)
    return Check(
        name=name,
        status="warning",
        figure=figure,
        message=f"queries in {database} write {human(per_day)} of temporary files a day: sorts and "
        "hashes spill to disk",
        action="set log_temp_files to find them, then raise work_mem for those queries or give them an index",
    )


def cache_checks(probe: Probe) -> list[Check]:
    f = read_cache(probe)
    return [
        check_hit_ratio(f, probe.thresholds, probe.database),
        check_temp_files(f, probe.thresholds, probe.database),
    ]
