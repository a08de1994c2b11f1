"""What can go wrong taking a base backup (kept apart so preflight and the stream share the classes)."""

from __future__ import annotations

from flows.core.errors import (
    DbopsError,
    PermissionDenied,
    TransientError,
)


class BaseBackupFailed(DbopsError):
    """pg_basebackup failed, or its output is not a usable base backup."""


class WalNotArchived(DbopsError):
    """The WAL a base backup needs did not reach the archive in time: it is not a backup."""


class ReplicationNotAllowed(PermissionDenied):
    """The role or pg_hba.conf does not allow the replication connection pg_basebackup needs."""


class NoWalSender(TransientError):
    """Every WAL sender slot is in use (max_wal_senders): a later attempt may find one free."""
