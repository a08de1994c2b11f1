"""Past one machine: the Prefect server on PostgreSQL, two process workers, a worker lost mid-job.

One stack for the whole module, started as `make run` starts it (`python -m deployments.stack`) with
`DBOPS_PREFECT_DB=postgres` (the server's database in the sandbox cluster), `--workers 2` (each worker from
its own directory and PREFECT_HOME, at most 2 runs each) and S3 storage on the session's moto server.
Everything is real: the server process, the workers and their flow-run processes, PostgreSQL, moto. What
the tests prove, each from what the Prefect API and the servers say afterwards (never from sleeps):

- two dumps and a reindex of one database triggered at once run one after another (the `db:` limit: the
  intervals during which each run held it, from its own log lines, never overlap), while a dump of a
  second database runs beside them;
- a schedule fires once per slot although two workers poll the pool;
- a host lost in the middle of a dump (its worker and everything under it SIGKILLed): the run is marked
  Crashed by the server (heartbeats stop), no manifest exists, its `db:` slot frees itself when its lease
  runs out and the next dump completes, and retention aborts the dead multipart upload once it is stale;
  a host lost during a migration: the advisory lock goes with the session, and the next migrate run
  starts cleanly and reports the revision production is really at.
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
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg
import pytest

from deployments import stackstate
from deployments.sandbox import free_port
from deployments.stack import worker_argv, worker_home
from deployments.stackstate import stop_child
from tests.harness.pg import wait_until
from tests.harness.s3 import ACCESS_KEY, REGION, SECRET_KEY, S3Endpoint
from tests.harness.stack import default_sigint, follow, spawn_logged, stack_env

ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT = 600
LEASE_SECONDS = 60  # the db: slot's lease in this stack: the server's minimum (production: 300)
CRASH_AFTER_SECONDS = 40  # a run silent this long after a heartbeat is marked Crashed (heartbeat: 30 s)
FOLDER = "dbops"


@dataclass
class MultiStack:
    state: Path
    proc: subprocess.Popen[str]
    bucket: str
    s3: S3Endpoint
    api_url: str = ""
    lines: list[str] = field(default_factory=list)
    extra_workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def sandbox(self) -> dict[str, str]:
        meta = self.state / "pg" / "sandbox.env"
        return dict(line.split("=", 1) for line in meta.read_text().splitlines() if "=" in line)

    def connect(self, dbname: str, **kw: Any) -> psycopg.Connection:
        box = self.sandbox()
        return psycopg.connect(
            host="127.0.0.1",
            port=int(box["port"]),
            user="postgres",
            password=box["password"],
            dbname=dbname,
            **{"autocommit": True, **kw},
        )

    def worker_pids(self) -> dict[int, str]:
        """Every live worker: the stack's two and any this module started."""
        pids = {}
        for unit in stackstate.recorded_workers(self.state):
            pid = stackstate.live_pid(self.state, unit)
            if pid is not None:
                pids[pid] = unit
        for proc in self.extra_workers:
            if proc.poll() is None:
                pids[proc.pid] = f"extra worker {proc.pid}"
        return pids

    def start_worker(self, n: int) -> subprocess.Popen[bytes]:
        """Another host's worker: the stack's own argv, directory layout and settings."""
        home = worker_home(self.state, n)
        env = {
            **multi_env(self.s3, self.bucket),
            "PREFECT_API_URL": self.api_url,
            "PREFECT_HOME": str(home / ".prefect"),
            "DBOPS_SANDBOX_PASSWORD": self.sandbox()["password"],
        }
        argv = worker_argv(f"dbops-worker-{n}", 2)
        proc = spawn_logged(
            [str(Path(sys.executable).parent / "prefect"), *argv[1:]],
            env,
            self.state / "logs" / f"prefect-worker-{n}.log",
            cwd=home,
        )
        self.extra_workers.append(proc)
        return proc


def multi_env(s3: S3Endpoint, bucket: str) -> dict[str, str]:
    return {
        **stack_env(),
        "DBOPS_PREFECT_DB": "postgres",
        "DBOPS_DEMO_IMAGES": "300",
        "DBOPS_STORAGE_URL": f"s3://{bucket}/{FOLDER}",
        "DBOPS_S3_ENDPOINT_URL": s3.url,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": REGION,
        "DBOPS_LOCK_LEASE_SECONDS": str(LEASE_SECONDS),
        "PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS": "1",
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30",
        "DBOPS_CRASH_DETECTION_SECONDS": str(CRASH_AFTER_SECONDS),
        "PREFECT_SERVER_EVENTS_PROACTIVE_GRANULARITY": "PT1S",
        "DBOPS_RETRY_BACKOFF": "0",
    }


@pytest.fixture(scope="module")
def multi(s3: S3Endpoint) -> Iterator[MultiStack]:
    state = Path(tempfile.mkdtemp(prefix="dbops-multi-"))
    # Its own port from the start: 4200 is the e2e stack's, and that test leaves its server there on
    # purpose (a killed `make run`) for its next run to adopt; this stack must never talk to that one.
    (state / "prefect").mkdir(parents=True)
    (state / "prefect" / "port").write_text(str(free_port()))
    bucket = s3.create_bucket(f"multi-{os.getpid()}-{int(time.time())}")
    argv = [sys.executable, "-m", "deployments.stack", "--workers", "2", "--worker-limit", "2"]
    argv += ["--no-first-jobs", "--state", str(state)]
    proc = subprocess.Popen(
        argv,
        cwd=ROOT,
        env=multi_env(s3, bucket),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=default_sigint,  # stopped with SIGINT, as Ctrl-C stops `make run`
    )
    running = MultiStack(state=state, proc=proc, bucket=bucket, s3=s3)
    up = threading.Event()
    reader = threading.Thread(target=follow, args=(proc, running.lines, "Serving; press Ctrl-C", up))
    reader.start()
    try:
        if not up.wait(STARTUP_TIMEOUT) or "Serving; press Ctrl-C" not in running.output:
            pytest.fail(f"the stack did not come up:\n{running.output[-6000:]}")
        match = re.search(r"starting a local Prefect server on (\S+)", running.output)
        assert match, running.output
        running.api_url = match.group(1)
        yield running
    finally:
        for extra in running.extra_workers:
            stop_child(extra, timeout=30)
        stop_child(proc, timeout=120)
        reader.join(timeout=30)
        for unit in ["stack", "prefect-server", *stackstate.recorded_workers(state)]:
            pid = stackstate.live_pid(state, unit)
            if pid is not None:
                stackstate.stop_pid(pid)
        if (state / "pg" / "cluster" / "data" / "postmaster.pid").exists():
            from deployments.sandbox import PgCluster

            PgCluster(base_dir=state / "pg" / "cluster", port=0).stop("immediate")
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture
def client(multi: MultiStack) -> Iterator[Any]:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: multi.api_url}), get_client(sync_client=True) as c:
        yield c


# -- helpers ---------------------------------------------------------------------------------------------


def trigger(client: Any, name: str, **parameters: Any) -> UUID:
    deployment = client.read_deployment_by_name(name)
    return client.create_flow_run_from_deployment(deployment.id, parameters=parameters, tags=["test"]).id


def wait_final(client: Any, run_ids: list[UUID], timeout: float = 300) -> dict[UUID, Any]:
    final: dict[UUID, Any] = {}

    def done() -> bool:
        for run_id in run_ids:
            if run_id not in final:
                run = client.read_flow_run(run_id)
                if run.state is not None and run.state.is_final():
                    final[run_id] = run
        return len(final) == len(run_ids)

    wait_until(done, timeout=timeout, interval=0.5, what=f"{len(run_ids)} flow runs to end")
    return final


def run_logs(client: Any, run_id: UUID) -> list[Any]:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    return list(client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id]))))


def held_interval(client: Any, run_id: UUID) -> tuple[datetime, datetime, str]:
    """When the run held its db: limit: from its "holding db:…" to its "releasing db:…" log line (the
    releasing line is logged while still held, so the interval lies inside the real one)."""
    found: dict[str, Any] = {}

    def both() -> bool:
        for entry in run_logs(client, run_id):
            for word in ("holding", "releasing"):
                if entry.message.startswith(f"{word} db:"):
                    found[word] = entry
        return len(found) == 2

    wait_until(both, timeout=60, interval=0.5, what=f"the lock log lines of run {run_id}")
    limit = found["holding"].message.split()[1]
    return found["holding"].timestamp, found["releasing"].timestamp, limit


def overlaps(a: tuple[datetime, datetime, str], b: tuple[datetime, datetime, str]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def ancestors(pid: int) -> list[int]:
    out = []
    while pid > 1:
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
        out.append(pid)
    return out


def pids_named(name: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv0 = (entry / "cmdline").read_bytes().split(b"\0", 1)[0]
            except OSError:
                continue
            if argv0.endswith(name.encode()):
                found.append(int(entry.name))
    return found


def lose_host(worker: int) -> list[int]:
    """What a lost host does to a worker: it and every process under it (the flow run runs in a session
    of its own, so its process group is not enough) stop at once, with no chance to report. Frozen first,
    so nothing forks away while the list is taken, then SIGKILLed."""
    os.kill(worker, signal.SIGSTOP)
    tree = [worker, *descendants(worker)]
    for pid in tree:
        os.kill(pid, signal.SIGSTOP)
    tree = [worker, *descendants(worker)]
    for pid in tree:
        os.kill(pid, signal.SIGKILL)
    wait_until(
        lambda: not any(stackstate.alive(p) for p in tree), timeout=30, what="the lost host's processes"
    )
    return tree


def state_of(client: Any, run_id: UUID) -> Any:
    return client.read_flow_run(run_id).state


# -- 1. one job per database at a time, across workers ---------------------------------------------------


def test_jobs_on_one_database_run_one_after_another_across_workers_and_another_database_in_parallel(
    multi: MultiStack, client: Any
) -> None:
    # The first dump of imagemanager to get the slot stops at pg_dump's first table lock (`hold_pg_dump`)
    # until the dump of the other database has completed: "beside them" is then a fact of the test, not of
    # how fast each flow-run process happened to start on this machine.
    blocker = hold_pg_dump(multi, "imagemanager")
    try:
        same = [trigger(client, "nightly-dump/nightly-dump"), trigger(client, "nightly-dump/nightly-dump")]
        other = trigger(
            client, "nightly-dump/nightly-dump", database="imagemanager-staging", prefix="staging"
        )
        wait_until(
            lambda: waiting_pg_dump(multi, "imagemanager"), timeout=240, interval=0.2, what="a dump to wait"
        )
        same.append(trigger(client, "weekly-reindex/weekly-reindex"))  # queued behind the dumps
        wait_final(client, [other], timeout=240)
    finally:
        blocker.rollback()
        blocker.close()
    final = wait_final(client, [*same, other])
    assert {r.state.type.value for r in final.values()} == {"COMPLETED"}, {
        str(k): (r.state.type.value, r.state.message) for k, r in final.items()
    }
    held = [held_interval(client, run_id) for run_id in same]
    beside = held_interval(client, other)
    assert len({limit for _, _, limit in held}) == 1, held  # one limit: db:<system id>:imagemanager
    assert beside[2] != held[0][2], beside
    assert beside[2].endswith(":imagemanager_staging"), beside
    for i, a in enumerate(held):
        for b in held[i + 1 :]:
            assert not overlaps(a, b), held
    assert any(overlaps(beside, a) for a in held), (beside, held)
    # The four runs were spread over both workers (each takes at most two at a time): separate hosts. Both
    # workers may try to submit a run; the server lets one move it to Pending (the other logs "Aborted
    # submission", Prefect's own guard against running a run twice). The worker that took a run labels it
    # with its name on the server, so the server says which worker ran each run.
    ran_on = {run_id: client.read_flow_run(run_id).labels.get("prefect.worker.name") for run_id in final}
    assert set(ran_on.values()) == {"dbops-worker-1", "dbops-worker-2"}, ran_on


# -- 2. a schedule fires once per slot with two workers polling ------------------------------------------


def test_a_schedule_fires_once_per_slot_with_two_workers_polling(client: Any) -> None:
    """The scheduler only creates runs for slots still ahead of it, so which slot comes first depends on
    when its loop next runs (later on a loaded machine): the test takes the first four slots it filled,
    checks they are consecutive points of the schedule, and that each ran exactly once."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.schedules import IntervalSchedule

    deployment = client.read_deployment_by_name("list-backups/list-backups")
    assert not deployment.schedules
    every = timedelta(seconds=3)
    anchor = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=2)
    (schedule,) = client.create_deployment_schedules(
        deployment.id, [(IntervalSchedule(interval=every, anchor_date=anchor), True)]
    )
    only_this = DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
    seen: list[Any] = []

    def runs() -> list[Any]:
        return list(client.read_flow_runs(deployment_filter=only_this, limit=200))

    def first_slots() -> list[datetime]:
        return sorted({r.expected_start_time for r in seen})[:4]

    def first_four_ran() -> bool:
        seen[:] = runs()
        slots = first_slots()
        return len(slots) == 4 and all(
            r.state and r.state.is_final() for r in seen if r.expected_start_time in slots
        )

    try:
        wait_until(first_four_ran, timeout=240, interval=0.5, what="the first four scheduled slots to run")
    except TimeoutError as exc:
        states = sorted((r.expected_start_time, r.state.type.value if r.state else None) for r in seen)
        raise AssertionError(f"{exc}; runs of the schedule (slot, state): {states[:12]}") from None
    finally:
        client.delete_deployment_schedule(deployment.id, schedule.id)
    slots = first_slots()
    # points of the schedule, one after another
    offsets = [(slot - anchor).total_seconds() for slot in slots]
    step = every.total_seconds()
    assert offsets[0] % step == 0, (anchor, slots)
    assert offsets == [offsets[0] + i * step for i in range(4)], (anchor, slots)
    per_slot: dict[datetime, list[Any]] = {}
    for run in runs():
        per_slot.setdefault(run.expected_start_time, []).append(run)
    for slot in slots:
        assert len(per_slot.get(slot, [])) == 1, (slot, per_slot)
        (run,) = per_slot[slot]
        assert run.state.is_completed(), (slot, run.state)
        started = [s for s in client.read_flow_run_states(run.id) if s.type.value == "RUNNING"]
        assert len(started) == 1, (slot, [s.type.value for s in client.read_flow_run_states(run.id)])
    for run in runs():  # what the scheduler had queued beyond the four slots goes with the schedule
        if run.state and run.state.type.value == "SCHEDULED":
            client.delete_flow_run(run.id)


# -- 3. a host lost mid-job -------------------------------------------------------------------------------


def multipart_uploads(multi: MultiStack, prefix: str, database: str) -> list[dict[str, Any]]:
    resp = multi.s3.client().list_multipart_uploads(
        Bucket=multi.bucket, Prefix=f"{FOLDER}/{prefix}/{database}/"
    )
    return list(resp.get("Uploads", []))


def manifests(multi: MultiStack, prefix: str, database: str) -> set[str]:
    resp = multi.s3.client().list_objects_v2(Bucket=multi.bucket, Prefix=f"{FOLDER}/{prefix}/{database}/")
    return {o["Key"] for o in resp.get("Contents", []) if o["Key"].endswith(".manifest.json")}


def waiting_pg_dump(multi: MultiStack, database: str) -> bool:
    """pg_dump of `database` waits for the lock `hold_pg_dump` holds."""
    with multi.connect("postgres") as conn:
        rows = conn.execute(
            "SELECT 1 FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock' "
            "AND query LIKE 'LOCK TABLE %%mw_hold%%'",
            (database,),
        ).fetchall()
    return bool(rows)


def advisory_locks(multi: MultiStack, database: str) -> int:
    with multi.connect(database) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
            "WHERE l.locktype = 'advisory' AND l.granted AND d.datname = %s",
            (database,),
        ).fetchone()
    return int(row[0]) if row else 0


def hold_pg_dump(multi: MultiStack, database: str) -> psycopg.Connection:
    """Hold pg_dump of `database` at its first table lock, after the dump's preflight and snapshot and
    with its upload open: an empty partitioned table (pg_dump locks it; the preflight and the exported
    snapshot only look at plain tables) held ACCESS EXCLUSIVE by the returned open transaction."""
    with multi.connect(database) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS mw_hold (id int) PARTITION BY RANGE (id)")
    blocker = multi.connect(database, autocommit=False)
    blocker.execute("LOCK TABLE ONLY mw_hold IN ACCESS EXCLUSIVE MODE")
    return blocker


def workers_running_pg_dump(multi: MultiStack) -> set[int]:
    """The workers whose flow runs run pg_dump right now (their process trees)."""
    workers = multi.worker_pids()
    return {up for pid in pids_named("pg_dump") for up in ancestors(pid) if up in workers}


def test_a_host_lost_mid_dump_and_mid_migration_leaves_nothing_held(multi: MultiStack, client: Any) -> None:
    """A dump of imagemanager_staging and a migration of imagemanager, each held up at pg_dump's first
    table lock (`hold_pg_dump`), so each run holds its db: slot, the dump its open
    multipart upload and the migration its advisory lock; then the hosts running them are lost. The two
    databases have separate slots, so both leases run out in the same minute."""
    from flows.core.catalog import read_catalog
    from flows.core.expiry import carry_out, plan_cleanup
    from flows.core.retention import RetentionPolicy, plan_from_catalog
    from flows.core.s3store import S3ObjectStore

    dumped, migrated = "imagemanager_staging", "imagemanager"
    before = manifests(multi, "staging", dumped)
    # production one revision behind, so the migration has work to do and takes its pre-backup
    box = multi.sandbox()
    alembic_env = {
        **os.environ,
        "DATABASE_URL": f"postgresql+psycopg://postgres@127.0.0.1:{box['port']}/{migrated}",
        "PGPASSWORD": box["password"],
    }
    app = ROOT / "examples" / "imagemanager"
    down = subprocess.run(
        [sys.executable, "-m", "alembic", "downgrade", "-1"], cwd=app, env=alembic_env, capture_output=True
    )
    assert down.returncode == 0, down.stderr
    with multi.connect(migrated) as conn:
        row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    assert row is not None
    really_at = row[0]

    blockers = [hold_pg_dump(multi, name) for name in (dumped, migrated)]
    dump = trigger(client, "nightly-dump/nightly-dump", database="imagemanager-staging", prefix="staging")
    migration = trigger(client, "migrate/migrate")
    try:
        wait_until(
            lambda: (
                state_of(client, dump).type.value == "RUNNING"
                and bool(multipart_uploads(multi, "staging", dumped))
                and waiting_pg_dump(multi, dumped)
                and waiting_pg_dump(multi, migrated)
                and advisory_locks(multi, migrated) > 0
            ),
            timeout=240,
            interval=0.2,
            what="the dump (upload open) and the migration (advisory lock held) to wait in pg_dump",
        )
        doomed = workers_running_pg_dump(multi)
        assert doomed, multi.worker_pids()
        lost = [pid for worker in doomed for pid in lose_host(worker)]
        lost_at = datetime.now(UTC)
    finally:
        for blocker in blockers:
            blocker.rollback()
            blocker.close()
    assert not any(stackstate.alive(p) for p in lost)
    (dead,) = multipart_uploads(multi, "staging", dumped)
    assert manifests(multi, "staging", dumped) == before  # no manifest: the dump is not a backup
    # The migration's advisory lock went with its session (the client's socket closed with the process).
    wait_until(
        lambda: advisory_locks(multi, migrated) == 0, timeout=30, interval=0.2, what="the advisory lock to go"
    )
    for n, _ in enumerate(doomed, start=3):  # the lost hosts' places, so two workers poll again
        multi.start_worker(n)

    # The next dump and the next migrate run wait for the slots the dead runs held until their leases
    # run out, then complete; migrate reports the revision production is really at.
    again = trigger(client, "nightly-dump/nightly-dump", database="imagemanager-staging", prefix="staging")
    dry = trigger(client, "migrate/migrate", dry_run=True)
    final = wait_final(client, [again, dry], timeout=LEASE_SECONDS + 240)
    assert final[again].state.is_completed(), final[again].state.message
    assert final[dry].state.is_completed(), final[dry].state.message
    said = " ".join(e.message for e in run_logs(client, dry)) + " " + (final[dry].state.message or "")
    assert really_at in said, said
    freed = (held_interval(client, again)[0] - lost_at).total_seconds()  # the dead run's slot, held on
    assert freed > 0
    assert len(manifests(multi, "staging", dumped) - before) == 1
    # Its retention ran with today's clock: the dead upload is younger than a day and is left alone (it
    # could be a dump still running on another host).
    assert [u["UploadId"] for u in multipart_uploads(multi, "staging", dumped)] == [dead["UploadId"]]

    # Both lost runs are marked Crashed by the server once their heartbeats stop.
    wait_until(
        lambda: (
            state_of(client, dump).type.value == "CRASHED"
            and state_of(client, migration).type.value == "CRASHED"
        ),
        timeout=CRASH_AFTER_SECONDS + 60,
        interval=0.5,
        what="the lost runs to be marked Crashed",
    )
    assert "no heartbeat" in (state_of(client, dump).message or "")

    # Retention a day and more later aborts the dead upload (the stale-orphan rule: older than a day).
    store = S3ObjectStore(multi.s3.client(), multi.bucket, FOLDER)
    later = datetime.now(UTC) + timedelta(days=1, hours=1)
    catalog = read_catalog(store, "staging", dumped)
    plan = plan_from_catalog(catalog, RetentionPolicy(keep_last=7), later)
    cleanup = plan_cleanup(store, catalog, plan, later, "staging", dumped)
    assert [w.key for w in cleanup.incomplete] == [dead["Key"].removeprefix(f"{FOLDER}/")]
    carry_out(store, cleanup, "staging", dumped)
    assert multipart_uploads(multi, "staging", dumped) == []
    print(f"the dead dump's slot was taken again {freed:.0f} s after its host was lost")
