"""Unpack a stored base backup into a data directory: stream, check sha256 while reading, zstd, tar.

Nothing is written outside the data directory: members with absolute paths, `..`, links that leave the
directory, devices and FIFOs stop the extraction (Python's `data` filter plus our own checks, which say
which member). A sha256 that does not match the manifest, a corrupt stream or a full disk stops it too,
and removes what was extracted, so a half-written data directory can never be started by mistake.
"""

from __future__ import annotations

import hashlib
import io
import os
import pwd
import shutil
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from flows.core.base_layout import BaseBackupManifest
from flows.core.objectstore import ObjectStore
from flows.core.pitr.errors import BaseBackupCorrupt, ExtractionFailed, RecoveryRefused
from flows.core.streams import DecompressionError, hashing, zstd_decompress

#: room kept free beyond the backup's raw size (the spool and the server's own WAL need some)
FREE_MARGIN = 256 * 1024 * 1024


class _ChunkReader(io.RawIOBase):
    """A file object over an iterator of chunks, for tarfile's stream mode."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._it: Iterator[bytes] = iter(chunks)
        self._buf = b""

    def readable(self) -> bool:
        return True

    # typeshed types the buffer as WriteableBuffer; tarfile only ever passes a bytearray or memoryview
    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._buf:
            try:
                self._buf = next(self._it)
            except StopIteration:
                return 0
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n

    def drain(self) -> None:
        """Read to the end, so the hash covers the whole object (tar stops at its end-of-archive)."""
        self._buf = b""
        for _ in self._it:
            pass


def server_user() -> str | None:
    """The OS user the server runs as: `postgres` when we are root (PostgreSQL refuses root), else us."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise RecoveryRefused(
            "this worker runs as root and has no `postgres` OS user to own the recovered data directory; "
            "create one or run the worker as the PostgreSQL user"
        ) from None
    return "postgres"


def check_data_directory(path: Path) -> None:
    """The data directory must not exist or be empty: a recovery never overwrites anything."""
    if path.exists() and not path.is_dir():
        raise RecoveryRefused(f"data directory {path} exists and is not a directory; choose another path")
    if path.is_dir() and any(path.iterdir()):
        raise RecoveryRefused(
            f"data directory {path} is not empty; recovery only writes into a new or empty directory: "
            "choose another path, or remove its contents if you are sure they are not needed"
        )
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RecoveryRefused(f"cannot create {path}: {parent} is not writable for this worker's user")


def check_free_space(path: Path, needed: int) -> None:
    parent = path if path.exists() else path.parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if free < needed + FREE_MARGIN:
        raise RecoveryRefused(
            f"{parent} has {free / 2**30:.1f} GiB free but the base backup unpacks to "
            f"{needed / 2**30:.1f} GiB (plus {FREE_MARGIN // 2**20} MiB for WAL): "
            "free space or choose another path"
        )


def _check_member(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    name = member.name
    parts = Path(name).parts
    if name.startswith("/") or ".." in parts:
        raise ExtractionFailed(
            f"the base backup holds an unsafe member {name!r} (absolute or ..); nothing kept"
        )
    if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
        raise ExtractionFailed(f"the base backup holds {name!r}, which is not a file, directory or link")
    try:
        filtered = tarfile.data_filter(member, dest)
    except tarfile.FilterError as exc:
        raise ExtractionFailed(
            f"the base backup holds an unsafe member {name!r} ({exc}); nothing kept"
        ) from None
    return filtered


@dataclass
class Extracted:
    stored_bytes: int
    tar_bytes: int
    seconds: float
    has_backup_manifest: bool


def own(path: Path, user: str | None) -> None:
    """Give the tree to the server's OS user and make the top 0700 (PostgreSQL insists)."""
    if user:
        pw = pwd.getpwnam(user)
        for root, dirs, files in os.walk(path):
            os.chown(root, pw.pw_uid, pw.pw_gid)
            for name in dirs + files:
                os.lchown(os.path.join(root, name), pw.pw_uid, pw.pw_gid)
    path.chmod(0o700)


def clear_directory(path: Path, created: bool) -> None:
    if created:
        shutil.rmtree(path, ignore_errors=True)
        return
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def extract_base_backup(
    store: ObjectStore,
    manifest: BaseBackupManifest,
    data_directory: Path,
    user: str | None,
    progress: Callable[[int, int], None] | None = None,
) -> Extracted:
    """Stream `manifest.tar_key` into `data_directory` (which must not exist or be empty)."""
    check_data_directory(data_directory)
    created = not data_directory.exists()
    data_directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    start = time.monotonic()
    digest = hashlib.sha256()
    stored = [0]
    tar_count = [0]

    def counted(chunks: Iterable[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            tar_count[0] += len(chunk)
            if progress:
                progress(stored[0], tar_count[0])
            yield chunk

    reader = _ChunkReader(
        counted(zstd_decompress(hashing(store.get_stream(manifest.tar_key), digest, stored)))
    )
    dest = str(data_directory)
    try:
        with tarfile.open(fileobj=io.BufferedReader(reader, 1024 * 1024), mode="r|") as tar:
            for member in tar:
                tar.extract(_check_member(member, dest), dest, filter="fully_trusted")
        reader.drain()
    except ExtractionFailed:
        clear_directory(data_directory, created)
        raise
    except (DecompressionError, tarfile.TarError, EOFError) as exc:
        clear_directory(data_directory, created)
        # Stored bytes that differ from the manifest's are this location's damage (another copy may be
        # whole); bytes that match it are a bad backup, the same everywhere.
        whole = hashlib.sha256()
        size = [0]
        for _ in hashing(store.get_stream(manifest.tar_key), whole, size):
            pass
        if whole.hexdigest() != manifest.sha256 or size[0] != manifest.bytes:
            raise BaseBackupCorrupt(
                f"the base backup {manifest.tar_key} does not match its manifest (sha256 "
                f"{whole.hexdigest()[:12]}… of {size[0]} bytes, expected {manifest.sha256[:12]}… of "
                f"{manifest.bytes}; it is not a readable zstd tar: {exc}); nothing was kept in "
                f"{data_directory}: the stored object is damaged, use another base backup"
            ) from None
        raise ExtractionFailed(
            f"the base backup {manifest.tar_key} is not a readable zstd tar ({exc}); nothing was kept in "
            f"{data_directory}: take a new base backup"
        ) from None
    except OSError as exc:
        clear_directory(data_directory, created)
        raise ExtractionFailed(
            f"extracting {manifest.tar_key} into {data_directory} failed ({exc.strerror or exc}); "
            "nothing was kept: check free space and permissions"
        ) from None
    except BaseException:
        clear_directory(data_directory, created)
        raise
    if digest.hexdigest() != manifest.sha256 or stored[0] != manifest.bytes:
        clear_directory(data_directory, created)
        raise BaseBackupCorrupt(
            f"the base backup {manifest.tar_key} does not match its manifest "
            f"(sha256 {digest.hexdigest()[:12]}… of {stored[0]} bytes, expected {manifest.sha256[:12]}… "
            f"of {manifest.bytes}); what was extracted into {data_directory} has been removed: "
            "the stored object is damaged, use another base backup"
        )
    own(data_directory, user)
    return Extracted(
        stored_bytes=stored[0],
        tar_bytes=tar_count[0],
        seconds=time.monotonic() - start,
        has_backup_manifest=(data_directory / "backup_manifest").is_file(),
    )
