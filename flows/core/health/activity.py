"""Slow and stuck work (the seed's "slow queries"): long active queries, sessions idle in transaction
(they hold locks and keep vacuum from removing dead rows), the oldest open transaction, and who blocks
whom (pg_blocking_pids). Only this database's client sessions; other roles' sessions are visible with
pg_monitor (pg_read_all_stats) only, so without it the group is skipped with the GRANT.
"""

from __future__ import annotations

from dataclasses import dataclass

from flows.core.health import Check, Status, judged
from flows.core.health.probe import Probe, count
from flows.core.health.thresholds import HealthThresholds

SESSIONS = """
SELECT pid, coalesce(usename, ''), coalesce(application_name, ''), coalesce(state, ''),
       extract(epoch FROM now() - query_start)::float8, extract(epoch FROM now() - state_change)::float8,
       extract(epoch FROM now() - xact_start)::float8, coalesce(wait_event_type, ''),
       pg_blocking_pids(pid), left(regexp_replace(coalesce(query, ''), '\\s+', ' ', 'g'), 120)
FROM pg_stat_activity
WHERE datname = current_database() AND backend_type = 'client backend' AND pid <> pg_backend_pid()
"""


@dataclass
class Session:
    pid: int
    user: str
    application: str
    state: str
    query_seconds: float | None
    state_seconds: float | None
    xact_seconds: float | None
    wait_event_type: str
    blocked_by: list[int]
    query: str

    def describe(self) -> str:
        app = f" ({self.application})" if self.application else ""
        return f"pid {self.pid} {self.user}{app}"


def read_sessions(probe: Probe) -> list[Session]:
    return [
        Session(int(r[0]), r[1], r[2], r[3], r[4], r[5], r[6], r[7], [int(p) for p in r[8] or []], r[9])
        for r in probe.rows(SESSIONS)
    ]


def _status(value: float, warn: float, critical: float) -> Status:
    return "critical" if value >= critical else "warning" if value >= warn else "ok"


def check_long_queries(sessions: list[Session], t: HealthThresholds) -> Check:
    name = "long-running queries"
    active = sorted(
        (s for s in sessions if s.state == "active" and s.query_seconds is not None),
        key=lambda s: -(s.query_seconds or 0),
    )
    over = [s for s in active if (s.query_seconds or 0) >= t.warn_active_seconds]
    figure = f"{len(active)} active; longest {active[0].query_seconds:.0f} s" if active else "no active query"
    if not over:
        return Check(name=name, status="ok", figure=figure)
    worst = over[0]
    return Check(
        name=name,
        status=_status(worst.query_seconds or 0, t.warn_active_seconds, t.critical_active_seconds),
        figure=figure
        + "; "
        + "; ".join(f"{s.describe()} {s.query_seconds:.0f} s: {s.query}" for s in over[:3]),
        message=f"{count(len(over), 'query', 'queries')} running longer than {t.warn_active_seconds:g} s, "
        f"the longest {worst.query_seconds:.0f} s ({worst.describe()})",
        action=f"look at the query (EXPLAIN); if it must stop: SELECT pg_cancel_backend({worst.pid})",
    )


def check_idle_in_transaction(sessions: list[Session], t: HealthThresholds) -> Check:
    name = "idle in transaction"
    idle = sorted(
        (s for s in sessions if s.state.startswith("idle in transaction") and s.state_seconds is not None),
        key=lambda s: -(s.state_seconds or 0),
    )
    over = [s for s in idle if (s.state_seconds or 0) >= t.warn_idle_in_transaction_seconds]
    figure = f"{len(idle)} sessions idle in transaction" + (
        f"; longest {idle[0].state_seconds:.0f} s ({idle[0].describe()})" if idle else ""
    )
    if not over:
        return Check(name=name, status="ok", figure=figure)
    worst = over[0]
    return Check(
        name=name,
        status=_status(
            worst.state_seconds or 0,
            t.warn_idle_in_transaction_seconds,
            t.critical_idle_in_transaction_seconds,
        ),
        figure=figure,
        message=f"{count(len(over), 'session')} idle in transaction for over "
        f"{t.warn_idle_in_transaction_seconds:g} s, the longest {worst.state_seconds:.0f} s "
        f"({worst.describe()}); such sessions hold locks and hold back vacuum",
        action="fix the application to commit or roll back; end it now with SELECT "
        f"pg_terminate_backend({worst.pid}), "
        "and set idle_in_transaction_session_timeout",
    )


def check_oldest_transaction(sessions: list[Session], t: HealthThresholds) -> Check:
    name = "oldest transaction"
    open_ = sorted((s for s in sessions if s.xact_seconds is not None), key=lambda s: -(s.xact_seconds or 0))
    if not open_:
        return Check(name=name, status="ok", figure="no open transaction")
    oldest = open_[0]
    age = oldest.xact_seconds or 0
    figure = f"{age:.0f} s ({oldest.describe()}, {oldest.state or 'unknown state'})"
    status = _status(age, t.warn_transaction_seconds, t.critical_transaction_seconds)
    return judged(
        name,
        status,
        figure,
        message=f"a transaction has been open for {age:.0f} s ({oldest.describe()}); dead rows since it "
        "began cannot be vacuumed",
        action=f"find out what it does; if it is stuck: SELECT pg_terminate_backend({oldest.pid})",
    )


def check_blocked(sessions: list[Session], t: HealthThresholds) -> Check:
    name = "blocked sessions"
    by_pid = {s.pid: s for s in sessions}
    blocked = sorted((s for s in sessions if s.blocked_by), key=lambda s: -(s.state_seconds or 0))
    if not blocked:
        return Check(name=name, status="ok", figure="no session waits for another's lock")
    waits = [(s, s.state_seconds or 0) for s in blocked]
    over = [(s, w) for s, w in waits if w >= t.warn_blocked_seconds]
    pairs = "; ".join(
        f"{s.describe()} waits {w:.0f} s for pid {', '.join(str(p) for p in s.blocked_by)}"
        for s, w in waits[:5]
    )
    figure = f"{len(blocked)} sessions blocked: {pairs}"
    if not over:
        return Check(name=name, status="ok", figure=figure)
    worst, wait = over[0]
    roots = sorted({p for s, _ in over for p in s.blocked_by if not (by_pid.get(p) and by_pid[p].blocked_by)})
    root_text = ", ".join(
        f"pid {p} ({by_pid[p].state or '?'}, {by_pid[p].describe()})" if p in by_pid else f"pid {p}"
        for p in roots
    )
    return Check(
        name=name,
        status=_status(wait, t.warn_blocked_seconds, t.critical_blocked_seconds),
        figure=figure,
        message=f"{count(len(over), 'session')} waiting for a lock, the longest {wait:.0f} s "
        f"({worst.describe()}), blocked by "
        f"{root_text or 'pid ' + ', '.join(map(str, worst.blocked_by))}",
        action="see what the blocking session does; if it is stuck: SELECT pg_terminate_backend("
        f"{roots[0] if roots else worst.blocked_by[0]})",
    )


def activity_checks(probe: Probe) -> list[Check]:
    if not probe.has_monitor:
        return [
            Check(
                name=n,
                status="skipped",
                figure=f"other roles' sessions are hidden from {probe.role}",
                action=probe.grant_monitor,
            )
            for n in ("long-running queries", "idle in transaction", "oldest transaction", "blocked sessions")
        ]
    sessions = read_sessions(probe)
    t = probe.thresholds
    return [
        check_long_queries(sessions, t),
        check_idle_in_transaction(sessions, t),
        check_oldest_transaction(sessions, t),
        check_blocked(sessions, t),
    ]
