"""Running an application's own Alembic tree, always in a subprocess.

Alembic's command API keeps global state (the `context` and `op` proxies, logging set up by env.py),
so nothing of it runs in our process: a small driver script (`_DRIVER`) runs in a child Python with
cwd = the folder of `alembic.ini`, and writes its answer as JSON to a file we read back.

The application's convention (see ARCHITECTURE.md): `DATABASE_URL` is a SQLAlchemy URL without the
password, online and offline (`--sql`) alike; the password travels in a private passfile (`PGPASSFILE`,
read by libpq and asyncpg alike), never in `PGPASSWORD`. The child sees an allowlisted environment
(`alembic_environment`): the worker's cloud and Prefect credentials stay with the worker.

lock_timeout / statement_timeout reach every session through the driver's own channel: the driver script
hooks SQLAlchemy's `do_connect` and adds `options=-c ...` for psycopg (and `PGOPTIONS` is set for any
other libpq user) or `server_settings` for asyncpg, which ignores `PGOPTIONS`. Independently of the
driver, a `SessionWatchdog` in dbops watches the sessions of the run's unique application_name and
cancels a lock wait or statement that outlives its timeout (then it counts as a lock timeout, or a
statement timeout, like PostgreSQL's own).

Only linear trees and trees whose branches are merged again are supported: several heads are refused.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from sqlalchemy.engine import URL

from flows.core.childenv import child_environment
from flows.core.errors import ConfigurationError, DbopsError, TransientError
from flows.core.postgres import ConnParams, classify_connect_error, libpq_environment, scrub
from flows.core.session_watchdog import LOCK, STATEMENT, SessionWatchdog


class AlembicError(DbopsError):
    """Something about the application's Alembic tree or its run needs a person."""


class AlembicConfigMissing(ConfigurationError):
    pass


class BrokenRevisionTree(AlembicError):
    """A revision file does not load or points at a revision that does not exist."""


class MultipleHeads(AlembicError):
    pass


class UnknownRevision(AlembicError):
    """The database is stamped with a revision the tree does not know."""


class UnknownTarget(AlembicError, ConfigurationError):
    """The requested target revision is not in the tree."""


class TargetBehindCurrent(AlembicError):
    pass


class TargetAheadOfCurrent(AlembicError):
    pass


class NoDowngrade(AlembicError):
    """A revision to be downgraded has an empty or refusing downgrade()."""


class MigrationFailed(AlembicError):
    """A revision failed for a reason a retry will not fix (SQL error, bug in the revision)."""


class RevisionMoved(AlembicError):
    """The database's revision changed between planning and running: someone else migrated it."""


class MigrationTimeout(AlembicError):
    pass


class WatchdogBlind(AlembicError):
    """dbops lost sight of the migration's sessions and stopped it rather than let it wait unguarded."""


class LockTimeout(AlembicError, TransientError):
    """A revision waited longer than lock_timeout for a table lock: retry the revision later."""

    transient = True


_CONNECT_FAILURES = (
    "authentication failed",
    "Connection refused",
    "connection to server",
    "no pg_hba.conf entry",
    "could not translate host name",
)
LOCK_NOT_AVAILABLE = "55P03"  # PostgreSQL errcodes.txt: lock_not_available
QUERY_CANCELED = "57014"  # statement_timeout


@dataclass(frozen=True)
class Revision:
    id: str
    down_revisions: tuple[str, ...]
    has_downgrade: bool
    doc: str
    path: str = ""

    @property
    def down_revision(self) -> str | None:
        """The single parent (None for a root); merges have several, see `down_revisions`."""
        return self.down_revisions[0] if len(self.down_revisions) == 1 else None


@dataclass(frozen=True)
class StepResult:
    revision: str
    direction: str  # "upgrade" | "downgrade"
    seconds: float


@dataclass
class RunResult:
    start: list[str]
    target: str
    steps: list[StepResult] = field(default_factory=list)
    end: list[str] = field(default_factory=list)
    log_tail: str = ""

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.steps)


class OfflineSql(dict[str, str]):
    """{revision: offline SQL}, in migration order; revisions whose SQL cannot be rendered (they read
    data through the connection, say) are not keys but in `failed` ({revision: one line why})."""

    def __init__(self) -> None:
        super().__init__()
        self.failed: dict[str, str] = {}

    @property
    def sql(self) -> dict[str, str]:
        return dict(self)


# The script the child Python runs: argv = result_path, ini_path, session settings (JSON), command, *args.
_DRIVER = r"""
import io, json, sys, time, traceback, warnings
result_path, ini_path, session, command, *args = sys.argv[1:]

def guard_sessions(settings):
    # Every connection SQLAlchemy opens in this process, whatever engine env.py builds, gets the
    # timeouts and the run's application_name through its driver's own channel.
    if not settings:
        return
    from sqlalchemy import event
    from sqlalchemy.engine import Engine
    settings = dict(settings)
    name = settings.pop("application_name", None)

    @event.listens_for(Engine, "do_connect")
    def _guard(dialect, conn_rec, cargs, cparams):
        driver = dialect.driver or ""
        if driver == "asyncpg":
            server_settings = dict(cparams.get("server_settings") or {})
            server_settings.update(settings)
            if name:
                server_settings["application_name"] = name
            cparams["server_settings"] = server_settings
        elif driver.startswith("psycopg"):
            options = " ".join(f"-c {k}={v}" for k, v in settings.items())
            cparams["options"] = f"{cparams.get('options') or ''} {options}".strip()
            if name:
                cparams["application_name"] = name

guard_sessions(json.loads(session))

def out(obj):
    with open(result_path, "w") as f:
        json.dump(obj, f)

def describe(exc):
    orig = getattr(exc, "orig", None) or exc.__cause__ or exc
    sqlstate = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    msg = str(orig).strip() or type(orig).__name__
    return {"type": type(exc).__name__, "orig_type": type(orig).__name__, "sqlstate": sqlstate,
            "message": msg.splitlines()[0] if msg else "", "detail": msg[:4000],
            "trace": traceback.format_exc()[-4000:]}

from alembic.config import Config
from alembic.script import ScriptDirectory
from alembic import command as alembic_command

def has_downgrade(module):
    import ast, inspect
    fn = getattr(module, "downgrade", None)
    if fn is None:
        return False
    try:
        tree = ast.parse(inspect.getsource(fn).strip())
    except (OSError, TypeError, SyntaxError):
        return True
    body = tree.body[0].body
    for stmt in body:
        if isinstance(stmt, ast.Pass):
            continue
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
            continue  # docstring or ...
        if isinstance(stmt, ast.Raise):
            return False
        return True
    return False

def scripts():
    cfg = Config(ini_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            script = ScriptDirectory.from_config(cfg)
            revs = list(script.walk_revisions())
            heads = list(script.get_heads())
        except SyntaxError as exc:
            out({"broken": f"{exc.filename}: {exc.msg} at line {exc.lineno}"}); return
        except Exception as exc:
            missing = [str(w.message) for w in caught if "is not present" in str(w.message)]
            d = describe(exc)
            out({"broken": missing[0] if missing else f"{d['type']}: {d['message']}"}); return
    missing = [str(w.message) for w in caught if "is not present" in str(w.message)]
    if missing:
        out({"broken": missing[0]}); return
    rows = []
    for sc in revs:
        down = sc.down_revision
        down = [] if down is None else ([down] if isinstance(down, str) else list(down))
        rows.append({"id": sc.revision, "down": down, "doc": sc.doc or "",
                     "has_downgrade": has_downgrade(sc.module), "path": sc.path})
    out({"heads": heads, "revisions": rows})

def read_current():
    from alembic.runtime.environment import EnvironmentContext
    cfg = Config(ini_path)
    script = ScriptDirectory.from_config(cfg)
    seen = []
    def fn(rev, context):
        seen.extend(context.get_current_heads())
        return []
    with EnvironmentContext(cfg, script, fn=fn, dont_mutate=True):
        script.run_env()
    return sorted(seen)

def current():
    try:
        out({"current": read_current()})
    except Exception as exc:
        out({"error": describe(exc)})

def migrate(direction, expected, pairs):
    res = {"start": None, "steps": [], "end": None}
    try:
        res["start"] = read_current()
    except Exception as exc:
        res["error"] = describe(exc); res["failed_at"] = None; out(res); return
    if res["start"] != sorted(r for r in expected.split(",") if r):
        res["moved"] = True; out(res); return
    for pair in pairs:
        to, rev = pair.split(" ", 1)
        t0 = time.monotonic()
        try:
            getattr(alembic_command, direction)(Config(ini_path), to)
        except Exception as exc:
            res["error"] = describe(exc); res["failed_at"] = rev; res["seconds"] = time.monotonic() - t0
            break
        res["steps"].append({"rev": rev, "seconds": time.monotonic() - t0})
        out(res)  # progress survives a kill
    try:
        res["end"] = read_current()
    except Exception:
        pass
    out(res)

def offline(pairs):
    res = {"sql": {}, "failed": {}}
    for pair in pairs:
        frm, to = pair.split(" ", 1)
        buf = io.StringIO()
        cfg = Config(ini_path, output_buffer=buf)
        try:
            alembic_command.upgrade(cfg, f"{frm}:{to}", sql=True)
        except BaseException as exc:
            d = describe(exc)
            res["failed"][to] = f"{d['orig_type']}: {d['message']}"
            continue
        res["sql"][to] = buf.getvalue()
    out(res)

if command == "scripts":
    scripts()
elif command == "current":
    current()
elif command == "migrate":
    migrate(args[0], args[1], args[2:])
elif command == "offline":
    offline(args)
"""


#: What the Alembic child inherits from the worker: what Python, locales and TLS need, nothing else.
#: Beyond what every child gets (flows.core.childenv): what a Python child needs to find its packages.
_PYTHON_NAMES = ("PYTHONPATH", "VIRTUAL_ENV")
#: Never passed, even when listed: the password goes only through the passfile.
_REFUSED_NAMES = frozenset({"PGPASSWORD"})


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
        if name in base and name not in _REFUSED_NAMES:
            env[name] = base[name]
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
def _passfile(params: ConnParams | None) -> Iterator[str | None]:
    """A 0600 passfile in a private directory, removed afterwards (the same writer as pg_dump's)."""
    if params is None:
        yield None
        return
    with libpq_environment(params) as env:
        yield env["PGPASSFILE"]


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
    _history: list[Revision] | None = field(default=None, init=False, repr=False)
    _heads: list[str] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        self.ini_path = Path(self.ini_path).resolve()
        if not self.ini_path.is_file():
            raise AlembicConfigMissing(
                f"no alembic.ini at {self.ini_path}; point the migrate deployment at the application's "
                "alembic.ini"
            )
        self.pass_env = tuple(self.pass_env)
        refused = sorted(set(self.pass_env) & _REFUSED_NAMES)
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
    ) -> tuple[dict, str]:
        """Run the driver; returns its JSON answer and the scrubbed tail of its stderr.

        `offline`: DATABASE_URL as online, but no password (nothing connects). `guard`: the timeouts go
        through the driver's channel and a SessionWatchdog watches the run (appended to `watchdog`).
        """
        password = params.password if params else None
        with tempfile.TemporaryDirectory(prefix="dbops-alembic-") as tmp, ExitStack() as stack:
            result_path = Path(tmp) / "result.json"
            passfile = None if offline else stack.enter_context(_passfile(params))
            env = alembic_environment(
                params,
                self.database_url(params) if params is not None else None,
                passfile=passfile,
                application_name=guard.application_name if guard else None,
                pgoptions=guard.pgoptions() if guard else None,
                pass_env=self.pass_env,
            )
            dog = None
            if guard is not None and params is not None:
                dog = SessionWatchdog(
                    params,
                    guard.application_name,
                    lock_timeout_ms=guard.lock_timeout_ms,
                    statement_timeout_ms=guard.statement_timeout_ms,
                    poll_s=self.watchdog_poll_s,
                    blind_limit_s=max(5.0, guard.lock_timeout_ms / 1000),
                )
                stack.enter_context(dog)  # connects first: no watchdog, no migration
                if watchdog is not None:
                    watchdog.append(dog)
            session = json.dumps(guard.settings() if guard else {})
            proc = subprocess.Popen(
                [self.python, "-c", _DRIVER, str(result_path), str(self.ini_path), session, command, *args],
                cwd=self.ini_path.parent,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            if dog is not None:
                dog.on_blind = proc.kill
            try:
                stdout, stderr = proc.communicate(timeout=self.timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                if dog is not None:
                    dog.end_sessions()
                raise MigrationTimeout(
                    f"alembic {command} {' '.join(args)} did not finish within {self.timeout_s:.0f} s and "
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
                answer = json.loads(result_path.read_text()) if result_path.exists() else {}
                return {**answer, "blind": dog.blind_for}, tail
            if not result_path.exists():
                last = scrub(_last_line(stderr or stdout or "no output"), password)
                raise AlembicError(
                    f"alembic {command} exited with code {proc.returncode} before answering ({last}); "
                    f"run it by hand in {self.ini_path.parent} to see why"
                )
            return json.loads(result_path.read_text()), tail

    # -- the tree ------------------------------------------------------------------------------------

    def history(self) -> list[Revision]:
        """All revisions, newest first (Alembic's walk order); cached per AlembicApp."""
        if self._history is None:
            answer, _ = self._run("scripts")
            if "broken" in answer:
                reason = answer["broken"].strip().rstrip(".")
                raise BrokenRevisionTree(
                    f"the Alembic tree at {self.ini_path.parent} is broken ({reason}); fix or remove that "
                    "revision file in the application before migrating"
                )
            self._history = [
                Revision(r["id"], tuple(r["down"]), bool(r["has_downgrade"]), r["doc"], r["path"])
                for r in answer["revisions"]
            ]
            self._heads = list(answer["heads"])
        return list(self._history)

    def heads(self) -> list[str]:
        self.history()
        return list(self._heads)

    def head(self) -> str:
        heads = self.heads()
        if len(heads) != 1:
            raise MultipleHeads(
                f"the Alembic tree at {self.ini_path.parent} has {len(heads)} heads ({', '.join(heads)}); "
                "merge them in the application (alembic merge heads) before migrating"
            )
        return heads[0]

    def _by_id(self) -> dict[str, Revision]:
        return {r.id: r for r in self.history()}

    def _ancestors(self, revs: list[str]) -> set[str]:
        """The revisions and everything below them."""
        by_id = self._by_id()
        seen: set[str] = set()
        stack = list(revs)
        while stack:
            rev = stack.pop()
            if rev in seen:
                continue
            seen.add(rev)
            stack.extend(by_id[rev].down_revisions)
        return seen

    def _resolve(self, target: str) -> str | None:
        """A revision id, or None for base; 'head' needs a single head."""
        if target == "base":
            return None
        if target in ("head", "heads"):
            return self.head()
        by_id = self._by_id()
        if target in by_id:
            return target
        matches = [r for r in by_id if r.startswith(target)]
        if len(matches) == 1:
            return matches[0]
        raise UnknownTarget(
            f"target revision {target!r} is not in the Alembic tree at {self.ini_path.parent}; use one of "
            f"its revision ids, 'head' or 'base'"
        )

    def check_known(self, current: list[str], database: str = "the database") -> None:
        unknown = [r for r in current if r not in self._by_id()]
        if unknown:
            raise UnknownRevision(
                f"{database} is stamped with revision {', '.join(unknown)} which the Alembic tree at "
                f"{self.ini_path.parent} does not know; deploy the application version that contains it "
                "or check the schema and re-stamp the database by hand"
            )

    def pending(self, current: list[str], target: str = "head") -> list[str]:
        """Revisions to apply, oldest first, to bring `current` to `target`."""
        self.head()  # refuses trees with several heads
        self.check_known(current)
        goal = self._resolve(target)
        if goal is None:
            if current:
                raise TargetBehindCurrent(
                    f"target 'base' is behind the current revision {', '.join(current)}; use downgrade to go "
                    "back, upgrade only moves forward"
                )
            return []
        done = self._ancestors(current)
        if goal in done:
            if goal in current:
                return []
            raise TargetBehindCurrent(
                f"target revision {goal} is behind the current revision {', '.join(current)}; use downgrade "
                "to go back, upgrade only moves forward"
            )
        return self._topological(self._ancestors([goal]) - done)

    def _topological(self, todo: set[str]) -> list[str]:
        by_id = self._by_id()
        order: list[str] = []
        placed: set[str] = set()

        def visit(rev: str) -> None:
            if rev in placed or rev not in todo:
                return
            for down in by_id[rev].down_revisions:
                visit(down)
            placed.add(rev)
            order.append(rev)

        for rev in sorted(todo):
            visit(rev)
        return order

    def offline_sql(
        self, from_rev: str | None, to_rev: str = "head", params: ConnParams | None = None
    ) -> OfflineSql:
        """`alembic upgrade prev:rev --sql` for each revision in (from_rev, to_rev], in order.

        With `params`, env.py gets the DATABASE_URL of that database (same driver as online, no
        password: nothing connects), so an env.py that reads os.environ["DATABASE_URL"] renders too.
        """
        current = [] if from_rev in (None, "base") else [self._resolve(from_rev) or ""]
        todo = self.pending([c for c in current if c], to_rev)
        by_id = self._by_id()
        pairs = []
        for rev in todo:
            downs = by_id[rev].down_revisions
            frm = "base" if not downs else downs[0]
            if len(downs) > 1:  # a merge: render from all its parents
                frm = ",".join(downs)
            pairs.append(f"{frm} {rev}")
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
        self.head()
        goal = self._resolve(target)
        done = self._ancestors(start)
        keep = self._ancestors([goal]) if goal else set()
        if goal is not None and goal not in done:
            raise TargetAheadOfCurrent(
                f"target revision {goal} is not below the current revision {', '.join(start) or 'base'}; use "
                "upgrade to go forward, downgrade only moves back"
            )
        undo = list(reversed(self._topological(done - keep)))
        by_id = self._by_id()
        empty = [r for r in undo if not by_id[r].has_downgrade]
        if empty and not allow_empty_downgrade:
            raise NoDowngrade(
                f"revision {', '.join(empty)} has no downgrade (empty or raising downgrade()); restore "
                "from a backup instead, or downgrade by hand"
            )
        steps = []
        for rev in undo:
            downs = by_id[rev].down_revisions
            steps.append(("base" if not downs else (downs[0] if len(downs) == 1 else f"{rev}-1"), rev))
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
            blind = WatchdogBlind(
                f"the {direction} on {params.where} was stopped because dbops could not watch its locks for "
                f"{answer['blind']:.0f} s (its own connection to the server was lost and could not be made "
                "again); check the server, then run the migration again (revisions done before stay applied)"
            )
            done = len(answer.get("steps", []))
            blind.revision = steps[done][1] if done < len(steps) else None  # type: ignore[attr-defined]
            blind.result = result  # type: ignore[attr-defined]
            blind.log_tail = tail  # type: ignore[attr-defined]
            raise blind
        if answer.get("moved"):
            raise RevisionMoved(
                f"database {params.database!r} moved from revision {', '.join(start) or 'base'} to "
                f"{', '.join(answer.get('start') or []) or 'base'} while this run was planning; check that "
                "no other migration is running, then start again"
            )
        if "error" in answer:
            rev = answer.get("failed_at")
            doing = f"{direction} of revision {rev}" if rev else "reading the current revision"
            exc = self._error(answer["error"], params, tail, doing, rev, result, cancelled_for)
            exc.seconds = answer.get("seconds")  # type: ignore[attr-defined]  # how long the failed step ran
            raise exc
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
    ) -> DbopsError:
        """`cancelled_for`: why the SessionWatchdog cancelled a statement of this run (LOCK, STATEMENT)."""
        message = scrub(err.get("message") or err.get("type") or "unknown error", params.password)
        detail = scrub(err.get("detail") or "", params.password)
        sqlstate = err.get("sqlstate")
        exc: DbopsError
        by_watchdog = sqlstate == QUERY_CANCELED or "canceling statement" in detail
        if (
            sqlstate == LOCK_NOT_AVAILABLE
            or "lock timeout" in detail
            or "lock timeout" in tail
            or (by_watchdog and cancelled_for == LOCK)
        ):
            exc = LockTimeout(
                f"{doing} on {params.where} waited longer than lock_timeout for a lock and was rolled back; "
                "it will be retried (find the blocking session in pg_stat_activity if it keeps happening)"
            )
        elif (
            "statement timeout" in detail
            or (by_watchdog and cancelled_for == STATEMENT)
            or (sqlstate == QUERY_CANCELED and cancelled_for is None)
        ):
            exc = MigrationFailed(
                f"{doing} on {params.where} ran longer than statement_timeout and was cancelled; raise "
                "statement_timeout for this revision or make it cheaper"
            )
        elif sqlstate is None and any(sign in detail for sign in _CONNECT_FAILURES):
            exc = classify_connect_error(psycopg.OperationalError(detail or message), params)
        else:
            exc = MigrationFailed(
                f"{doing} on {params.where} failed ({message}); fix the revision or the data it trips on, "
                "the log tail is in the run's artifact"
            )
        exc.revision = rev  # type: ignore[attr-defined]
        exc.result = result  # type: ignore[attr-defined]
        exc.log_tail = tail  # type: ignore[attr-defined]
        return exc


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no output"
