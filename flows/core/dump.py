"""The dump pipeline: pg_dump -Fc → (zstd) → sha256 → object store, never the whole dump on local disk.

Memory stays bounded by the store's part size x upload concurrency, whatever the size of the database.
The stored object only becomes visible when pg_dump exited 0: the chunk iterator waits for pg_dump at
end of stream and raises before the multipart upload is completed, so a killed pg_dump, a dropped
connection or a failed upload leaves no object (and no manifest) behind.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from flows.core.childenv import child_environment
from flows.core.compression import Compression, decompress_stream, pg_dump_level, zstd_compress
from flows.core.errors import (
    AuthenticationFailed,
    DatabaseMissing,
    DumpFailed,
    DumpInterrupted,
    PermissionDenied,
    VerificationFailed,
    VersionMismatch,
)
from flows.core.objectstore import DEFAULT_PART_SIZE, ObjectStore
from flows.core.postgres import ConnParams, SnapshotFacts, libpq_environment, scrub

READ_SIZE = 1024 * 1024
F_SETPIPE_SZ = 1031  # linux/fcntl.h; a 1 MiB pipe means fewer wake-ups between pg_dump and us
STDERR_TAIL = 64 * 1024
#: a custom-format archive of an empty database is ~1 KiB; less is not a dump
MIN_DUMP_BYTES = 512


# -- finding the right pg_dump -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PgTool:
    path: Path
    version: str  # e.g. "15.18"

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])


def _tool_version(path: Path) -> str | None:
    try:
        out = subprocess.run(
            [str(path), "--version"], capture_output=True, text=True, timeout=30, env=child_environment()
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"\(PostgreSQL\) (\d+(?:\.\d+)?)", out)
    return m.group(1) if m else None


def _candidate_bindirs(bindir: str | None) -> list[Path]:
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
    for d in _candidate_bindirs(bindir):
        path = d / name
        if path.exists():
            version = _tool_version(path)
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


# -- running pg_dump ---------------------------------------------------------------------------------------


def _error_summary(text: str) -> str:
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
    detail = f"{tool} exited with {returncode}" + (f": {_error_summary(text)}" if text else "")
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


class _StderrCollector(threading.Thread):
    """Drains stderr so pg_dump never blocks on a full pipe; keeps the tail for the error message."""

    def __init__(self, stream: object) -> None:
        super().__init__(daemon=True, name="pg-stderr")
        self.stream = stream
        self.buf: deque[bytes] = deque()
        self.size = 0

    def run(self) -> None:
        for line in iter(self.stream.readline, b""):  # type: ignore[attr-defined]
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
    stderr: _StderrCollector | None = None
    raw_bytes: int = 0
    on_start: Callable[[subprocess.Popen[bytes]], None] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=self.env
        )
        try:
            fcntl.fcntl(self.proc.stdout.fileno(), F_SETPIPE_SZ, READ_SIZE)  # type: ignore[union-attr]
        except OSError:
            pass
        self.stderr = _StderrCollector(self.proc.stderr)
        self.stderr.start()
        if self.on_start:
            self.on_start(self.proc)

    def chunks(self) -> Iterator[bytes]:
        """pg_dump's output; at end of stream, raise unless it exited 0 (before the upload completes)."""
        assert self.proc and self.proc.stdout
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


def pg_dump_argv(
    tool: PgTool,
    compression: Compression,
    level: int,
    *,
    lock_wait_timeout_s: int | None = 300,
    extra: Iterable[str] = (),
) -> list[str]:
    """The pg_dump command line: connection details come from the environment, never argv."""
    argv = [
        str(tool.path),
        "--format=custom",
        f"--compress={pg_dump_level(compression, level)}",
        "--no-password",
    ]
    if lock_wait_timeout_s:
        # Without it pg_dump queues behind an ACCESS EXCLUSIVE lock forever, and everything queues behind it.
        argv.append(f"--lock-wait-timeout={lock_wait_timeout_s}s")
    argv += list(extra)
    return argv


@dataclass
class DumpResult:
    key: str
    bytes: int
    raw_bytes: int
    sha256: str
    parts: int
    started_at: datetime
    ended_at: datetime
    argv: list[str] = field(default_factory=list)
    stderr: str = ""
    #: read in the snapshot pg_dump dumped (--snapshot), when the caller exported one
    facts: SnapshotFacts | None = None

    @property
    def seconds(self) -> float:
        return max((self.ended_at - self.started_at).total_seconds(), 1e-6)


def _hashing(chunks: Iterable[bytes], digest: hashlib._Hash, counter: list[int]) -> Iterator[bytes]:
    for chunk in chunks:
        digest.update(chunk)
        counter[0] += len(chunk)
        yield chunk


def stream_dump(
    params: ConnParams,
    store: ObjectStore,
    key: str,
    *,
    tool: PgTool,
    compression: Compression,
    level: int,
    part_size: int = DEFAULT_PART_SIZE,
    lock_wait_timeout_s: int | None = 300,
    extra_args: Iterable[str] = (),
    zstd_threads: int = 1,
    progress: Callable[[int, int], None] | None = None,
    on_start: Callable[[subprocess.Popen[bytes]], None] | None = None,
    min_bytes: int = MIN_DUMP_BYTES,
    if_absent: bool = False,
) -> DumpResult:
    """Run pg_dump and stream its output into `key`; returns sizes and the stored object's sha256.

    `progress(raw_bytes, stored_bytes)` is called as data flows; `on_start` sees the pg_dump process
    (tests use it to kill pg_dump mid-stream). `if_absent`: the object is created only if `key` is still
    free when it completes (`ObjectExists` otherwise, nothing replaced).
    """
    argv = pg_dump_argv(tool, compression, level, lock_wait_timeout_s=lock_wait_timeout_s, extra=extra_args)
    started = datetime.now(UTC)
    digest = hashlib.sha256()
    stored = [0]
    with libpq_environment(params) as env:
        run = ToolRun(argv=argv, params=params, env=env, on_start=on_start)
        run.start()
        try:
            raw: Iterable[bytes] = run.chunks()
            body = zstd_compress(raw, level, threads=zstd_threads) if compression is Compression.zstd else raw

            def report(_: int) -> None:
                if progress:
                    progress(run.raw_bytes, stored[0])

            put = store.put_stream(
                key, _hashing(body, digest, stored), part_size=part_size, progress=report, if_absent=if_absent
            )
        finally:
            run.stop()
    if run.raw_bytes < min_bytes:
        store.delete([key])
        raise DumpFailed(
            f"pg_dump produced only {run.raw_bytes} bytes, which is not a plausible dump; the object was "
            "removed, check pg_dump's output in the log"
        )
    return DumpResult(
        key=key,
        bytes=put.bytes,
        raw_bytes=run.raw_bytes,
        sha256=digest.hexdigest(),
        parts=put.parts,
        started_at=started,
        ended_at=datetime.now(UTC),
        argv=argv[1:],
        stderr=run.stderr_text(),
    )


def dump_globals(params: ConnParams, tool: PgTool) -> bytes:
    """Roles and tablespaces without password hashes: what a restore onto a new server needs first."""
    argv = [
        str(tool.path),
        "--globals-only",
        "--no-role-passwords",
        "--no-password",
        f"--dbname={params.conninfo()}",
    ]
    with libpq_environment(params) as env:
        proc = subprocess.run(argv, capture_output=True, env=env, timeout=600)
    if proc.returncode != 0:
        raise classify_pg_failure("pg_dumpall", proc.returncode, proc.stderr.decode(errors="replace"), params)
    return proc.stdout


# -- verification ------------------------------------------------------------------------------------------


@dataclass
class ListVerification:
    entries: int
    table_data: set[str]
    sha256: str | None  # set when the whole object was read back
    seconds: float
    empty_database: bool = False  # the catalog had no dumpable tables when it was dumped

    def detail(self) -> str:
        text = f"pg_restore --list read {self.entries} TOC entries, {len(self.table_data)} with table data"
        if self.empty_database:
            text += " (the database had no tables when it was dumped)"
        return text + (", sha256 re-checked over the whole object" if self.sha256 else "")


_TABLE_DATA_RE = re.compile(r"^\d+; \d+ \d+ TABLE DATA (?P<rest>.+)$")


def _table_data_names(rests: list[str], expected: Iterable[str]) -> set[str]:
    """ "schema.table" names of TABLE DATA entries, from the "schema table owner" text after the tag.

    pg_restore --list prints names unquoted, so a name containing a space cannot be split on spaces:
    expected names are looked up as "schema table" prefixes first, the remaining entries are split.
    """
    by_prefix: dict[str, str] = {}
    for rest in rests:
        for i, ch in enumerate(rest):
            if ch == " ":
                by_prefix.setdefault(rest[:i], rest)
    names: set[str] = set()
    explained: set[str] = set()
    for name in expected:
        for i, ch in enumerate(name):
            rest = by_prefix.get(f"{name[:i]} {name[i + 1 :]}") if ch == "." else None
            if rest is not None:
                names.add(name)
                explained.add(rest)
                break
    for rest in rests:
        if rest not in explained:
            schema, _, tail = rest.partition(" ")
            names.add(f"{schema}.{tail.partition(' ')[0]}")
    return names


def verify_stored_dump(
    store: ObjectStore,
    key: str,
    compression: Compression,
    pg_restore: PgTool,
    *,
    full: bool = False,
    expected_sha256: str | None = None,
    expected_tables: Iterable[str] = (),
    empty_database: bool = False,
) -> ListVerification:
    """Stream the stored object back into `pg_restore --list`; `full` also re-hashes every byte.

    `list` proves the archive's table of contents is readable and that every table we expected has a
    TABLE DATA entry; `full` reads the whole object again and compares its sha256 with the upload's.
    An archive without a single entry is refused as empty, unless `empty_database`: the catalog said the
    database had no dumpable tables when it was dumped (a brand-new database before its first
    migration), and pg_dump then writes a readable archive with no entries at all.
    """
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [str(pg_restore.path), "--list"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=child_environment(),
    )
    out_chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: out_chunks.append(proc.stdout.read()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    err_reader = _StderrCollector(proc.stderr)
    err_reader.start()
    digest = hashlib.sha256()
    feeding = True
    try:
        raw = store.get_stream(key)
        hashed = _hashing(raw, digest, [0])
        for chunk in decompress_stream(compression, hashed):
            if feeding:
                try:
                    proc.stdin.write(chunk)  # type: ignore[union-attr]
                except BrokenPipeError:
                    feeding = False  # pg_restore has read its TOC and left
            if not feeding and not full:
                break
        if proc.stdin:
            try:
                proc.stdin.close()
            except BrokenPipeError:
                pass
        rc = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=30)
    listing = b"".join(out_chunks).decode(errors="replace")
    if rc != 0:
        err = err_reader.text().strip().splitlines()
        raise VerificationFailed(
            f"pg_restore --list could not read {key} ({err[-1] if err else f'exit {rc}'}); "
            "the backup is not usable, the next run will take a new one"
        )
    entries = [line for line in listing.splitlines() if line and not line.startswith(";")]
    expected = set(expected_tables)
    rests = [m.group("rest") for m in map(_TABLE_DATA_RE.match, entries) if m]
    table_data = _table_data_names(rests, expected)
    if not entries and not empty_database:
        raise VerificationFailed(f"pg_restore --list found no entries in {key}; the backup is empty")
    missing = sorted(expected - table_data)
    if missing:
        raise VerificationFailed(
            f"{key} has no data for {len(missing)} table(s) that exist in the database "
            f"(first: {missing[0]}); check the dump options and pg_dump's log"
        )
    sha = digest.hexdigest() if full else None
    if full and expected_sha256 and sha != expected_sha256:
        raise VerificationFailed(
            f"{key} reads back with sha256 {sha}, not {expected_sha256} as uploaded; the object is corrupt"
        )
    return ListVerification(len(entries), table_data, sha, time.monotonic() - t0, empty_database)
