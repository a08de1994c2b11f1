"""A stored dump restored with plain pg_restore (after `zstd -d` when compressed) gives identical contents.

Real everything: a PostgreSQL cluster, pg_dump/pg_restore, the moto S3 server over HTTP, the zstd CLI.
Contents are compared per table by checksum, plus sequences, large objects and enum labels.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from psycopg import sql

from flows.core.compression import Compression
from flows.core.dump import stream_dump, verify_stored_dump
from flows.core.localstore import LocalObjectStore
from flows.core.objectstore import MiB, ObjectStore
from flows.core.pgtools import PgTool, find_tool
from flows.core.postgres import connect, dumpable_tables, server_version_num
from flows.core.s3store import S3ObjectStore
from tests.harness.factories import conn_params
from tests.harness.pg import PgCluster
from tests.harness.s3 import S3Endpoint

SCHEMA = r"""
CREATE SCHEMA sales;
CREATE SCHEMA "Audit Log";
CREATE TYPE sales.mood AS ENUM ('sad', 'ok', 'happy');
ALTER TYPE sales.mood ADD VALUE 'meh' BEFORE 'ok';
ALTER TYPE sales.mood ADD VALUE 'ecstatic';
-- new enum values must be committed before rows use them: the script runs in pieces split here
-- COMMIT --

CREATE SEQUENCE sales.invoice_no START 1000 INCREMENT 7;
SELECT nextval('sales.invoice_no') FROM generate_series(1, 42);
CREATE SEQUENCE public.never_used;

CREATE TABLE sales.customers (
    id bigserial PRIMARY KEY,
    name text NOT NULL,
    mood sales.mood,
    tags text[],
    scores int[][],
    prefs jsonb,
    avatar bytea,
    balance numeric(12, 2),
    ratio double precision,
    joined timestamptz
);
INSERT INTO sales.customers (name, mood, tags, scores, prefs, avatar, balance, ratio, joined) VALUES
    ('Café', 'happy', ARRAY['crème', 'brûlée'], '{{1,2},{3,4}}', '{"lang": "fr", "é": [1, 2.5, null]}',
     '\x00ff10'::bytea, 12.34, 0.1, '2024-02-29 12:00+01'),
    ('日本語', 'meh', ARRAY['東京', NULL], NULL, '{"nested": {"deep": [true, false]}}', '\x'::bytea,
     -0.01, 1e300, '1999-12-31 23:59:59.999999+00'),
    ('emoji 🐘🚀 and a "quote", a \backslash and a tab	here', 'ecstatic', '{}', '{{5}}', '[]',
     decode(repeat('deadbeef', 64), 'hex'), 0, 'NaN', 'infinity'),
    ('newline
inside', NULL, NULL, NULL, 'null', NULL, NULL, '-Infinity', NULL);
INSERT INTO sales.customers (name, mood, tags, prefs, avatar, balance, ratio, joined)
SELECT 'customer ' || g || ' ' || md5(g::text),
       (ARRAY['sad', 'meh', 'ok', 'happy', 'ecstatic'])[1 + g % 5]::sales.mood,
       ARRAY[md5(g::text), (g % 7)::text],
       jsonb_build_object('g', g, 'sq', g * g, 'tag', md5(g::text)),
       decode(md5(g::text), 'hex'),
       g * 1.25,
       g / 7.0,
       timestamptz '2020-01-01 00:00+00' + g * interval '37 minutes'
FROM generate_series(1, 5000) g;

CREATE TABLE sales.events (id bigint NOT NULL, at date NOT NULL, payload jsonb) PARTITION BY RANGE (at);
CREATE TABLE sales.events_2025 PARTITION OF sales.events FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE TABLE sales.events_2026 PARTITION OF sales.events FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
CREATE TABLE sales.events_other PARTITION OF sales.events DEFAULT;
INSERT INTO sales.events
SELECT g, date '2024-06-01' + (g % 900), jsonb_build_object('n', g) FROM generate_series(1, 3000) g;

CREATE MATERIALIZED VIEW sales.mood_counts AS
    SELECT mood, count(*) AS n, sum(balance) AS total FROM sales.customers GROUP BY mood;

CREATE TABLE "Audit Log"."Entry Log" (
    id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    msg text,
    customer bigint REFERENCES sales.customers (id),
    at timestamptz DEFAULT now()
);
INSERT INTO "Audit Log"."Entry Log" (msg, customer) SELECT 'changed ' || g, g FROM generate_series(1, 250) g;
-- a few ids consumed by rolled-back work still advance the identity sequence
SELECT nextval(pg_get_serial_sequence('"Audit Log"."Entry Log"', 'id')) FROM generate_series(1, 5);

CREATE TABLE public.sparse (a int, b text, c jsonb, d bytea, e int[], f sales.mood);
INSERT INTO public.sparse VALUES
    (NULL, NULL, NULL, NULL, NULL, NULL),
    (NULL, NULL, NULL, NULL, NULL, NULL),
    (1, '', '{}', '\x', '{}', NULL),
    (2, 'NULL', 'null', NULL, '{NULL}', 'sad');

-- incompressible-ish filler so an uncompressed dump spans more than one 5 MiB part
CREATE TABLE public.filler (id int PRIMARY KEY, body text);
INSERT INTO public.filler
SELECT g, (SELECT string_agg(md5((g * 1000 + i)::text), '') FROM generate_series(1, 12) i)
FROM generate_series(1, 20000) g;

CREATE TABLE public.documents (id int PRIMARY KEY, title text, content oid);
INSERT INTO public.documents
SELECT g, 'document ' || g, lo_from_bytea(0, convert_to(repeat('page ' || g || ' ünïcödé ', 500), 'UTF8'))
FROM generate_series(1, 15) g;
-- one large object with every byte value, one empty, one not referenced by any table
SELECT lo_from_bytea(0, (SELECT decode(string_agg(lpad(to_hex(b), 2, '0'), ''), 'hex')
                         FROM generate_series(0, 255) b));
SELECT lo_from_bytea(0, ''::bytea);
SELECT lo_from_bytea(0, decode(repeat('00ff', 100000), 'hex'));
"""


@pytest.fixture(scope="module")
def source_db(pg: PgCluster) -> Iterator[str]:
    name = f"roundtrip_src_{secrets.token_hex(4)}"
    pg.create_database(name)
    with pg.connect(name) as conn:
        for script in SCHEMA.split("-- COMMIT --"):
            conn.execute(script)
        conn.execute("ANALYZE")
    yield name
    pg.sql(f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.fixture
def restore_db(pg: PgCluster, unique: str) -> Iterator[str]:
    name = f"roundtrip_dst_{unique}"
    pg.create_database(name)
    yield name
    pg.sql(f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def zstd_cli() -> str:
    path = shutil.which("zstd") or ("/usr/bin/zstd" if Path("/usr/bin/zstd").exists() else None)
    if not path:
        pytest.fail(
            "the zstd CLI is needed to prove a .dump.zst restores with stock tools: apt-get install zstd"
        )
    return path


def tools(pg: PgCluster) -> tuple[PgTool, PgTool]:
    with pg.connect() as conn:
        version = server_version_num(conn)
    return find_tool("pg_dump", version), find_tool("pg_restore", version)


# -- what "identical contents" means -------------------------------------------------------------------------


def snapshot(pg: PgCluster, dbname: str) -> dict[str, Any]:
    """Checksums of everything a restore must bring back, keyed by what they describe."""
    out: dict[str, Any] = {}
    with connect(conn_params(pg, dbname)) as conn:
        relations = conn.execute(
            """
            SELECT n.nspname, c.relname, c.relkind
            FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE c.relkind IN ('r', 'p', 'm', 'S')
              AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%'
            ORDER BY 1, 2
            """
        ).fetchall()
        for schema, name, kind in relations:
            rel = sql.Identifier(schema, name)
            if kind == "S":
                query = sql.SQL("SELECT last_value, is_called FROM {}").format(rel)
                out[f"sequence {schema}.{name}"] = conn.execute(query).fetchone()
            else:
                query = sql.SQL(
                    "SELECT count(*), md5(string_agg(t::text, ',' ORDER BY t::text)) FROM {} t"
                ).format(rel)
                out[f"{kind} {schema}.{name}"] = conn.execute(query).fetchone()
        out["large objects"] = conn.execute(
            "SELECT count(*), md5(string_agg(oid::text || ':' || md5(lo_get(oid)), ',' ORDER BY oid)) "
            "FROM pg_largeobject_metadata"
        ).fetchone()
        out["enum labels"] = conn.execute(
            "SELECT array_agg(enumlabel::text ORDER BY enumsortorder) FROM pg_enum "
            "WHERE enumtypid = 'sales.mood'::regtype"
        ).fetchone()
    return out


@pytest.fixture(scope="module")
def source_snapshot(pg: PgCluster, source_db: str) -> dict[str, Any]:
    snap = snapshot(pg, source_db)
    # The fixture must contain what the test claims to cover, or equality proves nothing.
    for table in ("sales.customers", "sales.events_2025", "sales.events_other", "public.sparse"):
        assert snap[f"r {table}"][0] > 0, table
    assert snap["r Audit Log.Entry Log"][0] == 250
    assert snap["p sales.events"][0] == 3000
    assert snap["m sales.mood_counts"][0] == 6
    assert snap["sequence sales.invoice_no"] == (1000 + 41 * 7, True)
    assert snap["sequence public.never_used"] == (1, False)
    assert snap["large objects"][0] == 18
    assert snap["enum labels"] == (["sad", "meh", "ok", "happy", "ecstatic"],)
    return snap


def pg_restore(pg: PgCluster, tool: PgTool, archive: Path, dbname: str) -> None:
    env = {**os.environ, "PGPASSWORD": pg.password}
    proc = subprocess.run(
        [
            str(tool.path),
            "--no-owner",
            "--exit-on-error",
            "-h",
            pg.host,
            "-p",
            str(pg.port),
            "-U",
            pg.superuser,
            "-d",
            dbname,
            str(archive),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr


def assert_same_contents(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert sorted(after) == sorted(before)
    different = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    assert different == {}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(MiB):
            h.update(block)
    return h.hexdigest()


# -- the round trips ---------------------------------------------------------------------------------------


def dump_verify_and_restore(
    pg: PgCluster,
    store: ObjectStore,
    key: str,
    compression: Compression,
    fetch: Callable[[str, Path], None],
    source_db: str,
    restore_db: str,
    tmp_path: Path,
    zstd_cli: str,
) -> None:
    pg_dump, pg_restore_tool = tools(pg)
    params = conn_params(pg, source_db)
    level = {Compression.zstd: 3, Compression.gzip: 6, Compression.none: 0}[compression]

    result = stream_dump(
        params, store, key, tool=pg_dump, compression=compression, level=level, part_size=5 * MiB
    )

    stored = tmp_path / "stored.dump"
    fetch(key, stored)
    assert stored.stat().st_size == result.bytes
    assert sha256_file(stored) == result.sha256
    if compression is Compression.zstd:  # zstd here over pg_dump -Z0
        assert "--compress=0" in result.argv
        assert result.bytes < result.raw_bytes / 2
    elif compression is Compression.gzip:  # pg_dump's own zlib inside the archive
        assert "--compress=6" in result.argv
        assert result.bytes == result.raw_bytes
    else:
        assert "--compress=0" in result.argv
        assert result.bytes == result.raw_bytes
        assert result.parts >= 2

    with connect(params) as conn:
        expected_tables = dumpable_tables(conn)
    assert "Audit Log.Entry Log" in expected_tables
    assert "sales.events_2026" in expected_tables
    verification = verify_stored_dump(
        store,
        key,
        compression,
        pg_restore_tool,
        full=True,
        expected_sha256=result.sha256,
        expected_tables=expected_tables,
    )
    assert verification.sha256 == result.sha256
    assert set(expected_tables) <= verification.table_data

    archive = stored
    if compression is Compression.zstd:
        archive = tmp_path / "stored.dump.raw"
        subprocess.run([zstd_cli, "-d", "-q", "-o", str(archive), str(stored)], check=True, timeout=300)
        assert archive.stat().st_size == result.raw_bytes
    pg_restore(pg, pg_restore_tool, archive, restore_db)


@pytest.mark.parametrize("compression", [Compression.zstd, Compression.gzip, Compression.none])
def test_s3_dump_restored_with_stock_pg_restore_has_identical_contents(
    pg: PgCluster,
    s3: S3Endpoint,
    bucket: str,
    source_db: str,
    source_snapshot: dict[str, Any],
    restore_db: str,
    tmp_path: Path,
    zstd_cli: str,
    compression: Compression,
):
    client = s3.client()
    store = S3ObjectStore(client, bucket, "prod/app")
    key = f"dumps/2026/11/24/app.dump{'.zst' if compression is Compression.zstd else ''}"

    def fetch(k: str, dest: Path) -> None:
        client.download_file(bucket, f"prod/app/{k}", str(dest))

    dump_verify_and_restore(pg, store, key, compression, fetch, source_db, restore_db, tmp_path, zstd_cli)

    assert_same_contents(source_snapshot, snapshot(pg, restore_db))
    assert store.list_incomplete_uploads() == []


def test_local_directory_dump_restored_with_stock_pg_restore_has_identical_contents(
    pg: PgCluster,
    source_db: str,
    source_snapshot: dict[str, Any],
    restore_db: str,
    tmp_path: Path,
    zstd_cli: str,
):
    root = tmp_path / "backups"
    root.mkdir()
    store = LocalObjectStore(root)
    key = "prod/app/dumps/app.dump.zst"

    def fetch(k: str, dest: Path) -> None:
        shutil.copyfile(root / k, dest)

    dump_verify_and_restore(
        pg, store, key, Compression.zstd, fetch, source_db, restore_db, tmp_path, zstd_cli
    )

    assert_same_contents(source_snapshot, snapshot(pg, restore_db))
    assert [p.name for p in (root / "prod/app/dumps").iterdir()] == ["app.dump.zst"]
