"""One small object-store interface over S3 (any S3-compatible endpoint) and a local directory.

The flows need four things from storage: put a stream, list a prefix, get a stream, delete in batches.
Both implementations keep a stream's memory bounded (part size x upload concurrency for S3, one chunk for
a directory) and leave no partial object behind when the writer fails: S3 multipart uploads are aborted,
local files are written under a temporary name and renamed only when complete.
"""

from __future__ import annotations

import builtins  # the stores' method `list` shadows the type inside their classes
import contextlib
import errno
import os
import secrets
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from flows.core.errors import ObjectExists, ObjectNotFound, StorageError, StorageUnavailable

MiB = 1024 * 1024
S3_MIN_PART = 5 * MiB
S3_MAX_PART = 5 * 1024 * MiB
S3_MAX_PARTS = 10_000
DEFAULT_PART_SIZE = 16 * MiB
DELETE_BATCH = 1000  # S3 DeleteObjects accepts at most 1000 keys per request


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    last_modified: datetime


@dataclass(frozen=True)
class IncompleteWrite:
    """A write that never finished: an open S3 multipart upload, or a local `.partial-` file."""

    key: str  # the key it was meant to become
    started: datetime
    handle: str  # S3 upload id, or the temporary file's key


@dataclass(frozen=True)
class PutResult:
    key: str
    bytes: int
    parts: int


def part_size_for(expected_bytes: int | None, *, minimum: int = DEFAULT_PART_SIZE) -> int:
    """A base part size such that a stream of `expected_bytes` fits in well under 10,000 parts.

    Aims at 5,000 parts for the estimate, so an estimate that is off by a factor of several still fits
    (see `part_size_at`, which also grows the size past the estimate). Rounded up to a whole MiB.
    """
    if not expected_bytes or expected_bytes <= 0:
        return minimum
    wanted = -(-expected_bytes // 5_000)
    size = max(minimum, -(-wanted // MiB) * MiB)
    return min(size, S3_MAX_PART)


def part_size_at(part_number: int, base: int) -> int:
    """Size of part `part_number` (1-based): `base` for the first 5,000 parts, then doubling every 1,000.

    S3 parts may differ in size (all but the last at least 5 MiB), so a stream that outgrows its estimate
    still finishes under 10,000 parts: capacity is base x (5,000 + 1,000 x (2+4+8+16+32)) = 67,000 x base.
    """
    if part_number <= 5_000:
        return base
    tier = (part_number - 5_001) // 1_000 + 1
    return min(base * (2**tier), S3_MAX_PART)


class ObjectStore(ABC):
    """Keys are relative to the store's root (an S3 bucket folder or a directory)."""

    #: human-readable location used in messages and manifests, e.g. "s3://bucket/folder"
    url: str

    @abstractmethod
    def put_stream(
        self,
        key: str,
        chunks: Iterable[bytes],
        *,
        part_size: int = DEFAULT_PART_SIZE,
        progress: Callable[[int], None] | None = None,
        if_absent: bool = False,
    ) -> PutResult:
        """Store a stream of unknown length; the object appears only when the stream ended cleanly.

        `if_absent`: the object is created only if no object has that key when it appears (S3
        `If-None-Match: *`, a hard link for a directory); otherwise `ObjectExists` and nothing is replaced.
        """

    @abstractmethod
    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> None: ...

    @abstractmethod
    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object under `prefix`, lazily, page by page."""

    @abstractmethod
    def get_stream(self, key: str, chunk_size: int = MiB) -> Iterator[bytes]: ...

    @abstractmethod
    def delete(self, keys: Iterable[str]) -> int:
        """Delete keys in batches of at most 1000; returns how many were deleted."""

    @abstractmethod
    def head(self, key: str) -> ObjectInfo | None: ...

    def get_bytes(self, key: str) -> bytes:
        return b"".join(self.get_stream(key))

    def incomplete_writes(self, prefix: str) -> builtins.list[IncompleteWrite]:
        """Writes under `prefix` that were started and never finished (none by default)."""
        return []

    def discard_incomplete(self, writes: Iterable[IncompleteWrite]) -> int:
        """Abort or remove what `incomplete_writes` found; returns how many were discarded."""
        return 0

    def check_writable(self, prefix: str) -> None:
        """Preflight: write, read back and delete a marker, so a dump never starts into a dead end.

        Also checks that a conditional create of a taken key is refused: dump keys rely on it so that two
        dumps started in the same second never overwrite each other, and a store that silently ignores
        the condition would make that a silent overwrite (fail closed).
        """
        key = f"{prefix.rstrip('/')}/.dbops-write-check-{secrets.token_hex(6)}"
        self.put_bytes(key, b"dbops write check\n", if_absent=True)
        try:
            if self.get_bytes(key) != b"dbops write check\n":
                raise StorageError(f"{self.url}/{key} did not read back what was written; check the storage")
            try:
                self.put_bytes(key, b"dbops second writer\n", if_absent=True)
            except ObjectExists:
                return
            raise StorageError(
                f"{self.url} ignores conditional writes (If-None-Match: *), so two dumps started in the same "
                "second could overwrite each other; use storage that supports them (AWS S3, MinIO 2024+)"
            )
        finally:
            self.delete([key])


# -- S3 ----------------------------------------------------------------------------------------------------

_TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "InternalError",
    "ServiceUnavailable",
    "503",
    "500",
    "502",
    "504",
}


def _translate_s3_error(exc: BaseException, bucket: str, action: str) -> Exception:
    """botocore's errors → one sentence with a fix; 5xx/throttling/network are transient."""
    from botocore.exceptions import (
        ClientError,
        ConnectTimeoutError,
        EndpointConnectionError,
        HTTPClientError,  # ConnectionClosedError, ReadTimeoutError, ResponseStreamingError
        IncompleteReadError,
        NoCredentialsError,
    )

    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code == "NoSuchBucket":
            return StorageError(
                f"S3 bucket {bucket!r} does not exist; create it or fix bucket_name in the storage block"
            )
        if code in {"AccessDenied", "AllAccessDisabled", "403"}:
            return StorageError(
                f"S3 denied {action} in bucket {bucket!r}; grant s3:PutObject, s3:GetObject, s3:ListBucket "
                "and s3:DeleteObject to the credentials in the storage block"
            )
        if code in {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"}:
            return StorageError(
                f"S3 rejected the credentials ({code}) during {action}; fix the AwsCredentials block"
            )
        if code == "NoSuchKey" or code == "404":
            return StorageError(f"object not found in bucket {bucket!r} during {action}")
        if code in _TRANSIENT_CODES or status >= 500:
            return StorageUnavailable(
                f"S3 {action} in bucket {bucket!r} failed with {code or status}; retrying"
            )
        return StorageError(
            f"S3 {action} in bucket {bucket!r} failed: {code} {err.get('Message', '')}".strip()
        )
    if isinstance(exc, NoCredentialsError):
        return StorageError("no AWS credentials found; set them in the AwsCredentials block")
    network = EndpointConnectionError | ConnectTimeoutError | HTTPClientError | IncompleteReadError
    if isinstance(exc, network | ConnectionError):
        return StorageUnavailable(f"cannot reach the S3 endpoint during {action} ({exc}); retrying")
    return exc if isinstance(exc, Exception) else RuntimeError(str(exc))


class S3ObjectStore(ObjectStore):
    """S3 through a boto3 client; multipart uploads done by hand so a failure always aborts them."""

    def __init__(
        self, client: Any, bucket: str, root: str = "", *, concurrency: int = 4, page_size: int = 1000
    ):
        self.client = client
        self.bucket = bucket
        self.root = root.strip("/")
        self.concurrency = max(1, concurrency)
        self.page_size = page_size
        self.url = f"s3://{bucket}" + (f"/{self.root}" if self.root else "")

    def _key(self, key: str) -> str:
        return f"{self.root}/{key.lstrip('/')}" if self.root else key.lstrip("/")

    def _rel(self, full: str) -> str:
        return full[len(self.root) + 1 :] if self.root else full

    def _call(self, action: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
        try:
            return fn(**kwargs)
        except Exception as exc:  # translated below, never swallowed
            raise _translate_s3_error(exc, self.bucket, action) from exc

    def _exists_error(self, exc: Exception, key: str) -> ObjectExists | None:
        """S3's answer to a lost `If-None-Match: *` race: 412 PreconditionFailed (409 while in flight)."""
        from botocore.exceptions import ClientError

        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in {"PreconditionFailed", "412", "ConditionalRequestConflict"}:
                return ObjectExists(
                    f"{self.url}/{key} already exists (another writer created it first); nothing was replaced"
                )
        return None

    def _conditional(self, action: str, fn: Callable[..., Any], key: str, **kwargs: Any) -> Any:
        try:
            return fn(**kwargs)
        except Exception as exc:
            exists = self._exists_error(exc, key)
            if exists is not None:
                raise exists from exc
            raise _translate_s3_error(exc, self.bucket, action) from exc

    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        extra = {"IfNoneMatch": "*"} if if_absent else {}
        self._conditional(
            "put", self.client.put_object, key, Bucket=self.bucket, Key=self._key(key), Body=data, **extra
        )

    def put_stream(
        self,
        key: str,
        chunks: Iterable[bytes],
        *,
        part_size: int = DEFAULT_PART_SIZE,
        progress: Callable[[int], None] | None = None,
        if_absent: bool = False,
    ) -> PutResult:
        full = self._key(key)
        base = max(part_size, S3_MIN_PART)
        upload_id = self._call(
            "create multipart upload", self.client.create_multipart_upload, Bucket=self.bucket, Key=full
        )["UploadId"]
        completed = False
        total = 0
        parts: dict[int, str] = {}
        in_flight: list[Future[None]] = []
        slots = threading.BoundedSemaphore(self.concurrency)
        pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="s3-part")

        def upload(number: int, body: bytes) -> None:
            try:
                resp = self._call(
                    "upload part",
                    self.client.upload_part,
                    Bucket=self.bucket,
                    Key=full,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=body,
                )
                parts[number] = resp["ETag"]
            finally:
                slots.release()

        def submit(number: int, body: bytes) -> None:
            if number > S3_MAX_PARTS:
                raise StorageError(f"{full}: more than {S3_MAX_PARTS} parts; raise the part size")
            # Wait for a free slot first: at most `concurrency` parts in flight plus the one being filled.
            slots.acquire()
            for done in [f for f in in_flight if f.done()]:
                done.result()
                in_flight.remove(done)
            in_flight.append(pool.submit(upload, number, body))

        try:
            buf = bytearray()
            number = 1
            target = part_size_at(number, base)
            for chunk in chunks:
                if not chunk:
                    continue
                buf += chunk
                total += len(chunk)
                while len(buf) >= target:
                    with memoryview(buf) as view:  # one copy of the part, not two (slice, then bytes)
                        body = bytes(view[:target])
                    del buf[:target]
                    submit(number, body)
                    number += 1
                    target = part_size_at(number, base)
                if progress:
                    progress(total)
            if buf or number == 1:
                submit(number, bytes(buf))
                number += 1
            for fut in in_flight:
                fut.result()
            ordered = [{"PartNumber": n, "ETag": parts[n]} for n in sorted(parts)]
            self._conditional(
                "complete multipart upload",
                self.client.complete_multipart_upload,
                key,
                Bucket=self.bucket,
                Key=full,
                UploadId=upload_id,
                MultipartUpload={"Parts": ordered},
                **({"IfNoneMatch": "*"} if if_absent else {}),
            )
            completed = True
            return PutResult(key=key, bytes=total, parts=len(ordered))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            if not completed:
                with contextlib.suppress(Exception):
                    self.client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        paginator = self.client.get_paginator("list_objects_v2")
        pages = paginator.paginate(
            Bucket=self.bucket, Prefix=self._key(prefix), PaginationConfig={"PageSize": self.page_size}
        )
        try:
            for page in pages:
                for obj in page.get("Contents", []):
                    yield ObjectInfo(self._rel(obj["Key"]), int(obj["Size"]), obj["LastModified"])
        except Exception as exc:
            raise _translate_s3_error(exc, self.bucket, "list") from exc

    def get_stream(self, key: str, chunk_size: int = MiB) -> Iterator[bytes]:
        from botocore.exceptions import ClientError

        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in {"NoSuchKey", "404", "NotFound"}:
                raise ObjectNotFound(
                    f"{self.url}/{key} does not exist (deleted since it was listed?)"
                ) from exc
            raise _translate_s3_error(exc, self.bucket, "get") from exc
        except Exception as exc:
            raise _translate_s3_error(exc, self.bucket, "get") from exc
        body = resp["Body"]
        try:
            while True:
                try:
                    chunk = body.read(chunk_size)
                except Exception as exc:
                    raise _translate_s3_error(exc, self.bucket, "get") from exc
                if not chunk:
                    return
                yield chunk
        finally:
            body.close()

    def head(self, key: str) -> ObjectInfo | None:
        from botocore.exceptions import ClientError

        try:
            resp = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in {"404", "NoSuchKey", "NotFound"}:
                return None
            raise _translate_s3_error(exc, self.bucket, "head") from exc
        except Exception as exc:
            raise _translate_s3_error(exc, self.bucket, "head") from exc
        return ObjectInfo(key, int(resp["ContentLength"]), resp["LastModified"])

    def delete(self, keys: Iterable[str]) -> int:
        deleted = 0
        batch: list[str] = []

        def flush() -> None:
            nonlocal deleted
            if not batch:
                return
            resp = self._call(
                "delete",
                self.client.delete_objects,
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": self._key(k)} for k in batch], "Quiet": True},
            )
            errors = resp.get("Errors", [])
            if errors:
                first = errors[0]
                raise StorageError(
                    f"S3 refused to delete {len(errors)} of {len(batch)} objects (first: {first.get('Key')}: "
                    f"{first.get('Code')}); check s3:DeleteObject permission"
                )
            deleted += len(batch)
            batch.clear()

        for key in keys:
            batch.append(key)
            if len(batch) >= DELETE_BATCH:
                flush()
        flush()
        return deleted

    def list_incomplete_uploads(self, prefix: str = "") -> builtins.list[str]:
        """Keys with multipart uploads still open: orphan parts that cost money and hold no backup."""
        resp = self._call(
            "list multipart uploads",
            self.client.list_multipart_uploads,
            Bucket=self.bucket,
            Prefix=self._key(prefix),
        )
        return [self._rel(u["Key"]) for u in resp.get("Uploads", [])]

    def incomplete_writes(self, prefix: str) -> builtins.list[IncompleteWrite]:
        """Open multipart uploads under `prefix`, every page (a dead upload keeps its parts, and its cost)."""
        found: builtins.list[IncompleteWrite] = []
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self._key(prefix)}
        while True:
            resp = self._call("list multipart uploads", self.client.list_multipart_uploads, **kwargs)
            for upload in resp.get("Uploads", []):
                found.append(
                    IncompleteWrite(self._rel(upload["Key"]), upload["Initiated"], upload["UploadId"])
                )
            if not resp.get("IsTruncated"):
                return found
            kwargs["KeyMarker"] = resp.get("NextKeyMarker", "")
            kwargs["UploadIdMarker"] = resp.get("NextUploadIdMarker", "")

    def discard_incomplete(self, writes: Iterable[IncompleteWrite]) -> int:
        from botocore.exceptions import ClientError

        done = 0
        for write in writes:
            try:
                self.client.abort_multipart_upload(
                    Bucket=self.bucket, Key=self._key(write.key), UploadId=write.handle
                )
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") == "NoSuchUpload":
                    continue  # finished or aborted meanwhile
                raise _translate_s3_error(exc, self.bucket, "abort multipart upload") from exc
            except Exception as exc:
                raise _translate_s3_error(exc, self.bucket, "abort multipart upload") from exc
            done += 1
        return done


# -- local directory ---------------------------------------------------------------------------------------


class LocalObjectStore(ObjectStore):
    """A directory as an object store: the embedded default, and what an NFS-mounted backup volume is."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).expanduser().resolve()
        self.url = f"file://{self.root}"

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
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames.sort()
            for name in sorted(filenames):
                if ".partial-" in name:
                    continue
                full = Path(dirpath) / name
                rel = full.relative_to(self.root).as_posix()
                if rel.startswith(prefix):
                    st = full.stat()
                    yield ObjectInfo(rel, st.st_size, datetime.fromtimestamp(st.st_mtime, UTC))

    def get_stream(self, key: str, chunk_size: int = MiB) -> Iterator[bytes]:
        path = self._path(key)
        try:
            f = open(path, "rb")  # noqa: SIM115 - opened outside `with` so only the open maps to ObjectNotFound
        except FileNotFoundError as exc:
            raise ObjectNotFound(f"{self.url}/{key} does not exist") from exc
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
