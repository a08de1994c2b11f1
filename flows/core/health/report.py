"""The db_health report a person reads in ten seconds: a status line, then only the warnings and
criticals with what to do, then the figures (size trend as a sparkline of the last 14 days). The flow's
markdown artifact and `dbops health` in a terminal print the same text."""

from __future__ import annotations

from datetime import date

from flows.core.health import Check
from flows.core.health.database import HealthReport
from flows.core.health.history import SPARK_DAYS, sparkline
from flows.core.health.size import human

MARK = {"critical": "CRITICAL", "warning": "warning", "ok": "ok", "skipped": "skipped"}


def status_line(report: HealthReport) -> str:
    counts = {
        s: sum(1 for c in report.checks if c.status == s) for s in ("critical", "warning", "ok", "skipped")
    }
    parts = [f"{n} {s}" for s, n in counts.items() if n]
    return (
        f"**{report.database}: {report.status.upper()}** ({', '.join(parts)}) at {report.checked_at}, "
        f"{report.where}, PostgreSQL {report.server_version}"
    )


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _problem(c: Check) -> str:
    return f"- **{MARK[c.status]} {c.name}**: {c.message}. **Do**: {c.action}. _({c.figure})_"


def size_trend(report: HealthReport, today: date | None = None) -> str:
    day = today or date.fromisoformat(report.checked_at[:10])
    line = sparkline(report.history.last_days(day, SPARK_DAYS))
    size = human(report.database_bytes) if report.database_bytes is not None else "unknown"
    growth = (
        f"{'+' if report.growth_per_day >= 0 else '-'}{human(abs(report.growth_per_day))}/day"
        if report.growth_per_day is not None
        else "growth not known yet"
    )
    kept = len(report.history.days)
    return f"Size, last {SPARK_DAYS} days: `{line or '-'}` {size} ({growth}, {kept} days kept)"


def render(report: HealthReport, failure: str | None = None) -> str:
    lines: list[str] = []
    if failure:
        lines += [f"**Failed**: {failure}", ""]
    lines += [status_line(report), ""]
    problems = sorted(report.problems, key=lambda c: c.status != "critical")
    if problems:
        lines += ["### What to do", *(_problem(c) for c in problems), ""]
    else:
        lines += ["Nothing to do: no warning, no critical.", ""]
    lines += ["### Figures", size_trend(report)]
    if report.history_note:
        lines.append(f"_{report.history_note}_")
    if report.vacuumed:
        done = ", ".join(
            f"{t} ({'vacuumed' if e is None else 'failed: ' + e})" for t, e in report.vacuumed.items()
        )
        lines.append(f"VACUUM (ANALYZE): {done}")
    if report.wal_check_artifact:
        lines.append(f"WAL archiving: see the artifact `{report.wal_check_artifact}` (wal-archive-check).")
    lines += ["", "| check | status | figure |", "|---|---|---|"]
    lines += [f"| {_cell(c.name)} | {c.status} | {_cell(c.figure)} |" for c in report.checks]
    if report.largest_tables:
        lines += [
            "",
            "Largest tables: " + ", ".join(f"{n} {human(b)}" for n, b in report.largest_tables[:20]),
        ]
    if report.largest_indexes:
        lines += ["Largest indexes: " + ", ".join(f"{n} {human(b)}" for n, b in report.largest_indexes[:20])]
    skipped = [c for c in report.checks if c.status == "skipped" and c.action]
    if skipped:
        lines += ["", "Skipped, and what enables them:"]
        lines += [f"- {c.name}: {c.figure}; {c.action}" for c in skipped]
    return "\n".join(lines)
