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
    import sys
    from pathlib import Path
    from deployments import stack as st

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
