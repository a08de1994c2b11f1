"""Choosing the backup to restore and confirming the target: plain functions of the catalog.

Only backups with a manifest are candidates: `latest`, `latest before <timestamp>` (a dump holds the
database as of its start), or an explicit key. A protected target, and roles applied server-wide, need
the target's exact name as confirmation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from flows.core.catalog import Backup, Catalog
from flows.core.errors import ConfigurationError, RestoreError
from flows.core.layout import MANIFEST_SUFFIX
from flows.core.postgres import ConnParams


class BackupNotFound(RestoreError, ConfigurationError):
    pass


class RestoreRefused(RestoreError, ConfigurationError):
    """Protected target without the matching confirm, or a target that must (not) exist."""


@dataclass(frozen=True)
class Selector:
    kind: Literal["latest", "before", "key"]
    before: datetime | None = None
    key: str | None = None

    def describe(self) -> str:
        if self.kind == "before":
            return f"latest before {self.before:%Y-%m-%dT%H:%M:%SZ}"
        return self.kind if self.kind == "latest" else f"key {self.key}"


_BEFORE_RE = re.compile(r"^\s*latest\s+before\s+(?P<ts>.+?)\s*$", re.IGNORECASE)


def parse_timestamp(text: str) -> datetime:
    """ISO 8601 (`2026-03-01T14:00:00Z`, `2026-03-01 14:00`, `20260301T140000Z`); naive means UTC."""
    text = text.strip()
    compact = re.fullmatch(r"(\d{8})T(\d{6})Z?", text)
    try:
        when = (
            datetime.strptime("".join(compact.groups()), "%Y%m%d%H%M%S")
            if compact
            else datetime.fromisoformat(text.replace("Z", "+00:00"))
        )
    except ValueError:
        raise ConfigurationError(
            f"{text!r} is not a timestamp; use ISO 8601 such as 2026-03-01T14:00:00Z"
        ) from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def parse_selector(text: str) -> Selector:
    """`latest`, `latest before <timestamp>`, or a key (dump key, manifest key, stem or file name)."""
    text = (text or "latest").strip()
    if text.lower() == "latest":
        return Selector("latest")
    m = _BEFORE_RE.match(text)
    if m:
        return Selector("before", before=parse_timestamp(m.group("ts")))
    return Selector("key", key=text)


def names_of(backup: Backup) -> set[str]:
    """Every name a person may use for this backup: stem, file names, dump key, manifest key."""
    stem = backup.stem
    name = stem.rsplit("/", 1)[-1]
    dump = backup.manifest.dump_key
    return {stem, name, dump, dump.rsplit("/", 1)[-1], stem + MANIFEST_SUFFIX, name + MANIFEST_SUFFIX}


def select_backup(catalog: Catalog, selector: Selector, database: str) -> Backup:
    """The backup a selector names; only backups with a manifest are candidates."""
    if not catalog.backups:
        orphans = len(catalog.orphans)
        note = f" ({orphans} dump(s) without a manifest are not backups)" if orphans else ""
        raise BackupNotFound(
            f"no backups of {database!r} in this storage and prefix{note}; check source_database, storage "
            "and prefix (`dbops backups list` shows what exists)"
        )
    if selector.kind == "latest":
        return catalog.backups[0]
    if selector.kind == "before":
        assert selector.before is not None
        # A pg_dump archive holds the database as of the dump's start (its snapshot).
        older = [b for b in catalog.backups if b.manifest.started_at < selector.before]
        if not older:
            oldest = min(b.manifest.started_at for b in catalog.backups)
            raise BackupNotFound(
                f"no backup of {database!r} was started before {selector.before:%Y-%m-%d %H:%M:%S} UTC; the "
                f"oldest one started at {oldest:%Y-%m-%d %H:%M:%S} UTC"
            )
        return max(older, key=lambda b: (b.manifest.started_at, b.stem))
    key = (selector.key or "").strip("/")
    for backup in catalog.backups:
        if key in names_of(backup) or key.rstrip("/").endswith("/" + backup.manifest.dump_key):
            return backup
    raise BackupNotFound(
        f"{key!r} is not a backup of {database!r} with a manifest; pick a key from `dbops backups list`"
    )


# -- where it goes -----------------------------------------------------------------------------------------


def require_confirmation(
    protected: bool, database: str, confirm: str | None, *, replacing: bool = False
) -> None:
    """A protected database, and any database whose contents a replace would overwrite, is only restored
    into when `confirm` is its exact name: a re-run of yesterday's restore must not silently wipe what
    someone has since done in the restored copy."""
    if (confirm or "") == database:
        return
    if protected:
        raise RestoreRefused(
            f"database {database!r} is protected; restoring into it replaces production data, so the run "
            f"needs confirm={database!r} (nothing was touched)"
        )
    if replacing:
        raise RestoreRefused(
            f"mode=replace overwrites everything now in database {database!r}, so the run needs "
            f"confirm={database!r} (nothing was touched)"
        )


def require_globals_confirmation(apply_globals: bool, params: ConnParams, confirm: str | None) -> None:
    """Roles are server-wide: applying a roles file is only done when `confirm` is the target's name,
    protected or not, because it can create roles every database on that server sees."""
    if apply_globals and (confirm or "") != params.database:
        raise RestoreRefused(
            f"globals=true creates roles and tablespaces on the whole server {params.host}:{params.port}, "
            f"not only in {params.database!r}, so the run needs confirm={params.database!r} (nothing was "
            "touched)"
        )
