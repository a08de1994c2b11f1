"""Where backups live in storage (the contract every flow and person relies on).

<prefix>/<database>/dumps/YYYY/MM/DD/<database>-<UTC YYYYMMDDTHHMMSSZ>.dump[.zst]
<same stem>.manifest.json      uploaded last; without it the dump is not a backup
<same stem>.globals.sql        roles and tablespaces (pg_dumpall --globals-only), when asked for
<same stem>.drill.json         the last restore drill of this backup
<same stem>.reading-<run>.json a lease: a restore or drill is reading this backup (retention keeps it)

Only keys that parse exactly as this layout, for this database, are dbops' to manage. Anything else under
the dumps folder (a person's `dumps/keep-forever/...`, another database's name) is foreign: reported,
never deleted.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

from flows.core.compression import SUFFIX
from flows.core.errors import ConfigurationError
from flows.core.objectstore import ObjectInfo

MANIFEST_SUFFIX = ".manifest.json"
GLOBALS_SUFFIX = ".globals.sql"
DRILL_SUFFIX = ".drill.json"
LEASE_MARK = ".reading-"
_DUMP_EXTS = "|".join(sorted({re.escape(ext) for ext in SUFFIX.values() if ext}))
_EXACT_RE = re.compile(
    r"^(?P<y>\d{4})/(?P<m>\d{2})/(?P<d>\d{2})/(?P<name>[^/]+)-(?P<ts>(?P<date>\d{8})T\d{6}Z)"
    rf"(?P<rest>\.dump(?:{_DUMP_EXTS})?|{re.escape(MANIFEST_SUFFIX)}|{re.escape(GLOBALS_SUFFIX)}"
    rf"|{re.escape(DRILL_SUFFIX)}|{re.escape(LEASE_MARK)}[A-Za-z0-9_-]{{1,64}}\.json)$"
)
Kind = Literal["dump", "manifest", "globals", "drill", "lease"]
DUMP_RE = re.compile(r"^(?P<stem>.+/(?P<db>[^/]+)-(?P<ts>\d{8}T\d{6}Z))\.dump(?P<ext>\.[a-z0-9]+)?$")
STEM_RE = re.compile(r"^(?P<stem>.+/[^/]+-\d{8}T\d{6}Z)(?P<rest>\..+)$")


def _bad_segment(segment: str) -> str | None:
    if segment == "":
        return "an empty segment ('//')"
    if segment in {".", ".."}:
        return f"a {segment!r} segment"
    if "\\" in segment:
        return "a backslash"
    if "\x00" in segment:
        return "a NUL byte"
    return None


def check_location(prefix: str, database: str) -> None:
    """Refuse a prefix or database name that could point outside `<prefix>/<database>/dumps/`.

    A `..` in either would let a listing (and so retention) reach objects that are not this database's
    backups, or a local store reach files outside its directory.
    """
    check_prefix(prefix)
    check_database_name(database)


def check_prefix(prefix: str) -> None:
    """A relative folder of plain names (or empty): no `..`, `.`, `//`, backslash or leading slash."""
    if prefix.startswith("/"):
        raise ConfigurationError(
            f"prefix {prefix!r} is absolute; use a relative folder such as prod (or leave it empty)"
        )
    trimmed = prefix[:-1] if prefix.endswith("/") else prefix
    for segment in trimmed.split("/") if trimmed else []:
        why = _bad_segment(segment)
        if why:
            raise ConfigurationError(
                f"prefix {prefix!r} contains {why}; use plain folder names separated by single slashes"
            )


def check_database_name(database: str) -> None:
    """The database part of the layout: one plain name."""
    why = _bad_segment(database) or ("a slash" if "/" in database else None)
    if why:
        raise ConfigurationError(
            f"database name {database!r} contains {why}; use the database's plain name, e.g. imagemanager"
        )


def dumps_prefix(prefix: str, database: str) -> str:
    """The folder holding one database's dumps; `prefix` may be empty (checked: no `..`, no `//`)."""
    check_location(prefix, database)
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


def lease_key(stem: str, run_id: str) -> str:
    """`<stem>.reading-<run id>.json`: a restore or drill reading this backup (see flows.core.leases)."""
    token = re.sub(r"[^A-Za-z0-9_-]", "", run_id)[:64] or "run"
    return f"{stem}{LEASE_MARK}{token}.json"


@dataclass(frozen=True)
class ParsedKey:
    stem: str
    kind: Kind
    when: datetime  # the UTC timestamp in the name: when the dump started


def parse_key(key: str, prefix: str, database: str) -> ParsedKey | None:
    """The stem and kind of a key that is exactly this database's layout, else None (foreign).

    Exactly: `YYYY/MM/DD/` right under the dumps folder, agreeing with the timestamp's date, the file
    named after this database, and a suffix dbops writes.
    """
    return _parse(key, dumps_prefix(prefix, database), database)


def _parse(key: str, folder: str, database: str) -> ParsedKey | None:
    if not key.startswith(folder):
        return None
    m = _EXACT_RE.match(key[len(folder) :])
    if (
        m is None
        or m.group("name") != database
        or m.group("date") != m.group("y") + m.group("m") + m.group("d")
    ):
        return None
    rest = m.group("rest")
    stem = key[: len(key) - len(rest)]
    kind: Kind
    if rest.startswith(".dump"):
        kind = "dump"
    elif rest == MANIFEST_SUFFIX:
        kind = "manifest"
    elif rest == GLOBALS_SUFFIX:
        kind = "globals"
    elif rest == DRILL_SUFFIX:
        kind = "drill"
    else:
        kind = "lease"
    return ParsedKey(stem, kind, datetime.strptime(m.group("ts"), "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC))


@dataclass(frozen=True)
class KeyListing:
    """One pass over a database's dumps folder, grouped by backup stem."""

    manifests: dict[str, str]  # stem -> manifest key
    objects: dict[str, list[str]]  # stem -> every key of that backup (dump, manifest, sidecars; no leases)
    dumps: dict[str, str]  # stem -> dump key
    dump_times: dict[str, datetime]  # stem -> last-modified of the dump object
    leases: dict[str, list[str]] = field(default_factory=dict)  # stem -> lease keys
    foreign: list[str] = field(default_factory=list)  # keys that are not this database's layout

    @property
    def orphans(self) -> list[str]:
        """Stems with a dump but no manifest: an interrupted or unverified run, not a backup."""
        return sorted(s for s in self.dumps if s not in self.manifests)

    @property
    def leftovers(self) -> list[str]:
        """Stems with neither dump nor manifest: sidecars (drill record, roles file) of a deleted backup."""
        return sorted(s for s in self.objects if s not in self.dumps and s not in self.manifests)


def group_listing(infos: Iterable[ObjectInfo], prefix: str, database: str) -> KeyListing:
    manifests: dict[str, str] = {}
    objects: dict[str, list[str]] = {}
    dumps: dict[str, str] = {}
    times: dict[str, datetime] = {}
    leases: dict[str, list[str]] = {}
    foreign: list[str] = []
    folder = dumps_prefix(prefix, database)
    for info in infos:
        parsed = _parse(info.key, folder, database)
        if parsed is None:
            foreign.append(info.key)
            continue
        if parsed.kind == "lease":
            leases.setdefault(parsed.stem, []).append(info.key)
            continue
        objects.setdefault(parsed.stem, []).append(info.key)
        if parsed.kind == "manifest":
            manifests[parsed.stem] = info.key
        elif parsed.kind == "dump":
            if parsed.stem in dumps:  # two dumps for one stem (.dump and .dump.zst): not ours to guess
                foreign.append(info.key)
                objects[parsed.stem].remove(info.key)
                continue
            dumps[parsed.stem] = info.key
            times[parsed.stem] = info.last_modified
    return KeyListing(manifests, objects, dumps, times, leases, sorted(foreign))
