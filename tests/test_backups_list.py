"""`dbops backups list` and the list-backups flow: what exists, verified, drilled, Alembic revision."""

from __future__ import annotations

import json

import pytest

from deployments.cli import main
from flows.core.errors import ConfigurationError
from flows.core.s3store import S3ObjectStore
from flows.nightly_dump import nightly_dump
from flows.restore import list_backups
from flows.restore_drill import restore_drill
from tests.conftest import make_database_block, make_s3_block
from tests.harness.factories import DB, PREFIX, sample_database, write_backup
from tests.harness.pg import PgCluster
from tests.harness.s3 import S3Endpoint

pytestmark = pytest.mark.usefixtures("prefect_api")


def test_list_shows_backups_newest_first_with_verified_drilled_and_revision(
    pg: PgCluster, s3: S3Endpoint, bucket: str, unique: str, capsys: pytest.CaptureFixture[str]
) -> None:
    name = sample_database(pg, f"src_{unique}")
    block = make_database_block(pg, f"src-{unique}", name)
    storage = make_s3_block(s3, f"s3-{unique}", bucket, folder="dbops")
    unverified = nightly_dump(database=block, storage=storage, prefix="prod", verify="none")
    drilled = nightly_dump(database=block, storage=storage, prefix="prod")
    restore_drill(storage=storage, source_database=name, scratch=block, prefix="prod", amcheck=False)
    # A dump without a manifest is not a backup: never listed.
    s3.client().put_object(
        Bucket=bucket, Key=f"dbops/prod/{name}/dumps/2020/01/01/{name}-20200101T020000Z.dump.zst", Body=b"x"
    )
    capsys.readouterr()

    assert main(["backups", "list", "--storage", storage, "--prefix", "prod", "--database", name]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if name + "/dumps/" in line]
    assert len(lines) == 2
    assert drilled.key in lines[0]
    assert unverified.key in lines[1]
    assert "restored and checked at" in lines[0]
    assert "list" in lines[0]
    assert "never" in lines[1]
    assert " no " in lines[1]
    assert all("0004_classifications_image_index" in line and "zstd" in line for line in lines)
    assert "20200101T020000Z" not in out

    assert main(["backups", "list", "--storage", storage, "--prefix", "prod", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [row["key"] for row in listed[name]] == [drilled.key, unverified.key]

    rows = list_backups(storage=storage, database=name, prefix="prod")
    assert [row["drilled"].split(" at ")[0] for row in rows] == ["restored and checked", "never"]


def test_list_without_storage_says_what_to_pass(capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    monkeypatch.delenv("DBOPS_STORAGE", raising=False)
    assert main(["backups", "list", "--storage", ""]) == 2
    assert "--storage is required" in capsys.readouterr().err


def test_list_of_an_unknown_block_is_one_sentence(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["backups", "list", "--storage", "s3-bucket/no-such-block", "--database", "x"]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_a_corrupt_drill_record_or_manifest_shows_in_the_listing_and_never_breaks_it(
    s3: S3Endpoint, bucket: str, unique: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """One implementation for the flow and the CLI: both show the same rows and the same problems."""
    storage = make_s3_block(s3, f"s3-{unique}", bucket, folder="dbops")
    store = S3ObjectStore(s3.client(), bucket, "dbops")
    newest, older = write_backup(store, 1), write_backup(store, 2)
    store.put_bytes(newest + ".drill.json", b'{"passed": tru')  # cut off mid-write by hand
    bad = write_backup(store, 3)
    store.put_bytes(bad + ".manifest.json", b"{not json")
    capsys.readouterr()

    assert main(["backups", "list", "--storage", storage, "--prefix", PREFIX, "--database", DB]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if "/dumps/" in line]
    assert older in rows[1]
    assert "never" in rows[1]
    assert newest in rows[0]
    assert "drill record unreadable" in rows[0]
    assert bad + ".manifest.json" in rows[2]
    assert "unreadable manifest" in rows[2]

    flow_rows = list_backups(storage=storage, database=DB, prefix=PREFIX)
    assert [r["drilled"] for r in flow_rows] == ["drill record unreadable", "never"]


def test_list_refuses_a_prefix_or_database_that_leaves_the_layout(
    s3: S3Endpoint, bucket: str, unique: str, capsys: pytest.CaptureFixture[str]
) -> None:
    storage = make_s3_block(s3, f"s3-{unique}", bucket)
    assert main(["backups", "list", "--storage", storage, "--prefix", "../outside"]) == 1
    assert "prefix '../outside' contains a '..' segment" in capsys.readouterr().err
    assert main(["backups", "list", "--storage", storage, "--database", ".."]) == 1
    assert "database name '..'" in capsys.readouterr().err
    with pytest.raises(ConfigurationError, match=r"'\.\.' segment"):
        list_backups(storage=storage, database="..", prefix="")
