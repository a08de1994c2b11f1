"""PostgreSQL's client tools: finding the right one for a server, running it, and naming its failures.

Dump, restore, the drill, base backups and recovery all run libpq tools (pg_dump, pg_restore, pg_amcheck,
pg_basebackup, ...). What they share lives here, the way Barman keeps its `command_wrappers.py` apart
from the strategies that use them: which binary to run (the server's own major version when installed),
draining stderr without blocking the tool, the one line of stderr that says what went wrong, and which
failures are worth a retry. The callers decide what a failure means for their own step.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import signal
import subprocess
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from flows.core.childenv import child_environment
from flows.core.errors import (
    AuthenticationFailed,
    DatabaseMissing,
    DumpFailed,
    DumpInterrupted,
    PermissionDenied,
    VersionMismatch,
)
from flows.core.postgres import ConnParams, scrub

READ_SIZE = 1024 * 1024
F_SETPIPE_SZ = 1031  # linux/fcntl.h; a 1 MiB pipe means fewer wake-ups between pg_dump and us
STDERR_TAIL = 64 * 1024
#: the longest identifier PostgreSQL keeps (NAMEDATALEN - 1, src/include/pg_config_manual.h); longer
#: names are silently truncated, so names we derive are shortened to fit first
MAX_IDENTIFIER = 63


# -- finding the right tool --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PgTool:
    path: Path
    version: str  # e.g. "15.18"

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])


def tool_version(path: Path) -> str | None:
    """The version a client tool reports (`15.18`), or None when it does not run or does not say."""
    try:
        out = subprocess.run(
            [str(path), "--version"], capture_output=True, text=True, timeout=30, env=child_environment()
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"\(PostgreSQL\) (\d+(?:\.\d+)?)", out)
    return m.group(1) if m else None


def candidate_bindirs(bindir: str | None) -> list[Path]:
    """Where client tools may be installed, in order: `bindir` alone when given, else the usual places."""
    if bindir:
        return [Path(bindir)]
    dirs: list[Path] = []
    try:
        out = subprocess.run(
            ["pg_config", "--bindir"], capture_output=True, text=True, timeout=30, env=child_environment()
        ).stdout
        if out.strip():
            dirs.append(Path(out.strip()))
    except (OSError, subprocess.TimeoutExpired):
        pass
    dirs += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    dirs += sorted(Path("/usr").glob("pgsql-*/bin"), reverse=True)  # PGDG packages on RHEL
    which = shutil.which("pg_dump")
    if which:
        dirs.append(Path(which).resolve().parent)
    seen: list[Path] = []
    for d in dirs:
        if d not in seen:
            seen.append(d)
    return seen


def server_major(server_version_num: int) -> int:
    return server_version_num // 10000


def check_tool_version(tool: PgTool, server_version_num: int) -> None:
    """pg_dump refuses (or worse, misreads) servers newer than itself: its major must be ≥ the server's."""
    major = server_major(server_version_num)
    if tool.major < major:
        raise VersionMismatch(
            f"{tool.path.name} {tool.version} at {tool.path} is older than the server (PostgreSQL {major}); "
            f"install the PostgreSQL {major} client tools or point pg_bindir at them"
        )


def find_tool(name: str, server_version_num: int, bindir: str | None = None) -> PgTool:
    """The client tool to use against this server: its own major version if installed, else the newest.

    Same-major tools produce archives every restore host of that major can read; a newer one is only
    used when the server's own is missing.
    """
    major = server_major(server_version_num)
    found: list[PgTool] = []
    for d in candidate_bindirs(bindir):
        path = d / name
        if path.exists():
            version = tool_version(path)
            if version:
                found.append(PgTool(path, version))
    if not found:
        where = bindir or "pg_config --bindir, /usr/lib/postgresql/*/bin and PATH"
        raise VersionMismatch(f"{name} not found in {where}; install the PostgreSQL {major} client tools")
    same = [t for t in found if t.major == major]
    if same:
        return same[0]
    newest = max(found, key=lambda t: t.major)
    check_tool_version(newest, server_version_num)
    return newest


# -- what went wrong ---------------------------------------------------------------------------------------


def error_summary(text: str) -> str:
    """The line that says what went wrong: the first "error:" line (with the server's message, if any).

    The last line is usually a "detail: Query was: ..." that names the statement, not the failure.
    """
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if re.match(r"^(\S+: )?error: ", line):
            server = next((s for s in lines[i + 1 :] if "Error message from server:" in s), "")
            if server:
                line += f" ({server.split('Error message from server:', 1)[1].strip()})"
            return line.rstrip(";")
    return lines[-1].rstrip(";") if lines else ""


def classify_pg_failure(tool: str, returncode: int, stderr: str, params: ConnParams) -> Exception:
    """pg_dump's exit → a named error: interrupted runs are transient, bad configuration is not."""
    text = scrub(stderr, params.password).strip()
    detail = f"{tool} exited with {returncode}" + (f": {error_summary(text)}" if text else "")
    if returncode < 0:
        sig = signal.Signals(-returncode).name
        return DumpInterrupted(f"{tool} was killed by {sig}; the upload was aborted and will be retried")
    lowered = text.lower()
    if "password authentication failed" in lowered:
        return AuthenticationFailed(f"{detail}; fix the password in the database block")
    if re.search(r'database ".*" does not exist', lowered):
        return DatabaseMissing(f"{detail}; fix the database name in the block")
    if "permission denied" in lowered:
        return PermissionDenied(
            f"{detail}; grant the dump role SELECT on every table (or use a role with pg_read_all_data)"
        )
    transient_markers = (
        "server closed the connection",
        "terminating connection",
        "could not receive data",
        "connection to server",
        "ssl syscall",
        "connection reset",
        "could not obtain lock",
        "lock timeout",
        "canceling statement due to",
        "the database system is shutting down",
        "could not connect",
    )
    if any(marker in lowered for marker in transient_markers):
        return DumpInterrupted(f"{detail}; the upload was aborted and will be retried")
    return DumpFailed(f"{detail}; the upload was aborted, see the log for {tool}'s full output")


# -- running a tool ----------------------------------------------------------------------------------------


class StderrCollector(threading.Thread):
    """Drains stderr so the tool never blocks on a full pipe; keeps the tail for the error message."""

    def __init__(self, stream: IO[bytes] | None) -> None:
        super().__init__(daemon=True, name="pg-stderr")
        self.stream = stream
        self.buf: deque[bytes] = deque()
        self.size = 0

    def run(self) -> None:
        if self.stream is None:  # stderr not piped: nothing to collect
            return
        for line in iter(self.stream.readline, b""):
            self.buf.append(line)
            self.size += len(line)
            while self.size > STDERR_TAIL and len(self.buf) > 1:
                self.size -= len(self.buf.popleft())

    def text(self) -> str:
        self.join(timeout=5)
        return b"".join(self.buf).decode(errors="replace")


@dataclass
class ToolRun:
    """A running libpq tool whose stdout is consumed as chunks; `returncode` once finished."""

    argv: list[str]
    params: ConnParams
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    stderr: StderrCollector | None = None
    raw_bytes: int = 0
    on_start: Callable[[subprocess.Popen[bytes]], None] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=self.env
        )
        assert self.proc.stdout is not None  # PIPE above
        with contextlib.suppress(OSError):
            fcntl.fcntl(self.proc.stdout.fileno(), F_SETPIPE_SZ, READ_SIZE)
        self.stderr = StderrCollector(self.proc.stderr)
        self.stderr.start()
        if self.on_start:
            self.on_start(self.proc)

    def chunks(self) -> Iterator[bytes]:
        """pg_dump's output; at end of stream, raise unless it exited 0 (before the upload completes)."""
        assert self.proc
        assert self.proc.stdout
        fd = self.proc.stdout.fileno()
        while True:
            chunk = os.read(fd, READ_SIZE)
            if not chunk:
                break
            self.raw_bytes += len(chunk)
            yield chunk
        rc = self.proc.wait()
        if rc != 0:
            raise classify_pg_failure(Path(self.argv[0]).name, rc, self.stderr_text(), self.params)

    def stderr_text(self) -> str:
        return scrub(self.stderr.text(), self.params.password) if self.stderr else ""

    def stop(self) -> None:
        """Kill the tool if we stopped reading early (upload failed): never leave pg_dump running."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
        if self.proc:
            self.proc.wait()
            for stream in (self.proc.stdout, self.proc.stderr):
                if stream:
                    stream.close()
