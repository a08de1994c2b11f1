"""Copying one backup from the primary location to a copy location (the 3-2-1 rule), dumps and base
backups alike.

A copy has exactly the primary's keys, so every catalog reader works on it unchanged. The steps, in the
order that keeps a half-done copy from ever looking like a backup:

1. Read the primary's manifest: it must parse, describe the objects beside it and be verified; anything
   else is refused (an unverified backup is not copied, it is not a backup yet).
2. Look at the copy: a manifest already there that names the same bytes (sha256) and was checked, beside
   its main object, means "already there" (skipped, so copying twice is harmless); with the main object
   gone, the objects are copied again under the kept manifest (repaired); another manifest there is left
   alone, refused.
3. Take a read lease on the primary's backup (when the caller names its run), so retention there keeps
   it while it is copied. Copy the members: the main object (dump or tar) first, then the roles file /
   PostgreSQL's backup_manifest / drill records; never a reader's lease. Server-side within one S3
   endpoint and account, otherwise streamed through the worker with bounded memory.
4. Check the main object's sha256 against the manifest: a streamed copy is hashed on its way through and a
   mismatch aborts the upload before the object appears; a server-side copy is read back and hashed, and
   deleted on a mismatch.
5. Write the copy's manifest LAST, conditionally (`if_absent`): the primary's manifest plus a CopyRecord.
   A copy that fails before this leaves no manifest, and the members it wrote are removed (what a crash
   leaves is an orphan, which the copy location's retention removes after a day, as a dump's).
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from pydantic import BaseModel, Field, ValidationError

from flows.core.base_catalog import why_not_ours
from flows.core.base_layout import BaseBackupManifest, parse_base_key
from flows.core.copy_record import CopyMethod, CopyRecord
from flows.core.errors import (
    BackupIntegrityError,
    ConfigurationError,
    ObjectExists,
    ObjectNotFound,
    StorageFault,
)
from flows.core.layout import LEASE_MARK, MANIFEST_SUFFIX, parse_key
from flows.core.leases import release_lease, take_lease
from flows.core.manifest import Manifest, why_invalid
from flows.core.objectstore import ObjectStore, part_size_for
from flows.core.s3store import S3ObjectStore

__all__ = [
    "AnyManifest",
    "BackupRef",
    "CopyMethod",
    "CopyMismatch",
    "CopyRecord",
    "CopyRefused",
    "CopyReport",
    "backup_ref",
    "copy_backup",
    "copy_method",
    "present_and_verified",
    "read_any_manifest",
]

BackupKind = Literal["dump", "base"]
#: how long a copy's read lease holds the primary's retention off if the copier dies without releasing it
LEASE_TTL = timedelta(hours=12)
AnyManifest = Manifest | BaseBackupManifest


class CopyRefused(BackupIntegrityError):
    """The primary's backup cannot be copied as it is (unreadable, unverified, incomplete), or the copy
    location holds something else under its name. Not retried: a person has to look."""


class CopyMismatch(BackupIntegrityError):
    """The copied bytes do not hash to the manifest's sha256: the primary's object is corrupt (or changed
    while it was read). Nothing is left in the copy location."""


class CopyReport(BaseModel):
    """One backup copied (or found already there) in one copy location."""

    key: str = Field(description="The backup's manifest key (the same in every location).")
    kind: BackupKind = Field(description="dump or base (base backup).")
    location: str = Field(description="The copy location: its block slug, or its URL.")
    method: CopyMethod = Field(description="How the bytes went (or would go): server-side or streamed.")
    bytes: int = Field(default=0, description="Bytes copied (0 when it was already there).")
    seconds: float = Field(default=0.0, description="Wall time of this copy.")
    skipped: bool = Field(default=False, description="Already there and verified: nothing was copied.")
    repaired: bool = Field(
        default=False,
        description="The copy's manifest was there but its dump or tar was missing (or of another size): "
        "the objects were copied again, the manifest kept.",
    )


@dataclass(frozen=True)
class BackupRef:
    """What a manifest key names: one backup of one database, and where its layout starts."""

    kind: BackupKind
    prefix: str
    database: str
    stem: str
    manifest_key: str


def backup_ref(manifest_key: str) -> BackupRef:
    """The backup a manifest key belongs to, told apart by its layout:
    `<prefix>/<db>/dumps/YYYY/MM/DD/<db>-<ts>.manifest.json` or `<prefix>/<db>/base/...`."""
    parts = manifest_key.split("/")
    if manifest_key.endswith(MANIFEST_SUFFIX) and len(parts) >= 6 and parts[-5] in {"dumps", "base"}:
        prefix, database = "/".join(parts[:-6]), parts[-6]
        if parts[-5] == "dumps":
            parsed = parse_key(manifest_key, prefix, database)
            if parsed is not None and parsed.kind == "manifest":
                return BackupRef("dump", prefix, database, parsed.stem, manifest_key)
        else:
            base = parse_base_key(manifest_key, prefix, database)
            if base is not None and base[1] == MANIFEST_SUFFIX:
                return BackupRef("base", prefix, database, base[0], manifest_key)
    raise ConfigurationError(
        f"{manifest_key!r} is not the manifest of a dbops dump or base backup "
        "(<prefix>/<database>/dumps|base/YYYY/MM/DD/<database>-<time>.manifest.json); name one that is"
    )


def parse_any_manifest(ref: BackupRef, data: bytes) -> AnyManifest:
    return Manifest.from_json(data) if ref.kind == "dump" else BaseBackupManifest.from_json(data)


def read_any_manifest(store: ObjectStore, ref: BackupRef) -> AnyManifest:
    """The manifest at `ref` in `store`; ObjectNotFound when absent, CopyRefused when not a readable one."""
    data = store.get_bytes(ref.manifest_key)
    try:
        return parse_any_manifest(ref, data)
    except (ValueError, ValidationError) as exc:
        raise CopyRefused(
            f"{store.url}/{ref.manifest_key} is not a readable dbops manifest ({why_invalid(exc)}); "
            "nothing was copied: look at the object, then fix or remove it"
        ) from None


def present_and_verified(manifest: AnyManifest) -> bool:
    """The contract's test of a backup in one location: on a copy its bytes were checked when copied, on
    the primary it was verified when taken."""
    if manifest.copy is not None:
        return manifest.verified and manifest.copy.sha256_checked
    return manifest.verified


def main_key(manifest: AnyManifest) -> str:
    return manifest.dump_key if isinstance(manifest, Manifest) else manifest.tar_key


def _why_not_this_backup(manifest: AnyManifest, ref: BackupRef) -> str:
    if isinstance(manifest, BaseBackupManifest):
        return why_not_ours(manifest, ref.stem, ref.database)
    if manifest.database != ref.database:
        return f"manifest names database {manifest.database!r}, not {ref.database!r}"
    parsed = parse_key(manifest.dump_key, ref.prefix, ref.database)
    if parsed is None or parsed.kind != "dump" or parsed.stem != ref.stem:
        return f"manifest names dump key {manifest.dump_key!r}, not one beside it"
    return ""


def read_source(primary: ObjectStore, ref: BackupRef) -> AnyManifest:
    """Step 1: the primary's manifest, refused unless it is a verified manifest of the backup beside it."""
    where = f"{primary.url}/{ref.manifest_key}"
    try:
        manifest = read_any_manifest(primary, ref)
    except ObjectNotFound:
        raise CopyRefused(
            f"{where} does not exist, so there is no backup to copy; name a manifest the primary holds"
        ) from None
    other = _why_not_this_backup(manifest, ref)
    if other:
        raise CopyRefused(f"{where}: {other}; not trusted, nothing was copied: look at it")
    if not present_and_verified(manifest):
        raise CopyRefused(
            f"{where} describes a backup that was not verified; only verified backups are copied, so take "
            "a new backup (or verify this one) first"
        )
    return manifest


def members(primary: ObjectStore, ref: BackupRef, manifest: AnyManifest) -> dict[str, int]:
    """Step 3's list, key -> size, main object first: every object of the backup except its manifest
    and the readers' leases; refused when an object the manifest names is missing or of another size."""
    found: dict[str, int] = {}
    for info in primary.list(ref.stem):
        if ref.kind == "dump":
            parsed = parse_key(info.key, ref.prefix, ref.database)
            ok = parsed is not None and parsed.stem == ref.stem and parsed.kind not in {"manifest", "lease"}
        else:
            base = parse_base_key(info.key, ref.prefix, ref.database)
            ok = base is not None and base[0] == ref.stem and base[1] != MANIFEST_SUFFIX
            ok = ok and not (base is not None and base[1].startswith(LEASE_MARK))
        if ok:
            found[info.key] = info.size
    main = main_key(manifest)
    if found.get(main) != manifest.bytes:
        state = (
            f"{found[main]} bytes, not {manifest.bytes} as its manifest says" if main in found else "missing"
        )
        raise CopyRefused(
            f"the primary's {primary.url}/{main} is {state}; this backup cannot be copied from there "
            "(restore from another location, or take a new backup)"
        )
    named = manifest.globals_key if isinstance(manifest, Manifest) else manifest.pg_manifest_key
    if named and named not in found:
        raise CopyRefused(
            f"the primary's {primary.url}/{named}, named by the manifest, is missing; this backup cannot be "
            "copied whole from there"
        )
    return {main: found.pop(main), **dict(sorted(found.items()))}


def copy_method(primary: ObjectStore, copy: ObjectStore) -> CopyMethod:
    """Server-side when S3 can copy inside itself (same endpoint, same access key), else streamed."""
    if isinstance(copy, S3ObjectStore) and copy.can_copy_from(primary):
        return "server-side"
    return "streamed"


def existing_copy(copy: ObjectStore, ref: BackupRef, manifest: AnyManifest) -> bool:
    """Step 2: True when the copy already holds this backup, verified; False when it holds no manifest;
    anything else under the name is refused (never replaced)."""
    try:
        there = read_any_manifest(copy, ref)
    except ObjectNotFound:
        return False
    if there.sha256 == manifest.sha256 and present_and_verified(there):
        return True
    raise CopyRefused(
        f"{copy.url}/{ref.manifest_key} already exists and describes other bytes (or bytes never checked); "
        "it was left alone: look at it, remove it if it is wrong, then copy again"
    )


def _mismatch(primary: ObjectStore, key: str, want: str, got: str, size: int, count: int) -> CopyMismatch:
    what = f"{count} bytes, not {size}" if count != size else f"sha256 {got[:12]}…, not {want[:12]}…"
    return CopyMismatch(
        f"the primary's {primary.url}/{key} does not match its manifest ({what}): that object is corrupt or "
        "changed, so it was not copied; restore from another location or take a new backup"
    )


def _checked(
    chunks: Iterable[bytes], primary: ObjectStore, key: str, sha256: str, size: int
) -> Iterator[bytes]:
    """Pass the stream through, and raise at its end when it is not the manifest's bytes: the writer then
    aborts its upload (or drops its temporary file), so the object never appears."""
    digest, count = hashlib.sha256(), 0
    for chunk in chunks:
        digest.update(chunk)
        count += len(chunk)
        yield chunk
    if count != size or digest.hexdigest() != sha256:
        raise _mismatch(primary, key, sha256, digest.hexdigest(), size, count)


def _read_back(copy: ObjectStore, primary: ObjectStore, key: str, sha256: str, size: int) -> None:
    """After a server-side copy: hash what the copy location now holds (through this worker)."""
    try:
        for _ in _checked(copy.get_stream(key), primary, key, sha256, size):
            pass
    except CopyMismatch:
        copy.delete([key])
        raise


def transfer(
    primary: ObjectStore, copy: ObjectStore, key: str, size: int, method: CopyMethod, sha256: str | None
) -> int:
    """Copy one object; with `sha256`, its bytes are checked (step 4). Returns the bytes copied."""
    if method == "server-side":
        if not (isinstance(copy, S3ObjectStore) and isinstance(primary, S3ObjectStore)):
            raise ConfigurationError(f"a server-side copy needs two S3 stores, not {primary.url}, {copy.url}")
        copy.copy_from(primary, key, size)
        if sha256 is not None:
            _read_back(copy, primary, key, sha256, size)
        return size
    chunks: Iterable[bytes] = primary.get_stream(key)
    if sha256 is not None:
        chunks = _checked(chunks, primary, key, sha256, size)
    return copy.put_stream(key, chunks, part_size=part_size_for(size)).bytes


def copy_backup(
    primary: ObjectStore,
    copy: ObjectStore,
    manifest_key: str,
    *,
    location: str = "",
    reader: str | None = None,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> CopyReport:
    """Copy the backup whose manifest is `manifest_key` from `primary` to `copy` (steps 1-5).

    `reader` (a run id): while its objects are copied the backup carries a read lease on the primary
    (`<stem>.reading-<reader>.json`, flows.core.leases), so the primary's retention keeps it meanwhile."""
    started = time.monotonic()
    ref = backup_ref(manifest_key)
    if primary.identity.rstrip("/") == copy.identity.rstrip("/"):
        raise ConfigurationError(
            f"the copy location {copy.url} is the primary itself ({copy.identity}); name another place"
        )
    manifest = read_source(primary, ref)
    method = copy_method(primary, copy)
    report = CopyReport(key=manifest_key, kind=ref.kind, location=location or copy.url, method=method)
    main = main_key(manifest)
    if existing_copy(copy, ref, manifest):
        there = copy.head(main)
        if there is not None and there.size == manifest.bytes:
            report.skipped = True
            report.seconds = time.monotonic() - started
            return report
        report.repaired = True  # its manifest is there, its main object is not: copy the members again
    objects = members(primary, ref, manifest)
    lease = take_lease(primary, ref.stem, reader, f"copy to {report.location}", LEASE_TTL) if reader else None
    written: list[str] = []
    try:
        for key, size in objects.items():
            written.append(key)
            check = manifest.sha256 if key == main else None
            report.bytes += transfer(primary, copy, key, size, method, check)
        if report.repaired:
            report.seconds = time.monotonic() - started
            return report
        record = CopyRecord(source=primary.url, copied_at=clock(), method=method, sha256_checked=True)
        text = manifest.model_copy(update={"copy": record}).to_json()
        try:
            copy.put_bytes(manifest_key, text, if_absent=True)
        except ObjectExists:  # another copier finished first: fine when it copied these very bytes
            written.clear()
            report.skipped = existing_copy(copy, ref, manifest)
            report.bytes = 0
    except BaseException:
        _discard(copy, ref, written)
        raise
    finally:
        if lease is not None:  # one left behind only holds the primary's retention off until it expires
            with contextlib.suppress(StorageFault):
                release_lease(primary, lease)
    report.seconds = time.monotonic() - started
    return report


def _discard(copy: ObjectStore, ref: BackupRef, written: list[str]) -> None:
    """Remove the members a failed copy wrote, unless another copier has meanwhile completed this backup
    there (its manifest exists: the members are its now). Best effort: what stays is an orphan."""
    with contextlib.suppress(Exception):
        if written and copy.head(ref.manifest_key) is None:
            copy.delete(written)
