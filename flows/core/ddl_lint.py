"""Lint the offline SQL of Alembic revisions for statements that lock or break a live database.

Input is `{revision: sql}` (what `alembic upgrade a:b --sql` renders, one revision at a time, in
migration order) and the tables that exist before the migration: a table created earlier in the same
range is new and empty, so locking it is harmless. Rules are regexes over statements split by a small
splitter that knows quotes, dollar quotes and comments; no SQL parser. What the regexes cannot see
into (DO blocks, functions) is reported for review, never silently passed.

Alembic wraps each revision in `BEGIN; ... COMMIT;` and an `autocommit_block()` shows as `COMMIT; ...
BEGIN;`. We follow that state: CONCURRENTLY while a transaction is open will fail, and transaction
control that does not fit Alembic's pattern (a second COMMIT, START TRANSACTION, ROLLBACK, lower case)
came from the revision itself. An explicit `COMMIT` immediately followed by an explicit `BEGIN` looks
exactly like an autocommit block and is not flagged.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from flows.core.ddl_rules import REVIEW, RULES, Finding, apply_waivers
from flows.core.sql_text import (
    IDENT,
    NAME,
    Statement,
    bare_name,
    binary_compatible,
    flatten,
    norm_name,
    norm_type,
    split_statements,
    split_top,
    widening_target,
)

# -- the linter ----------------------------------------------------------------------------------------

_TX_BEGIN = re.compile(r"(?is)^(BEGIN|START\s+TRANSACTION)\b")
_TX_END = re.compile(r"(?is)^(COMMIT|END|ROLLBACK|ABORT)\b(?!\s+PREPARED)")
_CREATE_INDEX = re.compile(
    rf"(?is)^CREATE\s+(?:UNIQUE\s+)?INDEX\s+(CONCURRENTLY\s+)?(?:IF\s+NOT\s+EXISTS\s+)?(?:({NAME})\s+)?"
    rf"ON\s+(?:ONLY\s+)?({NAME})"
)
_DROP_INDEX = re.compile(
    rf"(?is)^DROP\s+INDEX\s+(CONCURRENTLY\s+)?(?:IF\s+EXISTS\s+)?({NAME}(?:\s*,\s*{NAME})*)"
)
_CONCURRENTLY = re.compile(
    r"(?is)^(?:(?:CREATE\s+(?:UNIQUE\s+)?|DROP\s+)INDEX\s+CONCURRENTLY|REINDEX\b.*\bCONCURRENTLY\b"
    r"|ALTER\s+TABLE\b.*\bDETACH\s+PARTITION\b.*\bCONCURRENTLY\b|REFRESH\s+MATERIALIZED\s+VIEW\s+CONCURRENTLY)"
)
_CREATE_TABLE = re.compile(
    rf"(?is)^CREATE\s+(?:(?:GLOBAL\s+|LOCAL\s+)?(?:TEMP|TEMPORARY|UNLOGGED)\s+)?TABLE\s+"
    rf"(?:IF\s+NOT\s+EXISTS\s+)?({NAME})\s*(\((.*)\))?"
)
_ALTER_TABLE = re.compile(rf"(?is)^ALTER\s+TABLE\s+(?:IF\s+EXISTS\s+)?(?:ONLY\s+)?({NAME})\s*\*?\s+(.*)$")
_DROP_TABLE = re.compile(rf"(?is)^DROP\s+TABLE\s+(?:IF\s+EXISTS\s+)?({NAME}(?:\s*,\s*{NAME})*)")
_DROP_SCHEMA = re.compile(r"(?is)^DROP\s+SCHEMA\b")
_TRUNCATE = re.compile(
    rf"(?is)^TRUNCATE\s+(?:TABLE\s+)?(?:ONLY\s+)?({NAME}(?:\s*\*?\s*,\s*(?:ONLY\s+)?{NAME})*)"
)
_UNANALYSABLE = re.compile(
    r"(?is)^(?:DO\b|CREATE\s+(?:OR\s+REPLACE\s+)?(?:FUNCTION|PROCEDURE|TRIGGER|RULE)\b|CALL\b)"
)
_VOLATILE = re.compile(
    r"(?is)\b(?:clock_timestamp|random|gen_random_uuid|uuid_generate_v\w*|nextval|timeofday|"
    r"txid_current|setseed|uuidv[47])\s*\("
)
_MAINTENANCE = re.compile(
    r"(?is)^(?:VACUUM\s*\((?:[^)]*\bFULL\b)[^)]*\)|VACUUM\s+(?:\w+\s+)*?FULL\b|CLUSTER\b"
    r"|REINDEX\s+(?!\(?[^;]*\bCONCURRENTLY\b))"
)
_ALEMBIC_VERSION = re.compile(r"(?is)\balembic_version\b")


@dataclass
class _State:
    existing: set[str] | None
    created: set[str]
    new_indexes: set[str]
    col_types: dict[tuple[str, str], str]

    def is_existing(self, table: str) -> bool:
        name = norm_name(table)
        if name in self.created or bare_name(name) in self.created:
            return False
        if self.existing is None:
            return True
        return name in self.existing or bare_name(name) in {bare_name(t) for t in self.existing}


def lint(
    revisions: Mapping[str, str],
    existing_tables: Iterable[str] | None = None,
    waivers: Iterable[str] = (),
    not_rendered: Mapping[str, str] | None = None,
) -> list[Finding]:
    """Findings for every revision, in migration order.

    `existing_tables` ("table" or "schema.table") are the tables before the migration; None means
    unknown, and every table not created in the range counts as existing. `not_rendered` ({revision:
    one line why}) are revisions whose offline SQL could not be produced: each is a blocking finding
    of its own (fail closed: what the lint could not see is not passed), listed first because the lint
    is blind there.
    """
    state = _State(
        existing=None if existing_tables is None else {norm_name(t) for t in existing_tables},
        created=set(),
        new_indexes=set(),
        col_types={},
    )
    findings: list[Finding] = [_not_rendered(rev, why) for rev, why in (not_rendered or {}).items()]
    for revision, sql in revisions.items():
        findings.extend(_lint_revision(revision, sql, state))
    return apply_waivers(findings, waivers)


def _not_rendered(revision: str, why: str) -> Finding:
    rule = RULES["offline-sql-not-rendered"]
    return Finding(
        rule=rule.id,
        revision=revision,
        statement=f"(offline SQL not rendered: {why})",
        why=f"Its offline SQL could not be rendered ({why.rstrip('.')}), so nothing in it was linted.",
        safe=rule.safe,
        severity=rule.severity,
    )


def _lint_revision(revision: str, sql: str, state: _State) -> list[Finding]:
    found: list[Finding] = []
    in_tx = False
    validated_checks: set[tuple[str, str]] = set()  # (table, column) proven NOT NULL in this revision
    not_valid_checks: dict[tuple[str, str], tuple[str, str]] = {}  # (table, constraint) -> (table, column)

    def add(rule_id: str, stmt: Statement, severity: str | None = None, why: str | None = None) -> None:
        rule = RULES[rule_id]
        found.append(
            Finding(rule_id, revision, stmt.short, why or rule.why, rule.safe, severity or rule.severity)
        )

    for stmt in split_statements(sql):
        s = flatten(stmt.masked)
        if _TX_BEGIN.match(s):
            if stmt.text != "BEGIN" or in_tx:
                add("transaction-control", stmt)
            in_tx = True
            continue
        if _TX_END.match(s):
            if stmt.text != "COMMIT" or not in_tx:
                add("transaction-control", stmt)
            in_tx = False
            continue
        if _ALEMBIC_VERSION.search(s):
            continue
        if _CONCURRENTLY.match(s) and in_tx:
            add("concurrently-in-transaction", stmt)
        if _MAINTENANCE.match(s):
            add("exclusive-maintenance", stmt)
            continue
        if _UNANALYSABLE.match(s):
            add("unanalysable-sql", stmt)
            continue
        if m := _CREATE_INDEX.match(s):
            concurrently, index, table = m.groups()
            if not state.is_existing(table):
                if index:
                    state.new_indexes.add(bare_name(norm_name(index)))
            elif not concurrently:
                add("create-index-not-concurrently", stmt)
            continue
        if m := _DROP_INDEX.match(s):
            names = [bare_name(norm_name(n)) for n in split_top(m.group(2))]
            if not m.group(1) and any(n not in state.new_indexes for n in names):
                add("drop-index-not-concurrently", stmt)
            continue
        if m := _CREATE_TABLE.match(s):
            table = norm_name(m.group(1))
            state.created.add(table)
            state.created.add(bare_name(table))
            for col in split_top(m.group(3) or ""):
                cm = re.match(rf"({IDENT})\s+(.+)$", col, re.S)
                if cm and not re.match(r"(?i)(CONSTRAINT|PRIMARY|UNIQUE|CHECK|FOREIGN|EXCLUDE|LIKE)\b", col):
                    state.col_types[(bare_name(table), norm_name(cm.group(1)))] = _column_type(cm.group(2))
            continue
        if m := _DROP_TABLE.match(s):
            if any(state.is_existing(t) for t in split_top(m.group(1))):
                add("drop-table", stmt)
            continue
        if _DROP_SCHEMA.match(s):
            add("drop-schema", stmt)
            continue
        if m := _TRUNCATE.match(s):
            tables = [re.sub(r"(?i)^ONLY\s+|\s*\*$", "", t) for t in split_top(m.group(1))]
            if any(state.is_existing(t) for t in tables):
                add("truncate", stmt)
            continue
        if m := _ALTER_TABLE.match(s):
            table, rest = norm_name(m.group(1)), m.group(2)
            if rm := re.match(rf"(?is)^RENAME\s+TO\s+({NAME})", rest):
                if state.is_existing(table):
                    add("rename-table", stmt)
                    if state.existing is not None:  # the old rows live on under the new name
                        state.existing.add(bare_name(norm_name(rm.group(1))))
                continue
            if re.match(r"(?is)^RENAME\s+(?:COLUMN\s+)?(?!CONSTRAINT\b)", rest):
                if state.is_existing(table):
                    add("rename-column", stmt)
                continue
            existing = state.is_existing(table)
            for action in split_top(rest):
                _lint_action(action, table, existing, stmt, state, add, validated_checks, not_valid_checks)
            continue
    return found


def _column_type(definition: str) -> str:
    """The type at the start of a column definition (up to the first constraint keyword)."""
    m = re.match(
        r"(?is)(.*?)(?=\s+(?:NOT\s+NULL|NULL|DEFAULT|CONSTRAINT|PRIMARY|UNIQUE|CHECK|REFERENCES|GENERATED|"
        r"COLLATE)\b|$)",
        definition.strip(),
    )
    return norm_type(m.group(1) if m else definition)


def _lint_action(
    action: str,
    table: str,
    existing: bool,
    stmt: Statement,
    state: _State,
    add: Callable[..., None],
    validated_checks: set[tuple[str, str]],
    not_valid_checks: dict[tuple[str, str], tuple[str, str]],
) -> None:
    a = flatten(action)
    bare = bare_name(table)
    m = re.match(rf"(?is)^ADD\s+(?:COLUMN\s+)?(?:IF\s+NOT\s+EXISTS\s+)?({IDENT})\s+(.*)$", a)
    if m and re.match(r"(?i)(CONSTRAINT|PRIMARY|UNIQUE|CHECK|FOREIGN|EXCLUDE)$", m.group(1)):
        m = None  # ADD CONSTRAINT ..., handled below
    if m:
        column, definition = norm_name(m.group(1)), m.group(2)
        state.col_types[(bare, column)] = _column_type(definition)
        if not existing:
            return
        has_default = re.search(r"(?i)\bDEFAULT\b", definition)
        if (
            re.search(r"(?i)\bNOT\s+NULL\b", definition)
            and not has_default
            and not re.search(r"(?i)\bGENERATED\b|\b(?:SMALL|BIG)?SERIAL\d?\b", definition)
        ):
            add("add-column-not-null-without-default", stmt)
        if (
            (has_default and _VOLATILE.search(definition))
            or re.search(r"(?i)^(?:SMALL|BIG)?SERIAL\d?\b", definition)
            or re.search(r"(?i)\bGENERATED\b.*\b(?:STORED|IDENTITY)\b", definition)
        ):
            add("add-column-volatile-default", stmt)
        if re.search(r"(?i)\bPRIMARY\s+KEY\b", definition):
            add("add-primary-key", stmt)
        elif re.search(r"(?i)\bUNIQUE\b", definition):
            add("add-unique-constraint", stmt)
        return
    if m := re.match(rf"(?is)^ADD\s+(?:CONSTRAINT\s+({IDENT})\s+)?(.*)$", a):
        name, body = m.group(1), m.group(2)
        if not existing:
            return
        if re.match(r"(?i)^(?:FOREIGN\s+KEY|CHECK)\b", body) and not re.search(
            r"(?i)\bNOT\s+VALID\s*$", body
        ):
            add("constraint-not-valid", stmt)
        elif re.match(r"(?i)^UNIQUE\b", body) and not re.search(r"(?i)\bUSING\s+INDEX\b", body):
            add("add-unique-constraint", stmt)
        elif re.match(r"(?i)^PRIMARY\s+KEY\b", body) and not re.search(r"(?i)\bUSING\s+INDEX\b", body):
            add("add-primary-key", stmt)
        cm = re.match(rf"(?is)^CHECK\s*\(\s*\(?\s*({IDENT})\s+IS\s+NOT\s+NULL\s*\)?\s*\)", body)
        if cm and name:
            target = (bare, norm_name(cm.group(1)))
            if re.search(r"(?i)\bNOT\s+VALID\s*$", body):
                not_valid_checks[(bare, norm_name(name))] = target
            else:
                validated_checks.add(target)
        return
    if m := re.match(rf"(?is)^VALIDATE\s+CONSTRAINT\s+({IDENT})", a):
        proven = not_valid_checks.get((bare, norm_name(m.group(1))))
        if proven:
            validated_checks.add(proven)
        return
    if m := re.match(rf"(?is)^DROP\s+(?:COLUMN\s+)?(?:IF\s+EXISTS\s+)?({IDENT})", a):
        if re.match(r"(?i)^(CONSTRAINT)$", m.group(1)):
            return
        if existing:
            add("drop-column", stmt)
        return
    if m := re.match(rf"(?is)^ALTER\s+(?:COLUMN\s+)?({IDENT})\s+(.*)$", a):
        column, change = norm_name(m.group(1)), m.group(2)
        if re.match(r"(?i)^SET\s+NOT\s+NULL\b", change):
            if not existing:
                return
            if (bare, column) in validated_checks:
                add(
                    "set-not-null",
                    stmt,
                    REVIEW,
                    "SET NOT NULL after a validated CHECK (col IS NOT NULL) in the same revision skips the "
                    "scan on PostgreSQL 12+; check the server version and that the CHECK is still there.",
                )
            else:
                add("set-not-null", stmt)
        elif re.match(r"(?i)^DROP\s+NOT\s+NULL\b", change):
            if existing:
                add("drop-not-null", stmt)
        elif tm := re.match(
            r"(?is)^(?:SET\s+DATA\s+)?TYPE\s+(.*?)(\s+COLLATE\s+\S+)?(\s+USING\s+.*)?$", change
        ):
            new_type = norm_type(tm.group(1))
            old_type = state.col_types.get((bare, column))
            state.col_types[(bare, column)] = new_type
            if not existing:
                return
            if tm.group(3) or tm.group(2):
                add("alter-column-type", stmt)
            elif old_type is not None:
                if not binary_compatible(old_type, new_type):
                    add("alter-column-type", stmt)
            elif widening_target(new_type):
                add(
                    "alter-column-type",
                    stmt,
                    REVIEW,
                    f"The column's old type is not visible here: changing it to {new_type} is free only if "
                    "it widens a binary-compatible type (varchar, numeric precision), otherwise it rewrites "
                    "the table under ACCESS EXCLUSIVE.",
                )
            else:
                add("alter-column-type", stmt)
