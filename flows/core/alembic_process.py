"""Running the Alembic driver (`flows.core.alembic_driver`) in a child Python, and what that child sees.

The application's convention (see ARCHITECTURE.md): `DATABASE_URL` is a SQLAlchemy URL without the
password, online and offline (`--sql`) alike; the password travels in a private passfile (`PGPASSFILE`,
read by libpq and asyncpg alike), never in `PGPASSWORD`. The child sees an allowlisted environment
(`alembic_environment`): the worker's cloud and Prefect credentials stay with the worker.

The child runs `python -m flows.core.alembic_driver` with cwd = the folder of alembic.ini, so the folder
that holds the `flows` package goes first on its PYTHONPATH (`driver_pythonpath`): the driver is found
from any working directory, whether dbops runs from a checkout or is installed elsewhere.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flows.core.alembic_errors import AlembicError, MigrationTimeout
from flows.core.childenv import child_environment
from flows.core.postgres import ConnParams, libpq_environment, scrub
from flows.core.session_watchdog import SessionWatchdog

#: The module the child runs with `python -m`.
DRIVER_MODULE = "flows.core.alembic_driver"

#: What the Alembic child inherits from the worker: what Python, locales and TLS need, nothing else.
#: Beyond what every child gets (flows.core.childenv): what a Python child needs to find its packages.
_PYTHON_NAMES = ("PYTHONPATH", "VIRTUAL_ENV")
#: Never passed, even when listed: the password goes only through the passfile.
REFUSED_NAMES = frozenset({"PGPASSWORD"})


def alembic_environment(
    params: ConnParams | None,
    database_url: str | None,
    *,
    passfile: str | None = None,
    application_name: str | None = None,
    pgoptions: str | None = None,
    pass_env: Iterable[str] = (),
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of an Alembic child: an allowlist of the worker's variables, `pass_env` (names the
    application's env.py needs, copied as they are), then the database convention: DATABASE_URL, the
    passfile, sslmode, application_name, connect timeout and PGOPTIONS.

    Why an allowlist: the worker holds cloud and Prefect credentials (AWS_*, PREFECT_API_KEY) that the
    application's env.py and revisions have no business seeing, and a crash dump or a revision that logs
    its environment would spread them.
    """
    base = os.environ if base is None else base
    env = child_environment(environ=base)
    env.update({k: base[k] for k in _PYTHON_NAMES if k in base})
    for name in pass_env:
        if name in base and name not in REFUSED_NAMES:
            env[name] = base[name]
    # after pass_env: the child runs `python -m flows.core.alembic_driver`, whatever else is listed
    env["PYTHONPATH"] = driver_pythonpath(base.get("PYTHONPATH"))
    if database_url is not None:
        env["DATABASE_URL"] = database_url
    if params is not None:
        env.update(
            PGSSLMODE=params.sslmode,
            PGAPPNAME=application_name or params.application_name,
            PGCONNECT_TIMEOUT=str(params.connect_timeout),
        )
    if passfile is not None:
        env["PGPASSFILE"] = passfile
    if pgoptions:
        env["PGOPTIONS"] = pgoptions
    return env


@dataclass(frozen=True)
class SessionGuard:
    """The timeouts of one migration run and the application_name that lets the watchdog find it."""

    lock_timeout_ms: int
    statement_timeout_ms: int
    application_name: str = field(default_factory=lambda: f"dbops-migrate-{secrets.token_hex(6)}")

    def settings(self) -> dict[str, str]:
        return {
            "application_name": self.application_name,
            "lock_timeout": str(int(self.lock_timeout_ms)),
            "statement_timeout": str(int(self.statement_timeout_ms)),
        }

    def pgoptions(self) -> str:
        lock, statement = int(self.lock_timeout_ms), int(self.statement_timeout_ms)
        return f"-c lock_timeout={lock} -c statement_timeout={statement}"


@contextmanager
def driver_passfile(params: ConnParams | None) -> Iterator[str | None]:
    """A 0600 passfile in a private directory, removed afterwards (the same writer as pg_dump's)."""
    if params is None:
        yield None
        return
    with libpq_environment(params) as env:
        yield env["PGPASSFILE"]


def driver_pythonpath(existing: str | None = None) -> str:
    """The child's PYTHONPATH: the folder holding the `flows` package first, then the worker's own."""
    root = str(Path(__file__).resolve().parents[2])  # flows/core/alembic_process.py -> the folder of flows
    rest = [p for p in (existing or "").split(os.pathsep) if p and p != root]
    return os.pathsep.join([root, *rest])


@dataclass(frozen=True)
class DriverCall:
    """Where and how the driver runs: one application's alembic.ini, interpreter and limits."""

    ini_path: Path
    python: str
    timeout_s: float
    pass_env: tuple[str, ...] = ()
    watchdog_poll_s: float = 0.2


def run_driver(
    call: DriverCall,
    command: str,
    *args: str,
    params: ConnParams | None = None,
    database_url: str | None = None,
    offline: bool = False,
    guard: SessionGuard | None = None,
    watchdog: list[SessionWatchdog] | None = None,
) -> tuple[dict[str, Any], str]:
    """Run the driver; returns its JSON answer and the scrubbed tail of its stderr.

    `offline`: DATABASE_URL as online, but no password (nothing connects). `guard`: the timeouts go
    through the driver's channel and a SessionWatchdog watches the run (appended to `watchdog`).
    """
    password = params.password if params else None
    with tempfile.TemporaryDirectory(prefix="dbops-alembic-") as tmp, ExitStack() as stack:
        result_path = Path(tmp) / "result.json"
        passfile = None if offline else stack.enter_context(driver_passfile(params))
        env = alembic_environment(
            params,
            database_url,
            passfile=passfile,
            application_name=guard.application_name if guard else None,
            pgoptions=guard.pgoptions() if guard else None,
            pass_env=call.pass_env,
        )
        dog = None
        if guard is not None and params is not None:
            dog = SessionWatchdog(
                params,
                guard.application_name,
                lock_timeout_ms=guard.lock_timeout_ms,
                statement_timeout_ms=guard.statement_timeout_ms,
                poll_s=call.watchdog_poll_s,
                blind_limit_s=max(5.0, guard.lock_timeout_ms / 1000),
            )
            stack.enter_context(dog)  # connects first: no watchdog, no migration
            if watchdog is not None:
                watchdog.append(dog)
        session = json.dumps(guard.settings() if guard else {})
        argv = [call.python, "-m", DRIVER_MODULE, str(result_path), str(call.ini_path), session, command]
        proc = subprocess.Popen(
            [*argv, *args],
            cwd=call.ini_path.parent,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        if dog is not None:
            dog.on_blind = proc.kill
        try:
            stdout, stderr = proc.communicate(timeout=call.timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            if dog is not None:
                dog.end_sessions()
            raise MigrationTimeout(
                f"alembic {command} {' '.join(args)} did not finish within {call.timeout_s:.0f} s and "
                "was stopped; check for a long-running revision or raise the timeout"
            ) from None
        except BaseException:
            proc.kill()
            proc.wait()
            if dog is not None:
                dog.end_sessions()
            raise
        tail = scrub("\n".join((stderr or "").splitlines()[-40:]), password)
        if dog is not None and dog.blind_for is not None:
            dog.end_sessions()  # in case the server can be reached again
            answer = read_driver_answer(result_path, command) if result_path.exists() else {}
            return {**answer, "blind": dog.blind_for}, tail
        if not result_path.exists():
            last = scrub(last_line(stderr or stdout or "no output"), password)
            raise AlembicError(
                f"alembic {command} exited with code {proc.returncode} before answering ({last}); "
                f"run it by hand in {call.ini_path.parent} to see why"
            )
        return read_driver_answer(result_path, command), tail


def read_driver_answer(path: Path, command: str) -> dict:
    """The driver's JSON answer; one cut short (the child killed while writing it) is an AlembicError."""
    try:
        answer = json.loads(path.read_text())
    except ValueError as exc:
        raise AlembicError(
            f"alembic {command} left an unreadable answer ({exc}); the database may be part way through: "
            "check its revision with `alembic current` before running the migration again"
        ) from None
    if not isinstance(answer, dict):
        raise AlembicError(f"alembic {command} answered {type(answer).__name__}, not an object; report a bug")
    return answer


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no output"
