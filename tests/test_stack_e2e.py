"""End to end: the local stack behind `make run`, as a user gets it.

One real Prefect server, a process worker, the sandbox PostgreSQL with archiving, `dbops setup`, and
`prefect deploy --all` from prefect.yaml, all started by `python -m deployments.stack` (what `make run`
runs) in its own process. The tests then talk to that server over HTTP like a deploy pipeline would:
every deployment is triggered through the API and must complete, the schedules the server stored must
be the ones in prefect.yaml, and `dbops migrate --wait` must turn the run's final state into its exit
code. Ctrl-C must stop everything, and a second run must reuse the state folder.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT = 600


@dataclass
class RunningStack:
    state: Path
    proc: subprocess.Popen[str]
    api_url: str = ""
    lines: list[str] = field(default_factory=list)

    @property
    def output(self) -> str:
        return "".join(self.lines)


def stack_env() -> dict[str, str]:
    # Not the test session's harness: the stack brings its own server, as on a fresh machine.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="false",
        DBOPS_DEMO_IMAGES="3000",
        PYTHONUNBUFFERED="1",
        PREFECT_WORKER_QUERY_SECONDS="1",  # the worker picks up each triggered run within a second
    )
    return env


def follow(proc: subprocess.Popen[str], lines: list[str], marker: str, seen: threading.Event) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if marker in line:
            seen.set()
    seen.set()  # the process ended: wake the waiter, which then sees the exit code


@pytest.fixture(scope="module")
def stack() -> Iterator[RunningStack]:
    # Not under pytest's tmp root: every pytest session resets that to 0700, and the sandbox's postgres
    # user must keep reaching the WAL archive in the state folder while the stack runs.
    state = Path(tempfile.mkdtemp(prefix="dbops-stack-"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "deployments.stack", "--state", str(state)],
        cwd=ROOT,
        env=stack_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    running = RunningStack(state=state, proc=proc)
    up = threading.Event()
    reader = threading.Thread(target=follow, args=(proc, running.lines, "Serving; press Ctrl-C", up))
    reader.start()
    try:
        if not up.wait(STARTUP_TIMEOUT) or proc.poll() is not None:
            pytest.fail(f"the stack did not come up:\n{running.output[-6000:]}")
        match = re.search(r"starting a local Prefect server on (\S+)", running.output)
        assert match, running.output
        running.api_url = match.group(1)
        yield running
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        reader.join(timeout=30)
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture
def api(stack: RunningStack) -> Iterator[str]:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: stack.api_url}):
        yield stack.api_url


def deployments_in_yaml() -> list[dict]:
    return yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]


def flow_name(entrypoint: str) -> str:
    return entrypoint.rsplit(":", 1)[1].replace("_", "-")


def test_first_dump_and_wal_check_completed_and_the_backup_is_where_it_says(stack: RunningStack) -> None:
    out = stack.output
    assert "nightly-dump and wal-archive-check (all completed)" in out, out[-4000:]
    match = re.search(r"latest backup\s+file://(\S+)", out)
    assert match, out[-4000:]
    dump = Path(match.group(1))
    assert dump.is_file() and dump.stat().st_size > 10_000
    assert dump.is_relative_to(stack.state / "backups")


def test_the_server_holds_every_deployment_with_the_schedules_of_prefect_yaml(api: str) -> None:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        for spec in deployments_in_yaml():
            deployment = client.read_deployment_by_name(f"{flow_name(spec['entrypoint'])}/{spec['name']}")
            assert deployment.work_pool_name == "dbops"
            assert set(spec["tags"]) <= set(deployment.tags)
            stored = sorted((s.schedule.cron, s.schedule.timezone) for s in deployment.schedules)
            wanted = sorted((s["cron"], s["timezone"]) for s in spec.get("schedules") or [])
            assert stored == wanted, spec["name"]
            # every schedule active, except those prefect.yaml pauses (pgbouncer-check)
            assert sorted(s.active for s in deployment.schedules) == sorted(
                s.get("active", True) for s in spec.get("schedules") or []
            ), spec["name"]
            # Variables were resolved at deploy time: no empty or templated block names reached the server.
            for key, value in deployment.parameters.items():
                assert value not in ("", None) and "{{" not in str(value), (spec["name"], key)
    assert not [s for s in deployments_in_yaml() if s["name"] in ("migrate", "restore")][0].get("schedules")


OTHER_DEPLOYMENTS = {
    "weekly-reindex/weekly-reindex": {},
    "restore-drill/restore-drill": {},
    "list-backups/list-backups": {},
    "restore/restore": {"mode": "replace"},
    "migrate/migrate": {},
}


def test_each_other_deployment_completes_when_triggered_through_the_api(api: str) -> None:
    """All started at once, as a busy Sunday morning would: the db:<name> limits queue them, none fails."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        runs = {}
        for name, parameters in OTHER_DEPLOYMENTS.items():
            deployment = client.read_deployment_by_name(name)
            runs[name] = client.create_flow_run_from_deployment(
                deployment.id, parameters=parameters, tags=["trigger:api"]
            ).id
        deadline = time.monotonic() + 600
        final = {}
        while len(final) < len(runs) and time.monotonic() < deadline:
            for name, run_id in runs.items():
                state = client.read_flow_run(run_id).state
                if name not in final and state is not None and state.is_final():
                    final[name] = (state.type.value, state.message)
            time.sleep(0.5)  # polling the API for a state, not waiting for time to pass
    assert {name: kind for name, (kind, _) in final.items()} == {name: "COMPLETED" for name in runs}, final


def dbops_migrate(api_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**stack_env(), "PREFECT_API_URL": api_url}
    return subprocess.run(
        [sys.executable, "-m", "deployments.cli", "migrate", "--deployment", "migrate/migrate", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_dbops_migrate_wait_exit_code_follows_the_run(api: str) -> None:
    ok = dbops_migrate(api, "--wait", "--timeout", "500")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # A target the Alembic tree does not know fails the run, and the pipeline must not roll out.
    bad = dbops_migrate(api, "--param", "target=ffffffffffff", "--wait", "--timeout", "500")
    assert bad.returncode == 1, bad.stdout + bad.stderr


def test_ctrl_c_stops_everything_and_a_second_run_reuses_the_state(stack: RunningStack) -> None:
    # Twice, as a terminal delivers it through `make run` (to make, uv and the stack; uv forwards one too):
    # the second must not cut the shutdown short and leave the server or the cluster running.
    os.killpg(stack.proc.pid, signal.SIGINT)
    os.killpg(stack.proc.pid, signal.SIGINT)
    assert stack.proc.wait(timeout=120) == 0, stack.output[-4000:]
    assert "stopped the sandbox PostgreSQL" in stack.output
    # Every process the stack started was in its session; none may be left behind.
    leftovers = subprocess.run(["pgrep", "-s", str(stack.proc.pid)], capture_output=True, text=True)
    assert leftovers.stdout.strip() == "", leftovers.stdout

    again = subprocess.run(
        [sys.executable, "-m", "deployments.stack", "--once", "--state", str(stack.state)],
        cwd=ROOT,
        env=stack_env(),
        capture_output=True,
        text=True,
        timeout=STARTUP_TIMEOUT,
    )
    assert again.returncode == 0, again.stdout[-6000:] + again.stderr[-3000:]
    assert "generating sample data" not in again.stdout  # the sandbox cluster and its data were reused
    assert re.search(r"block postgres-database/imagemanager-prod\s+exists", again.stdout), again.stdout
    assert "all completed" in again.stdout
    backups = list((stack.state / "backups").rglob("*.dump*"))
    assert len([b for b in backups if b.name.endswith((".dump", ".dump.zst"))]) >= 2, backups


def test_real_database_without_staging_and_archive_is_refused_before_anything_starts(tmp_path: Path) -> None:
    env = {**stack_env(), "DBOPS_DATABASE_URL": "postgresql://dbops@db.invalid/imagemanager"}
    done = subprocess.run(
        [sys.executable, "-m", "deployments.stack", "--once", "--state", str(tmp_path / "state")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert "also set DBOPS_STAGING_URL and DBOPS_WAL_ARCHIVE_DIR" in done.stderr
    assert not (tmp_path / "state").exists()  # no server, cluster or folder was started or made
