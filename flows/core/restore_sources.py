"""Reading one backup from a storage list: which location it is read from, and why others were passed over.

A storage list names the primary first, then its copies (flows/core/locations.py). A restore, a drill
and a point-in-time recovery read from it in two steps:

1. choose   the backup as always (latest, latest before, explicit key; for PITR the base backup whose
            WAL reaches the target) on the first location that holds one matching; a location whose
            listing cannot be read, or that holds no match, is passed over with its reason. When no
            location holds a match, the error is that of the first location that could be read (its
            sentence says what exists there), or the primary's when none could.
2. read     the chosen backup's stem, looked for in location order. A location is skipped, with its
            reason, when its manifest is missing, unreadable, describes other bytes than the chosen
            backup's, or (a copy) says its bytes were not sha256-checked when copied; when its object is
            missing or not the size the manifest says. The first location that passes is read; if the
            read then fails its sha256 check (or the object vanishes under it), the caller has cleaned up
            that attempt and the next location is tried.

Every location passed over is a `Fallback` (location, reason): the flows put them in their log, their
report and their artifact, so a person knows the primary failed even when the restore succeeded.
Nothing here imports Prefect; the flows' tasks call it with opened stores.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

from pydantic import ValidationError

from flows.core.base_layout import BaseBackupManifest
from flows.core.catalog import Catalog
from flows.core.copies import AnyManifest, present_and_verified
from flows.core.errors import (
    BackupIntegrityError,
    DbopsError,
    ObjectNotFound,
    RestoreError,
    StorageFault,
    is_transient,
)
from flows.core.manifest import Manifest, why_invalid
from flows.core.objectstore import ObjectStore

T = TypeVar("T")
M = TypeVar("M", Manifest, BaseBackupManifest)


@dataclass(frozen=True)
class Source:
    """One location of a storage list, opened: its block slug and its store."""

    name: str
    store: ObjectStore
    primary: bool = False

    @property
    def role(self) -> str:
        return f"{self.name} (the primary)" if self.primary else f"{self.name} (a copy)"


@dataclass(frozen=True)
class Fallback:
    """A location that was passed over, and why (a phrase that follows the location's name)."""

    location: str
    primary: bool
    reason: str

    def describe(self) -> str:
        return f"{'the primary' if self.primary else 'copy'} {self.location}: {self.reason}"


def describe_fallbacks(fallbacks: Sequence[Fallback]) -> str:
    return "; ".join(f.describe() for f in fallbacks)


def read_from_line(location: str, fallbacks: Sequence[str]) -> str:
    """The location read and, after a fallback, why not the ones before it (`Fallback.describe` each):
    `s3-bucket/eu (the primary s3-bucket/a: its object failed its sha256 check ...)`."""
    return f"{location} ({'; '.join(fallbacks)})" if fallbacks else location


class NoReadableSource(RestoreError, BackupIntegrityError):
    """No location of the storage list holds a readable, intact copy of the chosen backup."""


class NotInAnyLocation(RestoreError):
    """No location of the storage list holds a backup matching the choice (or none could be listed)."""


# -- what a copy's manifest vouches for ---------------------------------------------------------------------


def verified_here(manifest: AnyManifest) -> bool:
    """Present and verified in its location (the copy contract): a copy's bytes were sha256-checked when
    it was made; a primary's backup was verified when it was taken."""
    return present_and_verified(manifest)


def copy_unchecked(manifest: AnyManifest) -> str:
    """Why a copy's manifest does not vouch for its object ("" when it does, or is no copy's)."""
    if manifest.copy is not None and not manifest.copy.sha256_checked:
        return "its copy was not sha256-checked when it was made"
    return ""


# -- step 1: choose -----------------------------------------------------------------------------------------


def choose_first(
    sources: Sequence[Source],
    pick: Callable[[Source], T],
    not_here: tuple[type[BaseException], ...],
) -> tuple[T, Source, list[Fallback]]:
    """`pick` on each location in order; the first that returns wins. `not_here` are the errors that mean
    "no match in this location" (its sentence becomes the reason); a storage error means the location
    could not be read. Anything else is raised at once. With one location its own error is raised."""
    skipped: list[Fallback] = []
    errors: list[BaseException] = []
    first_readable: BaseException | None = None
    first_error: BaseException | None = None
    for source in sources:
        try:
            return pick(source), source, skipped
        except not_here as exc:
            first_readable = first_readable or exc
            first_error = first_error or exc
            errors.append(exc)
            skipped.append(Fallback(source.name, source.primary, f"no match ({exc})"))
        except DbopsError as exc:
            if not isinstance(exc, StorageFault):
                raise
            first_error = first_error or exc
            errors.append(exc)
            skipped.append(Fallback(source.name, source.primary, f"cannot be read ({exc})"))
    error = first_readable or first_error
    assert error is not None, "choose_first needs at least one location"
    if len(sources) == 1:
        raise error
    raise NotInAnyLocation(
        f"{error} (every location was tried: {describe_fallbacks(skipped)})",
        transient=first_readable is None and all(is_transient(e) for e in errors),
    ) from error


# -- step 2: read -------------------------------------------------------------------------------------------


def check_source(
    source: Source,
    manifest_key: str,
    object_key: str,
    chosen: AnyManifest,
    parse: Callable[[bytes], M],
) -> tuple[M | None, str]:
    """This location's manifest of the chosen backup, or why its copy cannot be read here."""
    try:
        data = source.store.get_bytes(manifest_key)
    except ObjectNotFound:
        return None, "its manifest is missing"
    except DbopsError as exc:
        return None, f"its manifest cannot be read ({exc})"
    try:
        manifest = parse(data)
    except (ValueError, ValidationError) as exc:
        return None, f"its manifest is not a readable dbops manifest ({why_invalid(exc)})"
    unchecked = copy_unchecked(manifest)
    if unchecked:
        return None, unchecked
    if manifest.sha256 != chosen.sha256 or manifest.bytes != chosen.bytes:
        return None, (
            f"its manifest describes other bytes (sha256 {manifest.sha256[:12]}…, {manifest.bytes} bytes) "
            f"than the chosen backup's (sha256 {chosen.sha256[:12]}…, {chosen.bytes} bytes)"
        )
    try:
        info = source.store.head(object_key)
    except DbopsError as exc:
        return None, f"its object cannot be read ({exc})"
    if info is None:
        return None, "its object is missing"
    if info.size != manifest.bytes:
        return None, f"its object is {info.size} bytes, the manifest says {manifest.bytes}"
    return manifest, ""


def why_failed(exc: BaseException) -> str:
    """The reason phrase for a read that failed part way."""
    if isinstance(exc, ObjectNotFound):
        return "its object vanished while it was read"
    text = str(exc)
    if "does not match its manifest" in text:
        return f"its object failed its sha256 check ({text.split(' (', 1)[0]})"
    return f"reading it failed ({text})"


def read_with_fallback(
    sources: Sequence[Source],
    check: Callable[[Source], str],
    attempt: Callable[[Source], T],
    *,
    what: str,
    log: Callable[[str], None] = print,
    fall_back_on: tuple[type[BaseException], ...] = (BackupIntegrityError, ObjectNotFound),
) -> tuple[T, Source, list[Fallback]]:
    """Read `what` from the first location that passes `check` (which returns why not, or "");
    `attempt` must leave nothing behind when it raises (the caller's cleanup, as for any failed
    restore). A failure in `fall_back_on` moves on to the next location; with one location, the
    read's own error is raised unchanged."""
    fallbacks: list[Fallback] = []
    last: BaseException | None = None
    for source in sources:
        why = check(source)
        if why:
            fallbacks.append(Fallback(source.name, source.primary, why))
            log(f"not reading {what} from {source.role}: {why}")
            continue
        if fallbacks:
            log(f"reading {what} from {source.role} instead ({describe_fallbacks(fallbacks)})")
        try:
            return attempt(source), source, fallbacks
        except fall_back_on as exc:
            last = exc
            reason = why_failed(exc)
            fallbacks.append(Fallback(source.name, source.primary, reason))
            log(f"reading {what} from {source.role} failed: {reason}; its attempt was cleaned up")
    if len(sources) == 1 and last is not None:
        raise last
    raise NoReadableSource(
        f"{what} could not be read from any of its {len(sources)} location(s) "
        f"({describe_fallbacks(fallbacks)}); nothing was restored: check the storage, or restore an "
        "older backup (`dbops backups list` shows where each one is)"
    )


def without_unchecked_copies(catalog: Catalog) -> Catalog:
    """The catalog without the backups whose copy record says their bytes were not sha256-checked."""
    kept = [b for b in catalog.backups if not copy_unchecked(b.manifest)]
    return catalog if len(kept) == len(catalog.backups) else replace(catalog, backups=kept)
