"""Creating, renaming and dropping databases for a restore, identifiers always through sql.Identifier.

A `create` restore goes into `<name>_restoring_<id>` (`temporary_name`) and is renamed onto the target
only when pg_restore succeeded; these are the statements it takes.
"""

from __future__ import annotations

import secrets

import psycopg
from psycopg import sql

from flows.core.pgtools import MAX_IDENTIFIER


def temporary_name(target: str, run_id: str | None = None) -> str:
    """`<target>_restoring_<id>`, shortened so PostgreSQL does not truncate it (63 bytes)."""
    suffix = f"_restoring_{run_id or secrets.token_hex(4)}"
    head = target.encode()[: MAX_IDENTIFIER - len(suffix.encode())].decode(errors="ignore")
    return head + suffix


def database_exists(conn: psycopg.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is not None


def create_database(conn: psycopg.Connection, name: str) -> None:
    """An empty database from template0 (what pg_restore of a custom archive expects)."""
    conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name)))


def drop_database(conn: psycopg.Connection, name: str) -> None:
    """Drop it even when a session is still connected (WITH (FORCE), PostgreSQL 13+)."""
    force = conn.info.server_version >= 130000
    query = sql.SQL("DROP DATABASE IF EXISTS {}" + (" WITH (FORCE)" if force else "")).format(
        sql.Identifier(name)
    )
    conn.execute(query)


def rename_database(conn: psycopg.Connection, old: str, new: str) -> None:
    conn.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(old), sql.Identifier(new)))
