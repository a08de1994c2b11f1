"""End to end: the local stack behind `make run`, as a user gets it.

One real Prefect server, a process worker, the sandbox PostgreSQL with archiving, `dbops setup`, and
`prefect deploy --all` from prefect.yaml, all started by `python -m deployments.stack` (what `make run`
runs) in its own process. The tests then talk to that server over HTTP like a deploy pipeline would:
every deployment is triggered through the API with its defaults only and must complete, the schedules
the server stored must be the ones in prefect.yaml, the banner's second-shell commands must work as
pasted (no PREFECT_API_URL), and `dbops migrate --wait` must turn the run's final state into its exit
code in a few lines. The stack's output is piped through a real `tee` in its process group, as in
`make run 2>&1 | tee run.log`: Ctrl-C kills the tee too, and the shutdown must still stop everything. A
run killed with SIGKILL leaves orphans; the next run (stdout to a file, SIGHUP ignored, as under nohup,
and stopped with SIGTERM as a service manager does) must adopt them, keep the port, and reuse the state.
"""

from __future__ import annotations

import os
import re
import shlex
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
from typing import Any

import pytest
import yaml

from deployments import stackstate
from deployments.stackstate import stop_child
from tests.harness.pg import wait_until
from tests.harness.stack import ROOT, follow, stack_env, start_piped

STARTUP_TIMEOUT = 600


@dataclass
class RunningStack:
    state: Path
    proc: subprocess.Popen[str]  # the shell running `stack 2>&1 | tee run.log`, leader of their group
    api_url: str = ""
    lines: list[str] = field(default_factory=list)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    @property
    def pid(self) -> int | None:
        """The stack's own pid (its pid file); the shell and the tee are its neighbours in the group."""
        return stackstate.live_pid(self.state, "stack")


@pytest.fixture(scope="module")
def stack() -> Iterator[RunningStack]:
    # Not under pytest's tmp root: every pytest session resets that to 0700, and the sandbox's postgres
    # user must keep reaching the WAL archive in the state folder while the stack runs.
    state = Path(tempfile.mkdtemp(prefix="dbops-stack-"))
    # `make run 2>&1 | tee run.log`, as a user pipes it: stack and tee in one process group, so Ctrl-C
    # reaches (and kills) the tee too. The shell exits with the stack's own exit code.
    pipeline = (  # `trap :` so the shell itself outlives the Ctrl-C and reports the stack's exit code
        f"trap : INT; {shlex.quote(sys.executable)} -m deployments.stack --notify-local "
        f"--state {shlex.quote(str(state))} 2>&1 "
        f"| tee {shlex.quote(str(state / 'run.log'))}; exit ${{PIPESTATUS[0]}}"
    )
    proc = start_piped(
        ["bash", "-c", pipeline],
        # A shell started with SIGINT ignored (a CI job, `cmd &`) passes that on to bash and tee, and a
        # non-interactive bash cannot undo it: reset it, as a terminal's shell has it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
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
        stop_child(proc, timeout=120)
        reader.join(timeout=30)
        for name in ("stack", "prefect-worker", "prefect-server"):  # whatever a failed test left running
            pid = stackstate.live_pid(state, name)
            if pid is not None:
                stackstate.stop_pid(pid)
        if (state / "pg" / "cluster" / "data" / "postmaster.pid").exists():
            from deployments.sandbox import PgCluster

            PgCluster(base_dir=state / "pg" / "cluster", port=0).stop("immediate")
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
    # The server keeps its state in PostgreSQL (DBOPS_PREFECT_DB=postgres): a database in the sandbox
    # cluster, no SQLite file, and the password never on a command line.
    assert "(PostgreSQL: database prefect in the sandbox cluster on port" in out, out[-4000:]
    assert not (stack.state / "prefect" / "prefect.db").exists()
    server = stackstate.live_pid(stack.state, "prefect-server")
    assert server is not None
    password = dict(
        line.split("=", 1) for line in (stack.state / "pg" / "sandbox.env").read_text().splitlines()
    )["password"]
    assert password not in Path(f"/proc/{server}/cmdline").read_text()
    assert "base-backup, nightly-dump, wal-archive-check (all completed)" in out, out[-4000:]
    # Every line is dbops's own: the runs' log lines say whose they are, and prefect deploy's advice to
    # start a worker (the stack started one) stays in its log file.
    assert "start a worker" not in out, out[-4000:]
    for line in out.splitlines():
        if "Finished in state" in line:
            assert line.startswith(("   base-backup | ", "   nightly-dump | ", "   wal-archive-check | ")), (
                line
            )
    match = re.search(r"latest backup\s+file://(\S+)", out)
    assert match, out[-4000:]
    dump = Path(match.group(1))
    assert dump.is_file()
    assert dump.stat().st_size > 10_000
    assert dump.is_relative_to(stack.state / "backups")
    # and the first base backup, manifest written last, beside the dumps
    base = [p for p in (stack.state / "backups").rglob("*.manifest.json") if "/base/" in str(p)]
    assert len(base) == 1
    assert base[0].with_name(base[0].name.replace(".manifest.json", ".tar.zst")).is_file()


def test_the_server_holds_every_deployment_with_the_schedules_of_prefect_yaml(api: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.schedules import CronSchedule

    with get_client(sync_client=True) as client:
        for spec in deployments_in_yaml():
            deployment = client.read_deployment_by_name(f"{flow_name(spec['entrypoint'])}/{spec['name']}")
            assert deployment.work_pool_name == "dbops"
            assert set(spec["tags"]) <= set(deployment.tags)
            crons = [s.schedule for s in deployment.schedules]
            assert all(isinstance(c, CronSchedule) for c in crons), crons
            stored = sorted((c.cron, c.timezone) for c in crons if isinstance(c, CronSchedule))
            wanted = sorted((s["cron"], s["timezone"]) for s in spec.get("schedules") or [])
            assert stored == wanted, spec["name"]
            # every schedule active, except those prefect.yaml pauses (pgbouncer-check)
            assert sorted(s.active for s in deployment.schedules) == sorted(
                s.get("active", True) for s in spec.get("schedules") or []
            ), spec["name"]
            # Variables were resolved at deploy time: no empty or templated block names reached the server.
            for key, value in deployment.parameters.items():
                assert value not in ("", None), (spec["name"], key)
                assert "{{" not in str(value), (spec["name"], key)
    assert not next(s for s in deployments_in_yaml() if s["name"] in ("migrate", "restore")).get("schedules")


def test_each_other_deployment_completes_when_triggered_with_its_defaults(
    stack: RunningStack, api: str
) -> None:
    """Every deployment of prefect.yaml the stack did not run yet, defaults only, all started at once as a
    busy Sunday morning would: the db:<name> limits queue them, none fails. Then a second restore with
    the defaults is refused (the first one's database exists), with the sentence saying what to do, and
    (the stack runs as `make run NOTIFY=1`) its alert is printed on the stack's console."""
    from prefect.client.orchestration import get_client

    first = ("base-backup", "nightly-dump", "wal-archive-check")  # the stack ran these already
    # pitr-restore needs a target and a data directory chosen per run
    specs = [s for s in deployments_in_yaml() if s["name"] not in first and s["name"] != "pitr-restore"]

    def paused(spec: dict[str, Any]) -> bool:  # ships paused: it needs a block only some sites have
        return bool(spec.get("schedules")) and not any(s.get("active", True) for s in spec["schedules"])

    others = [f"{flow_name(s['entrypoint'])}/{s['name']}" for s in specs if not paused(s)]
    optional = [f"{flow_name(s['entrypoint'])}/{s['name']}" for s in specs if paused(s)]
    assert "restore/restore" in others
    assert len(others) >= 5
    assert optional == ["pgbouncer-check/pgbouncer-check"]
    with get_client(sync_client=True) as client:
        runs = {name: start(client, name) for name in others + optional}
        final = wait_final(client, runs)
        assert {name: final[name][0] for name in others} == dict.fromkeys(others, "COMPLETED"), final
        again = wait_final(client, {"restore/restore": start(client, "restore/restore")})
    kind, message = again["restore/restore"]
    assert kind == "FAILED", message
    assert "already exists" in message, message
    assert "mode=replace" in message, message
    wait_until(
        lambda: "== alert: dbops: restore/restore Failed (imagemanager)" in stack.output,
        timeout=120,
        interval=0.5,
        what="the failed restore's alert on the stack's console",
    )
    assert re.search(r"automation dbops: nothing ran: nightly-dump/nightly-dump\s+created", stack.output)
    assert "alerts         printed here as they arrive (local receiver http://127.0.0.1:" in stack.output
    # the paused one, triggered anyway, says which block is missing and how to make it
    kind, message = final["pgbouncer-check/pgbouncer-check"]
    assert kind == "FAILED", message
    assert "imagemanager-pgbouncer" in message, message
    assert "dbops setup" in message, message


def start(client: Any, name: str) -> Any:
    deployment = client.read_deployment_by_name(name)
    return client.create_flow_run_from_deployment(deployment.id, parameters={}, tags=["trigger:api"]).id


def wait_final(client: Any, runs: dict[str, Any]) -> dict[str, tuple[str, str]]:
    deadline = time.monotonic() + 600
    final: dict[str, tuple[str, str]] = {}
    while len(final) < len(runs) and time.monotonic() < deadline:
        for name, run_id in runs.items():
            state = client.read_flow_run(run_id).state
            if name not in final and state is not None and state.is_final():
                final[name] = (state.type.value, state.message or "")
        time.sleep(0.5)  # polling the API for a state, not waiting for time to pass
    return final


def banner_commands(output: str) -> list[list[str]]:
    """The `uv run dbops ...` lines the banner offers for a second shell, as argv after `dbops`."""
    return [
        shlex.split(line.split("uv run dbops ", 1)[1])
        for line in output.splitlines()
        if "uv run dbops " in line
    ]


def second_shell(stack: RunningStack, argv: list[str]) -> subprocess.CompletedProcess[str]:
    """A new terminal: no PREFECT_API_URL; the banner's export of DBOPS_STATE_DIR (a non-default state)."""
    exports = dict(re.findall(r"export (DBOPS_STATE_DIR)=(\S+)", stack.output))
    assert exports.get("DBOPS_STATE_DIR") == str(stack.state), stack.output[-3000:]
    return subprocess.run(
        [sys.executable, "-m", "deployments.cli", *argv],
        cwd=ROOT,
        env={**stack_env(), **exports},
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_the_banners_commands_work_in_a_second_shell(stack: RunningStack) -> None:
    commands = banner_commands(stack.output)
    assert [c[:2] for c in commands] == [["backups", "list"], ["run", "nightly-dump"], ["migrate", "--wait"]]
    assert f"export PREFECT_API_URL={stack.api_url}" in stack.output
    listed = second_shell(stack, commands[0])
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert f"Prefect server {stack.api_url} (the local stack in {stack.state})" in listed.stderr
    assert re.search(r"imagemanager: \d+ backup\(s\)", listed.stdout), listed.stdout
    dump = second_shell(stack, commands[1])
    assert dump.returncode == 0, dump.stdout + dump.stderr
    assert "exit code 0" in dump.stdout, dump.stdout + dump.stderr
    for done in (listed, dump):
        assert "Still processing items" not in done.stderr, done.stderr


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


def test_dbops_migrate_wait_exit_code_follows_the_run(stack: RunningStack, api: str) -> None:
    ok = second_shell(stack, banner_commands(stack.output)[2])  # the banner's own migrate command
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # A target the Alembic tree does not know fails the run, and the pipeline must not roll out. What it
    # prints is the run's sentence, its page and the exit code, not pages of tracebacks.
    bad = dbops_migrate(api, "--param", "target=ffffffffffff", "--wait", "--timeout", "500")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "Traceback" not in bad.stdout + bad.stderr, bad.stdout + bad.stderr
    assert re.search(r"ended Failed: .*ffffffffffff", bad.stdout), bad.stdout
    assert f"run page: {api.removesuffix('/api')}/runs/flow-run/" in bad.stdout
    assert bad.stdout.rstrip().endswith("exit code 1 (the run did not complete)"), bad.stdout
    assert len((bad.stdout + bad.stderr).splitlines()) < 60, bad.stdout + bad.stderr


def test_a_second_make_run_on_a_served_state_is_refused(stack: RunningStack) -> None:
    """Never two Prefect servers on one SQLite state: the second start stops before it starts anything."""
    second = subprocess.run(
        [sys.executable, "-m", "deployments.stack", "--once", "--state", str(stack.state)],
        cwd=ROOT,
        env=stack_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert second.returncode == 1
    pid = stack.pid
    assert pid is not None
    assert f"another `make run` (pid {pid}) is serving {stack.state}" in second.stderr
    assert stack.proc.poll() is None
    assert stack.pid == pid


def started_pids(state: Path) -> dict[str, int | None]:
    names = ("stack", "prefect-server", "prefect-worker")
    pids: dict[str, int | None] = {name: stackstate.live_pid(state, name) for name in names}
    postmaster = state / "pg" / "cluster" / "data" / "postmaster.pid"
    pids["postgres"] = int(postmaster.read_text().split()[0]) if postmaster.exists() else None
    return pids


def log_size(state: Path) -> int:
    return (state / "logs" / "stack.log").stat().st_size


def assert_all_stopped(state: Path, pids: dict[str, int | None], since: int = 0) -> None:
    assert all(pids.values()), pids
    assert [name for name, pid in pids.items() if pid is not None and stackstate.alive(pid)] == [], pids
    assert not (state / "pg" / "cluster" / "data" / "postmaster.pid").exists()
    said = (state / "logs" / "stack.log").read_text()[since:]
    for line in ("stopped prefect worker", "stopped prefect server", "stopped the sandbox PostgreSQL"):
        assert line in said, said[-3000:]


def test_ctrl_c_under_tee_stops_everything(stack: RunningStack) -> None:
    """`make run 2>&1 | tee run.log`, Ctrl-C: the tee dies with it, and the shutdown must not."""
    pids = started_pids(stack.state)
    since = log_size(stack.state)
    # Twice, as a terminal delivers it through `make run` (to make, uv and the stack; uv forwards one too):
    # the second must not cut the shutdown short and leave the server or the cluster running.
    os.killpg(stack.proc.pid, signal.SIGINT)
    os.killpg(stack.proc.pid, signal.SIGINT)
    assert stack.proc.wait(timeout=120) == 0, (stack.state / "logs" / "stack.log").read_text()[-4000:]
    assert_all_stopped(stack.state, pids, since)
    # The scenario really had a dead reader: the tee's copy ends before the shutdown's last lines.
    assert "stopped the sandbox PostgreSQL" not in (stack.state / "run.log").read_text()


def test_a_killed_run_leaves_orphans_the_next_run_adopts_on_the_same_port(stack: RunningStack) -> None:
    assert stack.proc.poll() is not None  # the Ctrl-C test stopped the first run
    # A run killed with SIGKILL (OOM killer, `kill -9`) once its server and cluster are up. Its server
    # binds the first run's port although that run's connections are still in TIME-WAIT.
    killed = start_piped([sys.executable, "-m", "deployments.stack", "--state", str(stack.state)])
    lines: list[str] = []
    reached = threading.Event()
    reader = threading.Thread(target=follow, args=(killed, lines, "== dbops setup", reached))
    reader.start()
    assert reached.wait(STARTUP_TIMEOUT), "".join(lines)[-4000:]
    assert killed.poll() is None, "".join(lines)[-4000:]
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    reader.join(timeout=30)
    assert f"starting a local Prefect server on {stack.api_url}" in "".join(lines), "".join(lines)[-3000:]
    orphan = stackstate.live_pid(stack.state, "prefect-server")
    assert orphan is not None

    # The next run as a service manager or nohup runs it: SIGHUP ignored, stdout to a file, SIGTERM to stop.
    out = stack.state / "nohup.out"
    since = log_size(stack.state)
    with out.open("w") as sink:
        again = subprocess.Popen(
            [sys.executable, "-m", "deployments.stack", "--state", str(stack.state)],
            cwd=ROOT,
            env=stack_env(),
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN),
        )
    try:
        wait_until(
            lambda: "Serving; press Ctrl-C" in out.read_text() or again.poll() is not None,
            timeout=STARTUP_TIMEOUT,
            interval=0.5,
            what="the next run to serve",
        )
        text = out.read_text()
        assert again.poll() is None, text[-6000:]
        assert f"adopted the Prefect server an earlier run left running (pid {orphan})" in text, text[-4000:]
        assert "adopted the sandbox PostgreSQL an earlier run left running" in text, text[-4000:]
        assert f"Prefect UI     {stack.api_url.removesuffix('/api')}" in text  # the same port again
        assert "generating sample data" not in text  # the sandbox cluster and its data were reused
        assert re.search(r"block postgres-database/imagemanager-prod\s+exists", text), text
        assert "all completed" in text
        pids = started_pids(stack.state)
        assert pids["prefect-server"] == orphan
        os.kill(again.pid, signal.SIGTERM)
        assert again.wait(timeout=120) == 0, out.read_text()[-4000:]
    finally:
        if again.poll() is None:
            os.killpg(again.pid, signal.SIGKILL)
            again.wait()
    assert_all_stopped(stack.state, pids, since)
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
