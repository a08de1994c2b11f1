"""Running an application's own Alembic tree, always in a subprocess.

Alembic's command API keeps global state (the `context` and `op` proxies, logging set up by env.py),
so nothing of it runs in our process: the driver (`flows.core.alembic_driver`, run with `python -m` by
`flows.core.alembic_process`) runs in a child Python with cwd = the folder of `alembic.ini`, and writes its
answer as JSON to a file we read back. The revision arithmetic is `flows.core.alembic_tree`, the errors
`flows.core.alembic_errors`.

The application's convention (see ARCHITECTURE.md): `DATABASE_URL` is a SQLAlchemy URL without the
password, online and offline (`--sql`) alike; the password travels in a private passfile (`PGPASSFILE`,
read by libpq and asyncpg alike), never in `PGPASSWORD`. The child sees an allowlisted environment
(`alembic_environment`): the worker's cloud and Prefect credentials stay with the worker.

lock_timeout / statement_timeout reach every session through the driver's own channel: the driver
hooks SQLAlchemy's `do_connect` and adds `options=-c ...` for psycopg (and `PGOPTIONS` is set for any
other libpq user) or `server_settings` for asyncpg, which ignores `PGOPTIONS`. Independently of the
driver, a `SessionWatchdog` in dbops watches the sessions of the run's unique application_name and
cancels a lock wait or statement that outlives its timeout (then it counts as a lock timeout, or a
statement timeout, like PostgreSQL's own).

Only linear trees and trees whose branches are merged again are supported: several heads are refused.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy.engine import URL

from flows.core.alembic_errors import (
    AlembicConfigMissing,
    LockTimeout,
    MigrationFailed,
    RevisionMoved,
    WatchdogBlind,
)
from flows.core.alembic_process import REFUSED_NAMES, DriverCall, SessionGuard, run_driver
from flows.core.alembic_result import RunResult, StepResult
from flows.core.alembic_tree import Revision, RevisionTree
from flows.core.errors import ConfigurationError, DbopsError, MigrationConnectionLost
from flows.core.postgres import ConnParams, classify_connect_error, scrub
from flows.core.session_watchdog import LOCK, STATEMENT, SessionWatchdog

_CONNECT_FAILURES = (
    "authentication failed",
    "Connection refused",
    "connection to server",
    "no pg_hba.conf entry",
    "could not translate host name",
)
LOCK_NOT_AVAILABLE = "55P03"  # PostgreSQL errcodes.txt: lock_not_available
QUERY_CANCELED = "57014"  # statement_timeout


class OfflineSql(dict[str, str]):
    """{revision: offline SQL}, in migration order; revisions whose SQL cannot be rendered (they read
    data through the connection, say) are not keys but in `failed` ({revision: one line why})."""

    def __init__(self) -> None:
        super().__init__()
        self.failed: dict[str, str] = {}

    @property
    def sql(self) -> dict[str, str]:
        return dict(self)


@dataclass
class AlembicApp:
    """An application's Alembic tree, driven in subprocesses.

    Examples:
        app = AlembicApp(Path("examples/imagemanager/alembic.ini"))
        todo = app.pending(app.current(params), "head")
        app.upgrade(params, "head", lock_timeout_ms=5000, statement_timeout_ms=0)
    """

    ini_path: Path
    driver: str = "postgresql+psycopg"
    python: str = field(default_factory=lambda: sys.executable)
    timeout_s: float = 6 * 3600  # per subprocess: one revision, or one listing
    #: names of worker environment variables the application's env.py needs besides DATABASE_URL
    pass_env: tuple[str, ...] = ()
    watchdog_poll_s: float = 0.2
    _tree: RevisionTree | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.ini_path = Path(self.ini_path).resolve()
        if not self.ini_path.is_file():
            raise AlembicConfigMissing(
                f"no alembic.ini at {self.ini_path}; point the migrate deployment at the application's "
                "alembic.ini"
            )
        self.pass_env = tuple(self.pass_env)
        refused = sorted(set(self.pass_env) & REFUSED_NAMES)
        if refused:
            raise ConfigurationError(
                f"{', '.join(refused)} cannot be passed to Alembic: the password reaches it through a "
                "private passfile; remove it from the migrate option alembic_env"
            )

    # -- subprocess plumbing -------------------------------------------------------------------------

    def database_url(self, params: ConnParams) -> str:
        """A SQLAlchemy URL without password: safe to log."""
        url = URL.create(
            self.driver, username=params.user, host=params.host, port=params.port, database=params.database
        )
        return url.render_as_string(hide_password=False)

    def _run(
        self,
        command: str,
        *args: str,
        params: ConnParams | None = None,
        offline: bool = False,
        guard: SessionGuard | None = None,
        watchdog: list[SessionWatchdog] | None = None,
    ) -> tuple[dict[str, Any], str]:
        """Run the driver (see `alembic_process.run_driver`) for this application."""
        call = DriverCall(self.ini_path, self.python, self.timeout_s, self.pass_env, self.watchdog_poll_s)
        return run_driver(
            call,
            command,
            *args,
            params=params,
            database_url=self.database_url(params) if params is not None else None,
            offline=offline,
            guard=guard,
            watchdog=watchdog,
        )

    # -- the tree ------------------------------------------------------------------------------------

    def tree(self) -> RevisionTree:
        """The revision tree, read once per AlembicApp."""
        if self._tree is None:
            answer, _ = self._run("scripts")
            self._tree = RevisionTree.from_answer(self.ini_path.parent, answer)
        return self._tree

    def history(self) -> list[Revision]:
        """All revisions, newest first (Alembic's walk order); cached per AlembicApp."""
        return list(self.tree().revisions)

    def heads(self) -> list[str]:
        return list(self.tree().heads)

    def head(self) -> str:
        return self.tree().head()

    def check_known(self, current: list[str], database: str = "the database") -> None:
        self.tree().check_known(current, database)

    def pending(self, current: list[str], target: str = "head") -> list[str]:
        """Revisions to apply, oldest first, to bring `current` to `target`."""
        return self.tree().pending(current, target)

    def offline_sql(
        self, from_rev: str | None, to_rev: str = "head", params: ConnParams | None = None
    ) -> OfflineSql:
        """`alembic upgrade prev:rev --sql` for each revision in (from_rev, to_rev], in order.

        With `params`, env.py gets the DATABASE_URL of that database (same driver as online, no
        password: nothing connects), so an env.py that reads os.environ["DATABASE_URL"] renders too.
        """
        tree = self.tree()
        current = [] if from_rev in (None, "base") else [tree.resolve(from_rev) or ""]
        todo = tree.pending([c for c in current if c], to_rev)
        pairs = tree.offline_pairs(todo)
        if not pairs:
            return OfflineSql()
        answer, _ = self._run("offline", *pairs, params=params, offline=True)
        result = OfflineSql()
        for rev in todo:  # keep the migration order
            if rev in answer["sql"]:
                result[rev] = answer["sql"][rev]
            else:
                result.failed[rev] = answer["failed"].get(rev, "no SQL produced")
        return result

    # -- the database --------------------------------------------------------------------------------

    def current(self, params: ConnParams) -> list[str]:
        """Revisions stamped in the database (empty when none); unknown ones raise UnknownRevision."""
        answer, tail = self._run("current", params=params)
        if "error" in answer:
            raise self._error(answer["error"], params, tail, "reading the current revision", None)
        current = sorted(answer["current"])
        self.history()
        self.check_known(current, f"database {params.database!r}")
        return current

    def upgrade(
        self,
        params: ConnParams,
        target: str = "head",
        *,
        lock_timeout_ms: int = 5000,
        statement_timeout_ms: int = 0,
        start: list[str] | None = None,
    ) -> RunResult:
        """Apply pending revisions one at a time (`alembic upgrade <next id>`), timing each.

        The steps run in one subprocess (after one that reads the current revision, unless the caller
        just read it and passes `start`), which re-checks that the database is still where the plan
        started. A LockTimeout names the revision that waited (`exc.revision`, `exc.result` has the steps
        done); the revisions before it stay applied.
        """
        start = self.current(params) if start is None else sorted(start)
        todo = self.pending(start, target)
        return self._migrate(
            params,
            "upgrade",
            start,
            target,
            [(rev, rev) for rev in todo],
            lock_timeout_ms,
            statement_timeout_ms,
        )

    def downgrade(
        self,
        params: ConnParams,
        target: str,
        *,
        lock_timeout_ms: int = 5000,
        statement_timeout_ms: int = 0,
        allow_empty_downgrade: bool = False,
        start: list[str] | None = None,
    ) -> RunResult:
        """Undo revisions one at a time down to `target` (a revision id or 'base'); `start` as in upgrade."""
        start = self.current(params) if start is None else sorted(start)
        steps = self.tree().downgrade_steps(start, target, allow_empty_downgrade=allow_empty_downgrade)
        return self._migrate(params, "downgrade", start, target, steps, lock_timeout_ms, statement_timeout_ms)

    def _migrate(
        self,
        params: ConnParams,
        direction: str,
        start: list[str],
        target: str,
        steps: list[tuple[str, str]],
        lock_timeout_ms: int,
        statement_timeout_ms: int,
    ) -> RunResult:
        """One subprocess runs the steps one revision at a time, timing each (interpreter start-up once)."""
        result = RunResult(start=start, target=target, end=list(start))
        if not steps:
            return result
        guard = SessionGuard(int(lock_timeout_ms), int(statement_timeout_ms))
        watched: list[SessionWatchdog] = []
        answer, tail = self._run(
            "migrate",
            direction,
            ",".join(start),
            *(f"{to} {rev}" for to, rev in steps),
            params=params,
            guard=guard,
            watchdog=watched,
        )
        cancelled_for = watched[0].reason if watched else None
        result.log_tail = tail
        result.steps = [StepResult(s["rev"], direction, float(s["seconds"])) for s in answer.get("steps", [])]
        result.end = list(answer.get("end") or [])
        if "blind" in answer:
            done = len(answer.get("steps", []))
            raise WatchdogBlind(
                f"the {direction} on {params.where} was stopped because dbops could not watch its locks for "
                f"{answer['blind']:.0f} s (its own connection to the server was lost and could not be made "
                "again); check the server, then run the migration again (revisions done before stay applied)",
                revision=steps[done][1] if done < len(steps) else None,
                result=result,
                log_tail=tail,
            )
        if answer.get("moved"):
            raise RevisionMoved(
                f"database {params.database!r} moved from revision {', '.join(start) or 'base'} to "
                f"{', '.join(answer.get('start') or []) or 'base'} while this run was planning; check that "
                "no other migration is running, then start again"
            )
        if "error" in answer:
            rev = answer.get("failed_at")
            doing = f"{direction} of revision {rev}" if rev else "reading the current revision"
            seconds = answer.get("seconds")  # how long the failed step ran
            raise self._error(answer["error"], params, tail, doing, rev, result, cancelled_for, seconds)
        return result

    def _error(
        self,
        err: dict,
        params: ConnParams,
        tail: str,
        doing: str,
        rev: str | None,
        result: RunResult | None = None,
        cancelled_for: str | None = None,
        seconds: float | None = None,
    ) -> DbopsError:
        """`cancelled_for`: why the SessionWatchdog cancelled a statement of this run (LOCK, STATEMENT);
        `seconds`: how long the failed step ran. Reading the revision (no `result`) fails with the plain
        connection error; a run that lost its connection fails with MigrationConnectionLost, which keeps
        that error's sentence and `transient` flag and adds what the run did."""
        message = scrub(err.get("message") or err.get("type") or "unknown error", params.password)
        detail = scrub(err.get("detail") or "", params.password)
        sqlstate = err.get("sqlstate")
        by_watchdog = sqlstate == QUERY_CANCELED or "canceling statement" in detail
        if (
            sqlstate == LOCK_NOT_AVAILABLE
            or "lock timeout" in detail
            or "lock timeout" in tail
            or (by_watchdog and cancelled_for == LOCK)
        ):
            return LockTimeout(
                f"{doing} on {params.where} waited longer than lock_timeout for a lock and was rolled back; "
                "it will be retried (find the blocking session in pg_stat_activity if it keeps happening)",
                revision=rev,
                result=result,
                log_tail=tail,
                seconds=seconds,
            )
        if (
            "statement timeout" in detail
            or (by_watchdog and cancelled_for == STATEMENT)
            or (sqlstate == QUERY_CANCELED and cancelled_for is None)
        ):
            return MigrationFailed(
                f"{doing} on {params.where} ran longer than statement_timeout and was cancelled; raise "
                "statement_timeout for this revision or make it cheaper",
                revision=rev,
                result=result,
                log_tail=tail,
                seconds=seconds,
            )
        if sqlstate is None and any(sign in detail for sign in _CONNECT_FAILURES):
            lost = classify_connect_error(psycopg.OperationalError(detail or message), params)
            if result is None:
                return lost
            return MigrationConnectionLost(
                str(lost),
                transient=lost.transient,
                revision=rev,
                result=result,
                log_tail=tail,
                seconds=seconds,
            )
        return MigrationFailed(
            f"{doing} on {params.where} failed ({message}); fix the revision or the data it trips on, "
            "the log tail is in the run's artifact",
            revision=rev,
            result=result,
            log_tail=tail,
            seconds=seconds,
        )
