"""Where to connect: a PostgreSQL database as a Prefect block, with the password as a SecretStr."""

from __future__ import annotations

from typing import Any, Literal

import psycopg
from prefect.blocks.core import Block
from pydantic import Field, HttpUrl, SecretStr, ValidationError

from blocks.storage import load_block
from flows.core.errors import ConfigurationError
from flows.core.pooler import SessionRoute, connect_direct
from flows.core.postgres import ConnParams, connect
from flows.core.redact import libpq_parse_problem, validation_summary


class PostgresDatabase(Block):
    """A PostgreSQL database that dbops connects to.

    It connects (psycopg) and hands libpq tools a connection environment; it does not run backups.
    The password is stored encrypted by Prefect and never reaches argv, logs, artifacts or manifests:
    libpq tools and Alembic (libpq or asyncpg) get it through a 0600 passfile (PGPASSFILE).

    Examples:
        Create the block once (or let `dbops setup` do it):
        ```python
        from blocks import PostgresDatabase
        PostgresDatabase(host="db1.internal", database="imagemanager", user="dbops",
                         password="...", sslmode="verify-full").save("imagemanager-prod")
        ```
        Use it in a flow:
        ```python
        from blocks import PostgresDatabase
        db = PostgresDatabase.load("BLOCK_NAME")
        with db.connect() as conn:
            conn.execute("SELECT 1")
        ```
    """

    _block_type_name = "Postgres Database"
    _block_type_slug = "postgres-database"
    _logo_url = HttpUrl("https://www.postgresql.org/media/img/about/press/elephant.png")
    _description = "Connection details for a PostgreSQL database managed by dbops."
    # the fields are libpq's connection parameters, documented there
    _documentation_url = HttpUrl("https://www.postgresql.org/docs/current/libpq-connect.html")

    host: str = Field(description="Server host name or IP address.")
    port: int = Field(default=5432, ge=1, le=65535, description="Server port.")
    database: str = Field(description="Database name, e.g. imagemanager.")
    user: str = Field(description="Role to connect as; dumps need SELECT on every table (pg_read_all_data).")
    password: SecretStr | None = Field(default=None, description="Password of the role (stored encrypted).")
    sslmode: Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] = Field(
        default="prefer", description="libpq sslmode; use verify-full across untrusted networks."
    )
    application_name: str = Field(
        default="dbops", description="Shown in pg_stat_activity so DBAs can tell dbops sessions apart."
    )
    connect_timeout: int = Field(default=10, ge=1, le=600, description="Seconds to wait for a connection.")
    protected: bool = Field(
        default=False,
        description="Production: restores into it are refused unless the run's confirm equals the "
        "database name.",
    )

    allow_pooler: bool = Field(
        default=False,
        description="Accept a connection pooler between dbops and PostgreSQL. Leave off: every flow refuses "
        "a block that reaches PostgreSQL through PgBouncer, because pg_dump's snapshot, the migration lock "
        "and lock_timeout need a real session. On only for a pooler in session mode; transaction pooling is "
        "refused even then.",
    )

    def params(self, database: str | None = None) -> ConnParams:
        return ConnParams(
            host=self.host,
            port=self.port,
            database=database or self.database,
            user=self.user,
            password=self.password.get_secret_value() if self.password else None,
            sslmode=self.sslmode,
            application_name=self.application_name,
            connect_timeout=self.connect_timeout,
        )

    def connect(self, database: str | None = None, autocommit: bool = True) -> psycopg.Connection:
        """A psycopg connection; failures raise dbops errors with one sentence saying what to fix."""
        return connect(self.params(database), autocommit=autocommit)

    def connect_direct(
        self, database: str | None = None, autocommit: bool = True
    ) -> tuple[psycopg.Connection, SessionRoute]:
        """Connect, and refuse (ConnectionPoolerInTheWay) when the connection goes through a pooler:
        the preflight of every flow opens its first connection with this."""
        name = getattr(self, "_block_document_name", None)
        return connect_direct(
            self.params(database), allow_pooler=self.allow_pooler, block=name, autocommit=autocommit
        )

    @classmethod
    def from_url(cls, url: str, **overrides: object) -> PostgresDatabase:
        """Build from a postgresql:// URL (as `dbops setup` accepts); the password becomes a SecretStr.

        Any malformed input raises ConfigurationError with one sentence that names the field at fault but
        never quotes the URL or a value: libpq's parse errors and pydantic's (`input_value=...`) would
        echo the password into the terminal, a CI log or a flow run's state message.
        """
        try:
            info = psycopg.conninfo.conninfo_to_dict(url)
        except psycopg.Error as exc:
            raise ConfigurationError(
                f"the database URL cannot be parsed ({libpq_parse_problem(str(exc))}); write it as "
                "postgresql://user@host:port/database?sslmode=..., with special characters in the user or "
                "password percent-encoded (the URL is not shown: it may hold a password)"
            ) from None
        unknown = sorted(set(info) - URL_KEYS)
        if unknown:
            raise ConfigurationError(
                f"the database URL sets {', '.join(unknown)}, which dbops does not take from a URL; "
                f"use only {', '.join(sorted(URL_KEYS))}"
            )
        fields: dict[str, Any] = {  # checked by the model: a bad value is the ValidationError below
            "host": info.get("host") or "localhost",
            "port": _url_int(info.get("port"), "port", 5432),
            "database": info.get("dbname") or "postgres",
            "user": info.get("user") or "postgres",
            "password": info.get("password"),
        }
        if "," in str(fields["host"]):
            raise ConfigurationError("the database URL names several hosts; give exactly one host")
        if info.get("sslmode"):
            fields["sslmode"] = info["sslmode"]
        if info.get("connect_timeout"):
            fields["connect_timeout"] = _url_int(info["connect_timeout"], "connect_timeout", 10)
        if info.get("application_name"):
            fields["application_name"] = info["application_name"]
        fields.update(overrides)
        try:
            return cls(**fields)
        except ValidationError as exc:
            raise ConfigurationError(f"the database URL is not usable: {validation_summary(exc)}") from None


#: what a URL may set: where, as whom, and how the connection is secured
URL_KEYS = frozenset(
    {"host", "port", "dbname", "user", "password", "sslmode", "connect_timeout", "application_name"}
)


def _url_int(value: str | int | None, name: str, default: int) -> int:
    text = "" if value is None else str(value)
    if text == "":
        return default
    if not text.isdigit():
        raise ConfigurationError(f"the {name} in the database URL is not a number; fix it")
    return int(text)


def load_database(name: str) -> PostgresDatabase:
    """The PostgresDatabase block `name` (a bare name or `postgres-database/NAME`)."""
    slug = name if "/" in name else f"postgres-database/{name}"
    block = load_block(slug, PostgresDatabase)
    assert isinstance(block, PostgresDatabase)
    return block
