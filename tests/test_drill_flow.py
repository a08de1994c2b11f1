"""The weekly restore drill end to end: real PostgreSQL, the moto S3 server, a real Prefect API."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from flows.core.drill import DrillRecord
from flows.core.manifest import Manifest
from flows.core.postgres import one_row
from flows.nightly_dump import nightly_dump
from flows.restore_drill import restore_drill
from tests.harness.factories import databases, rewrite
from tests.harness.pg import PgCluster, wait_until
from tests.harness.runs import artifact_table, failure_message
from tests.harness.s3 import S3Endpoint

pytestmark = pytest.mark.usefixtures("prefect_api")


def drill_record(s3: S3Endpoint, bucket: str, manifest_key: str) -> DrillRecord:
    key = "dbops/" + manifest_key.removesuffix(".manifest.json") + ".drill.json"
    return DrillRecord.from_json(s3.client().get_object(Bucket=bucket, Key=key)["Body"].read())


def artifact_values(name: str) -> dict[str, Any]:
    return {row["item"]: row["value"] for row in artifact_table(f"restore-drill-{name.replace('_', '-')}")}


def test_drill_passes_on_a_good_backup_drops_the_scratch_database_and_records_the_rto(
    pg: PgCluster, source: tuple[str, str], storage: str, s3: S3Endpoint, bucket: str
) -> None:
    block, name = source
    dumped = nightly_dump(database=block, storage=storage, prefix="prod")
    report = restore_drill(storage=storage, source_database=name, scratch=block, prefix="prod")
    assert report.passed
    assert report.key == dumped.key
    assert (report.rto_seconds or 0) > 0
    assert {c["check"]: c["result"] for c in report.checks} == {
        "tables": "ok",
        "row counts": "ok",
        "alembic revision": "ok",
        "amcheck": "ok",
    }
    assert databases(pg, f"drill_{name}_%") == []  # the scratch database is gone
    record = drill_record(s3, bucket, dumped.manifest_key)
    assert record.passed
    assert record.rto_seconds == report.rto_seconds
    assert record.dump_key == dumped.key
    assert record.scratch_database == report.scratch_database
    assert record.describe().startswith("restored and checked at")
    values = artifact_values(name)
    assert 0 <= float(values["backup staleness (hours)"]) < 1
    assert values["result"] == "passed"


def test_drill_fails_when_the_manifest_claims_a_table_the_dump_lacks(
    pg: PgCluster, source: tuple[str, str], storage: str, s3: S3Endpoint, bucket: str
) -> None:
    block, name = source
    dumped = nightly_dump(database=block, storage=storage)

    def claim_ghost_table(body: bytes) -> bytes:
        data = json.loads(body)
        data["row_estimates"]["public.ghost"] = 5
        return json.dumps(data).encode()

    rewrite(s3, bucket, f"dbops/{dumped.manifest_key}", claim_ghost_table)
    state = restore_drill(
        storage=storage, source_database=name, scratch=block, amcheck=False, return_state=True
    )
    message = failure_message(state)
    assert "restore drill of" in message
    assert "public.ghost" in message
    assert "tables" in message
    assert databases(pg, f"drill_{name}_%") == []  # dropped although a check failed
    record = drill_record(s3, bucket, dumped.manifest_key)
    assert not record.passed
    assert "public.ghost" in record.summary
    assert artifact_values(name)["result"] == "FAILED"


def test_drill_fails_loudly_when_the_newest_backup_is_older_than_the_threshold(
    source: tuple[str, str], storage: str, s3: S3Endpoint, bucket: str
) -> None:
    block, name = source
    dumped = nightly_dump(database=block, storage=storage)

    def thirty_hours_old(body: bytes) -> bytes:
        m = Manifest.from_json(body)
        ended = datetime.now(UTC) - timedelta(hours=30)
        return m.model_copy(update={"ended_at": ended, "started_at": ended - timedelta(minutes=1)}).to_json()

    rewrite(s3, bucket, f"dbops/{dumped.manifest_key}", thirty_hours_old)
    state = restore_drill(
        storage=storage, source_database=name, scratch=block, amcheck=False, return_state=True
    )
    message = failure_message(state)
    assert "newest backup of" in message
    assert "h old (threshold 26 h)" in message
    values = artifact_values(name)
    assert 29.9 < float(values["backup staleness (hours)"]) < 30.5
    assert values["result"] == "passed"  # the backup itself restores fine: staleness alone fails the run


def test_drill_with_no_backups_at_all_fails_naming_the_database(
    storage: str, source: tuple[str, str]
) -> None:
    block, name = source
    state = restore_drill(storage=storage, source_database=name, scratch=block, return_state=True)
    assert f"no backup of {name!r} at all" in failure_message(state)


def test_small_table_with_a_stale_estimate_is_counted_exactly_in_the_dumps_snapshot(
    pg: PgCluster, source: tuple[str, str], storage: str, s3: S3Endpoint, bucket: str
) -> None:
    # ANALYZE saw 5 rows; 3 more arrived since (far below autovacuum's analyze threshold). Comparing the
    # restored 8 rows "exactly" with the planner's 5 would be a false alarm at 2 AM.
    block, name = source
    pg.sql("CREATE TABLE settings (k text PRIMARY KEY, v text)", dbname=name)
    pg.sql("INSERT INTO settings SELECT 'k' || i, 'v' FROM generate_series(1, 5) i", dbname=name)
    pg.sql("ANALYZE settings", dbname=name)
    pg.sql("INSERT INTO settings SELECT 'n' || i, 'v' FROM generate_series(1, 3) i", dbname=name)
    dumped = nightly_dump(database=block, storage=storage, prefix="prod")
    manifest = Manifest.from_json(
        s3.client().get_object(Bucket=bucket, Key="dbops/" + dumped.manifest_key)["Body"].read()
    )
    assert pg.sql("SELECT reltuples FROM pg_class WHERE relname = 'settings'", dbname=name)[0][0] == 5
    assert manifest.exact_row_counts["public.settings"] == 8
    assert "--snapshot=" in " ".join(manifest.dump_options)
    report = restore_drill(storage=storage, source_database=name, scratch=block, prefix="prod")
    assert report.passed, report.checks

    # And an exact count is held to exactly: one row fewer in the manifest's snapshot is a failure.
    def one_row_less(body: bytes) -> bytes:
        data = json.loads(body)
        data["exact_row_counts"]["public.settings"] = 7
        return json.dumps(data).encode()

    rewrite(s3, bucket, "dbops/" + dumped.manifest_key, one_row_less)
    state = restore_drill(
        storage=storage, source_database=name, scratch=block, prefix="prod", amcheck=False, return_state=True
    )
    assert "public.settings: 8 rows, the dump's snapshot had 7" in failure_message(state)


def test_large_table_that_grew_since_analyze_is_compared_with_the_live_tuple_count(
    pg: PgCluster, source: tuple[str, str], storage: str
) -> None:
    # Over 8 MB, so no exact count: ANALYZE saw 100,000 rows, 40,000 more came since (autovacuum is off
    # for it). reltuples (100,000) is 29 % off the 140,000 restored rows; n_live_tup follows every commit.
    block, name = source
    pad = "x" * 80
    pg.sql("CREATE TABLE big (id int, pad text) WITH (autovacuum_enabled = false)", dbname=name)

    def counters() -> tuple[int, int]:
        with pg.connect(name) as conn:
            query = "SELECT n_live_tup, n_tup_ins FROM pg_stat_user_tables WHERE relname = 'big'"
            live, inserted = one_row(conn, query)
            return int(live), int(inserted)

    def insert_and_flush(first: int, last: int) -> None:
        # A session's statistics reach the shared counters when it flushes them; each step waits for that,
        # or ANALYZE's live count and the still-pending inserts would be added up twice.
        with pg.connect(name) as conn:
            conn.execute("INSERT INTO big SELECT g, %s FROM generate_series(%s, %s) g", (pad, first, last))
            conn.execute("SELECT pg_stat_force_next_flush()")
            conn.execute("SELECT 1")
        wait_until(lambda: counters()[1] == last, what=f"{last} inserts into big in the statistics")

    insert_and_flush(1, 100_000)
    pg.sql("ANALYZE big", dbname=name)
    insert_and_flush(100_001, 140_000)
    assert counters()[0] == 140_000
    reltuples = pg.sql("SELECT reltuples::bigint FROM pg_class WHERE relname = 'big'", dbname=name)[0][0]
    assert reltuples == 100_000
    dumped = nightly_dump(database=block, storage=storage, prefix="prod")
    report = restore_drill(storage=storage, source_database=name, scratch=block, prefix="prod", amcheck=False)
    assert report.passed, report.checks
    assert report.key == dumped.key, report.checks


def test_drill_passes_with_a_dot_in_a_schema_name_and_in_a_table_name(
    pg: PgCluster, source: tuple[str, str], storage: str, s3: S3Endpoint, bucket: str
) -> None:
    # "my.schema"."t.x" and "my"."schema.t": split at a dot, both would read as my / schema.t...
    block, name = source
    pg.sql('CREATE SCHEMA "my.schema"; CREATE SCHEMA my', dbname=name)
    pg.sql('CREATE TABLE "my.schema"."t.x" (id int); CREATE TABLE "my.schema".plain (id int)', dbname=name)
    pg.sql('CREATE TABLE my."schema.t" (id int)', dbname=name)
    pg.sql(
        'INSERT INTO "my.schema"."t.x" SELECT generate_series(1, 7); '
        'INSERT INTO "my.schema".plain SELECT generate_series(1, 3); '
        'INSERT INTO my."schema.t" SELECT generate_series(1, 2)',
        dbname=name,
    )
    dumped = nightly_dump(database=block, storage=storage, prefix="prod")
    report = restore_drill(storage=storage, source_database=name, scratch=block, prefix="prod", amcheck=False)
    assert report.passed, report.checks
    manifest = Manifest.from_json(
        s3.client().get_object(Bucket=bucket, Key="dbops/" + dumped.manifest_key)["Body"].read()
    )
    assert manifest.exact_row_counts['"my.schema"."t.x"'] == 7  # quoted like SQL identifiers: unambiguous
    assert manifest.exact_row_counts['my."schema.t"'] == 2
    assert manifest.exact_row_counts['"my.schema".plain'] == 3
    assert "public.images" in manifest.row_estimates
