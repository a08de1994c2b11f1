"""Applying a stored roles file (pg_dumpall --globals-only) to a server without harming what is there.

Roles and tablespaces are server-wide: the target server's existing roles belong to other databases and
applications too. So the file is not run as a script. It is split into statements, each tied to the
role or tablespace it creates or changes, and only objects missing on the target are created, with the
statements that set them up (attributes, settings, comments, memberships, parameter grants). An
existing role keeps its password, attributes and memberships. Any failure other than "already exists"
stops the run with one sentence naming the object; nothing is reported as applied that was not.

Statements are executed through psycopg, one at a time, never through psql: a psql meta-command in a
tampered file (`\\!`) would run on the worker. Only `\\restrict`/`\\unrestrict` (pg_dumpall's own guard
lines since 15.14) are accepted and ignored; any other meta-command, or a statement of a kind this module
does not know, refuses the whole file before anything is executed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

import psycopg
from psycopg import sql

from flows.core.errors import ConfigurationError, GlobalsFailed
from flows.core.postgres import ConnParams, connect, scrub

Kind = Literal["session", "create_role", "role", "create_tablespace", "tablespace", "grant"]

_IDENT = r'(?:"(?:[^"]|"")+"|[A-Za-z_][A-Za-z0-9_$]*)'
_IDENT_RE = re.compile(_IDENT)
_IDENT_LIST = rf"{_IDENT}(?:\s*,\s*{_IDENT})*"

#: (pattern, kind); the named group `name` is the object the statement belongs to
_PATTERNS: list[tuple[re.Pattern[str], Kind]] = [
    (re.compile(r"SET\s+\w+\s*(?:=|TO)\s*.+", re.S | re.I), "session"),
    (re.compile(rf"CREATE\s+ROLE\s+(?P<name>{_IDENT})", re.I), "create_role"),
    (re.compile(rf"ALTER\s+ROLE\s+(?P<name>{_IDENT})\s.+", re.S | re.I), "role"),
    (re.compile(rf"COMMENT\s+ON\s+ROLE\s+(?P<name>{_IDENT})\s+IS\s.+", re.S | re.I), "role"),
    (
        re.compile(
            rf"SECURITY\s+LABEL\s+(?:FOR\s+{_IDENT}\s+)?ON\s+ROLE\s+(?P<name>{_IDENT})\s.+", re.S | re.I
        ),
        "role",
    ),
    (re.compile(rf"CREATE\s+TABLESPACE\s+(?P<name>{_IDENT})\s.+", re.S | re.I), "create_tablespace"),
    (re.compile(rf"ALTER\s+TABLESPACE\s+(?P<name>{_IDENT})\s.+", re.S | re.I), "tablespace"),
    (re.compile(rf"COMMENT\s+ON\s+TABLESPACE\s+(?P<name>{_IDENT})\s+IS\s.+", re.S | re.I), "tablespace"),
    (
        re.compile(
            rf"SECURITY\s+LABEL\s+(?:FOR\s+{_IDENT}\s+)?ON\s+TABLESPACE\s+(?P<name>{_IDENT})\s.+", re.S | re.I
        ),
        "tablespace",
    ),
    (
        re.compile(rf"(?:GRANT|REVOKE)\s+.+?\s+ON\s+TABLESPACE\s+(?P<name>{_IDENT})\s.+", re.S | re.I),
        "tablespace",
    ),
    # role memberships and privileges on configuration parameters: they belong to the grantee(s)
    (
        re.compile(
            rf"GRANT\s+(?:{_IDENT_LIST}|.+?\s+ON\s+PARAMETER\s+.+?)\s+TO\s+(?P<names>{_IDENT_LIST})"
            rf"(?:\s+WITH\s+.+?)?(?:\s+GRANTED\s+BY\s+{_IDENT})?",
            re.S | re.I,
        ),
        "grant",
    ),
]


@dataclass(frozen=True)
class Statement:
    text: str
    kind: Kind
    names: tuple[str, ...]  # the role(s) or tablespace it belongs to; empty for session settings

    @property
    def what(self) -> str:
        if self.kind in ("create_tablespace", "tablespace"):
            return f"tablespace {self.names[0]!r}"
        if self.kind == "session":
            return "a session setting"
        return f"role {', '.join(repr(n) for n in self.names)}"


def unquote(ident: str) -> str:
    return ident[1:-1].replace('""', '"') if ident.startswith('"') else ident.lower()


def split_statements(text: str) -> list[str]:
    """SQL statements of a pg_dumpall script, respecting quotes and comments; psql meta-command lines are
    returned as they are (starting with a backslash) for the caller to judge."""
    out: list[str] = []
    buf: list[str] = []
    i, n = 0, len(text)
    at_line_start = True
    while i < n:
        ch = text[i]
        if at_line_start and not "".join(buf).strip() and ch == "\\":
            end = text.find("\n", i)
            end = n if end < 0 else end
            out.append(text[i:end].strip())
            buf = []
            i = end
            continue
        at_line_start = ch == "\n"
        if ch == "-" and text.startswith("--", i):
            end = text.find("\n", i)
            i = n if end < 0 else end
            continue
        if ch in "'\"":
            j = i + 1
            while j < n:
                if text[j] == ch:
                    if j + 1 < n and text[j + 1] == ch:  # doubled quote inside
                        j += 2
                        continue
                    break
                j += 1
            if j >= n:
                raise ConfigurationError("the roles file ends inside a quoted string; it is damaged")
            buf.append(text[i : j + 1])
            i = j + 1
            continue
        if ch == ";":
            stmt = "".join(buf).strip()
            if stmt:
                out.append(stmt)
            buf = []
            i += 1
            continue
        buf.append(ch)
        i += 1
    if "".join(buf).strip():
        raise ConfigurationError("the roles file ends with a statement without its semicolon; it is damaged")
    return out


def parse_globals(text: str) -> list[Statement]:
    """The file's statements, each tied to its object; refuses the whole file on anything unexpected."""
    statements: list[Statement] = []
    for raw in split_statements(text):
        if raw.startswith("\\"):
            if re.fullmatch(r"\\(?:un)?restrict\s+\S+", raw):
                continue
            raise ConfigurationError(
                f"the roles file contains the psql command {raw.split()[0]!r}, which dbops never runs; "
                "use a roles file written by pg_dumpall --globals-only"
            )
        for pattern, kind in _PATTERNS:
            m = pattern.fullmatch(raw)
            if m:
                if kind == "session":
                    names: tuple[str, ...] = ()
                elif kind == "grant":
                    names = tuple(unquote(x) for x in _IDENT_RE.findall(m.group("names")))
                else:
                    names = (unquote(m.group("name")),)
                statements.append(Statement(raw, kind, names))
                break
        else:
            head = " ".join(raw.split()[:3])
            raise ConfigurationError(
                f"the roles file contains a statement dbops does not apply ({head} ...); nothing was "
                "applied, use a roles file written by pg_dumpall --globals-only or apply it by hand"
            )
    return statements


@dataclass
class GlobalsResult:
    created_roles: list[str] = field(default_factory=list)
    present_roles: list[str] = field(default_factory=list)
    created_tablespaces: list[str] = field(default_factory=list)
    present_tablespaces: list[str] = field(default_factory=list)
    skipped: int = 0  # statements about objects that were already present

    def summary(self) -> str:
        def names(items: list[str]) -> str:
            shown = ", ".join(items[:10]) + (f" and {len(items) - 10} more" if len(items) > 10 else "")
            return f" ({shown})" if items else ""

        text = (
            f"created {len(self.created_roles)} role(s){names(self.created_roles)}; "
            f"{len(self.present_roles)} already present, left unchanged{names(self.present_roles)}"
        )
        if self.created_tablespaces or self.present_tablespaces:
            text += (
                f"; created {len(self.created_tablespaces)} tablespace(s){names(self.created_tablespaces)}, "
                f"{len(self.present_tablespaces)} already present{names(self.present_tablespaces)}"
            )
        if self.skipped:
            text += f"; {self.skipped} statement(s) about present roles or tablespaces not applied"
        return text


def _existing(conn: psycopg.Connection, catalog: str, column: str) -> set[str]:
    query = sql.SQL("SELECT {} FROM {}").format(sql.Identifier(column), sql.Identifier("pg_catalog", catalog))
    return {r[0] for r in conn.execute(query).fetchall()}


def apply_globals(text: str, params: ConnParams) -> GlobalsResult:
    """Create the roles and tablespaces of a roles file that the server lacks; leave the others alone.

    `params` connects to the target server's maintenance database as a role allowed to create roles.
    """
    statements = parse_globals(text)  # refuses a damaged or foreign file before anything runs
    result = GlobalsResult()
    with connect(params) as conn:
        roles = _existing(conn, "pg_roles", "rolname")
        spaces = _existing(conn, "pg_tablespace", "spcname")
        new_roles: set[str] = set()
        new_spaces: set[str] = set()
        for st in statements:
            name = st.names[0] if st.names else ""
            if st.kind == "create_role":
                if name in roles:
                    _note(result.present_roles, name)
                    continue
                query: sql.SQL | sql.Composed = sql.SQL("CREATE ROLE {}").format(sql.Identifier(name))
            elif st.kind == "create_tablespace":
                if name in spaces:
                    _note(result.present_tablespaces, name)
                    continue
                query = sql.SQL(st.text)  # OWNER and LOCATION as pg_dumpall wrote them
            elif st.kind == "role" and name not in new_roles:
                result.skipped += 1  # an existing role is never altered
                continue
            elif st.kind == "tablespace" and name not in new_spaces:
                result.skipped += 1
                continue
            elif st.kind == "grant" and any(n in roles and n not in new_roles for n in st.names):
                result.skipped += 1  # an existing role gets no new membership or privilege
                continue
            else:
                query = sql.SQL(st.text)
            try:
                conn.execute(query)
            except psycopg.errors.DuplicateObject:
                if st.kind == "create_role":  # created by someone else meanwhile: present, left alone
                    roles.add(name)
                    _note(result.present_roles, name)
                    continue
                if st.kind == "create_tablespace":
                    spaces.add(name)
                    _note(result.present_tablespaces, name)
                    continue
                raise _failed(st, params, "it already exists", result) from None
            except psycopg.Error as exc:
                detail = scrub(
                    str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
                    params.password,
                )
                raise _failed(st, params, detail, result) from None
            if st.kind == "create_role":
                roles.add(name)
                new_roles.add(name)
                result.created_roles.append(name)
            elif st.kind == "create_tablespace":
                spaces.add(name)
                new_spaces.add(name)
                result.created_tablespaces.append(name)
    return result


def _note(items: list[str], name: str) -> None:
    if name not in items:
        items.append(name)


def _failed(st: Statement, params: ConnParams, detail: str, result: GlobalsResult) -> GlobalsFailed:
    done = f"; already created: {', '.join(result.created_roles)}" if result.created_roles else ""
    return GlobalsFailed(
        f"applying the roles file on {params.host}:{params.port} failed at {st.what} ({detail}){done}; "
        "the database was not restored: fix the role or tablespace on the server (or restore without "
        "globals) and run again"
    )
