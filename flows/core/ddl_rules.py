"""The DDL lint rules, their findings, and waivers: what `flows.core.ddl_lint` reports and how a
person accepts a finding (`apply_waivers`) or sees what stops a migration (`blocking`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from flows.core.errors import ConfigurationError, MigrationError

BLOCK = "block"
REVIEW = "review"


@dataclass(frozen=True)
class Rule:
    id: str
    why: str
    safe: str
    severity: str = BLOCK


_RULES = [
    Rule(
        "create-index-not-concurrently",
        "CREATE INDEX without CONCURRENTLY holds a SHARE lock on the table for the whole build: writes stop.",
        "CREATE INDEX CONCURRENTLY inside op.get_context().autocommit_block() (drop an INVALID leftover "
        "first).",
    ),
    Rule(
        "drop-index-not-concurrently",
        "DROP INDEX without CONCURRENTLY takes ACCESS EXCLUSIVE on the table: reads and writes queue "
        "behind it.",
        "DROP INDEX CONCURRENTLY inside an autocommit_block().",
    ),
    Rule(
        "concurrently-in-transaction",
        "CREATE/DROP/REINDEX ... CONCURRENTLY cannot run inside a transaction block: the migration fails.",
        "Wrap the statement in op.get_context().autocommit_block() with transaction_per_migration=True.",
    ),
    Rule(
        "add-column-not-null-without-default",
        "ADD COLUMN ... NOT NULL without a DEFAULT fails on a table that has rows.",
        "Add the column nullable (or with a constant DEFAULT), backfill in batches, then add NOT NULL via a "
        "validated CHECK.",
    ),
    Rule(
        "add-column-volatile-default",
        "A volatile DEFAULT (clock_timestamp(), random(), gen_random_uuid(), nextval/serial, identity, "
        "GENERATED STORED) rewrites the whole table under ACCESS EXCLUSIVE.",
        "Add the column without default (or with a stable one such as now()), set the default afterwards, "
        "backfill in batches.",
    ),
    Rule(
        "set-not-null",
        "SET NOT NULL scans the whole table under ACCESS EXCLUSIVE unless a validated "
        "CHECK (col IS NOT NULL) proves it (PostgreSQL 12+).",
        "ADD CONSTRAINT c CHECK (col IS NOT NULL) NOT VALID; VALIDATE CONSTRAINT c; then SET NOT NULL and "
        "drop the check.",
    ),
    Rule(
        "constraint-not-valid",
        "ADD FOREIGN KEY / CHECK validates every row while holding a lock that blocks writes "
        "(and, for a foreign key, on the referenced table too).",
        "ADD CONSTRAINT ... NOT VALID, then VALIDATE CONSTRAINT in a separate transaction.",
    ),
    Rule(
        "add-unique-constraint",
        "ADD UNIQUE builds its index under ACCESS EXCLUSIVE: reads and writes stop for the whole build.",
        "CREATE UNIQUE INDEX CONCURRENTLY, then ADD CONSTRAINT name UNIQUE USING INDEX name.",
    ),
    Rule(
        "add-primary-key",
        "ADD PRIMARY KEY builds its index (and checks NOT NULL) under ACCESS EXCLUSIVE.",
        "CREATE UNIQUE INDEX CONCURRENTLY, then ADD CONSTRAINT name PRIMARY KEY USING INDEX name.",
    ),
    Rule(
        "alter-column-type",
        "ALTER COLUMN TYPE rewrites the table and its indexes under ACCESS EXCLUSIVE, unless the change is "
        "binary compatible (varchar widening, varchar to text, numeric precision widening).",
        "Add a new column, backfill in batches, switch the application, drop the old column later.",
    ),
    Rule(
        "rename-column",
        "Renaming a column breaks the running application version that still uses the old name.",
        "Expand and contract: add the new column, write both, backfill, switch reads, drop the old one in a "
        "later release.",
    ),
    Rule(
        "rename-table",
        "Renaming a table breaks the running application version that still uses the old name.",
        "Rename, then create a view with the old name for the old version; drop the view in a later release.",
    ),
    Rule(
        "drop-column",
        "Dropping a column breaks the running application version that still reads it, and loses its data.",
        "Stop using the column in a release first, then drop it in a later migration (waive this rule "
        "there).",
    ),
    Rule(
        "drop-table",
        "Dropping a table loses its data and breaks the running version that still uses it.",
        "Stop using the table in a release first, back it up, then drop it in a later migration (waive it).",
    ),
    Rule(
        "drop-schema",
        "Dropping a schema loses every object in it.",
        "Drop the objects one by one after the application stopped using them, with a waiver.",
    ),
    Rule(
        "truncate",
        "TRUNCATE deletes every row under ACCESS EXCLUSIVE.",
        "Delete in batches if the data really must go, and say so with a waiver.",
    ),
    Rule(
        "drop-not-null",
        "DROP NOT NULL lets NULLs in that the running application version may not expect.",
        "Make sure every application version that reads the column handles NULL, then waive this rule.",
    ),
    Rule(
        "exclusive-maintenance",
        "VACUUM FULL, CLUSTER and REINDEX without CONCURRENTLY rebuild under locks that stop writes (VACUUM "
        "FULL and CLUSTER stop reads too) for the whole rebuild.",
        "REINDEX ... CONCURRENTLY in an autocommit_block(), or leave maintenance to the reindex flow.",
    ),
    Rule(
        "transaction-control",
        "BEGIN/COMMIT/ROLLBACK inside a revision fights Alembic's own transaction per migration: part of the "
        "revision commits without its version bump.",
        "Use op.get_context().autocommit_block() instead of explicit transaction statements.",
    ),
    Rule(
        "offline-sql-not-rendered",
        "The revision's offline SQL could not be rendered, so nothing in it was linted.",
        "Make the revision renderable with `alembic upgrade --sql` (no reads through the connection, or "
        "guard them with context.is_offline_mode()), or review it by hand and waive this rule for it.",
    ),
    Rule(
        "unanalysable-sql",
        "DO blocks and function bodies are not analysed: they may lock or rewrite tables.",
        "Review the body by hand; keep locking statements outside of it.",
        REVIEW,
    ),
]
RULES: dict[str, Rule] = {rule.id: rule for rule in _RULES}


@dataclass(frozen=True)
class Finding:
    rule: str
    revision: str
    statement: str
    why: str
    safe: str
    severity: str
    waived: bool = False

    @property
    def blocking(self) -> bool:
        return self.severity == BLOCK and not self.waived


class UnknownWaiver(MigrationError, ConfigurationError):
    pass


def apply_waivers(findings: Iterable[Finding], waivers: Iterable[str]) -> list[Finding]:
    """Mark findings waived by "rule-id" (everywhere) or "revision:rule-id" (that revision only)."""
    everywhere: set[str] = set()
    per_revision: set[tuple[str, str]] = set()
    for waiver in waivers:
        waiver = waiver.strip()
        revision, _, rule = waiver.rpartition(":")
        if rule not in RULES:
            raise UnknownWaiver(
                f"waiver {waiver!r} names no lint rule; use one of {', '.join(RULES)}, optionally as "
                "'revision:rule-id'"
            )
        if revision:
            per_revision.add((revision, rule))
        else:
            everywhere.add(rule)
    return [
        replace(f, waived=True) if f.rule in everywhere or (f.revision, f.rule) in per_revision else f
        for f in findings
    ]


def blocking(findings: Iterable[Finding]) -> list[Finding]:
    """The findings that stop a migration: severity block and not waived."""
    return [f for f in findings if f.blocking]
