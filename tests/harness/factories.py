"""Test data built one way for every test: connection parameters, manifests, sample databases, stored
backups, WAL server snapshots.

Tests import these instead of importing each other, so a test module can change without breaking another.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from psycopg import sql

from flows.core.compression import Compression
from flows.core.layout import backup_stem, dump_key, globals_key, manifest_key
from flows.core.manifest import Manifest, Verification
from flows.core.objectstore import ObjectStore
from flows.core.postgres import ConnParams
from flows.core.wal import segment_name
from flows.core.wal_server import ArchiverStats, ArchiveSettings, Backlog, ServerSnapshot
from tests.harness.pg import PgCluster, wait_until
from tests.harness.s3 import S3Endpoint

MiB = 1024 * 1024

# -- connection parameters ---------------------------------------------------------------------------------


def conn_params(pg: PgCluster, database: str, **overrides: Any) -> ConnParams:
    """The cluster's superuser on `database`; `overrides` replace any other field (application_name...)."""
    fields: dict[str, Any] = {
        "host": pg.host,
        "port": pg.port,
        "database": database,
        "user": pg.superuser,
        "password": pg.password,
    }
    return ConnParams(**{**fields, **overrides})


# -- manifests and stored backups --------------------------------------------------------------------------

DB = "imagemanager"
PREFIX = "prod"
NOW = datetime.now(UTC).replace(microsecond=0)


def make_manifest(**fields: Any) -> Manifest:
    """A manifest of a zstd dump of imagemanager taken now (`when=` another time), not verified; `fields`
    replace any of its values."""
    when = fields.pop("when", None) or datetime.now(UTC)
    values: dict[str, Any] = {
        "database": DB,
        "server": "db:5432",
        "server_version": "15.18",
        "pg_dump_version": "15.18",
        "started_at": when,
        "ended_at": when,
        "dump_key": "x",
        "bytes": 4,
        "raw_bytes": 4,
        "sha256": "0" * 64,
        "compression": Compression.zstd,
        "compression_level": 3,
        "dump_options": [],
    }
    return Manifest(**{**values, **fields})


def manifest_for(stem: str, when: datetime, *, database: str = DB, dump: str | None = None) -> Manifest:
    """The manifest of the verified backup `stem` taken at `when` (its dump key by default the stem's)."""
    return make_manifest(
        when=when,
        database=database,
        dump_key=dump or dump_key(stem, ".zst"),
        verified=True,
        verification=Verification(method="list"),
    )


def write_backup(
    store: ObjectStore,
    days_ago: float,
    *,
    globals_file: bool = False,
    prefix: str = PREFIX,
    database: str = DB,
    naive: bool = False,
) -> str:
    """A backup's objects as a dump writes them; `naive`: its manifest's times carry no time zone."""
    when = NOW - timedelta(days=days_ago)
    stem = backup_stem(prefix, database, when)
    store.put_bytes(dump_key(stem, ".zst"), b"dump")
    if globals_file:
        store.put_bytes(globals_key(stem), b"roles")
    text = manifest_for(stem, when, database=database).to_json()
    if naive:  # what an older tool wrote: no time zone
        text = text.replace(b"+00:00", b"").replace(b'Z"', b'"')
    store.put_bytes(manifest_key(stem), text)
    return stem


def rewrite(s3: S3Endpoint, bucket: str, key: str, change: Callable[[bytes], bytes]) -> None:
    """Rewrite one object in the bucket through `change(bytes) -> bytes`."""
    client = s3.client()
    body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    client.put_object(Bucket=bucket, Key=key, Body=change(body))


def flip_one_byte_of_row_data(body: bytes) -> bytes:
    """Change one character of a row (`img-10000` → `img-1000X`): still valid COPY data, so pg_restore
    alone would load and commit it; only the sha256 comparison can stop it."""
    at = body.index(b"\timg-10000\t") + len(b"\timg-1000")
    return body[:at] + b"X" + body[at + 1 :]


# -- sample databases --------------------------------------------------------------------------------------


def sample_database(pg: PgCluster, name: str, rows: int = 20_000) -> str:
    """`images` with `rows` rows and an Alembic revision: what a backup, restore or drill works on."""
    pg.create_database(name)
    pg.sql("CREATE TABLE images (id bigserial PRIMARY KEY, name text NOT NULL, body bytea, meta jsonb)", name)
    pg.sql(
        "INSERT INTO images (name, body, meta) SELECT 'img-' || g, decode(md5(g::text), 'hex'),"
        " jsonb_build_object('n', g) FROM generate_series(1, %s) g",
        name,
        (rows,),
    )
    pg.sql("CREATE TABLE alembic_version (version_num varchar(32) PRIMARY KEY)", name)
    pg.sql("INSERT INTO alembic_version VALUES ('0004_classifications_image_index')", name)
    with pg.connect(name) as conn:
        # The inserting sessions have ended, but their statistics may still be on the way; ANALYZE sets the
        # live-tuple count, and a late flush would add the rows a second time. Wait until they arrived.
        def arrived() -> bool:
            row = conn.execute(
                "SELECT coalesce(sum(n_tup_ins), 0) FROM pg_stat_user_tables WHERE relname = 'images'"
            ).fetchone()
            return row is not None and row[0] == rows

        wait_until(arrived, what="the inserts into images to reach the statistics")
        conn.execute("ANALYZE")
    return name


def content(pg: PgCluster, dbname: str) -> tuple[int, str, str]:
    """Row count, an md5 over every row, and the Alembic revision: equal means the same data."""
    count, digest = pg.sql(
        "SELECT count(*), md5(coalesce(string_agg(i::text, '|' ORDER BY id), '')) FROM images i", dbname
    )[0]
    revision = pg.sql("SELECT string_agg(version_num, ',') FROM alembic_version", dbname)[0][0]
    return count, digest, revision


def databases(pg: PgCluster, pattern: str) -> list[str]:
    """The names of the cluster's databases LIKE `pattern`."""
    return [r[0] for r in pg.sql("SELECT datname FROM pg_database WHERE datname LIKE %s", params=(pattern,))]


def bloated_database(pg: PgCluster, name: str, rows: int = 40_000, pgstattuple: bool = True) -> str:
    """`items` with two indexes left ~90 % empty by a mass delete + VACUUM, `healthy` freshly loaded."""
    pg.create_database(name)
    statements = [
        "CREATE TABLE items (id bigint PRIMARY KEY, code int NOT NULL, note text)",
        "CREATE INDEX items_code_idx ON items (code)",
        "INSERT INTO items SELECT g, g * 7 %% %(rows)s, 'n' || g FROM generate_series(1, %(rows)s) g",
        "UPDATE items SET code = code + 1 WHERE id % 10 <> 0",  # new index entries for 90 % of rows
        "DELETE FROM items WHERE id % 10 <> 0",
        "VACUUM ANALYZE items",
        "CREATE TABLE healthy (id bigint PRIMARY KEY, v int)",
        "INSERT INTO healthy SELECT g, g FROM generate_series(1, %(rows)s) g",
        "VACUUM ANALYZE healthy",
    ]
    if pgstattuple:
        statements.insert(0, "CREATE EXTENSION pgstattuple")
    for statement in statements:
        pg.sql(statement, name, {"rows": rows} if "%(rows)s" in statement else None)
    return name


ROWS, PROJECTS = 150_000, 200


def low_cardinality_table(pg: PgCluster, dbname: str, table: str = "images") -> None:
    """The seed's shape: `idx_<table>_deleted ON <table>(project_id) WHERE deleted_at IS NULL`, built fresh
    over 150,000 rows in 200 projects (posting lists of ~130 TIDs)."""
    t, idx = sql.Identifier(table), sql.Identifier(f"idx_{table}_deleted")
    with pg.connect(dbname) as conn:
        conn.execute(
            sql.SQL(
                "CREATE TABLE {} (id bigint PRIMARY KEY, project_id bigint NOT NULL, deleted_at timestamptz, "
                "note text) WITH (autovacuum_enabled = off)"
            ).format(t)
        )
        conn.execute(
            sql.SQL(
                "INSERT INTO {} SELECT g, (hashint4(g::int) & 2147483647) %% %s, NULL, 'n' "
                "FROM generate_series(1, %s) g"
            ).format(t),
            (PROJECTS, ROWS),
        )
        conn.execute(sql.SQL("CREATE INDEX {} ON {} (project_id) WHERE deleted_at IS NULL").format(idx, t))
        conn.execute(sql.SQL("VACUUM ANALYZE {}").format(t))


def churn(pg: PgCluster, dbname: str, table: str = "images") -> None:
    """Ordinary churn: every image moves to the next project (new index entries arrive one at a time and
    are deduplicated only lazily), then VACUUM and ANALYZE."""
    t = sql.Identifier(table)
    with pg.connect(dbname) as conn:
        conn.execute(sql.SQL("UPDATE {} SET project_id = (project_id + 1) %% %s").format(t), (PROJECTS,))
        conn.execute(sql.SQL("VACUUM ANALYZE {}").format(t))


# -- WAL server snapshots ----------------------------------------------------------------------------------


def archive_settings(**overrides: Any) -> ArchiveSettings:
    """A primary archiving 16 MiB segments with a command; `overrides` replace any field."""
    base: dict[str, Any] = {
        "wal_level": "replica",
        "archive_mode": "on",
        "archive_command": "cp %p /wal/%f",
        "segment_size": 16 * MiB,
        "in_recovery": False,
        "server": "db:5432",
    }
    return ArchiveSettings(**{**base, **overrides})


def snapshot_at(last_segno: int, size: int = MiB) -> ServerSnapshot:
    """A server on timeline 1 whose archiver has just archived segment `last_segno` and never failed."""
    now = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
    return ServerSnapshot(
        settings=archive_settings(segment_size=size),
        archiver=ArchiverStats(
            archived_count=last_segno,
            last_archived_wal=segment_name(1, last_segno, size),
            last_archived_time=now,
            failed_count=0,
            last_failed_wal=None,
            last_failed_time=None,
            stats_reset=None,
        ),
        position=None,
        backlog=Backlog(ready=0),
        standbys=[],
        user="test",
        taken_at=now,
    )


def churn_table(pg: PgCluster, db: str, rows: int = 20_000) -> None:
    """A table autovacuum leaves alone, with every row deleted: all dead rows, visible in the statistics."""
    pg.sql("CREATE TABLE churn (id int, pad text) WITH (autovacuum_enabled = false)", db)
    pg.sql("INSERT INTO churn SELECT g, repeat('x', 50) FROM generate_series(1, %s) g", db, (rows,))
    pg.sql("DELETE FROM churn", db)
    wait_until(
        lambda: (
            pg.sql("SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = 'churn'", db)[0][0] >= rows
        ),
        what="the dead rows in pg_stat_user_tables",
    )
