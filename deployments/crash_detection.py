"""A flow run whose worker (or host) died is marked Crashed by the server.

Nobody is left to report the end of a run whose worker and flow-run process were killed together
(SIGKILL, the OOM killer, a lost VM): without help it stays Running forever, and the "failed" alert never
fires. Every flow run sends a `prefect.flow-run.heartbeat` event every PREFECT_FLOWS_HEARTBEAT_FREQUENCY
seconds (30 at least, 180 by default); this automation, the one Prefect documents for "zombie" runs,
marks a run Crashed when `within` passes after a heartbeat with neither another heartbeat nor a final
state. Its `db:` slot is freed separately, when its lease runs out (flows.tasks.common.database_lock).

`within` must exceed the heartbeat period with a margin for a busy machine, or a live run is marked
Crashed: the stack uses three heartbeat periods unless DBOPS_CRASH_DETECTION_SECONDS says otherwise.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Literal

CRASH_AUTOMATION = "dbops: crashed runs (no heartbeat)"
DEFAULT_HEARTBEAT_SECONDS = 30  # what the stack's workers send (Prefect's own default is 180)
FINAL_EVENTS = (
    "prefect.flow-run.Completed",
    "prefect.flow-run.Failed",
    "prefect.flow-run.Cancelled",
    "prefect.flow-run.Crashed",
)


def heartbeat_seconds(environ: dict[str, str] | os._Environ[str] = os.environ) -> int:
    raw = environ.get("PREFECT_FLOWS_HEARTBEAT_FREQUENCY") or environ.get(
        "PREFECT_RUNNER_HEARTBEAT_FREQUENCY"
    )
    return int(raw) if raw else DEFAULT_HEARTBEAT_SECONDS


def detection_seconds(environ: dict[str, str] | os._Environ[str] = os.environ) -> int:
    """How long after its last heartbeat a run is declared Crashed."""
    raw = environ.get("DBOPS_CRASH_DETECTION_SECONDS")
    beat = heartbeat_seconds(environ)
    within = int(raw) if raw else 3 * beat
    if within <= beat:
        raise ValueError(
            f"DBOPS_CRASH_DETECTION_SECONDS={within} must be longer than the heartbeat period ({beat} s), "
            "or every live run would be marked Crashed"
        )
    return within


def crash_automation(within_seconds: int) -> Any:
    from prefect.automations import AutomationCore, ChangeFlowRunState, EventTrigger, Posture
    from prefect.client.schemas.objects import StateType

    return AutomationCore(
        name=CRASH_AUTOMATION,
        description=(
            "Created by dbops: a flow run that sent no heartbeat (and did not end) for "
            f"{within_seconds} s lost its worker or host; it is marked Crashed so alerts fire and "
            "nobody waits"
        ),
        trigger=EventTrigger(
            match={"prefect.resource.id": "prefect.flow-run.*"},
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *FINAL_EVENTS},
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=within_seconds),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=(
                    f"no heartbeat for {within_seconds} s: its worker or host was lost; the db: slot frees "
                    "itself when its lease runs out, then run the job again"
                ),
            )
        ],
    )


def ensure_crash_detection(within_seconds: int) -> Literal["created", "updated", "exists"]:
    from deployments.alerts import ensure_automation

    return ensure_automation(crash_automation(within_seconds))
