"""Named errors that carry one sentence for the person on call, grouped by area (as Barman's exceptions.py).

Every dbops error says what failed, where, and what to do, in `str(error)`: one line, with any password
in it (`password=...`, URL credentials) redacted. `transient` tells the task layer whether a retry can
help: a refused connection or an S3 5xx may pass, a wrong password will not. An error's context (a
revision, a log tail, a pid) is declared in its constructor, never attached afterwards.

Each area has a base class (`StorageFault`, `ToolError`, `MigrationError`...) so a caller can catch an
area; an error may belong to two (a `SameDatabase` is bad input *and* a safety refusal). Area bases never
set `transient`: that stays with `TransientError` and the leaf classes. The errors of modules being split
(flows/core/restore.py, alembic_runner.py, ddl_lint.py, wal_server.py) still live there, on these bases;
each section names them.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from flows.core.redact import redact_passwords

if TYPE_CHECKING:
    from flows.core.alembic_result import RunResult


def one_line(text: str) -> str:
    """The sentence on one line (a quoted stderr tail may bring newlines) and without passwords
    (`password=...`, URL credentials); failure_sentence redacts every secret-looking word on top."""
    return redact_passwords(re.sub(r"\s*\n\s*", " ", text).strip())


# == base ===================================================================================================


class DbopsError(Exception):
    """Base class: the message is the one sentence a person reads at 2 AM.

    `transient` may be given per instance when the same kind of error is sometimes worth a retry (a
    migration that lost its connection: a refused connection may pass, a wrong password will not).
    """

    transient: bool = False

    def __init__(self, message: str = "", *, transient: bool | None = None) -> None:
        super().__init__(message)
        if transient is not None:
            self.transient = transient

    def __str__(self) -> str:
        return one_line(str(self.args[0]) if self.args else "")


class TransientError(DbopsError):
    """A fault that may pass on its own (network, throttling, lock timeouts): retried with backoff."""

    transient = True


def is_transient(exc: BaseException) -> bool:
    """Whether a retry may help; unknown errors are not retried (they need a person)."""
    return isinstance(exc, DbopsError) and exc.transient


# == configuration and input ================================================================================
# also: ddl_lint.UnknownWaiver, alembic_runner.AlembicConfigMissing / UnknownTarget, restore.BackupNotFound,
# restore.RestoreRefused


class ConfigurationError(DbopsError):
    """Bad input: an unknown block, a negative retention, a missing bucket. Never retried."""


class UnreadableDocument(ConfigurationError):
    """A JSON document dbops reads (a Prefect Variable, a settings file) is not JSON or not the expected
    shape: the sentence names it and how to repair or remove it."""

    def __init__(self, message: str, *, source: str | None = None) -> None:
        super().__init__(message)
        self.source = source


# == connection and authentication ==========================================================================


class DatabaseConnectionError(DbopsError):
    """Area base: dbops could not open a usable session to PostgreSQL (or its pooler)."""


class DatabaseUnreachable(DatabaseConnectionError, TransientError):
    """The server did not answer, refused, or is starting up / shutting down: retried."""


class AuthenticationFailed(DatabaseConnectionError):
    """Wrong password or unknown role: a retry will not help."""


class DatabaseMissing(DatabaseConnectionError):
    """The database the block names does not exist on the server."""


class PermissionDenied(DatabaseConnectionError):
    """pg_hba.conf or a missing CONNECT grant keeps dbops out."""


class ConnectionPoolerInTheWay(DatabaseConnectionError):
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


class ConnectionRouteUnknown(DatabaseConnectionError):
    """The server is not where the block points (a different port or client address) and the probe that
    tells a plain TCP forward from a pooler failed: fail closed, a person must look."""


class PgBouncerUnhealthy(DatabaseConnectionError):
    """A PgBouncer pool is in a state the application feels (clients queueing, no server connection)."""


# == storage ================================================================================================


class StorageFault(DbopsError):
    """Area base: the object store (S3 or a local directory) did not do what was asked."""


class StorageError(StorageFault):
    """A permanent storage problem (missing bucket, access denied, a basepath that is not a directory)."""


class ObjectExists(StorageError):
    """A conditional create found the key taken: another writer won, nothing was replaced."""


class ObjectNotFound(StorageError):
    """The object is not there (never was, or deleted since it was listed)."""


class StorageUnavailable(StorageFault, TransientError):
    """S3 5xx, SlowDown, connection reset: retried."""


# == PostgreSQL client tools (pg_dump, pg_restore, pg_dumpall, psql) ========================================


class ToolError(DbopsError):
    """Area base: a PostgreSQL client tool is missing, of the wrong major version, or failed."""


class VersionMismatch(ToolError):
    """A client tool is missing or of the wrong major version, or the server's version cannot do the job
    (no REINDEX CONCURRENTLY, a minor release that corrupts concurrent builds)."""


class DumpFailed(ToolError):
    """pg_dump failed or produced something that is not a backup."""


class DumpInterrupted(ToolError, TransientError):
    """pg_dump lost its connection or was killed: a new attempt may succeed."""


class GlobalsFailed(ToolError):
    """A statement of the roles file failed: the run stops, naming the object."""


# == backup integrity and the catalogue =====================================================================
# also: restore.ChecksumMismatch


class BackupIntegrityError(DbopsError):
    """Area base: a stored backup, its manifest or its place in the catalogue is not what it must be."""


class VerificationFailed(BackupIntegrityError):
    """A fresh dump did not pass its checks (pg_restore --list, size, entries)."""


class ManifestUnreadable(BackupIntegrityError):
    """An object where a manifest (or lease, drill record) is expected is not valid JSON of its schema."""

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class BackupGone(BackupIntegrityError):
    """The chosen backup was deleted (by retention) between choosing it and starting to read it."""


class StemTaken(BackupIntegrityError, TransientError):
    """Another dump created the same key first; a retry picks the next free name."""


# == retention ==============================================================================================


class RetentionError(DbopsError, ValueError):
    """Base class so callers can tell "the plan cannot be made" apart from S3 or Prefect failures.

    Still a ValueError: callers written before dbops errors existed catch it as one."""


class DuplicateBackupError(RetentionError):
    """Two records share a stem.

    Deleting by stem would remove both objects while the plan might have meant to keep one of them,
    so a duplicate means the listing is wrong and no plan is safe.
    """


class NaiveDatetimeError(RetentionError):
    """A timestamp without a timezone.

    Calendar periods are UTC days/weeks/months; guessing the zone of a naive time could move a backup
    into another day and delete the one that should have represented it.
    """


# == restore and drill ======================================================================================
# also: restore.RestoreFailed, RestoreInterrupted, ChecksumMismatch, BackupNotFound, RestoreRefused,
# NotEnoughSpace


class RestoreError(DbopsError):
    """Area base: restoring a backup (or drilling one) failed or was refused."""


class RolesFileMissing(RestoreError, ConfigurationError):
    """Globals were asked for, but the chosen backup was taken without a roles file."""


class DrillFailed(RestoreError):
    """The newest backup is too old, or restoring it or one of the checks of the restored copy failed."""


# == WAL archive ============================================================================================
# also: wal_server.WalArchiveBroken


class WalArchiveError(DbopsError):
    """Area base: WAL archiving, the archive's contents, or the names and positions in it."""


class WalFormatError(WalArchiveError, ValueError):
    """Text that should be a WAL name, an LSN, a segment size or a timeline history is not.

    Still a ValueError: the parsing helpers were ValueError-raising before and callers catch them so."""


class BadWalName(WalFormatError):
    """A name that is not a WAL segment, partial, backup label or timeline history file."""


class BadLsn(WalFormatError):
    """Not an LSN in pg_lsn's text form (two hex halves, 16/B374D848)."""


class BadSegmentSize(WalFormatError):
    """Not a valid wal_segment_size (a power of two from 1 MiB to 1 GiB)."""


class BadTimelineHistory(WalFormatError):
    """A timeline history file with a line that is not "parentTLI switchpoint reason"."""


class UnsupportedCompression(WalArchiveError):
    """An archived file is compressed with a method dbops cannot read."""


# == migration ==============================================================================================
# also: alembic_runner.AlembicError and its subclasses, ddl_lint.UnknownWaiver


class MigrationError(DbopsError):
    """Area base: planning, rehearsing or applying an Alembic migration failed or was refused.

    The context a report needs is declared here: `revision` (the one that failed), `result` (what the
    run did before it failed, its steps and timings), `log_tail` (Alembic's last output), `seconds` (how
    long the failing step ran). `applied_seconds` / `applied_attempts` are what the whole upgrade did over
    its retries; the task that retries revisions records them with `record_progress`.
    """

    def __init__(
        self,
        message: str = "",
        *,
        transient: bool | None = None,
        revision: str | None = None,
        result: RunResult | None = None,
        log_tail: str = "",
        seconds: float | None = None,
    ) -> None:
        super().__init__(message, transient=transient)
        self.revision = revision
        self.result = result
        self.log_tail = log_tail
        self.seconds = seconds
        self.applied_seconds: dict[str, float] | None = None
        self.applied_attempts: dict[str, int] | None = None

    def record_progress(self, seconds: dict[str, float], attempts: dict[str, int]) -> None:
        """What the whole upgrade did before this error (timings per revision, attempts per revision)."""
        self.applied_seconds = dict(seconds)
        self.applied_attempts = dict(attempts)


class MigrationConnectionLost(MigrationError):
    """The migration's own connection failed mid-run (refused, wrong password, database gone): the
    sentence is the connection error's, `transient` too."""


class InvalidIndexes(MigrationError):
    """Production has INVALID indexes: a failed concurrent build that a migration may trip over."""


class LintBlocked(MigrationError):
    """The DDL lint found a blocking statement that is not waived."""


class PreBackupFailed(MigrationError):
    """The backup taken before the migration failed: nothing was migrated."""


class StagingFailed(MigrationError):
    """The rehearsal on staging (upgrade, downgrade, upgrade again) failed: production was not touched."""


class ApprovalRejected(MigrationError):
    """A person rejected the migration, or nobody approved it in time."""


class ProductionFailed(MigrationError):
    """Applying the migration to production failed."""


class LockBudgetExhausted(ProductionFailed):
    """Lock timeouts kept coming back until retry_budget was spent; nothing of that revision applied."""


class MigrationLockHeld(MigrationError):
    """Another session holds the migration lock of this database."""

    def __init__(self, message: str, pid: int | None = None, application_name: str | None = None) -> None:
        super().__init__(message)
        self.pid = pid
        self.application_name = application_name


class MigrationLockLost(MigrationError):
    """The session holding the migration lock ended: another migration could start, so this one stops."""


# == reindex ================================================================================================


class ReindexError(DbopsError):
    """Area base: the weekly reindex could not run or could not rebuild an index."""


class ReindexBusy(ReindexError):
    """Another reindexer holds the advisory lock on this database."""


class ReindexFailed(ReindexError):
    """At least one index could not be rebuilt after its retries."""


# == safety and identity ====================================================================================


class SafetyError(DbopsError):
    """Area base: a destructive step was refused because its target could not be proven to be the right
    one. Fail closed: these are never retried and never downgraded to a warning."""


class IdentityUnknown(SafetyError):
    """The server would not say which cluster it is (pg_control_system() failed): nothing is dropped."""


class TargetIdentityMismatch(SafetyError):
    """The database about to be dropped or replaced is not the one the plan recorded."""


class SameDatabase(SafetyError, ConfigurationError):
    """Two blocks that must name different databases reach one and the same database."""


class ProtectedTarget(SafetyError, ConfigurationError):
    """A database named by a protected block would be dropped or replaced without confirm."""


# == the local stack and the command line (deployments/) ===================================================


class StackError(DbopsError):
    """`make run` / `dbops` could not start or drive the local stack (sandbox cluster, Prefect server,
    worker, deployments): the sentence names the part and where its log is."""
