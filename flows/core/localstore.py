"""The object store in a local directory: files written under a temporary `.partial-` name and renamed
only when complete, so a failed writer leaves no object behind.
"""

from __future__ import annotations

import builtins  # the stores' method `list` shadows the type inside their classes
import errno
import os
import secrets
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

from flows.core.errors import ObjectExists, ObjectNotFound, StorageError
from flows.core.objectstore import DEFAULT_PART_SIZE, IncompleteWrite, MiB, ObjectInfo, ObjectStore, PutResult


class LocalObjectStore(ObjectStore):
    """A directory as an object store: the embedded default, and what an NFS-mounted backup volume is."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).expanduser().resolve()
        self.url = f"file://{self.root}"

    @property
    def identity(self) -> str:
        return f"file://{self.root}"

    def _path(self, key: str) -> Path:
        path = (self.root / key.lstrip("/")).resolve()
        if path != self.root and self.root not in path.parents:
            raise StorageError(f"key {key!r} escapes the storage directory {self.root}")
        return path

    def _publish(self, tmp: Path, path: Path, key: str) -> None:
        """Make the finished temporary file visible as `path` without replacing anything there.

        link(2) fails with EEXIST when the name exists, atomically, also on NFS: of two writers racing for
        one key exactly one wins. Filesystems without hard links get an O_EXCL placeholder first.
        """
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise ObjectExists(
                f"{self.url}/{key} already exists (another writer created it first); nothing was replaced"
            ) from None
        except OSError as exc:
            if exc.errno not in {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV}:
                raise
            try:
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            except FileExistsError:
                raise ObjectExists(
                    f"{self.url}/{key} already exists (another writer created it first); nothing was replaced"
                ) from None
            os.replace(tmp, path)
            return
        tmp.unlink()

    def _ensure_root(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise StorageError(
                f"local storage basepath {self.root} is a file, not a directory; point basepath in the block "
                "at a directory"
            )
        if not self.root.is_dir():
            raise StorageError(
                f"local storage directory {self.root} does not exist; create it or fix basepath in the block"
            )

    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        self.put_stream(key, [data], if_absent=if_absent)

    def put_stream(
        self,
        key: str,
        chunks: Iterable[bytes],
        *,
        part_size: int = DEFAULT_PART_SIZE,
        progress: Callable[[int], None] | None = None,
        if_absent: bool = False,
    ) -> PutResult:
        self._ensure_root()
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except PermissionError as exc:
            raise StorageError(f"cannot create {path.parent}: permission denied; fix the directory") from exc
        except OSError as exc:  # a file where a directory of the key must be (FileExistsError, ENOTDIR)
            raise StorageError(
                f"cannot create {path.parent} for {key} ({exc.strerror}): a file in {self.root} stands where "
                "a directory must be; move it away or use another prefix"
            ) from exc
        tmp = path.with_name(f".{path.name}.partial-{secrets.token_hex(4)}")
        total = 0
        ok = False
        try:
            with open(tmp, "wb") as f:
                for chunk in chunks:
                    f.write(chunk)
                    total += len(chunk)
                    if progress:
                        progress(total)
                f.flush()
                os.fsync(f.fileno())
            if if_absent:
                self._publish(tmp, path, key)
            else:
                os.replace(tmp, path)
            ok = True
        except PermissionError as exc:
            raise StorageError(
                f"cannot write to {path.parent}: permission denied; fix the directory"
            ) from exc
        finally:
            if not ok:
                tmp.unlink(missing_ok=True)
        return PutResult(key=key, bytes=total, parts=1)

    def _walk_start(self, prefix: str) -> Path:
        """The deepest directory the prefix names, confined to the root (`..` never lists outside it)."""
        if ".." in PurePosixPath(prefix).parts:
            raise StorageError(f"prefix {prefix!r} escapes the storage directory {self.root}")
        return self._path(prefix.rsplit("/", 1)[0]) if "/" in prefix else self.root

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        self._ensure_root()
        prefix = prefix.lstrip("/")
        # Walk only below the deepest directory the prefix names; filter by the rest of the prefix.
        start = self._walk_start(prefix)
        if not start.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(start, onerror=self._walk_error):
            dirnames.sort()
            for name in sorted(filenames):
                if ".partial-" in name:
                    continue
                full = Path(dirpath) / name
                rel = full.relative_to(self.root).as_posix()
                if rel.startswith(prefix):
                    st = full.stat()
                    yield ObjectInfo(rel, st.st_size, datetime.fromtimestamp(st.st_mtime, UTC))

    def _walk_error(self, exc: OSError) -> None:
        """os.walk skips a directory it cannot read, silently: a listing must not look complete then (WAL
        expiry and retention decide from it). A directory removed meanwhile held nothing: skipped."""
        if isinstance(exc, FileNotFoundError):
            return
        raise StorageError(
            f"cannot list {exc.filename} in {self.url} ({exc.strerror}); fix its permissions for this worker"
        ) from exc

    def get_stream(self, key: str, chunk_size: int = MiB) -> Iterator[bytes]:
        path = self._path(key)
        try:
            f = open(path, "rb")  # noqa: SIM115 - opened outside `with` so only the open maps to ObjectNotFound
        except FileNotFoundError as exc:
            raise ObjectNotFound(f"{self.url}/{key} does not exist") from exc
        except OSError as exc:  # a directory at the key, a file where a directory should be, permissions
            raise StorageError(
                f"cannot read {self.url}/{key} ({exc.strerror}); fix the storage directory"
            ) from exc
        with f:
            while chunk := f.read(chunk_size):
                yield chunk

    def head(self, key: str) -> ObjectInfo | None:
        path = self._path(key)
        if not path.is_file():
            return None
        st = path.stat()
        return ObjectInfo(key, st.st_size, datetime.fromtimestamp(st.st_mtime, UTC))

    def delete(self, keys: Iterable[str]) -> int:
        deleted = 0
        for key in keys:
            path = self._path(key)
            try:
                path.unlink()
                deleted += 1
            except FileNotFoundError:
                continue
            parent = path.parent
            while parent != self.root:
                try:
                    parent.rmdir()
                except OSError:
                    break
                parent = parent.parent
        return deleted

    def incomplete_writes(self, prefix: str) -> builtins.list[IncompleteWrite]:
        """`.<name>.partial-<token>` files under `prefix`: a writer that died before its rename."""
        self._ensure_root()
        prefix = prefix.lstrip("/")
        start = self._walk_start(prefix)
        if not start.is_dir():
            return []
        found: builtins.list[IncompleteWrite] = []
        for dirpath, _dirnames, filenames in os.walk(start):
            for name in filenames:
                if not name.startswith(".") or ".partial-" not in name:
                    continue
                full = Path(dirpath) / name
                rel = full.relative_to(self.root).as_posix()
                meant = (Path(dirpath) / name[1:].rsplit(".partial-", 1)[0]).relative_to(self.root).as_posix()
                if not meant.startswith(prefix):
                    continue
                try:
                    st = full.stat()
                except FileNotFoundError:
                    continue  # finished (renamed) or removed meanwhile
                found.append(IncompleteWrite(meant, datetime.fromtimestamp(st.st_mtime, UTC), rel))
        return sorted(found, key=lambda w: w.handle)

    def discard_incomplete(self, writes: Iterable[IncompleteWrite]) -> int:
        done = 0
        for write in writes:
            try:
                self._path(write.handle).unlink()
                done += 1
            except FileNotFoundError:
                continue
        return done
