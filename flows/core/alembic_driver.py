"""The child side of `flows.core.alembic_runner`: drives Alembic inside its own Python process.

Run as `python -m flows.core.alembic_driver RESULT_PATH INI_PATH SESSION_JSON COMMAND [ARGS...]` with
cwd = the folder of alembic.ini. It writes its answer as JSON to RESULT_PATH (read back by the parent);
stdout and stderr are the application's log. Alembic keeps global state (the `context` and `op` proxies,
logging configured by env.py), which is why this never runs in the worker's process.

Commands:
- `scripts`: the revision tree (`{"heads": [...], "revisions": [...]}` or `{"broken": why}`);
- `current`: the revisions stamped in the database (`{"current": [...]}` or `{"error": ...}`);
- `migrate DIRECTION EXPECTED_START "TO REV"...`: one Alembic step per pair, the answer rewritten after
  each step so that progress survives a kill;
- `offline "FROM TO"...`: the offline SQL (`alembic upgrade FROM:TO --sql`) of each revision.

This module imports nothing from dbops and only the standard library at import time (Alembic and
SQLAlchemy when a command runs): it runs in the application's environment, not the worker's.
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import io
import json
import sys
import time
import traceback
import warnings
from collections.abc import Mapping, Sequence
from typing import Any


def guard_sessions(settings: Mapping[str, str]) -> None:
    """Every connection SQLAlchemy opens in this process, whatever engine env.py builds, gets the
    timeouts and the run's application_name through its driver's own channel (asyncpg ignores PGOPTIONS).
    """
    if not settings:
        return
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    options_of = dict(settings)
    name = options_of.pop("application_name", None)

    @event.listens_for(Engine, "do_connect")
    def _guard(dialect: Any, conn_rec: Any, cargs: Any, cparams: dict[str, Any]) -> None:
        driver = dialect.driver or ""
        if driver == "asyncpg":
            server_settings = dict(cparams.get("server_settings") or {})
            server_settings.update(options_of)
            if name:
                server_settings["application_name"] = name
            cparams["server_settings"] = server_settings
        elif driver.startswith("psycopg"):
            options = " ".join(f"-c {k}={v}" for k, v in options_of.items())
            cparams["options"] = f"{cparams.get('options') or ''} {options}".strip()
            if name:
                cparams["application_name"] = name


def describe(exc: BaseException) -> dict[str, Any]:
    """What the parent needs to classify a failure: the driver's SQLSTATE and the first line."""
    orig = getattr(exc, "orig", None) or exc.__cause__ or exc
    sqlstate = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    msg = str(orig).strip() or type(orig).__name__
    return {
        "type": type(exc).__name__,
        "orig_type": type(orig).__name__,
        "sqlstate": sqlstate,
        "message": msg.splitlines()[0] if msg else "",
        "detail": msg[:4000],
        "trace": traceback.format_exc()[-4000:],
    }


def has_downgrade(module: Any) -> bool:
    """Whether a revision's downgrade() does something (not only `pass`, a docstring or a raise)."""
    fn = getattr(module, "downgrade", None)
    if fn is None:
        return False
    try:
        tree = ast.parse(inspect.getsource(fn).strip())
    except (OSError, TypeError, SyntaxError):
        return True
    first = tree.body[0]
    body = first.body if isinstance(first, ast.FunctionDef | ast.AsyncFunctionDef) else []
    for stmt in body:
        if isinstance(stmt, ast.Pass):
            continue
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
            continue  # docstring or ...
        return not isinstance(stmt, ast.Raise)
    return False


class Driver:
    """One command against one alembic.ini; `out` writes the answer the parent reads."""

    def __init__(self, result_path: str, ini_path: str) -> None:
        self.result_path = result_path
        self.ini_path = ini_path

    def out(self, obj: Mapping[str, Any]) -> None:
        with open(self.result_path, "w") as f:
            json.dump(obj, f)

    def scripts(self) -> None:
        from alembic.config import Config
        from alembic.script import ScriptDirectory

        cfg = Config(self.ini_path)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                script = ScriptDirectory.from_config(cfg)
                revs = list(script.walk_revisions())
                heads = list(script.get_heads())
            except SyntaxError as exc:
                self.out({"broken": f"{exc.filename}: {exc.msg} at line {exc.lineno}"})
                return
            except Exception as exc:
                missing = [str(w.message) for w in caught if "is not present" in str(w.message)]
                d = describe(exc)
                self.out({"broken": missing[0] if missing else f"{d['type']}: {d['message']}"})
                return
        missing = [str(w.message) for w in caught if "is not present" in str(w.message)]
        if missing:
            self.out({"broken": missing[0]})
            return
        rows = []
        for sc in revs:
            down = sc.down_revision
            downs = [] if down is None else ([down] if isinstance(down, str) else list(down))
            rows.append(
                {
                    "id": sc.revision,
                    "down": downs,
                    "doc": sc.doc or "",
                    "has_downgrade": has_downgrade(sc.module),
                    "path": sc.path,
                }
            )
        self.out({"heads": heads, "revisions": rows})

    def read_current(self) -> list[str]:
        from alembic.config import Config
        from alembic.runtime.environment import EnvironmentContext
        from alembic.script import ScriptDirectory

        cfg = Config(self.ini_path)
        script = ScriptDirectory.from_config(cfg)
        seen: list[str] = []

        def fn(rev: Any, context: Any) -> list[Any]:
            seen.extend(context.get_current_heads())
            return []

        with EnvironmentContext(cfg, script, fn=fn, dont_mutate=True):
            script.run_env()
        return sorted(seen)

    def current(self) -> None:
        try:
            self.out({"current": self.read_current()})
        except Exception as exc:
            self.out({"error": describe(exc)})

    def migrate(self, direction: str, expected: str, pairs: Sequence[str]) -> None:
        from alembic import command as alembic_command
        from alembic.config import Config

        res: dict[str, Any] = {"start": None, "steps": [], "end": None}
        try:
            res["start"] = self.read_current()
        except Exception as exc:
            res["error"] = describe(exc)
            res["failed_at"] = None
            self.out(res)
            return
        if res["start"] != sorted(r for r in expected.split(",") if r):
            res["moved"] = True
            self.out(res)
            return
        for pair in pairs:
            to, rev = pair.split(" ", 1)
            t0 = time.monotonic()
            try:
                getattr(alembic_command, direction)(Config(self.ini_path), to)
            except Exception as exc:
                res["error"] = describe(exc)
                res["failed_at"] = rev
                res["seconds"] = time.monotonic() - t0
                break
            res["steps"].append({"rev": rev, "seconds": time.monotonic() - t0})
            self.out(res)  # progress survives a kill
        with contextlib.suppress(Exception):  # the end revision is a courtesy; the steps are the answer
            res["end"] = self.read_current()
        self.out(res)

    def offline(self, pairs: Sequence[str]) -> None:
        from alembic import command as alembic_command
        from alembic.config import Config

        res: dict[str, dict[str, str]] = {"sql": {}, "failed": {}}
        for pair in pairs:
            frm, to = pair.split(" ", 1)
            buf = io.StringIO()
            cfg = Config(self.ini_path, output_buffer=buf)
            try:
                alembic_command.upgrade(cfg, f"{frm}:{to}", sql=True)
            except BaseException as exc:
                d = describe(exc)
                res["failed"][to] = f"{d['orig_type']}: {d['message']}"
                continue
            res["sql"][to] = buf.getvalue()
        self.out(res)


def main(argv: Sequence[str]) -> None:
    """argv = result_path, ini_path, session settings (JSON), command, *args."""
    result_path, ini_path, session, command, *args = argv
    guard_sessions(json.loads(session))
    driver = Driver(result_path, ini_path)
    if command == "scripts":
        driver.scripts()
    elif command == "current":
        driver.current()
    elif command == "migrate":
        driver.migrate(args[0], args[1], args[2:])
    elif command == "offline":
        driver.offline(args)
    else:
        raise SystemExit(f"unknown alembic driver command {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
