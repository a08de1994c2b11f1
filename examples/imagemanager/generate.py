"""Fill an image manager database (at Alembic head) with realistic, deterministic data.

The bulk of the rows is produced by PostgreSQL itself with ``INSERT ... SELECT ... FROM
generate_series``: one statement per batch instead of one round trip per row is what makes
a gigabyte take minutes rather than hours. Randomness comes from PostgreSQL's ``random()``
re-seeded with ``setseed()`` at every batch, so the same seed gives the same rows on any run
(into an empty database) without shipping data from the client.

Usage::

    python -m examples.imagemanager.generate --dsn postgresql://app@127.0.0.1/imagemanager --size 1GB
    python -m examples.imagemanager.generate --images 20000 --seed 3   # DSN from $DATABASE_URL

The password comes from ``PGPASSWORD`` (read by libpq), as for the migrations.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql

TABLES: tuple[str, ...] = ("meta_groups", "projects", "data_instances", "image_classifications")

# Average on-disk footprint (heap + TOAST + all indexes, classifications included) of one image,
# measured on PostgreSQL 15 with this generator; it turns a size target into a row count
# without measuring while generating, which keeps ``target_bytes`` runs deterministic.
BYTES_PER_IMAGE = 605

BATCH_IMAGES = 50_000
DELETED_RATIO = 0.05

# A fixed time window rather than now(): timestamps are part of the data that must be
# identical for a given seed.
WINDOW_START = "2022-01-01 00:00:00+00"
WINDOW_END = "2025-01-01 00:00:00+00"

META_GROUPS: tuple[str, ...] = (
    "Acme Retail",
    "Café Lumière",
    "日本 Research Lab",
    "Nordic Wildlife Trust",
    "Städtisches Archiv Zürich",
    "Open Data Collective",
)
PROJECT_TOPICS: tuple[str, ...] = (
    "Product shots",
    "Store shelves",
    "Menu photos",
    "Latte art",
    "桜 survey",
    "Street scenes",
    "Camera traps",
    "Bird census",
    "Scanned letters",
    "Façade inventory",
    "Drone mapping",
    "Training set",
    "Customer uploads",
    "Event coverage",
    "Ōsaka field trip",
)
CAMERAS: tuple[str, ...] = (
    "Canon EOS R5",
    "Canon EOS 5D Mark IV",
    "Nikon Z7 II",
    "Nikon D850",
    "Sony α7 IV",  # noqa: RUF001 - the camera's real name
    "Fujifilm X-T4",
    "Apple iPhone 14 Pro",
    "Google Pixel 8",
    "Samsung Galaxy S23",
    "DJI Mavic 3",
    "Epson Perfection V600",
)
RESOLUTIONS: tuple[tuple[int, int], ...] = (
    (6000, 4000),
    (8192, 5464),
    (4032, 3024),
    (3024, 4032),
    (1920, 1080),
    (1080, 1920),
    (5472, 3648),
    (2480, 3508),
    (1024, 768),
    (640, 480),
)
TAGS: tuple[str, ...] = (
    "outdoor",
    "indoor",
    "portrait",
    "landscape",
    "night",
    "macro",
    "hdr",
    "raw",
    "edited",
    "favorite",
    "café",
    "日本",
    "東京",
    "Zürich",
    "straße",
    "review",
    "blurry",
    "duplicate",
    "sample",
    "summer",
)
LABELS: tuple[str, ...] = (
    "person",
    "cat",
    "dog",
    "bird",
    "car",
    "bicycle",
    "boat",
    "building",
    "tree",
    "flower",
    "food",
    "coffee",
    "mountain",
    "beach",
    "sky",
    "street",
    "document",
    "screenshot",
    "text",
    "furniture",
    "animal",
    "vehicle",
    "plant",
    "indoor scene",
)
# Coprime with len(LABELS), so up to three labels of one image are always distinct.
LABEL_STEP = 7

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_SIZE_UNITS: dict[str, int] = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}

# Per-row random draws are computed in the OFFSET 0 subquery (an optimisation fence), so
# each one is evaluated exactly once per row and can be used several times outside.
_BATCH_SQL = """
WITH new_images AS (
    INSERT INTO data_instances
        (project_id, file_name, checksum, width, height, metadata, created_at, deleted_at)
    SELECT
        s.project_id,
        CASE
            WHEN s.r_name < 0.40 THEN format('IMG_%%s.JPG', lpad((s.g %% 10000)::text, 4, '0'))
            WHEN s.r_name < 0.65 THEN format('DSC%%s.jpg', lpad((s.g %% 100000)::text, 5, '0'))
            WHEN s.r_name < 0.80 THEN format('scan_%%s_%%s.png', to_char(s.created_at, 'YYYY-MM-DD'),
                                             lpad((s.g %% 1000)::text, 3, '0'))
            WHEN s.r_name < 0.92 THEN format('upload-%%s.webp', substr(s.hex2, 21, 12))
            WHEN s.r_name < 0.96 THEN format('Café_%%s.jpg', s.g)
            ELSE format('日本_桜_%%s.jpg', lpad((s.g %% 100000)::text, 5, '0'))
        END,
        s.hex1 || s.hex2,
        (%(widths)s::int[])[s.res],
        (%(heights)s::int[])[s.res],
        CASE WHEN s.r_meta >= 0.02 THEN
            jsonb_build_object(
                'camera', (%(cameras)s::text[])[1 + floor(s.r_cam * %(n_cameras)s)::int],
                'iso', (ARRAY[100, 200, 400, 800, 1600, 3200, 6400])[1 + floor(s.r_iso * 7)::int],
                'exposure', '1/' || (ARRAY[30, 60, 125, 250, 500, 1000, 4000])[1 + floor(s.r_exp * 7)::int],
                'focal_length_mm', 14 + floor(s.r_focal * 186)::int,
                'orientation', CASE WHEN (%(widths)s::int[])[s.res] >= (%(heights)s::int[])[s.res]
                                    THEN 'landscape' ELSE 'portrait' END,
                'tags', to_jsonb((%(tags)s::text[])[s.tag_start:s.tag_start + s.tag_count - 1])
            )
            || CASE WHEN s.r_gps < 0.3 THEN
                   jsonb_build_object('gps', jsonb_build_object(
                       'lat', round((s.r_lat * 140 - 60)::numeric, 5),
                       'lon', round((s.r_lon * 360 - 180)::numeric, 5)))
               ELSE '{}'::jsonb END
        END,
        s.created_at,
        CASE WHEN s.r_del < %(deleted_ratio)s
             THEN s.created_at + s.r_del_age * (%(window_end)s::timestamptz - s.created_at) END
    FROM (
        SELECT
            g,
            (%(project_ids)s::bigint[])[1 + floor(power(random(), 2) * %(n_projects)s)::int] AS project_id,
            %(window_start)s::timestamptz
                + ((g + random()) / %(total)s) * (%(window_end)s::timestamptz - %(window_start)s::timestamptz)
                AS created_at,
            md5(random()::text) AS hex1,
            md5(random()::text) AS hex2,
            random() AS r_name,
            1 + floor(random() * %(n_resolutions)s)::int AS res,
            random() AS r_meta,
            random() AS r_cam,
            random() AS r_iso,
            random() AS r_exp,
            random() AS r_focal,
            1 + floor(random() * %(n_tags)s)::int AS tag_start,
            floor(random() * 5)::int AS tag_count,
            random() AS r_gps,
            random() AS r_lat,
            random() AS r_lon,
            random() AS r_del,
            random() AS r_del_age
        FROM generate_series(%(first)s::bigint, %(last)s::bigint) AS g
        OFFSET 0
    ) AS s
    RETURNING id, created_at
)
INSERT INTO image_classifications (image_id, label, confidence, created_at)
SELECT
    c.id,
    (%(labels)s::text[])[1 + (c.label_base + (k - 1) * %(label_step)s) %% %(n_labels)s],
    greatest(0.05, 0.99 - (k - 1) * 0.25 - random() * 0.35)::real,
    c.created_at + random() * interval '2 hours'
FROM (
    SELECT id, created_at, floor(random() * %(n_labels)s)::int AS label_base,
           1 + floor(random() * 3)::int AS n_labels_for_image
    FROM new_images
    OFFSET 0
) AS c
CROSS JOIN LATERAL generate_series(1, c.n_labels_for_image) AS k
"""


def parse_size(text: str) -> int:
    """Parse "1GB", "500 MB", "1.5GiB" or a plain byte count.

    Units are powers of 1024 (as in pg_size_pretty), with or without the "i", because the
    sizes are compared with what PostgreSQL reports.
    """
    match = _SIZE_RE.match(text)
    if not match:
        raise ValueError(f"invalid size {text!r}; use e.g. 1GB, 500MB or a number of bytes")
    number, unit = match.groups()
    return int(float(number) * _SIZE_UNITS[(unit or "")[:1].lower()])


def libpq_conninfo(dsn: str) -> str:
    """Accept a SQLAlchemy URL too (``postgresql+psycopg://``), as stored in DATABASE_URL."""
    return re.sub(r"^postgres(?:ql)?\+\w+://", "postgresql://", dsn.strip())


def _batch_seed(seed: int, batch: int) -> float:
    """A setseed() argument in [-1, 1] per batch, so batches do not depend on each other."""
    return random.Random(f"imagemanager:{seed}:{batch}").uniform(-1.0, 1.0)


def _tables_bytes(conn: psycopg.Connection[Any]) -> int:
    """Heap + TOAST + indexes of the application tables: the part this generator grows."""
    row = conn.execute(
        "SELECT coalesce(sum(pg_total_relation_size(to_regclass(t))), 0)::bigint FROM unnest(%s::text[]) t",
        [list(TABLES)],
    ).fetchone()
    return int(row[0]) if row else 0


def _insert_groups_and_projects(
    conn: psycopg.Connection[Any], rng: random.Random, n_projects: int
) -> list[int]:
    """Small tables are generated client-side: a few hundred rows, readable code."""
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO meta_groups (name, created_at) VALUES (%s, %s::timestamptz) "
            "ON CONFLICT (name) DO NOTHING",
            [(name, WINDOW_START) for name in META_GROUPS],
        )
        cur.execute("SELECT id FROM meta_groups WHERE name = ANY(%s) ORDER BY id", [list(META_GROUPS)])
        group_ids = [int(r[0]) for r in cur.fetchall()]
        projects: list[tuple[int, str, str | None, str, bool]] = []
        for i in range(n_projects):
            topic = rng.choice(PROJECT_TOPICS)
            name = f"{topic} {2022 + rng.randrange(3)} #{i + 1}"
            description = (
                None
                if rng.random() < 0.2
                else f"{topic} — {rng.choice(TAGS)} set, {rng.randrange(1, 40)} contributors"
            )
            # Projects predate the images' time window, so no image is older than its project.
            created = f"2021-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d} 00:00:00+00"
            projects.append((rng.choice(group_ids), name, description, created, rng.random() < 0.08))
        cur.executemany(
            "INSERT INTO projects (meta_group_id, name, description, created_at, archived) "
            "VALUES (%s, %s, %s, %s::timestamptz, %s)",
            projects,
        )
        cur.execute("SELECT id FROM projects ORDER BY id")
        return [int(r[0]) for r in cur.fetchall()]


def _project_count(images: int) -> int:
    """Tens to hundreds of projects, growing with the data set."""
    return max(12, min(250, images // 5000))


def generate(
    conninfo: str,
    *,
    target_bytes: int | None = None,
    images: int | None = None,
    seed: int = 0,
) -> dict[str, int]:
    """Generate data into a database at Alembic head and return the row count of each table.

    Give either ``images`` (exact number of images to add) or ``target_bytes`` (approximate
    size of the four tables, indexes included, after the run). Rows are appended to whatever
    is there; the same seed into an empty database gives identical rows. ANALYZE runs at the
    end so that benchmarks start with realistic plans.
    """
    if (images is None) == (target_bytes is None):
        raise ValueError("give exactly one of images= or target_bytes=")
    if images is not None and images < 0:
        raise ValueError("images must be >= 0")
    if target_bytes is not None and target_bytes < 0:
        raise ValueError("target_bytes must be >= 0")

    rng = random.Random(f"imagemanager:{seed}")
    with psycopg.connect(libpq_conninfo(conninfo), autocommit=True) as conn:
        # Deterministic text (to_char) and faster commits; nothing here needs durability
        # before the end, and jit only adds compile time to these simple plans.
        conn.execute("SET TimeZone = 'UTC'")
        conn.execute("SET synchronous_commit = off")
        conn.execute("SET jit = off")
        if images is None:
            assert target_bytes is not None
            images = max(0, target_bytes - _tables_bytes(conn)) // BYTES_PER_IMAGE

        with conn.transaction():
            project_ids = _insert_groups_and_projects(conn, rng, _project_count(images))

        params: dict[str, Any] = {
            "project_ids": project_ids,
            "n_projects": len(project_ids),
            "total": max(images, 1),
            "window_start": WINDOW_START,
            "window_end": WINDOW_END,
            "widths": [w for w, _ in RESOLUTIONS],
            "heights": [h for _, h in RESOLUTIONS],
            "n_resolutions": len(RESOLUTIONS),
            "cameras": list(CAMERAS),
            "n_cameras": len(CAMERAS),
            "tags": list(TAGS),
            "n_tags": len(TAGS),
            "labels": list(LABELS),
            "n_labels": len(LABELS),
            "label_step": LABEL_STEP,
            "deleted_ratio": DELETED_RATIO,
        }
        for batch, first in enumerate(range(0, images, BATCH_IMAGES)):
            last = min(first + BATCH_IMAGES, images) - 1
            # One transaction per batch: bounded WAL/lock footprint, and an interrupted run
            # keeps what it has written.
            with conn.transaction():
                conn.execute("SELECT setseed(%s)", [_batch_seed(seed, batch)])
                conn.execute(_BATCH_SQL, {**params, "first": first, "last": last})

        for table in TABLES:
            conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(table)))
        counts: dict[str, int] = {}
        for table in TABLES:
            row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))).fetchone()
            counts[table] = int(row[0]) if row else 0
        return counts


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; prints the row counts and sizes as JSON for scripts and benchmarks."""
    parser = argparse.ArgumentParser(
        prog="python -m examples.imagemanager.generate",
        description="Fill an image manager database (at Alembic head) with realistic data.",
    )
    parser.add_argument(
        "--dsn",
        default=os.environ.get("DATABASE_URL"),
        help="libpq conninfo/URL or SQLAlchemy URL (default: $DATABASE_URL); password via PGPASSWORD",
    )
    amount = parser.add_mutually_exclusive_group(required=True)
    amount.add_argument("--size", type=parse_size, help="approximate size of the tables, e.g. 1GB, 200MB")
    amount.add_argument("--images", type=int, help="number of images to add")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same data (default: 0)")
    args = parser.parse_args(argv)
    if not args.dsn:
        parser.error("no database given: pass --dsn or set DATABASE_URL")

    started = time.monotonic()
    counts = generate(args.dsn, target_bytes=args.size, images=args.images, seed=args.seed)
    elapsed = time.monotonic() - started
    with psycopg.connect(libpq_conninfo(args.dsn)) as conn:
        row = conn.execute("SELECT pg_database_size(current_database())").fetchone()
        tables_bytes = _tables_bytes(conn)
    report = {
        "rows": counts,
        "tables_bytes": tables_bytes,
        "database_bytes": int(row[0]) if row else 0,
        "seconds": round(elapsed, 1),
    }
    json.dump(report, sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
