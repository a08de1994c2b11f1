"""Read leases: a restore or drill says "I am reading this backup" so retention leaves it alone.

A lease is a small object beside the backup, `<stem>.reading-<run id>.json`, written before the backup is
read and removed afterwards (in a `finally`). It carries an expiry time, so a reader that died (worker
killed, machine lost) holds the backup only until then. Retention keeps a backup with an unexpired or
unreadable lease (fail closed), reports it as "in use", and removes expired leases.

The order that makes this safe without a lock: the reader writes its lease, then checks the manifest is
still there; retention deletes the manifest first, then looks for leases again before it deletes the
dump. Either the reader sees the manifest gone (and stops), or retention sees the lease (and keeps the dump).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from pydantic import AwareDatetime, BaseModel, Field, ValidationError

from flows.core.errors import BackupGone, ObjectNotFound
from flows.core.layout import lease_key, manifest_key
from flows.core.manifest import why_invalid
from flows.core.objectstore import ObjectStore

LEASE_FORMAT_VERSION = 1


class Lease(BaseModel):
    format_version: int = LEASE_FORMAT_VERSION
    stem: str = Field(description="The backup being read.")
    run_id: str = Field(description="The flow run reading it.")
    purpose: str = Field(description="restore or restore drill.")
    taken_at: AwareDatetime
    expires_at: AwareDatetime = Field(description="After this the lease no longer protects the backup.")

    def to_json(self) -> bytes:
        return (self.model_dump_json(indent=2) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes) -> Lease:
        return cls.model_validate(json.loads(data))


def read_lease(store: ObjectStore, key: str) -> Lease | str | None:
    """The lease, None when it vanished (released meanwhile), or why it cannot be read."""
    try:
        return Lease.from_json(store.get_bytes(key))
    except ObjectNotFound:
        return None
    except (ValueError, ValidationError) as exc:
        return f"unreadable lease ({why_invalid(exc)})"


def take_lease(
    store: ObjectStore, stem: str, run_id: str, purpose: str, ttl: timedelta, now: datetime | None = None
) -> str:
    """Write the lease, then make sure the backup is still there; returns the lease key."""
    now = now or datetime.now(UTC)
    key = lease_key(stem, run_id)
    lease = Lease(stem=stem, run_id=run_id, purpose=purpose, taken_at=now, expires_at=now + ttl)
    store.put_bytes(key, lease.to_json())
    if store.head(manifest_key(stem)) is None:
        store.delete([key])
        raise BackupGone(
            f"backup {stem.rsplit('/', 1)[-1]} was deleted (by retention) after it was chosen; run again to "
            "choose from what exists now"
        )
    return key


def release_lease(store: ObjectStore, key: str) -> None:
    store.delete([key])
