"""What the local stack (`make run`) records in its state folder, so the next start and a second shell
find what is running.

    <state>/run/stack.pid            the `make run` process serving this state folder
    <state>/run/prefect-server.pid   the Prefect server it started
    <state>/run/prefect-worker.pid   the process worker it started (`prefect-worker-<n>.pid` for several)
    <state>/run/api-url              the server's API URL (what `dbops` in a second shell talks to)

A pid is only trusted while that process is alive *and* its command line is still the one recorded:
a pid reused by an unrelated program after a reboot is never signalled. No Prefect import here: the
`dbops` command reads this before it configures Prefect.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

# What identifies each process in /proc/<pid>/cmdline (a pid file whose process does not match is stale).
SIGNATURES = {
    "stack": ("deployments.stack",),
    "prefect-server": ("server", "start"),
    "prefect-worker": ("worker", "start"),
}


def default_state() -> Path:
    """The state folder `make run` uses: $DBOPS_STATE_DIR, else `.state` at the repository root."""
    return Path(os.environ.get("DBOPS_STATE_DIR") or ROOT / ".state").resolve()


def run_dir(state: Path) -> Path:
    return state / "run"


def write_pid(state: Path, name: str, pid: int) -> None:
    path = run_dir(state) / f"{name}.pid"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{pid}\n")


def forget(state: Path, name: str) -> None:
    (run_dir(state) / f"{name}.pid").unlink(missing_ok=True)


def live_pid(state: Path, name: str) -> int | None:
    """The recorded pid of `name` when that process still runs and is still what we started."""
    try:
        pid = int((run_dir(state) / f"{name}.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _matches(pid, _signature(name)) else None


def _signature(name: str) -> tuple[str, ...]:
    """`prefect-worker-2` is a worker like `prefect-worker`."""
    if name.startswith("prefect-worker"):
        return SIGNATURES["prefect-worker"]
    return SIGNATURES[name]


def recorded_workers(state: Path) -> list[str]:
    """The names of every worker a run recorded (one, or `prefect-worker-<n>` for several)."""
    return sorted(p.name.removesuffix(".pid") for p in run_dir(state).glob("prefect-worker*.pid"))


def _matches(pid: int, words: tuple[str, ...]) -> bool:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    if not raw or _is_zombie(pid):
        return False
    argv = raw.decode(errors="replace").split("\0")
    return all(any(word in arg for arg in argv) for word in words)


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] in ("Z", "X")


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists() and not _is_zombie(pid)


def stop_pid(pid: int, timeout: float = 30.0) -> None:
    """SIGINT to the process group a stack process leads (it was started in its own session), SIGKILL
    after `timeout`. For processes that are not our children (leftovers of an earlier run)."""
    for sig, wait in ((signal.SIGINT, timeout), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        except PermissionError:
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not alive(pid):
                return
            time.sleep(0.1)  # polling a process's exit, not waiting for time to pass


def stop_child(proc: subprocess.Popen[Any], timeout: float = 30.0) -> None:
    """SIGINT to the process group a child of ours leads (it was started in its own session), SIGKILL
    after `timeout`; waiting on the child reaps it. For processes this run started (see `stop_pid`)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def write_api_url(state: Path, url: str) -> None:
    path = run_dir(state) / "api-url"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(url + "\n")


def recorded_api_url(state: Path) -> str | None:
    try:
        return (run_dir(state) / "api-url").read_text().strip() or None
    except OSError:
        return None
