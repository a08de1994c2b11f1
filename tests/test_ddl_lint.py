"""The DDL lint: every rule fires on its sample and stays quiet on the safe pattern.

The samples are the offline SQL of a tiny Alembic application (tests/fixtures/lint_app, one rule per
revision after 0001_base), rendered the way the migrate flow renders them, plus inline SQL for the safe
patterns. No database is needed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.core.alembic_runner import AlembicApp
from flows.core.ddl_lint import lint
from flows.core.ddl_rules import BLOCK, REVIEW, RULES, UnknownWaiver, blocking
from flows.core.sql_text import binary_compatible, split_statements

REPO_ROOT = Path(__file__).resolve().parents[1]
LINT_APP = REPO_ROOT / "tests" / "fixtures" / "lint_app" / "alembic.ini"
IMAGEMANAGER = REPO_ROOT / "examples" / "imagemanager" / "alembic.ini"
EXISTING = ["users", "orders", "audit_log"]  # what 0001_base created: "production" before the range

# revision of the lint sample -> the one rule it must trigger
EXPECTED = {
    "0002_create_index": "create-index-not-concurrently",
    "0003_drop_index": "drop-index-not-concurrently",
    "0004_concurrently_in_tx": "concurrently-in-transaction",
    "0005_add_not_null": "add-column-not-null-without-default",
    "0006_volatile_default": "add-column-volatile-default",
    "0007_set_not_null": "set-not-null",
    "0008_foreign_key": "constraint-not-valid",
    "0009_check": "constraint-not-valid",
    "0010_unique": "add-unique-constraint",
    "0011_primary_key": "add-primary-key",
    "0012_alter_type": "alter-column-type",
    "0013_rename_column": "rename-column",
    "0014_rename_table": "rename-table",
    "0015_drop_column": "drop-column",
    "0016_drop_table": "drop-table",
    "0017_drop_schema": "drop-schema",
    "0018_truncate": "truncate",
    "0019_drop_not_null": "drop-not-null",
    "0020_explicit_commit": "transaction-control",
    "0021_do_block": "unanalysable-sql",
    "0022_reindex": "exclusive-maintenance",
}


@pytest.fixture(scope="module")
def lint_sql_from_base() -> dict[str, str]:
    """Offline SQL of base -> head, one revision at a time (rendered in one subprocess)."""
    offline = AlembicApp(LINT_APP).offline_sql(None, "head")
    assert not offline.failed
    return dict(offline)


@pytest.fixture(scope="module")
def lint_sql(lint_sql_from_base: dict[str, str]) -> dict[str, str]:
    """The range after 0001_base: its tables are the ones that exist in "production"."""
    return {rev: sql for rev, sql in lint_sql_from_base.items() if rev != "0001_base"}


@pytest.fixture(scope="module")
def imagemanager_sql() -> dict[str, str]:
    offline = AlembicApp(IMAGEMANAGER).offline_sql(None, "head")
    assert not offline.failed
    return dict(offline)


def test_each_sample_revision_triggers_exactly_its_rule(lint_sql: dict[str, str]) -> None:
    findings = lint(lint_sql, existing_tables=EXISTING)
    by_revision: dict[str, set[str]] = {}
    for f in findings:
        by_revision.setdefault(f.revision, set()).add(f.rule)
    assert by_revision == {rev: {rule} for rev, rule in EXPECTED.items()}
    # offline-sql-not-rendered needs a revision that fails to render: tests/test_alembic_guards.py
    assert set(EXPECTED.values()) == set(RULES) - {"offline-sql-not-rendered"}, "every rule has a sample"
    for f in findings:
        assert f.why == RULES[f.rule].why  # each sample is the rule's own case, review ones too
        assert f.safe
        assert f.statement
        assert f.severity in (BLOCK, REVIEW)
    assert {f.revision for f in blocking(findings)} == set(EXPECTED) - {"0021_do_block"}


def test_tables_created_earlier_in_the_range_are_new(lint_sql_from_base: dict[str, str]) -> None:
    """From base on an empty database, only what is dangerous on any table remains."""
    rules = {(f.revision, f.rule) for f in lint(lint_sql_from_base, existing_tables=[])}
    assert rules == {
        ("0004_concurrently_in_tx", "concurrently-in-transaction"),
        ("0017_drop_schema", "drop-schema"),
        ("0020_explicit_commit", "transaction-control"),
        ("0021_do_block", "unanalysable-sql"),
        ("0022_reindex", "exclusive-maintenance"),
    }


def test_imagemanager_from_base_has_no_blocking_findings(imagemanager_sql: dict[str, str]) -> None:
    assert list(imagemanager_sql) == [
        "0001_initial",
        "0002_image_metadata",
        "0003_projects_archived",
        "0004_classifications_image_index",
    ]
    findings = lint(imagemanager_sql, existing_tables=[])
    assert blocking(findings) == []
    assert [(f.revision, f.rule) for f in findings] == [("0003_projects_archived", "unanalysable-sql")]


def test_imagemanager_on_existing_tables_only_needs_review(imagemanager_sql: dict[str, str]) -> None:
    """0003's SET NOT NULL follows a validated CHECK in the same revision: a review, not a block."""
    later = {k: v for k, v in imagemanager_sql.items() if k != "0001_initial"}
    tables = ["meta_groups", "projects", "data_instances", "image_classifications"]
    findings = lint(later, existing_tables=tables)
    assert blocking(findings) == []
    assert sorted((f.rule, f.severity) for f in findings) == [
        ("set-not-null", REVIEW),
        ("unanalysable-sql", REVIEW),
    ]
    why = {f.rule: f.why for f in findings}
    assert "after a validated CHECK (col IS NOT NULL)" in why["set-not-null"]
    assert why["unanalysable-sql"] == RULES["unanalysable-sql"].why


def test_concurrent_index_in_autocommit_block_is_outside_the_transaction(
    imagemanager_sql: dict[str, str],
) -> None:
    rules = {f.rule for f in lint({"r": imagemanager_sql["0004_classifications_image_index"]}, ["x"])}
    assert "concurrently-in-transaction" not in rules
    assert "create-index-not-concurrently" not in rules


def _rules(sql: str, existing: list[str] | None = None) -> set[str]:
    wrapped = f"BEGIN;\n{sql};\nCOMMIT;\n"
    return {
        f.rule for f in lint({"r1": wrapped}, existing_tables=["t", "u"] if existing is None else existing)
    }


@pytest.mark.parametrize(
    "sql",
    [
        "COMMIT; CREATE INDEX CONCURRENTLY ix ON t (a); BEGIN;",
        "COMMIT; DROP INDEX CONCURRENTLY IF EXISTS ix; BEGIN;",
        "ALTER TABLE t ADD COLUMN c integer",
        "ALTER TABLE t ADD COLUMN c integer NOT NULL DEFAULT 0",
        "ALTER TABLE t ADD COLUMN c timestamptz DEFAULT now()",
        "ALTER TABLE t ADD COLUMN c timestamptz NOT NULL DEFAULT CURRENT_TIMESTAMP",
        "ALTER TABLE t ADD CONSTRAINT fk FOREIGN KEY (a) REFERENCES u (id) NOT VALID",
        "ALTER TABLE t VALIDATE CONSTRAINT fk",
        "ALTER TABLE t ADD CONSTRAINT c CHECK (a > 0) NOT VALID",
        "ALTER TABLE t ADD CONSTRAINT t_a_key UNIQUE USING INDEX t_a_idx",
        "ALTER TABLE t ADD CONSTRAINT t_pkey PRIMARY KEY USING INDEX t_pkey_idx",
        "ALTER TABLE t ALTER COLUMN a SET DEFAULT 0",
        "ALTER TABLE t DROP CONSTRAINT IF EXISTS c",
        "CREATE TABLE n (id bigint PRIMARY KEY, a text NOT NULL); CREATE INDEX ix ON n (a);"
        " ALTER TABLE n ADD CONSTRAINT f FOREIGN KEY (id) REFERENCES t (id); ALTER TABLE n RENAME a TO b;"
        " ALTER TABLE n ALTER COLUMN b SET NOT NULL; DROP TABLE n;",
        "COMMENT ON TABLE t IS 'DROP TABLE t; TRUNCATE t; CREATE INDEX i ON t (a)'",
        "INSERT INTO t (a) VALUES ($x$ ALTER TABLE t DROP COLUMN a; $x$)",
        "SELECT 1 -- DROP TABLE t;\n",
        "/* ALTER TABLE t RENAME TO v; /* nested */ */ SELECT 1",
    ],
)
def test_safe_patterns_are_not_flagged(sql: str) -> None:
    assert _rules(sql) == set()


def test_set_not_null_after_validated_check_is_review_only() -> None:
    sql = (
        "ALTER TABLE t ADD CONSTRAINT t_a_nn CHECK (a IS NOT NULL) NOT VALID; COMMIT;"
        " ALTER TABLE t VALIDATE CONSTRAINT t_a_nn; BEGIN; ALTER TABLE t ALTER COLUMN a SET NOT NULL;"
        " ALTER TABLE t DROP CONSTRAINT t_a_nn;"
    )
    findings = lint({"r1": f"BEGIN; {sql} COMMIT;"}, existing_tables=["t"])
    assert [(f.rule, f.severity) for f in findings] == [("set-not-null", REVIEW)]
    # the reviewer is told why it is only a review and what to check, not the blocking rule's text
    assert findings[0].why != RULES["set-not-null"].why
    assert "after a validated CHECK (col IS NOT NULL) in the same revision skips the scan" in findings[0].why
    assert "check the server version and that the CHECK is still there" in findings[0].why
    assert blocking(findings) == []
    # a check on another column proves nothing
    other = sql.replace("ALTER COLUMN a SET", "ALTER COLUMN b SET")
    assert [f.severity for f in lint({"r1": f"BEGIN; {other} COMMIT;"}, ["t"])] == [BLOCK]


@pytest.mark.parametrize(
    "default",
    [
        "clock_timestamp()",
        "random()",
        "gen_random_uuid()",
        "nextval('t_seq'::regclass)",
        "uuid_generate_v4()",
    ],
)
def test_volatile_defaults_rewrite(default: str) -> None:
    assert _rules(f"ALTER TABLE t ADD COLUMN c text DEFAULT {default}") == {"add-column-volatile-default"}


def test_serial_and_stored_generated_columns_rewrite() -> None:
    assert _rules("ALTER TABLE t ADD COLUMN c bigserial") == {"add-column-volatile-default"}
    assert _rules("ALTER TABLE t ADD COLUMN c int GENERATED ALWAYS AS (a * 2) STORED") == {
        "add-column-volatile-default"
    }


def test_column_type_changes() -> None:
    assert _rules("ALTER TABLE t ALTER COLUMN a TYPE integer") == {"alter-column-type"}
    widen = lint({"r": "BEGIN; ALTER TABLE t ALTER COLUMN a TYPE varchar(200); COMMIT;"}, ["t"])
    assert [f.severity for f in widen] == [REVIEW]  # old type unknown: a person checks
    assert widen[0].why != RULES["alter-column-type"].why
    assert "old type is not visible here: changing it to varchar(200) is free only if" in widen[0].why
    known = (
        "BEGIN; ALTER TABLE t ADD COLUMN a varchar(100); COMMIT; BEGIN;"
        " ALTER TABLE t ALTER COLUMN a TYPE varchar(200); ALTER TABLE t ALTER COLUMN a TYPE text; COMMIT;"
    )
    assert lint({"r": known}, ["t"]) == []
    narrow = (
        "BEGIN; ALTER TABLE t ADD COLUMN a varchar(100);"
        " ALTER TABLE t ALTER COLUMN a TYPE varchar(50); COMMIT;"
    )
    assert [f.severity for f in lint({"r": narrow}, ["t"])] == [BLOCK]


@pytest.mark.parametrize(
    ("old", "new", "free"),
    [
        ("varchar(10)", "varchar(20)", True),
        ("character varying(10)", "varchar", True),
        ("varchar(20)", "varchar(10)", False),
        ("varchar(10)", "text", True),
        ("numeric(10,2)", "numeric(12,2)", True),
        ("numeric(10,2)", "numeric(12,3)", False),
        ("numeric(10,2)", "numeric", True),
        ("integer", "bigint", False),
        ("text", "integer", False),
    ],
)
def test_binary_compatible_type_changes(old: str, new: str, free: bool) -> None:
    assert binary_compatible(old, new) is free


def test_explicit_transaction_statements_are_told_from_alembics_own() -> None:
    alembic_own = (
        "BEGIN; ALTER TABLE t ADD COLUMN c int; COMMIT; CREATE INDEX CONCURRENTLY i ON t (c); BEGIN; COMMIT;"
    )
    assert lint({"r": alembic_own}, ["t"]) == []
    for explicit in ("commit", "START TRANSACTION", "ROLLBACK", "END"):
        assert "transaction-control" in _rules(f"SELECT 1; {explicit}; SELECT 1;")


def test_unanalysable_sql_is_review_not_block() -> None:
    sql = (
        "CREATE OR REPLACE FUNCTION f() RETURNS int AS $body$ BEGIN DROP TABLE t; RETURN 1; END $body$ "
        "LANGUAGE plpgsql"
    )
    findings = lint({"r": f"BEGIN; {sql}; COMMIT;"}, ["t"])
    assert [(f.rule, f.severity) for f in findings] == [("unanalysable-sql", REVIEW)]
    assert blocking(findings) == []


def test_waivers_global_and_per_revision(lint_sql: dict[str, str]) -> None:
    findings = lint(
        lint_sql,
        existing_tables=EXISTING,
        waivers=["drop-column", "0018_truncate:truncate", "0002_x:rename-table"],
    )
    waived = {(f.revision, f.rule) for f in findings if f.waived}
    assert waived == {("0015_drop_column", "drop-column"), ("0018_truncate", "truncate")}
    still = {f.revision for f in blocking(findings)}
    assert "0015_drop_column" not in still
    assert "0018_truncate" not in still
    assert "0014_rename_table" in still  # a waiver for another revision does not count
    assert len(findings) == len(lint(lint_sql, existing_tables=EXISTING)), "waived findings are kept"


def test_unknown_waiver_is_refused() -> None:
    with pytest.raises(UnknownWaiver, match="drop-everything"):
        lint({"r": "SELECT 1"}, [], waivers=["drop-everything"])


def test_splitter_minds_quotes_dollar_quotes_and_comments() -> None:
    sql = (
        "SELECT 'a;b', E'c\\';d', \"we;ird\" FROM t; -- x; y\n"
        "DO $f$ BEGIN PERFORM 1; END $f$; /* ; */ SELECT $$;$$; SELECT $1"
    )
    statements = split_statements(sql)
    assert [s.text for s in statements] == [
        "SELECT 'a;b', E'c\\';d', \"we;ird\" FROM t",
        "DO $f$ BEGIN PERFORM 1; END $f$",
        "SELECT $$;$$",
        "SELECT $1",
    ]
    assert statements[1].masked == "DO $f$ $f$"
