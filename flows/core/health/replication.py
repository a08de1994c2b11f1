"""Replication and WAL: every replication slot and the WAL it keeps in pg_wal (an inactive slot keeps
WAL until the disk is full), and how far each standby's replay lags. Whether WAL reaches the archive is
the wal-archive-check flow's job: the report links its latest artifact instead of repeating it.
"""

from __future__ import annotations

from dataclasses import dataclass

from flows.core.health import Check, Status, judged
from flows.core.health.probe import Probe
from flows.core.health.size import human
from flows.core.health.thresholds import HealthThresholds

SLOTS = """
SELECT slot_name, slot_type, active, coalesce(wal_status, ''),
       CASE WHEN restart_lsn IS NULL THEN NULL
            WHEN pg_is_in_recovery() THEN pg_wal_lsn_diff(pg_last_wal_receive_lsn(), restart_lsn)
            ELSE pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn) END::bigint
FROM pg_replication_slots ORDER BY 5 DESC NULLS LAST, 1
"""
STANDBYS = """
SELECT coalesce(application_name, ''), coalesce(client_addr::text, 'local'), coalesce(state, ''),
       extract(epoch FROM replay_lag)::float8
FROM pg_stat_replication ORDER BY 4 DESC NULLS LAST
"""


@dataclass
class Slot:
    name: str
    kind: str
    active: bool
    wal_status: str
    retained: int | None


@dataclass
class Standby:
    name: str
    address: str
    state: str
    replay_lag: float | None


def read_slots(probe: Probe) -> list[Slot]:
    return [
        Slot(str(r[0]), str(r[1]), bool(r[2]), str(r[3]), None if r[4] is None else int(r[4]))
        for r in probe.rows(SLOTS)
    ]


def read_standbys(probe: Probe) -> list[Standby]:
    return [Standby(str(r[0]), str(r[1]), str(r[2]), r[3]) for r in probe.rows(STANDBYS)]


def check_slots(slots: list[Slot], t: HealthThresholds) -> Check:
    name = "replication slots"
    if not slots:
        return Check(name=name, status="ok", figure="no replication slot")
    figure = "; ".join(
        f"{s.name} ({s.kind}, {'active' if s.active else 'inactive'}) retains "
        f"{human(s.retained) if s.retained is not None else 'no WAL'}"
        + (f", {s.wal_status}" if s.wal_status else "")
        for s in slots[:5]
    )
    flagged = []
    for s in slots:
        kept = s.retained or 0
        if not s.active:
            flagged.append(
                ("critical" if kept >= t.critical_slot_bytes or s.wal_status == "lost" else "warning", s)
            )
        elif kept >= t.warn_slot_bytes:
            flagged.append(("warning", s))
    if not flagged:
        return Check(name=name, status="ok", figure=figure)
    flagged.sort(key=lambda p: (p[0] != "critical", -(p[1].retained or 0)))
    status, worst = flagged[0]
    state = "inactive" if not worst.active else "active but behind"
    return Check(
        name=name,
        status="critical" if status == "critical" else "warning",
        figure=figure,
        message=f"replication slot {worst.name} is {state} and keeps "
        f"{human(worst.retained or 0)} of WAL in pg_wal",
        action="start its consumer again, or if it is gone for good: SELECT "
        f"pg_drop_replication_slot('{worst.name}'); "
        "set max_slot_wal_keep_size so a lost consumer cannot fill the disk",
    )


def check_standbys(standbys: list[Standby], t: HealthThresholds) -> Check:
    name = "standby lag"
    if not standbys:
        return Check(name=name, status="ok", figure="no standby connected")
    figure = "; ".join(
        f"{s.name or s.address} {s.state}, replay lag "
        + (f"{s.replay_lag:.1f} s" if s.replay_lag is not None else "none")
        for s in standbys[:5]
    )
    worst = standbys[0]
    lag = worst.replay_lag or 0
    status: Status = (
        "critical"
        if lag >= t.critical_standby_lag_seconds
        else "warning"
        if lag >= t.warn_standby_lag_seconds
        else "ok"
    )
    return judged(
        name,
        status,
        figure,
        message=f"standby {worst.name or worst.address} replays {lag:.0f} s behind",
        action="check the standby's disk and CPU and the network; long queries on the standby can "
        "pause replay "
        "(max_standby_streaming_delay)",
    )


def replication_checks(probe: Probe) -> list[Check]:
    checks = [check_slots(read_slots(probe), probe.thresholds)]
    if probe.has_monitor:
        checks.append(check_standbys(read_standbys(probe), probe.thresholds))
    else:
        checks.append(
            Check(
                name="standby lag",
                status="skipped",
                figure=f"pg_stat_replication's lag columns are hidden from {probe.role}",
                action=probe.grant_monitor,
            )
        )
    return checks
