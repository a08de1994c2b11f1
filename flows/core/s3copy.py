"""Server-side copies between two S3 stores on one endpoint and one account: the bytes never pass through
the worker, so a copy in the same region costs a request per object instead of a download and an upload.

CopyObject takes objects up to 5 GiB; larger ones are copied as a multipart upload of UploadPartCopy
ranges (each at most 5 GiB). A copy that must not replace anything (`if_absent`) also goes the multipart
way, because CompleteMultipartUpload honours `If-None-Match: *` and CopyObject does not everywhere. A
failed multipart copy is aborted, so it leaves no object and no parts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from flows.core.objectstore import MiB, PutResult, part_size_for

GiB = 1024 * MiB
#: the largest object (and the largest part) CopyObject / UploadPartCopy accept
COPY_OBJECT_LIMIT = 5 * GiB
#: the smallest part of a multipart copy: fewer requests than upload parts, still far below 5 GiB
COPY_PART_MIN = 256 * MiB


class S3Side(Protocol):
    """What this module uses of an S3Side (its companion: it calls the store's own error-translating
    request helpers, so a failed copy reads like any other failed S3 request)."""

    client: Any
    bucket: str
    concurrency: int
    put_args: dict[str, str]

    @property
    def endpoint(self) -> str: ...

    def bucket_key(self, key: str) -> str: ...

    def _call(self, action: str, fn: Callable[..., Any], **kwargs: Any) -> Any: ...

    def _conditional(self, action: str, fn: Callable[..., Any], key: str, **kwargs: Any) -> Any: ...


def access_key(client: Any) -> str | None:
    """The access key id a boto3 client signs with, or None when it cannot be told (then no server-side
    copy: a copy across two accounts would fail, or read with rights the target should not have)."""
    try:
        credentials = client._get_credentials()
        return str(credentials.get_frozen_credentials().access_key) if credentials is not None else None
    except Exception:  # not a boto3 client, or credentials that cannot be resolved here
        return None


def same_account(target: S3Side, source: S3Side) -> bool:
    """Both on one endpoint with one access key: CopyObject can then read the source with the target's
    credentials."""
    if target.endpoint != source.endpoint:
        return False
    key = access_key(target.client)
    return key is not None and key == access_key(source.client)


def copy_object(
    target: S3Side,
    source: S3Side,
    key: str,
    size: int,
    *,
    if_absent: bool = False,
    multipart_threshold: int = COPY_OBJECT_LIMIT,
    part_size: int | None = None,
) -> PutResult:
    """Copy `key` of `source` to the same key of `target` inside S3, with the target's put options
    (storage class, server-side encryption). `size` is the source object's size (from its listing)."""
    copy_source = {"Bucket": source.bucket, "Key": source.bucket_key(key)}
    full = target.bucket_key(key)
    if size <= multipart_threshold and not if_absent:
        # MetadataDirective COPY keeps the object's metadata; the storage class and SSE given here apply
        target._call(
            "copy",
            target.client.copy_object,
            Bucket=target.bucket,
            Key=full,
            CopySource=copy_source,
            MetadataDirective="COPY",
            **target.put_args,
        )
        return PutResult(key=key, bytes=size, parts=1)
    part = part_size or min(part_size_for(size, minimum=COPY_PART_MIN), COPY_OBJECT_LIMIT)
    ranges = [(start, min(start + part, size) - 1) for start in range(0, max(size, 1), part)]
    upload_id = target._call(
        "create multipart upload",
        target.client.create_multipart_upload,
        Bucket=target.bucket,
        Key=full,
        **target.put_args,
    )["UploadId"]
    completed = False

    def copy_part(numbered: tuple[int, tuple[int, int]]) -> dict[str, Any]:
        number, (first, last) = numbered
        extra = {"CopySourceRange": f"bytes={first}-{last}"} if size else {}
        resp = target._call(
            "upload part copy",
            target.client.upload_part_copy,
            Bucket=target.bucket,
            Key=full,
            UploadId=upload_id,
            PartNumber=number,
            CopySource=copy_source,
            **extra,
        )
        return {"PartNumber": number, "ETag": resp["CopyPartResult"]["ETag"]}

    try:
        with ThreadPoolExecutor(max_workers=target.concurrency, thread_name_prefix="s3-copy") as pool:
            parts = list(pool.map(copy_part, enumerate(ranges, start=1)))
        target._conditional(
            "complete multipart upload",
            target.client.complete_multipart_upload,
            key,
            Bucket=target.bucket,
            Key=full,
            UploadId=upload_id,
            MultipartUpload={"Parts": parts},
            **({"IfNoneMatch": "*"} if if_absent else {}),
        )
        completed = True
        return PutResult(key=key, bytes=size, parts=len(parts))
    finally:
        if not completed:
            with contextlib.suppress(Exception):
                target.client.abort_multipart_upload(Bucket=target.bucket, Key=full, UploadId=upload_id)
