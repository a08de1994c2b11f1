"""Alerts reach a person: a real Prefect server with its automation services on, a process worker, the
automations `dbops setup --notify` creates, Prefect's own webhook notification block, and an HTTP
receiver on 127.0.0.1 (deployments/alert_receiver.py). Nothing in the delivery path is faked: a nightly
dump with a wrong password is triggered through its deployment, fails, and the message that arrives over
HTTP is checked for what a person needs.

The session's Prefect API (prefect_test_harness) runs with the automation triggers off for speed, so
this module starts its own server once (`prefect server start`, as `make run` does, with proactive
automations evaluated every second) and shares it between its tests. The "nothing ran" alerts use a
12 s window (Prefect's minimum is 10 s) on a deployment that never runs.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from deployments.alert_receiver import AlertReceiver, format_alert, webhook_block
from deployments.alerts import AlertConfig
from deployments.deploy import prefect_bin
from deployments.sandbox import free_port
from deployments.setup import SetupConfig, SetupReport, ensure_work_pool, run_setup
from deployments.stack import prefect_server_argv, prefect_server_env, wait_http
from deployments.stackstate import stop_child
from tests.conftest import make_local_block
from tests.harness.pg import PgCluster
from tests.harness.stack import drain_prefect_clients, spawn_logged

ROOT = Path(__file__).resolve().parent.parent
QUIET_WINDOW = "12s"
WRONG_PASSWORD = "not-the-password"


@dataclass
class AlertStack:
    api_url: str
    ui_url: str
    receiver: AlertReceiver
    pool: str
    database: str  # the PostgreSQL database the dump deployment backs up
    block: str  # its PostgresDatabase block (created with a wrong password)
    pg: PgCluster
    first: SetupReport
    second: SetupReport
    setup_config: SetupConfig
    setup_started: float  # time.time() before the first setup: the "nothing ran" alerts are armed after it


def _create_deployment(
    client: Any,
    flow: str,
    name: str,
    pool: str,
    parameters: dict[str, Any],
    tags: list[str],
    entrypoint: str,
    cron: str | None = None,
) -> None:
    from prefect.client.schemas.actions import DeploymentScheduleCreate
    from prefect.client.schemas.schedules import CronSchedule

    client.create_deployment(
        flow_id=client.create_flow_from_name(flow),
        name=name,
        entrypoint=entrypoint,
        path=str(ROOT),
        pull_steps=[{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}],
        work_pool_name=pool,
        parameters=parameters,
        tags=tags,
        schedules=[DeploymentScheduleCreate(schedule=CronSchedule(cron=cron))] if cron else None,
    )


@pytest.fixture(scope="module")
def alerts(pg: PgCluster) -> Iterator[AlertStack]:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    unique = secrets.token_hex(4)
    home = Path(tempfile.mkdtemp(prefix="dbops-alerts-"))
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    # Not the session's settings (they switch the trigger service off): a server as `make run` starts it.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home / "server"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="false",
        PREFECT_SERVER_EVENTS_PROACTIVE_GRANULARITY="PT1S",
        # what no test here waits for; the scheduler would only queue runs of the scheduled deployments
        PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false",
        PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED="false",
        PREFECT_SERVER_SERVICES_FOREMAN_ENABLED="false",
        **prefect_server_env(port),
    )
    procs: list[subprocess.Popen[bytes]] = []
    receiver = AlertReceiver().start()
    try:
        server = spawn_logged([prefect_bin(), *prefect_server_argv(port)[1:]], env, home / "server.log")
        procs.append(server)
        wait_http(
            f"{api_url}/health", timeout=180, what="the Prefect server", procs=[("prefect server", server)]
        )
        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            from prefect.client.orchestration import get_client

            pool = f"alerts-{unique}"
            database = f"alerts_{unique}"
            pg.create_database(database)
            pg.sql("CREATE TABLE t AS SELECT g AS id FROM generate_series(1, 100) g", dbname=database)
            block = f"alerts-db-{unique}"
            save_database_block(pg, block, database, WRONG_PASSWORD)
            storage = make_local_block(f"alerts-store-{unique}", home / "backups")
            webhook_block(receiver.url).save(f"alerts-{unique}")
            ensure_work_pool(pool, SetupReport())
            tags = ["dbops", f"db:{database}"]
            dump = "flows/nightly_dump.py:nightly_dump"
            params = {"database": block, "storage": storage, "prefix": "alerts", "verify": "list"}
            with get_client(sync_client=True) as client:
                _create_deployment(client, "nightly-dump", "nightly-dump", pool, params, tags, dump)
                _create_deployment(client, "nightly-dump", "quiet-dump", pool, params, tags, dump)
                # what another branch adds: a scheduled base-backup deployment (a flow that never runs here)
                _create_deployment(
                    client,
                    "base-backup",
                    "base-backup",
                    pool,
                    {},
                    tags,
                    "flows/base_backup.py:base_backup",
                    cron="0 1 * * *",
                )
            config = SetupConfig(
                work_pool=pool,
                notify=f"custom-webhook/alerts-{unique}",
                alerts=AlertConfig(windows={"quiet-dump": QUIET_WINDOW}),
            )
            setup_started = time.time()
            first = run_setup(config, environ={})
            second = run_setup(config, environ={})
            worker_env = {
                **env,
                "PREFECT_HOME": str(home / "worker"),
                "PREFECT_API_URL": api_url,
                "PREFECT_WORKER_QUERY_SECONDS": "1",
            }
            procs.append(
                spawn_logged(
                    [prefect_bin(), "worker", "start", "--pool", pool, "--type", "process"],
                    worker_env,
                    home / "worker.log",
                )
            )
            yield AlertStack(
                api_url,
                api_url.removesuffix("/api"),
                receiver,
                pool,
                database,
                block,
                pg,
                first,
                second,
                config,
                setup_started,
            )
    finally:
        drain_prefect_clients()  # while the server still answers
        for proc in reversed(procs):
            stop_child(proc)
        receiver.stop()
        # what arrived, for a failing test's report (and `pytest -s`: the README's examples come from here)
        print("\n".join(format_alert(alert) for alert in receiver.alerts))
        shutil.rmtree(home, ignore_errors=True)


def run(name: str) -> Any:
    """Trigger the deployment through the API and wait for its final state."""
    from prefect.deployments import run_deployment

    flow_run: Any = run_deployment(name, timeout=240, poll_interval=1)
    assert flow_run.state is not None, flow_run.state
    assert flow_run.state.is_final(), flow_run.state
    return flow_run


def save_database_block(pg: PgCluster, name: str, dbname: str, password: str) -> None:
    from blocks import PostgresDatabase

    PostgresDatabase(host=pg.host, port=pg.port, database=dbname, user=pg.superuser, password=password).save(
        name, overwrite=True
    )


def set_password(stack: AlertStack, password: str) -> None:
    save_database_block(stack.pg, stack.block, stack.database, password)


def _within(trigger: Any) -> Any:
    return trigger.within


def test_setup_lists_every_alert_and_a_second_setup_changes_nothing(alerts: AlertStack) -> None:
    automations = {name: status for kind, name, status in alerts.first.items if kind == "automation"}
    assert automations == {
        "dbops: crashed runs (no heartbeat)": "created",
        "dbops: notify on failed or crashed runs": "created",
        "dbops: nothing ran: base-backup/base-backup": "created",
        "dbops: resolved: base-backup/base-backup": "created",
        "dbops: nothing ran: nightly-dump/nightly-dump": "created",
        "dbops: resolved: nightly-dump/nightly-dump": "created",
        "dbops: nothing ran: nightly-dump/quiet-dump": "created",
        "dbops: resolved: nightly-dump/quiet-dump": "created",
    }, alerts.first.render()
    assert not alerts.second.changed, alerts.second.render()
    assert "dbops: nothing ran: nightly-dump/quiet-dump" in alerts.first.render()
    from datetime import timedelta

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with (
        temporary_settings(updates={PREFECT_API_URL: alerts.api_url}),
        get_client(sync_client=True) as client,
    ):
        windows = {
            name: _within(client.read_automations_by_name(f"dbops: nothing ran: {name}")[0].trigger)
            for name in ("nightly-dump/nightly-dump", "nightly-dump/quiet-dump", "base-backup/base-backup")
        }
    # 26 h by default; the deployment-named override; base-backup: its daily schedule plus the 2 h margin
    assert windows == {
        "nightly-dump/nightly-dump": timedelta(hours=26),
        "nightly-dump/quiet-dump": timedelta(seconds=12),
        "base-backup/base-backup": timedelta(hours=26),
    }
    # a deployment that is gone takes its alerts with it; nothing else changes
    with (
        temporary_settings(updates={PREFECT_API_URL: alerts.api_url}),
        get_client(sync_client=True) as client,
    ):
        client.delete_deployment(client.read_deployment_by_name("base-backup/base-backup").id)
        third = run_setup(alerts.setup_config, environ={})
        assert not client.read_automations_by_name("dbops: nothing ran: base-backup/base-backup")
    changed = sorted((n, st) for kind, n, st in third.items if kind == "automation" and st != "exists")
    assert changed == [
        ("dbops: nothing ran: base-backup/base-backup", "removed"),
        ("dbops: resolved: base-backup/base-backup", "removed"),
    ], third.render()


def test_a_failed_dump_alerts_once_then_two_successes_resolve_it_once(alerts: AlertStack) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    receiver = alerts.receiver
    failed_subject = "dbops: nightly-dump/nightly-dump Failed"
    resolved_subject = "dbops: resolved: nightly-dump/nightly-dump"
    with temporary_settings(updates={PREFECT_API_URL: alerts.api_url}):
        failed = run("nightly-dump/nightly-dump")  # the wrong password
        assert failed.state.is_failed(), failed.state
        sentence = failed.state.message
        assert sentence, sentence
        assert "password" in sentence, sentence
        (alert,) = receiver.wait_for(failed_subject, timeout=60)
        assert alert.subject == f"{failed_subject} ({alerts.database})"
        assert f"database: {alerts.database}" in alert.body
        assert f"reason: {sentence}" in alert.body
        assert f"run: {alerts.ui_url}/runs/flow-run/{failed.id}" in alert.body
        assert WRONG_PASSWORD not in alert.text()

        set_password(alerts, alerts.pg.password)
        ok = run("nightly-dump/nightly-dump")
        assert ok.state.is_completed(), ok.state
        (resolved,) = receiver.wait_for(resolved_subject, timeout=60)
        assert resolved.subject == f"{resolved_subject} ({alerts.database})"
        assert f"run: {alerts.ui_url}/runs/flow-run/{ok.id}" in resolved.body
        assert run("nightly-dump/nightly-dump").state.is_completed()

        # The second success must stay silent. The server evaluates events in the order they arrive, so
        # once the alert of a later failure (another deployment's run, set Failed through the API) is in,
        # a resolved message for the second success would have been sent before it.
        from prefect.client.orchestration import get_client
        from prefect.states import Failed

        with get_client(sync_client=True) as client:
            quiet = client.read_deployment_by_name("nightly-dump/quiet-dump")
            client.create_flow_run_from_deployment(quiet.id, state=Failed(message="a later failure"))
        (later,) = receiver.wait_for("dbops: nightly-dump/quiet-dump Failed", timeout=60)
        assert "reason: a later failure" in later.body
        assert len(receiver.matching(resolved_subject)) == 1, [a.text() for a in receiver.alerts]
    assert len(receiver.matching(failed_subject)) == 1, [a.text() for a in receiver.alerts]


def test_a_deployment_that_never_completes_alerts_that_nothing_ran_and_since_when(alerts: AlertStack) -> None:
    """quiet-dump never runs (12 s window): one "nothing ran" alert naming the setup time, not one per
    window; after a Completed run, one "resolved", then, 12 s of silence later, an alert naming that run."""
    from datetime import UTC, datetime

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Completed

    receiver = alerts.receiver
    missing = "dbops: nothing ran: nightly-dump/quiet-dump"
    (alert,) = receiver.wait_for(missing, timeout=90)
    assert alert.subject == f"{missing} ({alerts.database})"
    match = re.search(
        r"no Completed run of nightly-dump/quiet-dump for 12s: "
        r"none since this alert was set up at (\S+ \S+) UTC",
        alert.body,
    )
    assert match, alert.body
    armed = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC).timestamp()
    assert alerts.setup_started - 1 <= armed <= alerts.setup_started + 60, (armed, alerts.setup_started)
    assert 12 <= alert.received - armed <= 60, (armed, alert.received)
    assert f"database: {alerts.database}" in alert.body
    assert f"deployment: {alerts.ui_url}/deployments/deployment/" in alert.body
    # the deployments on the default 26 h window stay quiet
    assert not receiver.matching("dbops: nothing ran: nightly-dump/nightly-dump")
    # once per silence: two windows later there is still one (after the test above, they have passed)
    from deployments.sandbox import wait_until

    wait_until(lambda: time.time() > alert.received + 2 * 12, timeout=60, interval=0.5, what="two windows")
    with (
        temporary_settings(updates={PREFECT_API_URL: alerts.api_url}),
        get_client(sync_client=True) as client,
    ):
        assert len(receiver.matching(missing)) == 1, [a.text() for a in receiver.matching(missing)]
        # A run completes (set Completed through the API: what matters here is the event the server sees)
        quiet = client.read_deployment_by_name("nightly-dump/quiet-dump")
        done = client.create_flow_run_from_deployment(quiet.id, state=Completed(message="done"))
        (resolved,) = receiver.wait_for("dbops: resolved: nightly-dump/quiet-dump", timeout=60)
        assert f"run: {alerts.ui_url}/runs/flow-run/{done.id}" in resolved.body
        _, again = receiver.wait_for(missing, count=2, timeout=60)
    assert re.search(
        rf"for 12s: the last one ended \S+ \S+ UTC \({re.escape(alerts.ui_url)}/runs/flow-run/{done.id}\)",
        again.body,
    ), again.body
