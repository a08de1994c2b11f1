"""Carrying out a retention plan: what may be deleted, in which order, and what is left alone.

The planner (flows.core.retention) decides which backups expire. This module turns that decision into
deletions and adds the housekeeping a bucket needs, under rules that make a mistake cost nothing:

* only keys that parse exactly as this database's layout are ever deleted (checked again right before
  the delete); foreign objects and unreadable manifests are reported and left alone;
* a backup a restore or drill is reading (an unexpired lease) is kept and reported "in use";
* manifests go first, then leases are looked for again, then the dumps: a reader that took its lease in
  between keeps its dump (see flows.core.leases);
* leftovers: dumps without a manifest older than a day, drill records and roles files whose backup is
  gone, expired leases, and incomplete writes (S3 multipart uploads, local `.partial-` files) older
  than a day.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from flows.core.catalog import Catalog, deletion_order
from flows.core.errors import ConfigurationError
from flows.core.layout import dumps_prefix, group_listing, parse_key
from flows.core.objectstore import IncompleteWrite, ObjectStore
from flows.core.retention import RetentionPlan

LEFTOVER_AGE = timedelta(days=1)


@dataclass
class Cleanup:
    """Everything one retention run will delete, and everything it leaves alone on purpose."""

    expired: dict[str, list[str]]  # stem -> keys of an expired backup
    in_use: dict[str, str]  # stem -> who reads it (expired by the plan, kept because of a lease)
    orphans: dict[str, list[str]]  # stale dumps without a manifest
    leftovers: dict[str, list[str]]  # sidecars of a backup that is gone
    expired_leases: list[str]
    incomplete: list[IncompleteWrite]  # older than a day, of this database's layout
    foreign: list[tuple[str, str]]
    unreadable: list[tuple[str, str]]
    deleted_objects: int = 0
    kept_after_recheck: list[str] = field(default_factory=list)  # stems a reader leased meanwhile

    def summary(self) -> str:
        parts = [
            f"{len(self.expired)} expired backup(s)",
            f"{len(self.orphans)} stale orphan(s)",
            f"{len(self.leftovers)} leftover sidecar set(s)",
            f"{len(self.expired_leases)} expired lease(s)",
            f"{len(self.incomplete)} incomplete upload(s)",
        ]
        text = ", ".join(parts)
        if self.in_use:
            text += f"; {len(self.in_use)} expired backup(s) kept because a restore or drill reads them"
        if self.foreign or self.unreadable:
            text += f"; left alone: {len(self.foreign)} foreign, {len(self.unreadable)} unreadable"
        return text


def plan_cleanup(
    store: ObjectStore, catalog: Catalog, plan: RetentionPlan, now: datetime, prefix: str, database: str
) -> Cleanup:
    """What `carry_out` would delete; only reads (so a dry run shows exactly this)."""
    newest = catalog.newest()
    keys_of = {b.stem: b.keys for b in catalog.backups}
    if newest is not None and newest.stem in {r.stem for r in plan.delete}:  # the planner guarantees this
        raise ConfigurationError(
            f"retention planned to delete the newest verified backup {newest.stem}; refusing"
        )
    in_use_now = catalog.in_use(now)
    expired = {r.stem: keys_of[r.stem] for r in plan.delete if r.stem not in in_use_now}
    in_use = {r.stem: in_use_now[r.stem] for r in plan.delete if r.stem in in_use_now}
    orphans = dict(catalog.stale_orphans(now, LEFTOVER_AGE))
    leftovers = {stem: keys for stem, keys in catalog.leftovers if stem not in in_use_now}
    cutoff = now - LEFTOVER_AGE
    incomplete = []
    for write in store.incomplete_writes(dumps_prefix(prefix, database)):
        parsed = parse_key(write.key, prefix, database)
        # Old by the store's clock and by the dump's own start time in the key: a store whose clock (or
        # whose idea of "initiated") is off can never get a running dump's upload aborted.
        if parsed is not None and write.started < cutoff and parsed.when < cutoff:
            incomplete.append(write)
    return Cleanup(
        expired=expired,
        in_use=in_use,
        orphans=orphans,
        leftovers=leftovers,
        expired_leases=catalog.expired_leases(now),
        incomplete=incomplete,
        foreign=list(catalog.foreign),
        unreadable=list(catalog.unreadable),
    )


def _ours(keys: list[str], prefix: str, database: str) -> list[str]:
    """Second line of defence: refuse to delete anything that is not exactly this database's layout."""
    for key in keys:
        if parse_key(key, prefix, database) is None:
            raise ConfigurationError(
                f"retention was about to delete {key!r}, which is not a backup object of {database!r}; "
                "nothing more was deleted, report this as a dbops bug"
            )
    return keys


def carry_out(store: ObjectStore, cleanup: Cleanup, prefix: str, database: str) -> Cleanup:
    """Delete what `plan_cleanup` found: manifests, then a fresh look for leases, then the rest."""
    manifests, rest = deletion_order(k for keys in cleanup.expired.values() for k in keys)
    deleted = store.delete(_ours(manifests, prefix, database))
    if cleanup.expired:
        # A restore or drill that leased one of these after our listing keeps its dump (flows.core.leases).
        known_expired = set(cleanup.expired_leases)
        relisted = group_listing(store.list(dumps_prefix(prefix, database)), prefix, database)
        leased = {
            stem
            for stem, keys in relisted.leases.items()
            if stem in cleanup.expired and any(k not in known_expired for k in keys)
        }
        if leased:
            cleanup.kept_after_recheck = sorted(leased)
            remaining = set(rest)
            rest = [
                k
                for stem, keys in cleanup.expired.items()
                if stem not in leased
                for k in keys
                if k in remaining
            ]
    rest += [k for keys in cleanup.orphans.values() for k in keys]
    rest += [k for keys in cleanup.leftovers.values() for k in keys]
    rest += cleanup.expired_leases
    deleted += store.delete(_ours(rest, prefix, database))
    deleted += store.discard_incomplete(cleanup.incomplete)
    cleanup.deleted_objects = deleted
    return cleanup
