"""Named errors that carry one sentence for the person on call.

Every dbops error says what failed, where, and what to do, in `str(error)`. `transient` tells the task
layer whether a retry can help: a refused connection or an S3 5xx may pass, a wrong password will not.
"""

from __future__ import annotations


class DbopsError(Exception):
    """Base class: the message is the one sentence a person reads at 2 AM."""

    transient: bool = False


class TransientError(DbopsError):
    """A fault that may pass on its own (network, throttling, lock timeouts): retried with backoff."""

    transient = True


class ConfigurationError(DbopsError):
    """Bad input: an unknown block, a negative retention, a missing bucket. Never retried."""


class DatabaseUnreachable(TransientError):
    pass


class AuthenticationFailed(DbopsError):
    pass


class DatabaseMissing(DbopsError):
    pass


class PermissionDenied(DbopsError):
    pass


class VersionMismatch(DbopsError):
    pass


class StorageError(DbopsError):
    """A permanent storage problem (missing bucket, access denied)."""


class ObjectExists(StorageError):
    """A conditional create found the key taken: another writer won, nothing was replaced."""


class ObjectNotFound(StorageError):
    """The object is not there (never was, or deleted since it was listed)."""


class StorageUnavailable(TransientError):
    """S3 5xx, SlowDown, connection reset: retried."""


class DumpFailed(DbopsError):
    """pg_dump failed or produced something that is not a backup."""


class DumpInterrupted(TransientError):
    """pg_dump lost its connection or was killed: a new attempt may succeed."""


class VerificationFailed(DbopsError):
    pass


class IdentityUnknown(DbopsError):
    """The server would not say which cluster it is (pg_control_system() failed): nothing is dropped."""


class TargetIdentityMismatch(DbopsError):
    """The database about to be dropped or replaced is not the one the plan recorded."""


class SameDatabase(ConfigurationError):
    """Two blocks that must name different databases reach one and the same database."""


class ProtectedTarget(ConfigurationError):
    """A database named by a protected block would be dropped or replaced without confirm."""


def is_transient(exc: BaseException) -> bool:
    """Whether a retry may help; unknown errors are not retried (they need a person)."""
    return isinstance(exc, DbopsError) and exc.transient


class ConnectionPoolerInTheWay(DbopsError):
    """A database block reaches PostgreSQL through a connection pooler (PgBouncer in transaction pooling):
    pg_dump's exported snapshot, the migration's session advisory lock and a session's lock_timeout would
    land on whichever server connection the pooler hands out. Permanent: the block must change."""

    def __init__(
        self,
        message: str,
        *,
        block: str | None = None,
        host: str | None = None,
        port: int | None = None,
        server_port: int | None = None,
        evidence: str | None = None,
    ) -> None:
        super().__init__(message)
        self.block = block
        self.host = host
        self.port = port
        self.server_port = server_port
        self.evidence = evidence


class ConnectionRouteUnknown(DbopsError):
    """The server is not where the block points (a different port or client address) and the probe that
    tells a plain TCP forward from a pooler failed: fail closed, a person must look."""
