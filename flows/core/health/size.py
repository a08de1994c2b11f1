"""Size (the seed's "Monitor Database Size"): the database, its 20 largest tables and indexes, growth per
day from the kept history, and the days until the data directory's disk is full.

Free disk space is not readable over SQL by a pg_monitor role (pg_ls_dir/statvfs are not exposed), so it
is read only where it can be read honestly: when dbops runs on the database host (a local address or a
socket) and the `data_directory` PostgreSQL reports is a directory here. Otherwise the disk check is
skipped and says why.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from flows.core.health import Check
from flows.core.health.probe import Probe
from flows.core.health.thresholds import HealthThresholds

LARGEST = 20
#: Exact sizes are read for this many candidates per list, chosen by the catalog's page counts.
CANDIDATES = 200

# pg_total_relation_size opens and stats every fork of a table, its TOAST table and each index: on 10,000
# tables that is seconds of work. The catalog's relpages (kept by VACUUM, ANALYZE and CREATE INDEX) ranks
# the candidates cheaply; only the top CANDIDATES are measured exactly, then the top LARGEST kept.
LARGEST_TABLES = """
SELECT name, pg_total_relation_size(oid) AS bytes FROM (
    SELECT c.oid, format('%%I.%%I', n.nspname, c.relname) AS name,
           c.relpages::bigint + coalesce(t.relpages, 0)
           + coalesce((SELECT sum(i.relpages) FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
                       WHERE x.indrelid = c.oid), 0) AS pages
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    LEFT JOIN pg_class t ON t.oid = c.reltoastrelid
    WHERE c.relkind IN ('r', 'm') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
      AND n.nspname NOT LIKE 'pg_toast%%'
    ORDER BY pages DESC, name LIMIT %s
) candidates
ORDER BY bytes DESC, name LIMIT %s
"""

LARGEST_INDEXES = """
SELECT name, pg_relation_size(oid) AS bytes FROM (
    SELECT c.oid, format('%%I.%%I', n.nspname, c.relname) AS name, c.relpages
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.relkind = 'i' AND n.nspname NOT IN ('pg_catalog', 'information_schema')
      AND n.nspname NOT LIKE 'pg_toast%%'
    ORDER BY c.relpages DESC, name LIMIT %s
) candidates
ORDER BY bytes DESC, name LIMIT %s
"""


@dataclass
class SizeFigures:
    database_bytes: int
    tables: list[tuple[str, int]]
    indexes: list[tuple[str, int]]


@dataclass
class DiskFigures:
    """The data directory's filesystem, or why it could not be read."""

    path: str
    total_bytes: int | None = None
    free_bytes: int | None = None
    unreadable: str = ""


def read_size(probe: Probe) -> SizeFigures:
    db = probe.rows("SELECT pg_database_size(current_database())")[0][0]
    tables = [(str(n), int(b)) for n, b in probe.rows(LARGEST_TABLES, (CANDIDATES, LARGEST))]
    indexes = [(str(n), int(b)) for n, b in probe.rows(LARGEST_INDEXES, (CANDIDATES, LARGEST))]
    return SizeFigures(int(db), tables, indexes)


def read_disk(probe: Probe) -> DiskFigures:
    """statvfs of the data directory, when this machine is the database host and can see it."""
    rows = probe.rows(
        "SELECT setting FROM pg_settings WHERE name = 'data_directory'"
    )  # hidden from roles without pg_read_all_settings (part of pg_monitor)
    path = str(rows[0][0]) if rows and rows[0][0] else ""
    if not path:
        return DiskFigures("", unreadable=f"data_directory is hidden from {probe.role} (needs pg_monitor)")
    if not probe.local_host:
        return DiskFigures(
            path, unreadable=f"dbops runs on another host than {probe.where}, and SQL cannot read free space"
        )
    try:
        st = os.statvfs(path)
    except OSError as exc:
        return DiskFigures(path, unreadable=f"{path} is not readable here ({exc.strerror})")
    return DiskFigures(path, total_bytes=st.f_blocks * st.f_frsize, free_bytes=st.f_bavail * st.f_frsize)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def check_size(figures: SizeFigures, growth_per_day: float | None, database: str) -> Check:
    top = ", ".join(f"{n} {human(b)}" for n, b in figures.tables[:3])
    growth = (
        f", {'+' if growth_per_day >= 0 else ''}{human(growth_per_day)}/day"
        if growth_per_day is not None
        else ", growth not known yet (history starts)"
    )
    return Check(
        name=f"size {database}",
        status="ok",
        figure=f"{human(figures.database_bytes)}{growth}; largest tables: {top or 'none'}",
    )


def check_disk(disk: DiskFigures, growth_per_day: float | None, t: HealthThresholds) -> Check:
    name = "disk of the data directory"
    if disk.unreadable or disk.free_bytes is None or not disk.total_bytes:
        return Check(
            name=name,
            status="skipped",
            figure=f"free space unknown: {disk.unreadable}",
            message="",
            action="",
        )
    free_fraction = disk.free_bytes / disk.total_bytes
    days = disk.free_bytes / growth_per_day if growth_per_day and growth_per_day > 0 else None
    figure = (
        f"{human(disk.free_bytes)} free of {human(disk.total_bytes)} ({free_fraction:.0%}) at {disk.path}"
    )
    figure += f"; full in {days:.0f} days at the current growth" if days is not None else "; not growing"
    status = "ok"
    if free_fraction < t.critical_free_fraction or (days is not None and days < t.critical_days_until_full):
        status = "critical"
    elif free_fraction < t.warn_free_fraction or (days is not None and days < t.warn_days_until_full):
        status = "warning"
    if status == "ok":
        return Check(name=name, status="ok", figure=figure)
    when = f" and fills in about {days:.0f} days" if days is not None else ""
    return Check(
        name=name,
        status=status,
        figure=figure,
        message=f"the data directory's disk has {human(disk.free_bytes)} ({free_fraction:.0%}) free{when}",
        action="grow the volume, or free space: drop unused indexes, archive old rows, remove WAL kept by "
        "inactive replication slots",
    )


def size_checks(probe: Probe, growth_per_day: float | None = None) -> list[Check]:
    figures = read_size(probe)
    probe.findings.database_bytes = figures.database_bytes
    probe.findings.largest_tables = figures.tables
    probe.findings.largest_indexes = figures.indexes
    return [check_size(figures, growth_per_day, probe.database)]


def disk_checks(probe: Probe, growth_per_day: float | None = None) -> list[Check]:
    disk = read_disk(probe)
    probe.findings.free_bytes, probe.findings.disk_bytes = disk.free_bytes, disk.total_bytes
    return [check_disk(disk, growth_per_day, probe.thresholds)]
