"""Starting the local stack (`python -m deployments.stack`, what `make run` runs) from tests, as a user on a
fresh machine would: its own Prefect server, not the test session's harness. Shared by the end-to-end
test and the several-workers test."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def stack_env() -> dict[str, str]:
    # Not the test session's harness: the stack brings its own server, as on a fresh machine.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="false",
        DBOPS_DEMO_IMAGES="3000",
        PYTHONUNBUFFERED="1",
        PREFECT_WORKER_QUERY_SECONDS="1",  # the worker picks up each triggered run within a second
        DBOPS_PREFECT_DB="postgres",  # the server on PostgreSQL, as in production (not SQLite)
    )
    return env


def default_sigint() -> None:
    """preexec_fn for a process a test starts and later stops with SIGINT (`stop_child`). A CI job started
    in the background (`cmd &`) runs pytest with SIGINT ignored, and its children inherit that. `prefect
    worker` then cannot be stopped by SIGINT (its handler re-sends the signal to itself with the inherited
    "ignore" restored), so every stop waited out its 30 s grace and ended in SIGKILL. The stack's own
    children are not affected: the stack sets its own SIGINT handler, and a handler is reset at exec."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def spawn_logged(
    argv: list[str], env: dict[str, str], log: Path, cwd: Path = ROOT
) -> subprocess.Popen[bytes]:
    """Start a server or worker a test stops later with SIGINT (`stop_child`): its output appended to
    `log`, in a session of its own (so the signal reaches its whole group), SIGINT at its default."""
    with log.open("ab") as out:
        return subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=default_sigint,
        )


def start_piped(argv: list[str], preexec_fn: Callable[[], object] | None = None) -> subprocess.Popen[str]:
    """Start `argv` from the repository root with the stack's environment, in a session of its own (so a
    test can signal its whole process group), its output and errors as text on one pipe."""
    return subprocess.Popen(
        argv,
        cwd=ROOT,
        env=stack_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=preexec_fn,
    )


def follow(proc: subprocess.Popen[str], lines: list[str], marker: str, seen: threading.Event) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if marker in line:
            seen.set()
    seen.set()  # the process ended: wake the waiter, which then sees the exit code


def drain_prefect_clients(timeout: float = 30.0) -> list[str]:
    """Send what this process's Prefect log and event workers still hold, while the servers it was meant
    for still answer; returns the workers that did not finish within `timeout`. A test module that talked
    to a server of its own (block loads emit events) calls it before stopping that server, so nothing is
    left queued for a server that is gone when the session's harness drains at the end."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    stuck = []
    for worker in (APILogWorker, EventsWorker):
        drained = worker.drain_all(timeout=timeout)  # (done, not done): called outside an event loop
        assert isinstance(drained, tuple), drained
        if drained[1]:
            stuck.append(worker.__name__)
    return stuck
