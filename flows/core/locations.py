"""Where backups live: a primary location and its copies (the 3-2-1 rule: three copies, two media, one
off-site), as pgBackRest's repo1/repo2 each with its own retention.

A flow's `storage` parameter names them: one block slug (`s3-bucket/backups`), a comma-separated string
of slugs (what a Prefect Variable can hold), or a list whose items are slugs or `StorageLocation`s with
per-location settings. The first is the primary: backups are written there first and its manifest makes
them backups; the others are copies, filled from the primary afterwards.

Two names for the same place would make a "copy" that is the primary itself (and retention of one would
delete the other's objects), so locations are compared by what they are, not by what they are called:
S3 endpoint + bucket + folder, or the resolved directory (`check_distinct`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from flows.core.errors import ConfigurationError
from flows.core.retention import RetentionPolicy

SUPPORTED_KINDS = ("s3-bucket", "local-file-system")

Encryption = Literal["none", "AES256", "aws:kms"]


class StorageLocation(BaseModel):
    """One place backups are kept, with the settings that may differ between places."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    block: str = Field(description="Storage block slug: s3-bucket/NAME or local-file-system/NAME.")
    retention: RetentionPolicy | None = Field(
        default=None,
        description="This location's own retention (e.g. 7 days locally, 12 months off-site); empty: the "
        "flow's retention.",
    )
    storage_class: str | None = Field(
        default=None,
        description="S3 storage class of new objects (STANDARD_IA, GLACIER_IR, ...); empty: the bucket's "
        "default. S3 only.",
    )
    sse: Encryption = Field(
        default="none",
        description="S3 server-side encryption of new objects: none (the bucket's default), AES256 (SSE-S3) "
        "or aws:kms (SSE-KMS, with sse_kms_key_id). S3 only.",
    )
    sse_kms_key_id: str | None = Field(
        default=None, description="KMS key id or ARN for sse=aws:kms; empty: the account's aws/s3 key."
    )

    @model_validator(mode="after")
    def _consistent(self) -> StorageLocation:
        try:
            check_slug(self.block)
        except ConfigurationError as exc:  # pydantic reports ValueErrors as validation errors
            raise ValueError(str(exc)) from None
        if self.kind != "s3-bucket" and (self.storage_class or self.sse != "none" or self.sse_kms_key_id):
            raise ValueError(
                f"{self.block}: storage_class and sse apply to S3 only; remove them from this location"
            )
        if self.sse_kms_key_id and self.sse != "aws:kms":
            raise ValueError(f"{self.block}: sse_kms_key_id needs sse=aws:kms")
        return self

    @property
    def kind(self) -> str:
        return self.block.split("/", 1)[0]

    def put_args(self) -> dict[str, str]:
        """Extra arguments for S3 PutObject/CreateMultipartUpload/CopyObject (empty for the defaults)."""
        args: dict[str, str] = {}
        if self.storage_class:
            args["StorageClass"] = self.storage_class
        if self.sse != "none":
            args["ServerSideEncryption"] = self.sse
        if self.sse_kms_key_id:
            args["SSEKMSKeyId"] = self.sse_kms_key_id
        return args


#: A flow's `storage` parameter: the primary first, then the copies.
StorageList = str | list[str | StorageLocation]

#: What a task takes for one location: a plain slug, or a location with its settings.
StorageRef = str | StorageLocation


def check_slug(slug: str) -> None:
    if "/" not in slug or not slug.split("/", 1)[1]:
        raise ConfigurationError(
            f"storage {slug!r} is not a block slug; use s3-bucket/NAME or local-file-system/NAME"
        )
    if slug.split("/", 1)[0] not in SUPPORTED_KINDS:
        raise ConfigurationError(
            f"storage {slug!r} is not a supported block type; use s3-bucket/NAME or local-file-system/NAME"
        )


def as_location(ref: StorageRef) -> StorageLocation:
    if isinstance(ref, StorageLocation):
        return ref
    try:
        return StorageLocation(block=ref.strip())
    except ValidationError as exc:
        raise ConfigurationError(str(exc.errors()[0]["msg"]).removeprefix("Value error, ")) from None


def slug_of(ref: StorageRef) -> str:
    return ref.block if isinstance(ref, StorageLocation) else ref


def parse_locations(storage: StorageList) -> list[StorageLocation]:
    """The primary first, then the copies; refuses an empty list and a slug named twice."""
    items: list[str | StorageLocation]
    if isinstance(storage, str):
        items = [part.strip() for part in storage.split(",") if part.strip()]
    else:
        items = list(storage)
    if not items:
        raise ConfigurationError(
            "storage is empty; name at least one storage block, e.g. s3-bucket/backups (the primary), then "
            "any copies"
        )
    locations = [as_location(item) for item in items]
    seen: set[str] = set()
    for location in locations:
        if location.block in seen:
            raise ConfigurationError(
                f"storage lists {location.block} twice; a copy must be a different place from the primary "
                "and from the other copies"
            )
        seen.add(location.block)
    return locations


def check_distinct(places: list[tuple[str, str]]) -> None:
    """Refuse two locations that are the same place, or one inside the other, under different names.

    `places` is (block slug, identity) in storage order; an identity is `s3://ENDPOINT/BUCKET/FOLDER` or
    `file:///resolved/dir` (`ObjectStore.identity`). Nested places are refused too: the outer one's
    retention would read the inner one's objects as its own or as foreign.
    """
    for i, (slug_a, ident_a) in enumerate(places):
        for slug_b, ident_b in places[i + 1 :]:
            a, b = ident_a.rstrip("/"), ident_b.rstrip("/")
            if a == b:
                raise ConfigurationError(
                    f"storage blocks {slug_a} and {slug_b} are the same place ({a}); a copy must be "
                    "somewhere else, or it is no copy"
                )
            if a.startswith(b + "/") or b.startswith(a + "/"):
                inner, outer = (a, b) if a.startswith(b + "/") else (b, a)
                raise ConfigurationError(
                    f"storage blocks {slug_a} and {slug_b} overlap ({inner} is inside {outer}); give each "
                    "location its own bucket, folder or directory"
                )
