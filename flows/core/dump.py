"""The dump pipeline: pg_dump -Fc → (zstd) → sha256 → object store, never the whole dump on local disk.

Memory stays bounded by the store's part size x upload concurrency, whatever the size of the database.
The stored object only becomes visible when pg_dump exited 0: the chunk iterator waits for pg_dump at
end of stream and raises before the multipart upload is completed, so a killed pg_dump, a dropped
connection or a failed upload leaves no object (and no manifest) behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from flows.core.childenv import child_environment
from flows.core.compression import Compression, pg_dump_level
from flows.core.errors import DumpFailed, VerificationFailed
from flows.core.objectstore import DEFAULT_PART_SIZE, ObjectStore
from flows.core.pgtools import PgTool, StderrCollector, ToolRun, classify_pg_failure
from flows.core.postgres import ConnParams, SnapshotFacts, libpq_environment
from flows.core.stored_stream import StoredStream, put_tool_output
from flows.core.streams import compress_stream, decompress_stream, hashing

#: a custom-format archive of an empty database is ~1 KiB; less is not a dump
MIN_DUMP_BYTES = 512


# -- running pg_dump ---------------------------------------------------------------------------------------


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
class DumpResult(StoredStream):
    argv: list[str] = field(default_factory=list)
    stderr: str = ""
    #: read in the snapshot pg_dump dumped (--snapshot), when the caller exported one
    facts: SnapshotFacts | None = None


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
    with libpq_environment(params) as env:
        run = ToolRun(argv=argv, params=params, env=env, on_start=on_start)
        run.start()
        try:
            body = compress_stream(compression, run.chunks(), level, threads=zstd_threads)
            put = put_tool_output(
                store, key, run, body, part_size=part_size, progress=progress, if_absent=if_absent
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
        **put,
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
            dotted = by_prefix.get(f"{name[:i]} {name[i + 1 :]}") if ch == "." else None
            if dotted is not None:
                names.add(name)
                explained.add(dotted)
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
    assert proc.stdout is not None
    assert proc.stdin is not None  # both PIPE above
    stdout = proc.stdout
    out_chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: out_chunks.append(stdout.read()), daemon=True)
    reader.start()
    err_reader = StderrCollector(proc.stderr)
    err_reader.start()
    digest = hashlib.sha256()
    feeding = True
    try:
        raw = store.get_stream(key)
        hashed = hashing(raw, digest, [0])
        for chunk in decompress_stream(compression, hashed):
            if feeding:
                try:
                    proc.stdin.write(chunk)
                except BrokenPipeError:
                    feeding = False  # pg_restore has read its TOC and left
            if not feeding and not full:
                break
        if proc.stdin:
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()
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
