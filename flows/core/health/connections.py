"""Connections: in use against what ordinary roles may open (max_connections minus
superuser_reserved_connections), by state and application_name. The count is visible to every role;
other roles' states need pg_monitor, so without it the figure says so instead of guessing.
"""

from __future__ import annotations

from dataclasses import dataclass

from flows.core.health import Check, Status, judged
from flows.core.health.probe import Probe
from flows.core.health.thresholds import HealthThresholds

BY_STATE = """
SELECT coalesce(state, 'unknown'), coalesce(nullif(application_name, ''), '(none)'), count(*)
FROM pg_stat_activity WHERE backend_type = 'client backend' GROUP BY 1, 2 ORDER BY 3 DESC, 1, 2
"""


@dataclass
class ConnectionFigures:
    max_connections: int
    reserved: int
    groups: list[tuple[str, str, int]]  # state, application_name, count

    @property
    def usable(self) -> int:
        return max(self.max_connections - self.reserved, 1)

    @property
    def in_use(self) -> int:
        return sum(n for _, _, n in self.groups)


def read_connections(probe: Probe) -> ConnectionFigures:
    row = probe.rows(
        "SELECT current_setting('max_connections')::int, "
        "current_setting('superuser_reserved_connections')::int"
    )[0]
    groups = [(str(s), str(a), int(n)) for s, a, n in probe.rows(BY_STATE)]
    return ConnectionFigures(int(row[0]), int(row[1]), groups)


def check_connections(f: ConnectionFigures, t: HealthThresholds, states_visible: bool = True) -> Check:
    name = "connections"
    ratio = f.in_use / f.usable
    states: dict[str, int] = {}
    apps: dict[str, int] = {}
    for state, app, n in f.groups:
        states[state] = states.get(state, 0) + n
        apps[app] = apps.get(app, 0) + n
    by_state = ", ".join(f"{s} {n}" for s, n in sorted(states.items(), key=lambda kv: -kv[1]))
    by_app = ", ".join(f"{a} {n}" for a, n in sorted(apps.items(), key=lambda kv: -kv[1])[:5])
    figure = (
        f"{f.in_use} of {f.usable} in use ({ratio:.0%}; max_connections {f.max_connections} - "
        f"{f.reserved} reserved); by state: {by_state}; by application: {by_app}"
    )
    if not states_visible:
        figure += " (other roles' states need pg_monitor)"
    status: Status = (
        "critical" if ratio >= t.critical_connections else "warning" if ratio >= t.warn_connections else "ok"
    )
    return judged(
        name,
        status,
        figure,
        message=f"{f.in_use} of {f.usable} connections are in use ({ratio:.0%}); new ones will soon "
        "be refused",
        action="put PgBouncer in front of the application or lower its pool size; end idle sessions that "
        "leak; raise max_connections only with memory to spare",
    )


def connection_checks(probe: Probe) -> list[Check]:
    return [check_connections(read_connections(probe), probe.thresholds, probe.has_monitor)]
