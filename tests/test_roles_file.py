"""Reading a stored roles file (pg_dumpall --globals-only): every statement tied to its role or
tablespace, and a file that holds anything else refused before a single statement runs."""

from __future__ import annotations

import pytest

from flows.core.errors import ConfigurationError
from flows.core.roles import parse_globals

PG15_GLOBALS = """--
-- PostgreSQL database cluster dump
--

\\restrict hPveNDwTrya1KWcJMnfdsFtH7lVsMJyoX0TlNovGU8VEJWdu6lpm4gXRBROyPwk

SET default_transaction_read_only = off;

SET client_encoding = 'UTF8';
SET standard_conforming_strings = on;

CREATE ROLE "Weird Role";
ALTER ROLE "Weird Role" WITH NOSUPERUSER INHERIT NOCREATEROLE NOCREATEDB NOLOGIN NOREPLICATION NOBYPASSRLS;
CREATE ROLE app;
ALTER ROLE app WITH NOSUPERUSER INHERIT NOCREATEROLE CREATEDB LOGIN NOREPLICATION CONNECTION LIMIT 5;
COMMENT ON ROLE app IS 'the app; with a semicolon -- and no comment';
ALTER ROLE app SET search_path TO 'a, b';
GRANT "Weird Role" TO app GRANTED BY postgres;
GRANT SET ON PARAMETER work_mem TO app;
CREATE TABLESPACE fast OWNER postgres LOCATION '/srv/fast';
GRANT ALL ON TABLESPACE fast TO app;

\\unrestrict hPveNDwTrya1KWcJMnfdsFtH7lVsMJyoX0TlNovGU8VEJWdu6lpm4gXRBROyPwk
"""


def test_each_statement_of_a_pg_dumpall_file_belongs_to_its_object() -> None:
    parsed = [(s.kind, s.names) for s in parse_globals(PG15_GLOBALS)]
    assert parsed == [
        ("session", ()),
        ("session", ()),
        ("session", ()),
        ("create_role", ("Weird Role",)),
        ("role", ("Weird Role",)),
        ("create_role", ("app",)),
        ("role", ("app",)),
        ("role", ("app",)),
        ("role", ("app",)),
        ("grant", ("app",)),
        ("grant", ("app",)),
        ("create_tablespace", ("fast",)),
        ("tablespace", ("fast",)),
    ]
    comment = parse_globals(PG15_GLOBALS)[7].text
    assert comment.endswith("'the app; with a semicolon -- and no comment'")


@pytest.mark.parametrize(
    "extra",
    [
        "\\! rm -rf /tmp/x",  # a psql meta-command would run a shell on the worker
        "\\c otherdb",
        "DROP ROLE app;",
        "ALTER SYSTEM SET archive_command = 'x';",
        "CREATE ROLE app; DROP DATABASE imagemanager;",
        "SELECT pg_terminate_backend(1);",
    ],
)
def test_anything_but_roles_tablespaces_and_settings_refuses_the_whole_file(extra: str) -> None:
    with pytest.raises(ConfigurationError, match="roles file contains"):
        parse_globals(PG15_GLOBALS + extra + "\n")


def test_damaged_file_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="damaged"):
        parse_globals("CREATE ROLE app;\nCOMMENT ON ROLE app IS 'unterminated;\n")
    with pytest.raises(ConfigurationError, match="damaged"):
        parse_globals("CREATE ROLE app;\nCREATE ROLE other\n")
