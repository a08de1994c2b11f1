"""When db_health's figures become a warning or a failed run, and which indexes the schema must have.

Defaults follow pgHero and check_postgres where they agree, and are lower where an outage is near
(an integer key 75 % used is months from a hard stop, not years). Every field is a flow parameter.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

GIB = 1024**3
MIB = 1024**2


class HealthThresholds(BaseModel):
    """Thresholds of every db_health check: warning first, then critical (the run fails)."""

    # size and disk
    warn_days_until_full: float = Field(
        default=30, ge=0, description="Warning when the data directory's disk fills in fewer days than this."
    )
    critical_days_until_full: float = Field(
        default=7, ge=0, description="Critical when the data directory's disk fills in fewer days than this."
    )
    warn_free_fraction: float = Field(
        default=0.15, ge=0, le=1, description="Warning when less than this fraction of the disk is free."
    )
    critical_free_fraction: float = Field(
        default=0.05, ge=0, le=1, description="Critical when less than this fraction of the disk is free."
    )
    # slow and stuck work
    warn_active_seconds: float = Field(
        default=300, ge=0, description="Warning when a query has been running for longer than this (s)."
    )
    critical_active_seconds: float = Field(
        default=3600, ge=0, description="Critical when a query has been running for longer than this (s)."
    )
    warn_idle_in_transaction_seconds: float = Field(
        default=60,
        ge=0,
        description="Warning when a session sits idle in transaction for longer than this (s): it holds "
        "its locks and keeps vacuum from removing dead rows.",
    )
    critical_idle_in_transaction_seconds: float = Field(
        default=1800, ge=0, description="Critical when a session sits idle in transaction this long (s)."
    )
    warn_transaction_seconds: float = Field(
        default=3600, ge=0, description="Warning when the oldest open transaction is older than this (s)."
    )
    critical_transaction_seconds: float = Field(
        default=6 * 3600,
        ge=0,
        description="Critical when the oldest open transaction is older than this (s).",
    )
    warn_blocked_seconds: float = Field(
        default=10, ge=0, description="Warning when a session has waited for another's lock this long (s)."
    )
    critical_blocked_seconds: float = Field(
        default=300, ge=0, description="Critical when a session has waited for another's lock this long (s)."
    )
    # connections
    warn_connections: float = Field(
        default=0.8,
        gt=0,
        le=1,
        description="Warning when connections in use reach this fraction of max_connections minus "
        "superuser_reserved_connections.",
    )
    critical_connections: float = Field(
        default=0.95, gt=0, le=1, description="Critical when connections in use reach this fraction."
    )
    # wraparound
    warn_freeze_age_factor: float = Field(
        default=1.5,
        gt=0,
        description="Warning when age(datfrozenxid) or a table's age(relfrozenxid) exceeds this multiple "
        "of autovacuum_freeze_max_age (autovacuum should have frozen it by 1.0).",
    )
    critical_xid_age: int = Field(
        default=1_000_000_000,
        gt=0,
        description="Critical at this transaction ID age: less than half of the 2^31 at which PostgreSQL "
        "stops accepting writes, so there is time to vacuum.",
    )
    # sequences and integer keys
    warn_sequence_fraction: float = Field(
        default=0.75,
        gt=0,
        le=1,
        description="Warning when a sequence or key has used this fraction of its type's maximum.",
    )
    critical_sequence_fraction: float = Field(
        default=0.9,
        gt=0,
        le=1,
        description="Critical when a sequence or key has used this fraction of its maximum.",
    )
    # vacuum and statistics
    dead_tuple_margin: float = Field(
        default=2.0,
        gt=0,
        description="A table is flagged when its dead rows exceed this multiple of its autovacuum trigger "
        "(autovacuum_vacuum_threshold + scale_factor x rows): autovacuum is not keeping up.",
    )
    min_dead_tuples: int = Field(
        default=10_000, ge=0, description="Tables with fewer dead rows than this are never flagged."
    )
    critical_dead_fraction: float = Field(
        default=0.5,
        gt=0,
        description="A flagged table whose dead rows exceed this fraction of its live rows is critical.",
    )
    warn_analyze_age_hours: float = Field(
        default=7 * 24,
        ge=0,
        description="Warning when a table changed beyond its autoanalyze trigger has not been analyzed "
        "for this long (h): the planner works from stale statistics.",
    )
    # indexes
    min_unused_index_bytes: int = Field(
        default=10 * MIB,
        ge=0,
        description="Unused indexes (no scan since the statistics were reset) smaller than this are "
        "not reported.",
    )
    # cache and I/O
    warn_hit_ratio: float = Field(
        default=0.95, ge=0, le=1, description="Warning when the buffer cache hit ratio is below this."
    )
    min_cache_blocks: int = Field(
        default=100_000, ge=0, description="Hit ratios over fewer block reads than this are not judged."
    )
    warn_temp_bytes_per_day: int = Field(
        default=10 * GIB,
        ge=0,
        description="Warning when queries write more temporary files than this per day since the "
        "statistics were reset (sorts and hashes that do not fit work_mem).",
    )
    # replication and WAL
    warn_slot_bytes: int = Field(
        default=1 * GIB, ge=0, description="Warning when a replication slot retains this much WAL."
    )
    critical_slot_bytes: int = Field(
        default=10 * GIB,
        ge=0,
        description="Critical when an inactive replication slot retains this much WAL (it fills pg_wal); "
        "any inactive slot is at least a warning.",
    )
    warn_standby_lag_seconds: float = Field(
        default=60, ge=0, description="Warning when a standby replays more than this far behind (s)."
    )
    critical_standby_lag_seconds: float = Field(
        default=900, ge=0, description="Critical when a standby replays more than this far behind (s)."
    )


class PrescribedIndex(BaseModel):
    """An index the application's queries rely on: it must exist and be valid."""

    name: str = Field(description="Index name (any schema on the search path or outside pg_catalog).")
    table: str | None = Field(default=None, description="The table it must be on (unqualified), if known.")
    partial: bool = Field(default=False, description="It must be a partial index (WHERE ...).")


#: The seed's indexes (examples/imagemanager): projects by meta group, images by project, the live images
#: of a project (partial: deleted_at IS NULL), classifications by image.
SEED_PRESCRIBED: tuple[PrescribedIndex, ...] = (
    PrescribedIndex(name="idx_projects_meta_group", table="projects"),
    PrescribedIndex(name="idx_images_project", table="data_instances"),
    PrescribedIndex(name="idx_images_deleted", table="data_instances", partial=True),
    PrescribedIndex(name="idx_classifications_image", table="image_classifications"),
)
