"""The alerts `dbops setup --notify BLOCK` creates: Prefect automations that reach a person.

Three kinds, all sent through one notification block (Slack, e-mail, PagerDuty, a webhook: any of
Prefect's notification blocks):

- **failed**: any dbops run (tag `dbops`) ends Failed or Crashed. One automation for all deployments.
- **nothing ran**: a *proactive* trigger per deployment ("after a Completed run, expect the next one
  within T"): no Completed `nightly-dump` for 26 h, `wal-archive-check` for 1 h, `base-backup` for its
  schedule's interval plus a margin. It catches what no failure alert can: a stopped worker, a paused
  schedule, a server the worker cannot reach. It fires T after the last Completed run and names that run
  (or, when none completed since setup armed it, the time it was armed), once per silence.
- **resolved**: per deployment, one message when a deployment that failed or went quiet completes again,
  and not on every later success.

How "resolved" is done (Prefect 3.8, open-source server): automations have `actions_on_resolve`, but
the open-source trigger service never sets the Resolved state, so those actions never run. A
`SequenceTrigger` does work there: its children's latest firings are kept per child and it fires when they
happened in order, then forgets them. So "resolved" is Sequence[ Compound(any)[failed, nothing ran],
completed ]: a failure (or a quiet window) followed by a Completed run fires once; the next success finds
no failure before it and stays silent; a success followed by a failure waits for the next success.

Why `after` and an arming event: a proactive trigger without `after` counts Completed runs in fixed
back-to-back windows that start whenever the server first evaluated it, so a run that completed at the
start of one window is followed by an alert up to two windows later (52 h for a 26 h window), and the
alert cannot say when the last run was. With `after = Completed`, each Completed run starts the window.
Setup sends one `dbops.alert.armed` event when it creates or changes the automation, so a deployment
that never completes is caught too.

Every automation has a fixed name per deployment, so a second `dbops setup` compares what it would create
with what the server holds and reports `exists`, or updates it in place (`updated`).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal
from uuid import UUID

from pydantic import BaseModel, Field

from flows.core.errors import ConfigurationError

NIGHTLY_DUMP = "nightly-dump"
WAL_ARCHIVE_CHECK = "wal-archive-check"
BASE_BACKUP = "base-backup"
#: "nothing ran" windows by flow name; base-backup's comes from its schedule (see `base_backup_window`)
DEFAULT_WINDOWS: dict[str, str] = {NIGHTLY_DUMP: "26h", WAL_ARCHIVE_CHECK: "1h"}
DEFAULT_BASE_BACKUP_MARGIN = "2h"
#: Prefect's documented minimum for a proactive trigger's window
MIN_WINDOW = timedelta(seconds=10)

FAILED_AUTOMATION = "dbops: notify on failed or crashed runs"
#: what `dbops setup` sends to start the window of a new "nothing ran" alert (see `arm`)
ARMED_EVENT = "dbops.alert.armed"
ARMED_RESOURCE = "dbops.alert"
MISSING_PREFIX = "dbops: nothing ran: "
RESOLVED_PREFIX = "dbops: resolved: "

_DURATION = re.compile(r"(\d+)\s*([dhms])")
_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}


class AlertConfig(BaseModel):
    """`[alerts]` in the setup config."""

    windows: dict[str, str] = Field(
        default_factory=dict,
        description="'Nothing ran' windows, e.g. nightly-dump = \"26h\": a key is a flow name (every "
        "deployment of it) or a deployment name (that one only, e.g. one database's); 1d2h30m10s form.",
    )
    base_backup_margin: str = Field(
        default=DEFAULT_BASE_BACKUP_MARGIN,
        description="Added to the base-backup schedule's interval to give its 'nothing ran' window.",
    )


def parse_duration(text: str, what: str) -> timedelta:
    """`26h`, `90m`, `1h30m`, `15s`, `2d`: what a person writes in a config file."""
    compact = text.replace(" ", "").lower()
    parts = _DURATION.findall(compact)
    if not parts or "".join(n + u for n, u in parts) != compact:
        raise ConfigurationError(f"{what}: {text!r} is not a duration; write it like 26h, 90m, 1h30m or 45s")
    return timedelta(seconds=sum(int(n) * _UNITS[u] for n, u in parts))


def _human(window: timedelta) -> str:
    seconds = int(window.total_seconds())
    out = ""
    for unit, size in _UNITS.items():
        if seconds >= size:
            out += f"{seconds // size}{unit}"
            seconds %= size
    return out or "0s"


@dataclass(frozen=True)
class Watched:
    """One deployment as the alerts see it."""

    flow: str
    deployment: str
    id: UUID
    database: str
    ui_url: str
    window: timedelta | None  # None: no "nothing ran" alert (not a periodic job, or no schedule to read)

    @property
    def full_name(self) -> str:
        return f"{self.flow}/{self.deployment}"


def base_backup_window(schedules: Iterable[Any], margin: timedelta) -> timedelta | None:
    """The longest gap between two runs of the deployment's active schedules, plus the margin."""
    from datetime import UTC, datetime

    from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule

    gaps: list[timedelta] = []
    for item in schedules:
        if not getattr(item, "active", True):
            continue
        schedule = item.schedule
        if isinstance(schedule, IntervalSchedule):
            gaps.append(schedule.interval)
        elif isinstance(schedule, CronSchedule):
            # the server's own cron arithmetic, so the window follows what the scheduler will do
            from prefect.server.schemas.schedules import CronSchedule as ServerCron
            from prefect.utilities.asyncutils import run_coro_as_sync

            cron = ServerCron(cron=schedule.cron, timezone=schedule.timezone or "UTC", day_or=schedule.day_or)
            times: list[datetime] = list(run_coro_as_sync(cron.get_dates(n=8, start=datetime.now(UTC))) or [])
            gaps.extend(b - a for a, b in itertools.pairwise(times))
    return max(gaps) + margin if gaps else None


def watched_deployments(config: AlertConfig) -> list[Watched]:
    """Every dbops deployment on the server (tag `dbops`), with its database (the `db:` tag) and window."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterTags
    from prefect.settings import get_current_settings

    margin = parse_duration(config.base_backup_margin, "[alerts] base_backup_margin")
    windows = {name: parse_duration(text, f"[alerts] window {name}") for name, text in config.windows.items()}
    for name, configured in windows.items():
        if configured < MIN_WINDOW:
            raise ConfigurationError(
                f"[alerts] window {name}: {_human(configured)} is shorter than Prefect's minimum of "
                f"{_human(MIN_WINDOW)}; make it longer"
            )
    watched: list[Watched] = []
    with get_client(sync_client=True) as client:
        deployments = client.read_deployments(
            deployment_filter=DeploymentFilter(tags=DeploymentFilterTags(all_=["dbops"]))
        )
        flows = {f.id: f.name for f in client.read_flows()}
        # the UI the person opens: PREFECT_UI_URL, else the API's address without /api (a local server)
        api = str(client.api_url).rstrip("/").removesuffix("/api")
        settings = get_current_settings()
        ui_base = (
            settings.ui_url if "ui_url" in settings.model_fields_set and settings.ui_url else api
        ).rstrip("/")
        for d in sorted(deployments, key=lambda d: (flows.get(d.flow_id, ""), d.name)):
            flow = flows.get(d.flow_id, "?")
            window: timedelta | None = windows.get(d.name) or windows.get(flow)
            if window is None and flow in DEFAULT_WINDOWS:
                window = parse_duration(DEFAULT_WINDOWS[flow], flow)
            if window is None and BASE_BACKUP in (flow, d.name):
                window = base_backup_window(d.schedules, margin)
            database = next((t[3:] for t in d.tags if t.startswith("db:")), None)
            database = database or str(d.parameters.get("database") or "not named in the deployment")
            ui = f"{ui_base}/deployments/deployment/{d.id}"
            watched.append(Watched(flow, d.name, d.id, database, ui, window))
    return watched


# -- the automations -----------------------------------------------------------------------------------

# The database of a run: its `db:` tag (deployments carry one), else its `database` parameter.
_RUN_DATABASE = (
    "{% for t in flow_run.tags if t.startswith('db:') %}{{ t[3:] }}{% else %}"
    "{{ flow_run.parameters.get('database', 'not named') }}{% endfor %}"
)
_RUN_DEPLOYMENT = "{{ flow.name }}/{{ deployment.name if deployment else '(no deployment)' }}"


def failed_automation(block_id: UUID) -> Any:
    from prefect.automations import AutomationCore, EventTrigger, Posture, SendNotification

    return AutomationCore(
        name=FAILED_AUTOMATION,
        description="Created by dbops setup: a dbops run ended Failed or Crashed; its message says why.",
        trigger=EventTrigger(
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={"prefect.resource.role": "tag", "prefect.resource.id": "prefect.tag.dbops"},
            expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
            posture=Posture.Reactive,
            threshold=1,
        ),
        actions=[
            SendNotification(
                block_document_id=block_id,
                subject=f"dbops: {_RUN_DEPLOYMENT} {{{{ flow_run.state.name }}}} ({_RUN_DATABASE})",
                body=(
                    f"{_RUN_DEPLOYMENT} ended {{{{ flow_run.state.name }}}}\n"
                    f"database: {_RUN_DATABASE}\n"
                    "reason: {{ flow_run.state.message }}\n"
                    "run: {{ flow_run|ui_url }}"
                ),
            )
        ],
    )


def _deployment_related(w: Watched) -> dict[str, str]:
    return {"prefect.resource.role": "deployment", "prefect.resource.id": f"prefect.deployment.{w.id}"}


def _missing_trigger(w: Watched) -> Any:
    """Each Completed run (or the arming event setup sends) starts a window; the next Completed run must
    come before it ends. So the alert comes `window` after the last Completed run, and it knows which
    run that was; once sent, it stays quiet until a run completes again (the "resolved" alert follows)."""
    from prefect.automations import EventTrigger, Posture

    assert w.window is not None
    return EventTrigger(
        match={"prefect.resource.id": ["prefect.flow-run.*", f"{ARMED_RESOURCE}.*"]},
        match_related=_deployment_related(w),
        after={"prefect.flow-run.Completed", ARMED_EVENT},
        expect={"prefect.flow-run.Completed"},
        posture=Posture.Proactive,
        threshold=1,
        within=w.window,
    )


def arm(w: Watched) -> None:
    """Start the window of a new (or changed) "nothing ran" alert now: without it, a deployment that has
    never completed (a worker down since the first day) would never start one. Sent only when setup
    created or updated the automation: it would otherwise replace the last Completed run as the event
    the alert reports."""
    from datetime import UTC, datetime
    from uuid import uuid4

    from prefect.client.orchestration import get_client
    from prefect.events import Event

    event = Event(
        occurred=datetime.now(UTC),
        event=ARMED_EVENT,
        resource={"prefect.resource.id": f"{ARMED_RESOURCE}.{w.id}", "prefect.resource.name": w.full_name},
        related=[{**_deployment_related(w), "prefect.resource.name": w.deployment}],
        id=uuid4(),
    )
    with get_client(sync_client=True) as client:
        client.request("POST", "/events", json=[event.model_dump(mode="json")]).raise_for_status()


def missing_automation(w: Watched, block_id: UUID) -> Any:
    from prefect.automations import AutomationCore, SendNotification

    window = _human(w.window) if w.window else ""
    return AutomationCore(
        name=MISSING_PREFIX + w.full_name,
        description=f"Created by dbops setup: no Completed run of {w.full_name} within {window}.",
        trigger=_missing_trigger(w),
        actions=[
            SendNotification(
                block_document_id=block_id,
                subject=f"dbops: nothing ran: {w.full_name} ({w.database})",
                body=(
                    f"no Completed run of {w.full_name} for {window}: "
                    "{% if event.event == 'prefect.flow-run.Completed' %}the last one ended "
                    "{{ event.occurred.strftime('%Y-%m-%d %H:%M:%S UTC') }} ({{ flow_run|ui_url }})"
                    "{% else %}none since this alert was set up at "
                    "{{ event.occurred.strftime('%Y-%m-%d %H:%M:%S UTC') }}{% endif %}\n"
                    f"database: {w.database}\n"
                    "what to check: is the worker running and polling its pool, is the schedule paused, "
                    "are runs failing (see the failure alerts), can the worker reach the server\n"
                    f"deployment: {w.ui_url}"
                ),
            )
        ],
    )


def resolved_automation(w: Watched, block_id: UUID) -> Any:
    from prefect.automations import (
        AutomationCore,
        CompoundTrigger,
        EventTrigger,
        Posture,
        SendNotification,
        SequenceTrigger,
    )

    def reactive(*events: str) -> EventTrigger:
        return EventTrigger(
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related=_deployment_related(w),
            expect=set(events),
            posture=Posture.Reactive,
            threshold=1,
        )

    went_wrong: list[Any] = [reactive("prefect.flow-run.Failed", "prefect.flow-run.Crashed")]
    if w.window is not None:
        went_wrong.append(_missing_trigger(w))
    return AutomationCore(
        name=RESOLVED_PREFIX + w.full_name,
        description=f"Created by dbops setup: {w.full_name} completed again after a failure or quiet window.",
        trigger=SequenceTrigger(
            triggers=[
                CompoundTrigger(require="any", triggers=went_wrong),
                reactive("prefect.flow-run.Completed"),
            ]
        ),
        actions=[
            SendNotification(
                block_document_id=block_id,
                subject=f"dbops: resolved: {w.full_name} ({w.database})",
                body=(
                    f"{w.full_name} completed again after a failure or a missed run; nothing to do\n"
                    f"database: {w.database}\n"
                    "completed: {{ flow_run.end_time.strftime('%Y-%m-%d %H:%M:%S UTC') "
                    "if flow_run.end_time else 'now' }}\n"
                    "run: {{ flow_run|ui_url }}"
                ),
            )
        ],
    )


def _comparable(automation: Any) -> Any:
    """What an automation does, without the ids the client or server gave it."""

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k != "id"}
        if isinstance(value, list):
            items = [strip(v) for v in value]
            # sets (expect, for_each) come back from JSON as lists in any order
            return sorted(items) if all(isinstance(v, str) for v in items) else items
        return value

    fields = {
        "name",
        "description",
        "enabled",
        "trigger",
        "actions",
        "actions_on_trigger",
        "actions_on_resolve",
    }
    return strip(automation.model_dump(mode="json", include=fields))


def ensure_automation(desired: Any) -> Literal["created", "updated", "exists"]:
    """Create it, update it in place when it differs, or leave it: `created`, `updated` or `exists`."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        existing = client.read_automations_by_name(desired.name)
        if not existing:
            client.create_automation(desired)
            return "created"
        first, *duplicates = existing
        for extra in duplicates:  # two setups racing: one automation per name is the contract
            client.delete_automation(extra.id)
        if _comparable(first) == _comparable(desired) and not duplicates:
            return "exists"
        # Not client.update_automation: it sends only the fields set explicitly, and the server then
        # refuses composite triggers for their missing `within`.
        # The update schema has no owner_resource (set at creation only): sending it is a 422.
        body = desired.model_dump(mode="json", exclude={"owner_resource"})
        client.request("PUT", "/automations/{id}", path_params={"id": first.id}, json=body).raise_for_status()
        return "updated"


def deployment_alerts(block_id: UUID, watched: Iterable[Watched]) -> list[Any]:
    out: list[Any] = []
    for w in watched:
        if w.window is not None:
            out.append(missing_automation(w, block_id))
        out.append(resolved_automation(w, block_id))
    return out


def remove_stale_alerts(kept: Iterable[str]) -> list[str]:
    """Delete the per-deployment automations setup made for deployments that are gone (or no longer get
    that kind of alert); returns their names. Only names with our prefixes are touched."""
    from prefect.client.orchestration import get_client

    keep = set(kept)
    removed: list[str] = []
    with get_client(sync_client=True) as client:
        for automation in client.read_automations():
            name = automation.name
            if name.startswith((MISSING_PREFIX, RESOLVED_PREFIX)) and name not in keep:
                client.delete_automation(automation.id)
                removed.append(name)
    return sorted(removed)
