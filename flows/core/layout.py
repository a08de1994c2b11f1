"""Where backups live in storage (the contract every flow and person relies on).

<prefix>/<database>/dumps/YYYY/MM/DD/<database>-<UTC YYYYMMDDTHHMMSSZ>.dump[.zst]
<same stem>.manifest.json      uploaded last; without it the dump is not a backup
<same stem>.globals.sql        roles and tablespaces (pg_dumpall --globals-only), when asked for
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from flows.core.objectstore import ObjectInfo

MANIFEST_SUFFIX = ".manifest.json"
GLOBALS_SUFFIX = ".globals.sql"
DUMP_RE = re.compile(r"^(?P<stem>.+/(?P<db>[^/]+)-(?P<ts>\d{8}T\d{6}Z))\.dump(?P<ext>\.[a-z0-9]+)?$")
STEM_RE = re.compile(r"^(?P<stem>.+/[^/]+-\d{8}T\d{6}Z)(?P<rest>\..+)$")


def dumps_prefix(prefix: str, database: str) -> str:
    """The folder holding one database's dumps; `prefix` may be empty."""
    parts = [p for p in (prefix.strip("/"), database, "dumps") if p]
    return "/".join(parts) + "/"


def backup_stem(prefix: str, database: str, when: datetime) -> str:
    when = when.astimezone(UTC)
    return f"{dumps_prefix(prefix, database)}{when:%Y/%m/%d}/{database}-{when:%Y%m%dT%H%M%SZ}"


def dump_key(stem: str, suffix: str) -> str:
    return f"{stem}.dump{suffix}"


def manifest_key(stem: str) -> str:
    return stem + MANIFEST_SUFFIX


def globals_key(stem: str) -> str:
    return stem + GLOBALS_SUFFIX


def stem_of(key: str) -> str | None:
    """The backup stem an object belongs to (dump, manifest, globals, drill sidecar...), or None."""
    m = STEM_RE.match(key)
    return m.group("stem") if m else None


def is_dump(key: str) -> bool:
    return DUMP_RE.match(key) is not None


@dataclass(frozen=True)
class Listing:
    """One pass over a database's dumps folder, grouped by backup stem."""

    manifests: dict[str, str]  # stem -> manifest key
    objects: dict[str, list[str]]  # stem -> every key of that backup (dump, manifest, sidecars)
    dumps: dict[str, str]  # stem -> dump key
    dump_times: dict[str, datetime]  # stem -> last-modified of the dump object

    @property
    def orphans(self) -> list[str]:
        """Stems with a dump but no manifest: an interrupted or unverified run, not a backup."""
        return sorted(s for s in self.dumps if s not in self.manifests)


def group_listing(infos: Iterable[ObjectInfo]) -> Listing:
    manifests: dict[str, str] = {}
    objects: dict[str, list[str]] = {}
    dumps: dict[str, str] = {}
    times: dict[str, datetime] = {}
    for info in infos:
        stem = stem_of(info.key)
        if stem is None:
            continue
        objects.setdefault(stem, []).append(info.key)
        if info.key.endswith(MANIFEST_SUFFIX):
            manifests[stem] = info.key
        elif is_dump(info.key):
            dumps[stem] = info.key
            times[stem] = info.last_modified
    return Listing(manifests, objects, dumps, times)
