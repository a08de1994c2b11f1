"""Run the recovering server and watch it: started with the server's own pg_ctl as the data directory's
owner, followed through its log and a trusted private socket, stopped at the end.

What the log says is the authority on how recovery ended (PostgreSQL 13+):
- "recovery stopping before/after ..." / "recovery stopping at restore point": the target was found;
- "FATAL: recovery ended before configured recovery target was reached": the archive ran out first; the
  lines before it say where ("redo done at LSN ... last completed transaction was at log time ...").
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import psycopg

from flows.core.childenv import child_environment
from flows.core.pitr.errors import RecoveryFailed

_FATAL_RE = re.compile(r"(?:FATAL|PANIC):\s+(.*)")
_REDO_DONE_RE = re.compile(r"redo done at ([0-9A-F]+/[0-9A-F]+)")
_LAST_TXN_RE = re.compile(r"last completed transaction was at log time ([0-9: .+-]+)")
_STOPPING_RE = re.compile(r"recovery stopping (.*)")
_PAUSED_RE = re.compile(r"pausing at the end of recovery|recovery has paused")


@dataclass
class LogFacts:
    """What the server log says about this recovery (pure parse, tested on real logs)."""

    fatal: str | None = None
    redo_done_lsn: str | None = None
    last_transaction: str | None = None
    stopping: str | None = None
    paused: bool = False
    consistent: bool = False
    ready: bool = False
    spool_misses: list[str] = field(default_factory=list)


def parse_log(text: str) -> LogFacts:
    facts = LogFacts()
    for line in text.splitlines():
        m = _FATAL_RE.search(line)
        if m and facts.fatal is None and "the database system is" not in m.group(1):
            facts.fatal = m.group(1).strip()
        m = _REDO_DONE_RE.search(line)
        if m:
            facts.redo_done_lsn = m.group(1)
        m = _LAST_TXN_RE.search(line)
        if m:
            facts.last_transaction = m.group(1).strip()
        m = _STOPPING_RE.search(line)
        if m:
            facts.stopping = m.group(1).strip()
        if _PAUSED_RE.search(line):
            facts.paused = True
        if "consistent recovery state reached" in line:
            facts.consistent = True
        if "database system is ready to accept" in line:
            facts.ready = True
        if "dbops-spool:" in line:
            facts.spool_misses.append(line.split("dbops-spool:", 1)[1].strip())
    return facts


@dataclass
class PgServer:
    """One scratch server on a data directory; `user` is the OS user it runs as (None: ourselves)."""

    data_directory: Path
    pg_ctl: Path
    log_file: Path
    socket_dir: Path
    port: int
    user: str | None = None

    def _argv(self, args: list[str]) -> list[str]:
        return (["runuser", "-u", self.user, "--"] if self.user else []) + [str(self.pg_ctl), *args]

    def start(self) -> None:
        """`pg_ctl start` without waiting: recovery can take hours; the caller watches it."""
        argv = self._argv(["-D", str(self.data_directory), "-l", str(self.log_file), "-W", "start"])
        run = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=child_environment())
        if run.returncode != 0:
            raise RecoveryFailed(
                f"pg_ctl could not start the recovered server in {self.data_directory}: "
                f"{((run.stderr or run.stdout).strip().splitlines() or ['no output'])[-1]}; "
                f"see {self.log_file}"
            )

    def pid(self) -> int | None:
        try:
            first = (self.data_directory / "postmaster.pid").read_text().splitlines()[0]
            return int(first)
        except (OSError, ValueError, IndexError):
            return None

    def running(self) -> bool:
        pid = self.pid()
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def stop(self, mode: str = "fast", timeout: int = 300) -> None:
        if not self.running():
            return
        subprocess.run(
            self._argv(["-D", str(self.data_directory), "-m", mode, "-w", "-t", str(timeout), "stop"]),
            capture_output=True,
            text=True,
            timeout=timeout + 30,
            env=child_environment(),
        )
        if self.running() and mode != "immediate":
            self.stop("immediate", timeout=60)

    def log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    def connect(self, user: str, dbname: str) -> psycopg.Connection:
        """Through the private socket (trust, 0700 directory): no password is needed or written anywhere."""
        return psycopg.connect(
            host=str(self.socket_dir),
            port=self.port,
            user=user,
            dbname=dbname,
            connect_timeout=5,
            autocommit=True,
        )

    def command_line(self) -> str:
        runner = f"runuser -u {self.user} -- " if self.user else ""
        return f"{runner}{self.pg_ctl} -D {self.data_directory} -m fast stop"


@dataclass
class ReplayState:
    in_recovery: bool
    paused: bool
    lsn: str | None
    timestamp: datetime | None
    timeline: int | None


def read_replay_state(conn: psycopg.Connection) -> ReplayState:
    row = conn.execute(
        "SELECT pg_is_in_recovery(),"
        " CASE WHEN pg_is_in_recovery() THEN pg_get_wal_replay_pause_state() ELSE 'not paused' END,"
        " pg_last_wal_replay_lsn()::text, pg_last_xact_replay_timestamp(),"
        " CASE WHEN pg_is_in_recovery() THEN (SELECT timeline_id FROM pg_control_checkpoint())"
        " ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END"
    ).fetchone()
    assert row is not None
    return ReplayState(bool(row[0]), row[1] == "paused", row[2], row[3], row[4])
