"""Tests of the image manager sample application against a real, throwaway PostgreSQL.

Alembic always runs as a subprocess, exactly as the dbops flows and the README run it, so the
env.py conventions (DATABASE_URL without password, PGPASSWORD, one transaction per migration)
are what is tested, not an in-process shortcut. The application connects as an unprivileged
role over TCP with scram, so a password that does not travel through PGPASSWORD fails for real.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from examples.imagemanager import generate as gen
from tests.harness.pg import PgCluster

REPO_ROOT = Path(__file__).resolve().parents[1]
APP_DIR = REPO_ROOT / "examples" / "imagemanager"
APP_ROLE = "imgmgr_app"
APP_PASSWORD = "s3cret-Pässword"
HEAD = "0004_classifications_image_index"
INDEXES = ("idx_projects_meta_group", "idx_images_project", "idx_images_deleted", "idx_classifications_image")


@dataclass(frozen=True)
class Cluster:
    """The shared cluster seen by the image manager: its own role, one database per test."""

    pg: PgCluster

    def conninfo(self, dbname: str) -> str:
        return psycopg.conninfo.make_conninfo(
            host=self.pg.host, port=self.pg.port, dbname=dbname, user=APP_ROLE, password=APP_PASSWORD
        )

    def database_url(self, dbname: str, driver: str = "psycopg") -> str:
        return f"postgresql+{driver}://{APP_ROLE}@{self.pg.host}:{self.pg.port}/{dbname}"


@pytest.fixture(scope="module")
def imgmgr_cluster(pg: PgCluster) -> Cluster:
    if not pg.sql("SELECT 1 FROM pg_roles WHERE rolname = %s", params=[APP_ROLE]):
        pg.create_role(APP_ROLE, APP_PASSWORD)
    return Cluster(pg)


def _create_database(cluster: Cluster, template: str = "template1") -> str:
    """Unique names: the cluster is shared by the whole test session."""
    name = f"imgmgr_{secrets.token_hex(4)}"
    with cluster.pg.connect() as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} OWNER {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(APP_ROLE), sql.Identifier(template)
            )
        )
    return name


@pytest.fixture
def imgmgr_db(imgmgr_cluster: Cluster) -> str:
    """A fresh empty database per test, so tests cannot depend on each other's migrations."""
    return _create_database(imgmgr_cluster)


@pytest.fixture(scope="module")
def head_template(imgmgr_cluster: Cluster) -> str:
    """One database migrated to head, cloned per generator test (much faster than migrating)."""
    name = _create_database(imgmgr_cluster)
    alembic(imgmgr_cluster, name, "upgrade", "head")
    return name


def alembic(
    cluster: Cluster | None, dbname: str | None, *args: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG") and k != "DATABASE_URL"}
    if cluster is not None and dbname is not None:
        env["DATABASE_URL"] = cluster.database_url(dbname)
        env["PGPASSWORD"] = APP_PASSWORD
    result = subprocess.run(
        [sys.executable, "-m", "alembic", *args],
        cwd=APP_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check:
        assert result.returncode == 0, f"alembic {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def _scalar(conn: psycopg.Connection, query: str) -> Any:
    row = conn.execute(query).fetchone()
    assert row is not None
    return row[0]


def _app_tables(conn: psycopg.Connection) -> set[str]:
    rows = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'").fetchall()
    return {r[0] for r in rows}


def test_upgrade_head_from_empty(imgmgr_cluster: Cluster, imgmgr_db: str) -> None:
    alembic(imgmgr_cluster, imgmgr_db, "upgrade", "head")

    with psycopg.connect(imgmgr_cluster.conninfo(imgmgr_db)) as conn:
        assert _app_tables(conn) == {
            "alembic_version",
            "meta_groups",
            "projects",
            "data_instances",
            "image_classifications",
        }
        assert _scalar(conn, "SELECT version_num FROM alembic_version") == HEAD
        rows = conn.execute(
            "SELECT c.relname, pg_get_indexdef(i.indexrelid), i.indisvalid "
            "FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
            "WHERE c.relname = ANY(%s)",
            [list(INDEXES)],
        ).fetchall()
        indexes = {name: definition for name, definition, _ in rows}
        assert set(indexes) == set(INDEXES)
        assert all(valid for _, _, valid in rows), rows
        assert "WHERE (deleted_at IS NULL)" in indexes["idx_images_deleted"]
        assert (
            "ON public.image_classifications USING btree (image_id)" in indexes["idx_classifications_image"]
        )
        archived = conn.execute(
            "SELECT is_nullable, column_default FROM information_schema.columns "
            "WHERE table_name = 'projects' AND column_name = 'archived'"
        ).fetchone()
        assert archived == ("NO", "false")
        # The temporary CHECK used to prove NOT NULL without a scan must be gone.
        assert (
            _scalar(conn, "SELECT count(*) FROM pg_constraint WHERE conname = 'projects_archived_not_null'")
            == 0
        )

    # The models mirror the migrations: autogenerate finds nothing to do.
    alembic(imgmgr_cluster, imgmgr_db, "check")


def test_downgrade_base_and_upgrade_again(imgmgr_cluster: Cluster, imgmgr_db: str) -> None:
    alembic(imgmgr_cluster, imgmgr_db, "upgrade", "head")
    alembic(imgmgr_cluster, imgmgr_db, "downgrade", "base")
    with psycopg.connect(imgmgr_cluster.conninfo(imgmgr_db)) as conn:
        assert _app_tables(conn) == {"alembic_version"}
        assert _scalar(conn, "SELECT count(*) FROM alembic_version") == 0
    alembic(imgmgr_cluster, imgmgr_db, "upgrade", "head")
    result = alembic(imgmgr_cluster, imgmgr_db, "current")
    assert HEAD in result.stdout


def test_archived_backfill_of_existing_projects(imgmgr_cluster: Cluster, imgmgr_db: str) -> None:
    """0003 on a populated table: several backfill batches, then NOT NULL."""
    alembic(imgmgr_cluster, imgmgr_db, "upgrade", "0002_image_metadata")
    with psycopg.connect(imgmgr_cluster.conninfo(imgmgr_db)) as conn:
        conn.execute("INSERT INTO meta_groups (name) VALUES ('Café')")
        conn.execute(
            "INSERT INTO projects (meta_group_id, name) SELECT 1, 'p' || g FROM generate_series(1, 2500) g"
        )
    alembic(imgmgr_cluster, imgmgr_db, "upgrade", "head")
    with psycopg.connect(imgmgr_cluster.conninfo(imgmgr_db)) as conn:
        assert conn.execute("SELECT archived, count(*) FROM projects GROUP BY 1").fetchall() == [
            (False, 2500)
        ]


def test_offline_sql_builds_index_concurrently() -> None:
    # No DATABASE_URL at all: offline mode falls back to a bare postgresql:// dialect URL.
    result = alembic(None, None, "upgrade", "0001_initial:head", "--sql")
    sql_text = result.stdout
    assert "CREATE INDEX CONCURRENTLY" in sql_text
    # CONCURRENTLY must come after a COMMIT, i.e. outside the migration's transaction.
    before = sql_text[: sql_text.index("CREATE INDEX CONCURRENTLY")]
    assert before.rstrip().endswith("COMMIT;")
    assert "SET NOT NULL" in sql_text


def test_online_without_database_url_fails_with_one_sentence() -> None:
    result = alembic(None, None, "upgrade", "head", check=False)
    assert result.returncode != 0
    assert "DATABASE_URL is not set" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(importlib.util.find_spec("asyncpg") is None, reason="asyncpg not installed")
def test_upgrade_with_asyncpg_url(imgmgr_cluster: Cluster, imgmgr_db: str) -> None:
    env_url = imgmgr_cluster.database_url(imgmgr_db, driver="asyncpg")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(DATABASE_URL=env_url, PGPASSWORD=APP_PASSWORD)
    result = subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        cwd=APP_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    with psycopg.connect(imgmgr_cluster.conninfo(imgmgr_db)) as conn:
        assert _scalar(conn, "SELECT version_num FROM alembic_version") == HEAD


# Everything generated, in id order: equal fingerprints mean identical data, not just counts.
FINGERPRINT = """
SELECT md5(string_agg(concat_ws('|', id, project_id, file_name, checksum, width, height, metadata,
                                 created_at, deleted_at), ',' ORDER BY id))
       || md5((SELECT string_agg(concat_ws('|', id, image_id, label, confidence, created_at), ','
                                 ORDER BY id) FROM image_classifications))
       || md5((SELECT string_agg(concat_ws('|', id, meta_group_id, name, description, archived), ','
                                 ORDER BY id) FROM projects))
FROM data_instances
"""


def test_generator_is_deterministic_and_realistic(imgmgr_cluster: Cluster, head_template: str) -> None:
    dbs = [_create_database(imgmgr_cluster, template=head_template) for _ in range(3)]
    counts = [
        gen.generate(imgmgr_cluster.conninfo(db), images=2000, seed=s)
        for db, s in zip(dbs, (7, 7, 8), strict=True)
    ]

    assert counts[0] == counts[1]
    assert counts[0]["data_instances"] == 2000
    assert counts[0]["meta_groups"] == len(gen.META_GROUPS)
    assert 10 <= counts[0]["projects"] <= 300
    assert 2000 <= counts[0]["image_classifications"] <= 6000

    fingerprints = []
    for db in dbs:
        with psycopg.connect(imgmgr_cluster.conninfo(db)) as conn:
            fingerprints.append(_scalar(conn, FINGERPRINT))
    assert fingerprints[0] == fingerprints[1]
    assert fingerprints[0] != fingerprints[2]

    with psycopg.connect(imgmgr_cluster.conninfo(dbs[0])) as conn:
        deleted = _scalar(conn, "SELECT count(*) FROM data_instances WHERE deleted_at IS NOT NULL")
        assert isinstance(deleted, int)
        assert 40 <= deleted <= 200  # ~5% of 2000
        per_image = conn.execute(
            "SELECT min(n), max(n), bool_and(n = d) FROM (SELECT i.id, count(c.id) AS n, "
            "count(DISTINCT c.label) AS d FROM data_instances i "
            "LEFT JOIN image_classifications c ON c.image_id = i.id GROUP BY i.id) s"
        ).fetchone()
        assert per_image == (1, 3, True)
        assert _scalar(conn, "SELECT count(*) FROM data_instances WHERE file_name ~ '[^\\x01-\\x7f]'") > 0
        assert (
            _scalar(
                conn, "SELECT count(*) FROM meta_groups WHERE name IN ('Café Lumière', '日本 Research Lab')"
            )
            == 2
        )
        assert _scalar(conn, "SELECT count(*) FROM data_instances WHERE checksum !~ '^[0-9a-f]{64}$'") == 0
        assert (
            _scalar(
                conn, "SELECT count(*) FROM data_instances WHERE jsonb_typeof(metadata->'tags') = 'array'"
            )
            > 0
        )
        # ANALYZE ran: the planner knows the table is not empty.
        assert _scalar(conn, "SELECT reltuples FROM pg_class WHERE relname = 'data_instances'") == 2000


def test_generator_target_bytes(imgmgr_cluster: Cluster, head_template: str) -> None:
    db = _create_database(imgmgr_cluster, template=head_template)
    target = 4 * 1024**2
    counts = gen.generate(imgmgr_cluster.conninfo(db), target_bytes=target)
    assert counts["data_instances"] > 0
    with psycopg.connect(imgmgr_cluster.conninfo(db)) as conn:
        size = _scalar(
            conn,
            "SELECT sum(pg_total_relation_size(c))::bigint FROM unnest(ARRAY['meta_groups', 'projects', "
            "'data_instances', 'image_classifications']::regclass[]) c",
        )
    assert isinstance(size, int)
    assert 0.75 * target <= size <= 1.25 * target


def test_generator_cli_accepts_sqlalchemy_url(imgmgr_cluster: Cluster, head_template: str) -> None:
    db = _create_database(imgmgr_cluster, template=head_template)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(DATABASE_URL=imgmgr_cluster.database_url(db), PGPASSWORD=APP_PASSWORD)
    result = subprocess.run(
        [sys.executable, "-m", "examples.imagemanager.generate", "--images", "300", "--seed", "1"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert '"data_instances": 300' in result.stdout


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1GB", 1024**3), ("500 MB", 500 * 1024**2), ("1.5GiB", int(1.5 * 1024**3)), ("123", 123), ("2k", 2048)],
)
def test_parse_size(text: str, expected: int) -> None:
    assert gen.parse_size(text) == expected


def test_parse_size_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="invalid size 'lots'"):
        gen.parse_size("lots")


def test_generate_needs_exactly_one_amount() -> None:
    with pytest.raises(ValueError, match="exactly one of images= or target_bytes="):
        gen.generate("", images=1, target_bytes=1)
    with pytest.raises(ValueError, match="exactly one of images= or target_bytes="):
        gen.generate("")
