"""Running pg_restore on a stored backup: streamed (jobs=1) or from a downloaded file (jobs > 1).

The stored object streams through sha256 (of the stored bytes) and zstd into pg_restore, one chunk
behind, so pg_restore cannot reach the end of its archive (and COMMIT) before the sha256 was compared
with the manifest's. `jobs > 1` needs a seekable archive: a free-space check, then a download into a
temporary file whose sha256 is compared before `pg_restore --jobs` starts.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from flows.core.errors import BackupIntegrityError, RestoreError, TransientError, is_transient
from flows.core.identity import DatabaseIdentity
from flows.core.manifest import Manifest
from flows.core.objectstore import ObjectStore
from flows.core.pgtools import PgTool, StderrCollector, classify_pg_failure, error_summary
from flows.core.postgres import ConnParams, libpq_environment, scrub
from flows.core.streams import DecompressionError, decompress_stream, hashing

Mode = Literal["create", "replace"]
#: free space wanted beyond the archive itself when downloading for `jobs > 1`
DISK_MARGIN = 1.10
DISK_SLACK = 256 * 1024 * 1024


class RestoreFailed(RestoreError):
    """pg_restore failed; the target was left as it was (create: temp dropped, replace: rolled back)."""


class RestoreInterrupted(RestoreError, TransientError):
    """pg_restore lost its connection: nothing was committed, a new attempt may succeed."""


class ChecksumMismatch(RestoreFailed, BackupIntegrityError):
    """The stored object is not the one the manifest describes."""


class NotEnoughSpace(RestoreError):
    pass


# -- disk space --------------------------------------------------------------------------------------------


def space_needed(raw_bytes: int, margin: float = DISK_MARGIN) -> int:
    return int(raw_bytes * margin) + DISK_SLACK


def check_disk_space(directory: str | os.PathLike[str], raw_bytes: int, margin: float = DISK_MARGIN) -> int:
    """Free bytes in `directory`; raises when the decompressed archive (plus margin) would not fit."""
    free = shutil.disk_usage(directory).free
    needed = space_needed(raw_bytes, margin)
    if free < needed:
        raise NotEnoughSpace(
            f"{directory} has {free / 2**30:.1f} GiB free, the archive needs {needed / 2**30:.1f} GiB "
            f"({raw_bytes} bytes + margin) for jobs > 1; free space, point options.workdir elsewhere, "
            "or use jobs=1 (streams, needs no disk)"
        )
    return free


# -- running pg_restore ------------------------------------------------------------------------------------


@dataclass
class RestoreResult:
    key: str
    database: str  # where it ended up
    mode: Mode
    jobs: int
    method: Literal["stream", "file"]
    bytes: int  # stored bytes read
    raw_bytes: int  # archive bytes pg_restore read
    sha256: str
    started_at: datetime
    ended_at: datetime
    argv: list[str] = field(default_factory=list)
    warnings: str = ""
    identity: DatabaseIdentity | None = None  # create: the database as renamed, read on that connection
    location: str = ""  # the storage location it was read from (a storage list: the first intact one)
    fallbacks: list[str] = field(default_factory=list)  # locations passed over before it, and why

    @property
    def seconds(self) -> float:
        return max((self.ended_at - self.started_at).total_seconds(), 1e-6)


def pg_restore_argv(
    tool: PgTool,
    params: ConnParams,
    *,
    jobs: int = 1,
    clean: bool = False,
    single_transaction: bool = False,
    no_owner: bool = False,
    archive: str | None = None,
) -> list[str]:
    """Connection details in --dbname without the password (that comes from the passfile)."""
    argv = [str(tool.path), "--no-password", "--exit-on-error", f"--dbname={params.conninfo()}"]
    if clean:
        argv += ["--clean", "--if-exists"]
    if single_transaction:
        argv.append("--single-transaction")
    if jobs > 1:
        argv.append(f"--jobs={jobs}")
    if no_owner:
        argv += ["--no-owner", "--no-privileges"]
    if archive:
        argv.append(archive)
    return argv


def session_options(lock_timeout_s: int | None) -> dict[str, str]:
    """PGOPTIONS for pg_restore's session: a lock wait ends (and is retried) instead of queueing forever."""
    return {"PGOPTIONS": f"-c lock_timeout={int(lock_timeout_s * 1000)}"} if lock_timeout_s else {}


def _failure(rc: int, stderr: str, params: ConnParams, where: str) -> Exception:
    text = scrub(stderr, params.password).strip()
    summary = error_summary(text) if text else ""
    if rc < 0 or is_transient(classify_pg_failure("pg_restore", rc, stderr, params)):
        return RestoreInterrupted(
            f"pg_restore into {where} was interrupted (exit {rc}{': ' + summary if summary else ''}); "
            "nothing was committed, it will be retried"
        )
    return RestoreFailed(
        f"pg_restore into {where} failed (exit {rc}: {summary or 'no message'}); nothing was committed, "
        "see the log for pg_restore's output"
    )


def _mismatch(key: str, manifest: Manifest, sha: str, size: int, why: str = "") -> ChecksumMismatch:
    return ChecksumMismatch(
        f"{key} does not match its manifest ({why or f'sha256 {sha[:16]}…, {size} bytes'}; the manifest says "
        f"sha256 {manifest.sha256[:16]}…, {manifest.bytes} bytes): the stored object is corrupt, "
        "pg_restore was stopped before it committed anything; restore an older backup"
    )


def stream_restore(
    store: ObjectStore,
    manifest: Manifest,
    params: ConnParams,
    tool: PgTool,
    *,
    clean: bool = False,
    single_transaction: bool = False,
    no_owner: bool = False,
    mode: Mode = "create",
    progress: Callable[[int], None] | None = None,
    on_start: Callable[[subprocess.Popen[bytes]], None] | None = None,
    timeout_s: float | None = None,
    lock_timeout_s: int | None = None,
) -> RestoreResult:
    """Stream the stored object into pg_restore (jobs=1); the last chunk waits for the sha256 check."""
    key = manifest.dump_key
    argv = pg_restore_argv(
        tool, params, clean=clean, single_transaction=single_transaction, no_owner=no_owner
    )
    started = datetime.now(UTC)
    digest = hashlib.sha256()
    stored = [0]
    fed = 0
    with libpq_environment(params) as env:
        env.update(session_options(lock_timeout_s))
        proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
        )
        errors = StderrCollector(proc.stderr)
        errors.start()
        if on_start:
            on_start(proc)
        assert proc.stdin is not None
        feeding = True
        decode_error = ""
        try:
            pending: bytes | None = None
            chunks = decompress_stream(manifest.compression, hashing(store.get_stream(key), digest, stored))
            try:
                for chunk in chunks:
                    if feeding and pending is not None:
                        try:
                            proc.stdin.write(pending)
                            fed += len(pending)
                        except BrokenPipeError:
                            feeding = False  # pg_restore stopped: keep reading to finish the sha256
                        if progress:
                            progress(fed)
                    pending = chunk
            except Exception as exc:  # zstd could not decode: the object is corrupt
                if isinstance(exc, DecompressionError):
                    decode_error = f"zstd cannot decompress it: {exc}"
                    for _ in hashing(store.get_stream(key), hashlib.sha256(), [0]):
                        pass  # the object is readable, the failure is in its bytes
                else:
                    raise
            sha = digest.hexdigest()
            if decode_error or sha != manifest.sha256 or stored[0] != manifest.bytes:
                proc.kill()  # before the last chunk, so before pg_restore can commit
                proc.wait()
                raise _mismatch(key, manifest, sha, stored[0], decode_error)
            if feeding and pending is not None:
                try:
                    proc.stdin.write(pending)
                    fed += len(pending)
                except BrokenPipeError:
                    pass
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()
            rc = proc.wait(timeout=timeout_s)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    stderr = scrub(errors.text(), params.password)
    if rc != 0:
        raise _failure(rc, stderr, params, params.database)
    return RestoreResult(
        key=key,
        database=params.database,
        mode=mode,
        jobs=1,
        method="stream",
        bytes=stored[0],
        raw_bytes=fed,
        sha256=sha,
        started_at=started,
        ended_at=datetime.now(UTC),
        argv=argv[1:],
        warnings=stderr.strip(),
    )


def download_archive(
    store: ObjectStore,
    manifest: Manifest,
    path: Path,
    *,
    progress: Callable[[int], None] | None = None,
) -> tuple[int, int]:
    """Write the decompressed archive to `path`, checking the stored bytes' sha256; (stored, raw) bytes."""
    key = manifest.dump_key
    digest = hashlib.sha256()
    stored = [0]
    raw = 0
    try:
        with open(path, "wb") as f:
            hashed = hashing(store.get_stream(key), digest, stored)
            for chunk in decompress_stream(manifest.compression, hashed):
                f.write(chunk)
                raw += len(chunk)
                if progress:
                    progress(raw)
    except Exception as exc:
        if isinstance(exc, DecompressionError):
            raise _mismatch(key, manifest, "", stored[0], f"zstd cannot decompress it: {exc}") from None
        raise
    sha = digest.hexdigest()
    if sha != manifest.sha256 or stored[0] != manifest.bytes:
        raise _mismatch(key, manifest, sha, stored[0])
    return stored[0], raw


def file_restore(
    store: ObjectStore,
    manifest: Manifest,
    params: ConnParams,
    tool: PgTool,
    *,
    jobs: int,
    workdir: str | None = None,
    no_owner: bool = False,
    mode: Mode = "create",
    progress: Callable[[int], None] | None = None,
    log: Callable[[str], None] = print,
    timeout_s: float | None = None,
    lock_timeout_s: int | None = None,
) -> RestoreResult:
    """Download (sha256 checked) to a temporary file, then `pg_restore --jobs` from it."""
    directory = workdir or tempfile.gettempdir()
    free = check_disk_space(directory, manifest.raw_bytes)
    log(
        f"jobs={jobs} needs a seekable archive: downloading {manifest.raw_bytes / 2**20:.1f} MiB to "
        f"{directory} ({free / 2**30:.1f} GiB free) before pg_restore starts"
    )
    started = datetime.now(UTC)
    with tempfile.TemporaryDirectory(prefix="dbops-restore-", dir=directory) as tmp:
        path = Path(tmp) / "archive.dump"
        t0 = time.monotonic()
        stored, raw = download_archive(store, manifest, path, progress=progress)
        log(f"downloaded and sha256-checked in {time.monotonic() - t0:.1f} s; pg_restore --jobs={jobs} runs")
        argv = pg_restore_argv(tool, params, jobs=jobs, no_owner=no_owner, archive=str(path))
        with libpq_environment(params) as env:
            env.update(session_options(lock_timeout_s))
            try:
                proc = subprocess.run(argv, capture_output=True, env=env, timeout=timeout_s)
            except subprocess.TimeoutExpired:
                raise RestoreFailed(
                    f"pg_restore into {params.database} did not finish in {timeout_s:.0f} s; it was stopped"
                ) from None
    stderr = scrub(proc.stderr.decode(errors="replace"), params.password)
    if proc.returncode != 0:
        raise _failure(proc.returncode, stderr, params, params.database)
    return RestoreResult(
        key=manifest.dump_key,
        database=params.database,
        mode=mode,
        jobs=jobs,
        method="file",
        bytes=stored,
        raw_bytes=raw,
        sha256=manifest.sha256,
        started_at=started,
        ended_at=datetime.now(UTC),
        argv=argv[1:-1],
        warnings=stderr.strip(),
    )
