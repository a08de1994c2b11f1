"""What can go wrong when dbops drives an application's Alembic tree (`flows.core.alembic_runner`).

Kept apart from the runner so that the revision tree (`alembic_tree`) and the child-process plumbing
(`alembic_process`) raise the same classes without importing the runner.
"""

from __future__ import annotations

from flows.core.errors import ConfigurationError, MigrationError, TransientError


class AlembicError(MigrationError):
    """Something about the application's Alembic tree or its run needs a person."""


class AlembicConfigMissing(MigrationError, ConfigurationError):
    pass


class BrokenRevisionTree(AlembicError):
    """A revision file does not load or points at a revision that does not exist."""


class MultipleHeads(AlembicError):
    pass


class UnknownRevision(AlembicError):
    """The database is stamped with a revision the tree does not know."""


class UnknownTarget(AlembicError, ConfigurationError):
    """The requested target revision is not in the tree."""


class TargetBehindCurrent(AlembicError):
    pass


class TargetAheadOfCurrent(AlembicError):
    pass


class NoDowngrade(AlembicError):
    """A revision to be downgraded has an empty or refusing downgrade()."""


class MigrationFailed(AlembicError):
    """A revision failed for a reason a retry will not fix (SQL error, bug in the revision)."""


class RevisionMoved(AlembicError):
    """The database's revision changed between planning and running: someone else migrated it."""


class MigrationTimeout(AlembicError):
    pass


class WatchdogBlind(AlembicError):
    """dbops lost sight of the migration's sessions and stopped it rather than let it wait unguarded."""


class LockTimeout(AlembicError, TransientError):
    """A revision waited longer than lock_timeout for a table lock: retry the revision later."""

    transient = True
