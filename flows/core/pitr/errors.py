"""What can stop a point-in-time recovery, each with the one sentence a person reads."""

from __future__ import annotations

from flows.core.errors import BackupIntegrityError, ConfigurationError, DbopsError


class RecoveryRefused(ConfigurationError):
    """Refused before anything was downloaded: the target, the data directory, the port or the chain."""


class ExtractionFailed(DbopsError):
    """The base backup could not be unpacked (checksum, corrupt stream, unsafe member, disk): what was
    extracted has been removed."""


class BaseBackupCorrupt(ExtractionFailed, BackupIntegrityError):
    """The stored base backup is not the one its manifest describes (sha256, or a stream that does not
    decode): another location's copy may be whole."""


class RecoveryFailed(DbopsError):
    """The server did not reach the target: recovery ended early, a segment was missing, it did not start."""

    def __init__(
        self, message: str, *, missing_segment: str | None = None, last_lsn: str | None = None
    ) -> None:
        super().__init__(message)
        self.missing_segment = missing_segment
        self.last_lsn = last_lsn


class PitrDrillFailed(DbopsError):
    """The recovered copy did not prove the recovery point (canary, amcheck, tables, position)."""
