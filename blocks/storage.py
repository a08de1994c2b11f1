"""Where backups go: Prefect's own storage blocks, seen through dbops' small object-store interface.

Flows take a block slug (`s3-bucket/imagemanager-backups`, `local-file-system/backups`) and get an
`ObjectStore`; S3 comes from prefect-aws (any S3-compatible endpoint through `endpoint_url`), local
storage from Prefect's LocalFileSystem.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from prefect.blocks.core import Block
from prefect.filesystems import LocalFileSystem
from prefect_aws import S3Bucket
from pydantic import ValidationError

from flows.core.errors import ConfigurationError, DbopsError
from flows.core.localstore import LocalObjectStore
from flows.core.locations import (
    SUPPORTED_KINDS,
    StorageList,
    StorageLocation,
    StorageRef,
    as_location,
    check_distinct,
    parse_locations,
)
from flows.core.objectstore import ObjectStore
from flows.core.redact import validation_summary
from flows.core.s3store import S3ObjectStore
from flows.core.wal_archive import ArchiveLocation, WalArchive


def load_sync(slug: str) -> Block:
    """`Block.load` from synchronous code, where it returns the block (Prefect types it as block or
    coroutine because inside an event loop it dispatches to `aload`); every dbops caller is synchronous."""
    block = Block.load(slug)
    if not isinstance(block, Block):
        raise DbopsError(
            f"block {slug!r} was loaded from inside an event loop, where Prefect returns a coroutine; "
            "this is a dbops bug, report it"
        )
    return block


def load_block(slug: str, expected: type[Block] | None = None) -> Block:
    """Load `type-slug/name`; an unknown block is one sentence naming it and how to create it."""
    if "/" not in slug:
        raise ConfigurationError(
            f"{slug!r} is not a block slug; use TYPE/NAME such as s3-bucket/backups or "
            "postgres-database/imagemanager-prod"
        )
    try:
        block = load_sync(slug)
    except RuntimeError as exc:  # stored, but its fields no longer fit the block's schema
        if not isinstance(exc.__cause__, ValidationError):
            raise
        raise ConfigurationError(
            f"block {slug!r} is not valid ({validation_summary(exc.__cause__)}); fix it with `dbops setup` "
            "or in the Prefect UI"
        ) from None
    except ValueError as exc:
        raise ConfigurationError(
            f"block {slug!r} does not exist; create it with `dbops setup` or in the Prefect UI ({exc})"
        ) from None
    if expected is not None and not isinstance(block, expected):
        raise ConfigurationError(f"block {slug!r} is a {type(block).__name__}, not a {expected.__name__}")
    return block


def store_from_block(block: Block, location: StorageLocation | None = None) -> ObjectStore:
    """`location` carries per-location settings (S3 storage class, server-side encryption)."""
    if isinstance(block, S3Bucket):
        client = block.credentials.get_client("s3")
        put_args = location.put_args() if location is not None else {}
        return S3ObjectStore(client, block.bucket_name, block.bucket_folder or "", put_args=put_args)
    if isinstance(block, LocalFileSystem):
        if not block.basepath:
            raise ConfigurationError("the local-file-system block has no basepath; set it to a directory")
        return LocalObjectStore(block.basepath)
    raise ConfigurationError(
        f"storage block type {type(block).__name__} is not supported; use one of {', '.join(SUPPORTED_KINDS)}"
    )


def load_store(ref: StorageRef) -> ObjectStore:
    """The object store behind a storage block slug, or a location with its settings."""
    location = as_location(ref)
    return store_from_block(load_block(location.block), location)


@dataclass(frozen=True)
class Location:
    """One opened place of a storage list: its settings and its store."""

    settings: StorageLocation
    store: ObjectStore

    @property
    def slug(self) -> str:
        return self.settings.block


def load_locations(storage: StorageList) -> list[Location]:
    """The primary and its copies, opened; refuses a place named twice under two block names (or nested)."""
    locations = [Location(settings, load_store(settings)) for settings in parse_locations(storage)]
    check_distinct([(loc.slug, loc.store.identity) for loc in locations])
    return locations


def open_archive(location: ArchiveLocation) -> WalArchive:
    """The WAL archive a location names: a directory this worker mounts, or a storage block and prefix."""
    if location.directory:
        path = Path(location.directory)
        if not path.is_dir() or not os.access(path, os.R_OK | os.X_OK):
            raise ConfigurationError(
                f"archive directory {path} does not exist or is not readable on this machine; run the check "
                "on a worker that mounts the archive, readable by its user (group postgres), or fix directory"
            )
        return WalArchive(LocalObjectStore(path), "")
    assert location.storage is not None
    return WalArchive(load_store(location.storage), location.prefix)
