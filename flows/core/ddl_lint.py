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
from dataclasses import dataclass, replace

from flows.core.errors import ConfigurationError

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


class UnknownWaiver(ConfigurationError):
    pass


# -- splitting -----------------------------------------------------------------------------------------

_DOLLAR = re.compile(r"\$([A-Za-z_\x80-\uffff][\w\x80-\uffff]*)?\$")


@dataclass(frozen=True)
class Statement:
    text: str  # without comments, for people
    masked: str  # also without string and dollar-quoted contents, for the rules

    @property
    def short(self) -> str:
        flat = " ".join(self.text.split())
        return flat if len(flat) <= 240 else flat[:237] + "..."


def split_statements(sql: str) -> list[Statement]:
    """Split on top-level semicolons; comments dropped, literals kept in `text` and emptied in `masked`."""
    out: list[Statement] = []
    text: list[str] = []
    masked: list[str] = []
    i, n = 0, len(sql)

    def flush() -> None:
        t, m = "".join(text).strip(), "".join(masked).strip()
        if t:
            out.append(Statement(t, m))
        text.clear()
        masked.clear()

    while i < n:
        c = sql[i]
        if c == "-" and sql.startswith("--", i):
            j = sql.find("\n", i)
            i = n if j < 0 else j
            text.append(" ")
            masked.append(" ")
            continue
        if c == "/" and sql.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if sql.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif sql.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            i = j
            text.append(" ")
            masked.append(" ")
            continue
        if c in "'\"":
            escapes = c == "'" and i > 0 and sql[i - 1] in "eE" and (i < 2 or not _ident_char(sql[i - 2]))
            j = i + 1
            while j < n:
                if escapes and sql[j] == "\\":
                    j += 2
                    continue
                if sql[j] == c:
                    if j + 1 < n and sql[j + 1] == c:
                        j += 2
                        continue
                    break
                j += 1
            j = min(j + 1, n)
            text.append(sql[i:j])
            masked.append(sql[i:j] if c == '"' else "''")
            i = j
            continue
        if c == "$" and (i == 0 or not _ident_char(sql[i - 1])):
            m = _DOLLAR.match(sql, i)
            if m:
                tag = m.group(0)
                end = sql.find(tag, m.end())
                j = n if end < 0 else end + len(tag)
                text.append(sql[i:j])
                masked.append(f"{tag} {tag}")
                i = j
                continue
        if c == ";":
            flush()
            i += 1
            continue
        text.append(c)
        masked.append(c)
        i += 1
    flush()
    return out


def _ident_char(c: str) -> bool:
    return c.isalnum() or c in "_$"


# -- names ---------------------------------------------------------------------------------------------

_IDENT = r'(?:"(?:[^"]|"")+"|[A-Za-z_\x80-\uffff][\w$\x80-\uffff]*)'
_NAME = rf"{_IDENT}(?:\s*\.\s*{_IDENT})*"


def norm_name(name: str) -> str:
    """`Public."Foo"` -> `public.Foo`: unquoted parts fold to lower case, like PostgreSQL does."""
    parts = re.findall(_IDENT, name)
    return ".".join(p[1:-1].replace('""', '"') if p.startswith('"') else p.lower() for p in parts)


def _bare(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _split_top(text: str, sep: str = ",") -> list[str]:
    """Split on `sep` outside parentheses (the masked text has no literals left to trip on)."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(text):
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif c == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _flat(text: str) -> str:
    return " ".join(text.split())


# -- type changes --------------------------------------------------------------------------------------


def _norm_type(t: str) -> str:
    t = _flat(t).lower()
    t = re.sub(r"\bcharacter varying\b", "varchar", t)
    t = re.sub(r"\bbit varying\b", "varbit", t)
    t = re.sub(r"\bdecimal\b", "numeric", t)
    return re.sub(r"\s*([(),])\s*", r"\1", t)


def _type_args(t: str, base: str) -> list[int] | None:
    """[] for `base` without modifier, [n, ...] for `base(n, ...)`, None if another type."""
    m = re.fullmatch(rf"{base}(?:\((\d+)(?:,(\d+))?\))?", t)
    if not m:
        return None
    return [int(g) for g in m.groups() if g is not None]


def binary_compatible(old: str, new: str) -> bool:
    """Type changes PostgreSQL does without rewriting the table or rebuilding indexes."""
    old, new = _norm_type(old), _norm_type(new)
    if old == new:
        return True
    for base in ("varchar", "varbit"):
        a, b = _type_args(old, base), _type_args(new, base)
        if a is not None and b is not None:
            return not b or (bool(a) and b[0] >= a[0])
    if (_type_args(old, "varchar") is not None) and new == "text":
        return True
    if old == "text" and new == "varchar":
        return True
    if old == "cidr" and new == "inet":
        return True
    a, b = _type_args(old, "numeric"), _type_args(new, "numeric")
    if a is not None and b is not None:
        if not b:
            return True
        if not a:
            return False
        return b[0] >= a[0] and (a[1] if len(a) > 1 else 0) == (b[1] if len(b) > 1 else 0)
    return False


def _widening_target(new: str) -> bool:
    """Targets that a binary-compatible change can have: without the old type we cannot decide."""
    new = _norm_type(new)
    return new in ("text", "inet") or any(
        _type_args(new, base) is not None for base in ("varchar", "varbit", "numeric")
    )


# -- the linter ----------------------------------------------------------------------------------------

_TX_BEGIN = re.compile(r"(?is)^(BEGIN|START\s+TRANSACTION)\b")
_TX_END = re.compile(r"(?is)^(COMMIT|END|ROLLBACK|ABORT)\b(?!\s+PREPARED)")
_CREATE_INDEX = re.compile(
    rf"(?is)^CREATE\s+(?:UNIQUE\s+)?INDEX\s+(CONCURRENTLY\s+)?(?:IF\s+NOT\s+EXISTS\s+)?(?:({_NAME})\s+)?"
    rf"ON\s+(?:ONLY\s+)?({_NAME})"
)
_DROP_INDEX = re.compile(
    rf"(?is)^DROP\s+INDEX\s+(CONCURRENTLY\s+)?(?:IF\s+EXISTS\s+)?({_NAME}(?:\s*,\s*{_NAME})*)"
)
_CONCURRENTLY = re.compile(
    r"(?is)^(?:(?:CREATE\s+(?:UNIQUE\s+)?|DROP\s+)INDEX\s+CONCURRENTLY|REINDEX\b.*\bCONCURRENTLY\b"
    r"|ALTER\s+TABLE\b.*\bDETACH\s+PARTITION\b.*\bCONCURRENTLY\b|REFRESH\s+MATERIALIZED\s+VIEW\s+CONCURRENTLY)"
)
_CREATE_TABLE = re.compile(
    rf"(?is)^CREATE\s+(?:(?:GLOBAL\s+|LOCAL\s+)?(?:TEMP|TEMPORARY|UNLOGGED)\s+)?TABLE\s+"
    rf"(?:IF\s+NOT\s+EXISTS\s+)?({_NAME})\s*(\((.*)\))?"
)
_ALTER_TABLE = re.compile(rf"(?is)^ALTER\s+TABLE\s+(?:IF\s+EXISTS\s+)?(?:ONLY\s+)?({_NAME})\s*\*?\s+(.*)$")
_DROP_TABLE = re.compile(rf"(?is)^DROP\s+TABLE\s+(?:IF\s+EXISTS\s+)?({_NAME}(?:\s*,\s*{_NAME})*)")
_DROP_SCHEMA = re.compile(r"(?is)^DROP\s+SCHEMA\b")
_TRUNCATE = re.compile(
    rf"(?is)^TRUNCATE\s+(?:TABLE\s+)?(?:ONLY\s+)?({_NAME}(?:\s*\*?\s*,\s*(?:ONLY\s+)?{_NAME})*)"
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
        if name in self.created or _bare(name) in self.created:
            return False
        if self.existing is None:
            return True
        return name in self.existing or _bare(name) in {_bare(t) for t in self.existing}


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
        s = _flat(stmt.masked)
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
                    state.new_indexes.add(_bare(norm_name(index)))
            elif not concurrently:
                add("create-index-not-concurrently", stmt)
            continue
        if m := _DROP_INDEX.match(s):
            names = [_bare(norm_name(n)) for n in _split_top(m.group(2))]
            if not m.group(1) and any(n not in state.new_indexes for n in names):
                add("drop-index-not-concurrently", stmt)
            continue
        if m := _CREATE_TABLE.match(s):
            table = norm_name(m.group(1))
            state.created.add(table)
            state.created.add(_bare(table))
            for col in _split_top(m.group(3) or ""):
                cm = re.match(rf"({_IDENT})\s+(.+)$", col, re.S)
                if cm and not re.match(r"(?i)(CONSTRAINT|PRIMARY|UNIQUE|CHECK|FOREIGN|EXCLUDE|LIKE)\b", col):
                    state.col_types[(_bare(table), norm_name(cm.group(1)))] = _column_type(cm.group(2))
            continue
        if m := _DROP_TABLE.match(s):
            if any(state.is_existing(t) for t in _split_top(m.group(1))):
                add("drop-table", stmt)
            continue
        if _DROP_SCHEMA.match(s):
            add("drop-schema", stmt)
            continue
        if m := _TRUNCATE.match(s):
            tables = [re.sub(r"(?i)^ONLY\s+|\s*\*$", "", t) for t in _split_top(m.group(1))]
            if any(state.is_existing(t) for t in tables):
                add("truncate", stmt)
            continue
        if m := _ALTER_TABLE.match(s):
            table, rest = norm_name(m.group(1)), m.group(2)
            if rm := re.match(rf"(?is)^RENAME\s+TO\s+({_NAME})", rest):
                if state.is_existing(table):
                    add("rename-table", stmt)
                    if state.existing is not None:  # the old rows live on under the new name
                        state.existing.add(_bare(norm_name(rm.group(1))))
                continue
            if re.match(r"(?is)^RENAME\s+(?:COLUMN\s+)?(?!CONSTRAINT\b)", rest):
                if state.is_existing(table):
                    add("rename-column", stmt)
                continue
            existing = state.is_existing(table)
            for action in _split_top(rest):
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
    return _norm_type(m.group(1) if m else definition)


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
    a = _flat(action)
    bare = _bare(table)
    m = re.match(rf"(?is)^ADD\s+(?:COLUMN\s+)?(?:IF\s+NOT\s+EXISTS\s+)?({_IDENT})\s+(.*)$", a)
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
    if m := re.match(rf"(?is)^ADD\s+(?:CONSTRAINT\s+({_IDENT})\s+)?(.*)$", a):
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
        cm = re.match(rf"(?is)^CHECK\s*\(\s*\(?\s*({_IDENT})\s+IS\s+NOT\s+NULL\s*\)?\s*\)", body)
        if cm and name:
            target = (bare, norm_name(cm.group(1)))
            if re.search(r"(?i)\bNOT\s+VALID\s*$", body):
                not_valid_checks[(bare, norm_name(name))] = target
            else:
                validated_checks.add(target)
        return
    if m := re.match(rf"(?is)^VALIDATE\s+CONSTRAINT\s+({_IDENT})", a):
        proven = not_valid_checks.get((bare, norm_name(m.group(1))))
        if proven:
            validated_checks.add(proven)
        return
    if m := re.match(rf"(?is)^DROP\s+(?:COLUMN\s+)?(?:IF\s+EXISTS\s+)?({_IDENT})", a):
        if re.match(r"(?i)^(CONSTRAINT)$", m.group(1)):
            return
        if existing:
            add("drop-column", stmt)
        return
    if m := re.match(rf"(?is)^ALTER\s+(?:COLUMN\s+)?({_IDENT})\s+(.*)$", a):
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
            new_type = _norm_type(tm.group(1))
            old_type = state.col_types.get((bare, column))
            state.col_types[(bare, column)] = new_type
            if not existing:
                return
            if tm.group(3) or tm.group(2):
                add("alter-column-type", stmt)
            elif old_type is not None:
                if not binary_compatible(old_type, new_type):
                    add("alter-column-type", stmt)
            elif _widening_target(new_type):
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
