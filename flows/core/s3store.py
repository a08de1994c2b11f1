"""The object store on S3 or any S3-compatible endpoint: multipart uploads with bounded memory, aborted
when the writer fails; conditional puts; batched deletes; S3 errors translated into dbops errors.
"""

from __future__ import annotations

import builtins
import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from flows.core.errors import ObjectExists, ObjectNotFound, StorageError, StorageUnavailable
from flows.core.objectstore import (
    DEFAULT_PART_SIZE,
    DELETE_BATCH,
    S3_MAX_PARTS,
    S3_MIN_PART,
    IncompleteWrite,
    MiB,
    ObjectInfo,
    ObjectStore,
    PutResult,
    part_size_at,
)
from flows.core.s3copy import copy_object, same_account

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
        self,
        client: Any,
        bucket: str,
        root: str = "",
        *,
        concurrency: int = 4,
        page_size: int = 1000,
        put_args: dict[str, str] | None = None,
    ):
        self.client = client
        self.bucket = bucket
        self.root = root.strip("/")
        self.concurrency = max(1, concurrency)
        self.page_size = page_size
        #: StorageClass / ServerSideEncryption / SSEKMSKeyId for every object this store creates
        self.put_args = dict(put_args or {})
        self.url = f"s3://{bucket}" + (f"/{self.root}" if self.root else "")

    @property
    def endpoint(self) -> str:
        """The endpoint the client talks to, normalised (AWS's regional endpoints stay distinct)."""
        url = str(getattr(getattr(self.client, "meta", None), "endpoint_url", "") or "aws")
        return url.lower().rstrip("/").removeprefix("https://").removeprefix("http://")

    @property
    def identity(self) -> str:
        return f"s3://{self.endpoint}/{self.bucket}" + (f"/{self.root}" if self.root else "")

    def bucket_key(self, key: str) -> str:
        """The S3 key of a store key (under the store's root prefix), for the few callers that use boto3."""
        return f"{self.root}/{key.lstrip('/')}" if self.root else key.lstrip("/")

    def can_copy_from(self, source: ObjectStore) -> bool:
        """Whether `copy_from(source, ...)` works: S3 on the same endpoint with the same access key."""
        return isinstance(source, S3ObjectStore) and same_account(self, source)

    def copy_from(
        self, source: S3ObjectStore, key: str, size: int, *, if_absent: bool = False, **options: Any
    ) -> PutResult:
        """Server-side copy of `source`'s `key` (of `size` bytes) to the same key here (flows.core.s3copy);
        the bytes stay in S3, this store's storage class and encryption apply."""
        return copy_object(self, source, key, size, if_absent=if_absent, **options)

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
            "put",
            self.client.put_object,
            key,
            Bucket=self.bucket,
            Key=self.bucket_key(key),
            Body=data,
            **extra,
            **self.put_args,
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
        full = self.bucket_key(key)
        base = max(part_size, S3_MIN_PART)
        upload_id = self._call(
            "create multipart upload",
            self.client.create_multipart_upload,
            Bucket=self.bucket,
            Key=full,
            **self.put_args,
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
            Bucket=self.bucket, Prefix=self.bucket_key(prefix), PaginationConfig={"PageSize": self.page_size}
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
            resp = self.client.get_object(Bucket=self.bucket, Key=self.bucket_key(key))
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
            resp = self.client.head_object(Bucket=self.bucket, Key=self.bucket_key(key))
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
                Delete={"Objects": [{"Key": self.bucket_key(k)} for k in batch], "Quiet": True},
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
            Prefix=self.bucket_key(prefix),
        )
        return [self._rel(u["Key"]) for u in resp.get("Uploads", [])]

    def incomplete_writes(self, prefix: str) -> builtins.list[IncompleteWrite]:
        """Open multipart uploads under `prefix`, every page (a dead upload keeps its parts, and its cost)."""
        found: list[IncompleteWrite] = []
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.bucket_key(prefix)}
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
                    Bucket=self.bucket, Key=self.bucket_key(write.key), UploadId=write.handle
                )
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") == "NoSuchUpload":
                    continue  # finished or aborted meanwhile
                raise _translate_s3_error(exc, self.bucket, "abort multipart upload") from exc
            except Exception as exc:
                raise _translate_s3_error(exc, self.bucket, "abort multipart upload") from exc
            done += 1
        return done
