"""The local stack's lifecycle pieces that need no running stack: a shutdown that survives a dead
terminal, the port kept across restarts, pid files that are never trusted blindly, a second shell that
finds the server (or says none answers), and the one-line output of triggered runs. The whole stack is
exercised in tests/test_stack_e2e.py."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

from deployments import stackstate
from deployments.cli import main
from deployments.stack import port_free
from deployments.trigger import brief_log, final_sentence
from flows.core.postgres import version_text
from flows.tasks.reindex import skipped_summary
from tests.conftest import make_local_block
from tests.harness.pg import free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent


# -- item 1: the shutdown goes on when the terminal (a `tee`) is gone ------------------------------------

STOP_WITH_DEAD_STDOUT = textwrap.dedent(
    """
    import signal
    import sys
    from pathlib import Path
    from deployments import stack as st

    # The stack's children are Prefect CLIs, which set their own SIGINT handler; this stand-in child is a
    # plain Python program and would inherit SIGINT ignored from a CI job started in the background (`&`),
    # making the stop wait out its 30 s grace before SIGKILL.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    state = Path(sys.argv[1])
    st.STACK_LOG[:] = [state / "stack.log"]
    s = st.Stack(state)
    proc = s.spawn("web server", ["http.server", "0", "--bind", "127.0.0.1"])
    (state / "child.pid").write_text(str(proc.pid))
    sys.stdin.readline()  # the test closes its end of our stdout, then says go
    for _ in range(3):
        st.log("the reader of this pipe is gone")
    s.stop()
    """
)


def test_shutdown_completes_and_is_logged_when_stdout_is_a_dead_pipe(tmp_path: Path) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", STOP_WITH_DEAD_STDOUT, str(tmp_path)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    pid_file = tmp_path / "child.pid"
    wait_until(pid_file.exists, timeout=60, what="the stack's child process")
    server = int(pid_file.read_text())
    assert child.stdout is not None
    assert child.stdin is not None
    child.stdout.close()  # what `tee` dying with the Ctrl-C does to the pipe
    child.stdin.write("go\n")
    child.stdin.close()
    try:
        assert child.wait(timeout=60) == 0
    finally:
        if stackstate.alive(server):
            stackstate.stop_pid(server)
    assert not stackstate.alive(server)
    assert "stopped web server" in (tmp_path / "stack.log").read_text()


# -- item 3: the same port after a restart ---------------------------------------------------------------


def test_a_port_whose_old_connections_are_in_time_wait_is_reused() -> None:
    port = free_port()
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
    listener.bind(("127.0.0.1", port))
    listener.listen()
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = listener.accept()
    conn.close()  # the server closes first: its side of the connection goes to TIME-WAIT
    client.close()
    listener.close()
    assert port_free(port)


def test_a_port_another_program_listens_on_is_not_taken() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        assert not port_free(holder.getsockname()[1])


# -- item 2: pid files are trusted only while they name what the stack started ---------------------------


def test_a_pid_file_naming_another_program_or_a_dead_process_is_ignored(tmp_path: Path) -> None:
    other = subprocess.Popen(["cat"], stdin=subprocess.PIPE)  # alive, but not a Prefect server
    try:
        stackstate.write_pid(tmp_path, "prefect-server", other.pid)
        assert stackstate.live_pid(tmp_path, "prefect-server") is None
    finally:
        other.kill()
        other.wait()
    stackstate.write_pid(tmp_path, "prefect-worker", other.pid)  # now dead
    assert stackstate.live_pid(tmp_path, "prefect-worker") is None
    assert stackstate.live_pid(tmp_path, "stack") is None  # no file at all


# -- item 4: a second shell -------------------------------------------------------------------------------


def test_dbops_without_a_server_says_so_instead_of_block_does_not_exist(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DBOPS_STATE_DIR", str(tmp_path))
    argv = ["backups", "list", "--storage", "local-file-system/imagemanager-backups", "--prefix", "prod"]
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert main(argv) == 3
        err = capsys.readouterr().err
        assert "no Prefect server to talk to" in err
        assert "make run" in err
        assert "does not exist" not in err
        stackstate.write_api_url(tmp_path, f"http://127.0.0.1:{free_port()}/api")  # a stack that stopped
        assert main(argv) == 3
        err = capsys.readouterr().err
        assert "does not answer" in err
        assert "the local stack in" in err
        assert "does not exist" not in err


@pytest.mark.usefixtures("prefect_api")
def test_dbops_finds_the_local_stacks_server_when_prefect_api_url_is_unset(
    tmp_path: Path, unique: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = str(get_current_settings().api.url)
    storage = make_local_block(f"stack-{unique}", tmp_path / "backups")
    monkeypatch.setenv("DBOPS_STATE_DIR", str(tmp_path / "state"))
    stackstate.write_api_url(tmp_path / "state", url)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert main(["backups", "list", "--storage", storage, "--prefix", "prod"]) == 0
    said = capsys.readouterr()
    assert f"Prefect server {url} (the local stack in {tmp_path / 'state'})" in said.err
    assert "no backups under" in said.out


# -- item 6: a run's outcome in a few lines -----------------------------------------------------------------

TRACEBACK_LOG = """Encountered exception during execution:
Traceback (most recent call last):
  File "/x/prefect/flow_engine.py", line 1, in begin_run
    result = call()
  File "/x/flows/migrate.py", line 2, in migrate
    raise MigrationRefused("target 0099 is not in the Alembic tree; pass a revision it knows")
flows.core.errors.MigrationRefused: target 0099 is not in the Alembic tree; pass a revision it knows"""


def test_a_traceback_in_a_runs_log_prints_as_one_line() -> None:
    assert brief_log(TRACEBACK_LOG) == (
        "Encountered exception during execution: flows.core.errors.MigrationRefused: target 0099 is not in "
        "the Alembic tree; pass a revision it knows"
    )
    assert brief_log("dumped 3 MB") == "dumped 3 MB"
    assert final_sentence(
        "Flow run encountered an exception: MigrationRefused: target 0099 is not in the Alembic tree"
    ) == ("target 0099 is not in the Alembic tree")


# -- item 8: small wording ---------------------------------------------------------------------------


def test_versions_print_the_way_people_write_them() -> None:
    assert version_text(150018) == "15.18"
    assert version_text(170000) == "17.0"
    assert version_text(90624) == "9.6.24"


def test_reindex_log_says_why_indexes_were_skipped() -> None:
    reasons = (
        ["under the minimum size"] * 7 + ["not selected"] * 2 + ["BRIN (skipped: bug)", "system catalog"]
    )
    assert skipped_summary(reasons) == "10 skipped (7 below min size, 2 excluded, 1 BRIN)"
    assert skipped_summary(["system catalog"]) == "0 skipped"


# -- issue 16: the Prefect server's database, several workers, crashed runs ------------------------------


def test_the_prefect_database_setting_reaches_only_the_server_and_never_names_the_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from deployments.stack import Stack
    from flows.core.errors import StackError

    monkeypatch.delenv("DBOPS_PREFECT_DB", raising=False)
    where, env = Stack(tmp_path).prefect_database()
    assert where.startswith("SQLite in ")
    assert env == {}
    url = "postgresql+asyncpg://prefect:s3cret@db.internal:5432/prefect"
    monkeypatch.setenv("DBOPS_PREFECT_DB", url)
    stack = Stack(tmp_path)
    where, env = stack.prefect_database()
    assert env == {"PREFECT_API_DATABASE_CONNECTION_URL": url}
    assert "s3cret" not in where
    assert "db.internal" in where
    assert "DBOPS_PREFECT_DB" not in stack.env  # workers and their flow runs never see it
    monkeypatch.setenv("DBOPS_PREFECT_DB", "postgres")
    with pytest.raises(StackError, match="postgresql\\+asyncpg://"):
        Stack(tmp_path).prefect_database()  # no sandbox cluster (DBOPS_DATABASE_URL): a URL is needed
    monkeypatch.setenv("DBOPS_PREFECT_DB", "mysql://root:pw@h/db")
    with pytest.raises(StackError, match="not understood") as refused:
        Stack(tmp_path).prefect_database()
    assert "pw" not in str(refused.value)


def test_the_db_slot_lease_is_prefects_default_and_never_shorter_than_the_server_accepts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flows.core.errors import ConfigurationError
    from flows.tasks.common import lock_lease_seconds

    monkeypatch.delenv("DBOPS_LOCK_LEASE_SECONDS", raising=False)
    assert lock_lease_seconds() == 300
    monkeypatch.setenv("DBOPS_LOCK_LEASE_SECONDS", "120")
    assert lock_lease_seconds() == 120
    for bad in ("30", "five minutes"):
        monkeypatch.setenv("DBOPS_LOCK_LEASE_SECONDS", bad)
        with pytest.raises(ConfigurationError, match="DBOPS_LOCK_LEASE_SECONDS"):
            lock_lease_seconds()


def test_a_run_is_declared_crashed_only_well_after_its_heartbeat_period() -> None:
    from deployments.crash_detection import crash_automation, detection_seconds

    assert detection_seconds({}) == 90  # three heartbeats of 30 s
    assert detection_seconds({"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "60"}) == 180
    assert detection_seconds({"DBOPS_CRASH_DETECTION_SECONDS": "40"}) == 40
    with pytest.raises(ValueError, match="longer than the heartbeat period"):
        detection_seconds({"DBOPS_CRASH_DETECTION_SECONDS": "30"})
    automation = crash_automation(40)
    assert automation.trigger.within.total_seconds() == 40
    assert automation.trigger.after == {"prefect.flow-run.heartbeat"}
    assert "prefect.flow-run.Completed" in automation.trigger.expect
    assert automation.actions[0].state.value == "CRASHED"


def test_each_worker_has_a_directory_of_its_own_and_every_one_is_found_again(tmp_path: Path) -> None:
    from deployments.stack import worker_argv, worker_home

    homes = [worker_home(tmp_path, n) for n in (1, 2)]
    assert homes[0] != homes[1]
    for home in homes:
        assert (home / "flows").resolve() == ROOT / "flows"
        assert (home / "prefect.yaml").resolve() == ROOT / "prefect.yaml"
    assert worker_home(tmp_path, 1) == homes[0]  # a restart reuses it
    assert worker_argv("w", 2)[-2:] == ["--limit", "2"]
    assert "--limit" not in worker_argv("w")
    for n in (1, 2):
        stackstate.write_pid(tmp_path, f"prefect-worker-{n}", 1)
    assert stackstate.recorded_workers(tmp_path) == ["prefect-worker-1", "prefect-worker-2"]
    assert stackstate.live_pid(tmp_path, "prefect-worker-2") is None  # pid 1 is no worker
