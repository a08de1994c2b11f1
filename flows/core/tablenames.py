"""Table names as (schema, table) pairs, and the keys the manifest stores them under.

PostgreSQL allows a dot in a schema or table name (`"my.schema"."t.x"`), so "schema.table" split at the
first dot names the wrong table. Inside dbops a table is a `TableName` pair. In the manifest's JSON
objects it is a key: `schema.table` as before when neither part holds a dot or a double quote (every
key of older manifests stays valid and unchanged), and otherwise that part is quoted like an SQL
identifier (`"my.schema"."t.x"`, `"my.schema".plain`, a `"` doubled), so a new key has one reading.

Older manifests wrote `my.schema.t.x` unquoted: such a key has several readings (`legacy_readings`),
and the restore drill takes the one that exists in the restored catalog (`resolve_key`).
"""

from __future__ import annotations

import re
from collections.abc import Container
from typing import NamedTuple

_PART = r'(?:"(?:[^"]|"")+"|[^."]+)'
_KEY_RE = re.compile(rf"(?P<schema>{_PART})\.(?P<table>{_PART})")


class TableName(NamedTuple):
    schema: str
    table: str

    def __str__(self) -> str:
        return table_key(self.schema, self.table)


def _quote_part(part: str) -> str:
    if "." in part or '"' in part or not part:
        return '"' + part.replace('"', '""') + '"'
    return part


def _unquote_part(part: str) -> str:
    return part[1:-1].replace('""', '"') if part.startswith('"') else part


def table_key(schema: str, table: str) -> str:
    """The manifest key of a table: `schema.table`, a part quoted only when it holds a dot or a quote."""
    return f"{_quote_part(schema)}.{_quote_part(table)}"


def parse_table_key(key: str) -> TableName | None:
    """The one reading of a key written by `table_key`; None for a legacy key with more than one dot."""
    m = _KEY_RE.fullmatch(key)
    if m is None:
        return None
    return TableName(_unquote_part(m["schema"]), _unquote_part(m["table"]))


def legacy_readings(key: str) -> list[TableName]:
    """Every (schema, table) an unquoted "schema.table" key of an older manifest may mean."""
    return [TableName(key[:i], key[i + 1 :]) for i in _dots(key)]


def _dots(key: str) -> list[int]:
    return [i for i, ch in enumerate(key) if ch == "." and 0 < i < len(key) - 1]


def resolve_key(key: str, catalog: Container[TableName]) -> TableName | None:
    """The table a manifest key names, checked against the restored catalog.

    A key in the current form has one reading (None when that table is not in `catalog`); a legacy key is
    read every way it splits, and the reading that exists wins.
    """
    exact = parse_table_key(key)
    if exact is not None and exact in catalog:
        return exact
    return next((t for t in legacy_readings(key) if t in catalog), None)
