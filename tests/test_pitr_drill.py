"""The weekly PITR drill against a real archiving cluster: it writes a canary and a restore point on the
"production" cluster, recovers a scratch copy to it, checks it, records the result beside the base backup,
and always removes the scratch server. The failing case deletes a real segment from the archive."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from flows.core.base_layout import BaseBackupManifest, pitr_drill_key
from flows.core.localstore import LocalObjectStore
from flows.core.pitr.drill import PitrDrillRecord
from flows.core.wal_archive import ArchiveLocation
from tests.conftest import make_local_block
from tests.harness.basebackup import archiving_cluster, switch_and_archive, take_base_backup
from tests.harness.pg import PgCluster

pytestmark = pytest.mark.usefixtures("prefect_api")


@dataclass
class Production:
    cluster: PgCluster
    archive_dir: Path
    store: LocalObjectStore
    manifest: BaseBackupManifest
    block: str
    storage: str
    scratch_root: Path


@pytest.fixture(scope="module")
def production(prefect_api: None) -> Iterator[Production]:
    from blocks import PostgresDatabase

    with archiving_cluster() as (cluster, archive_dir):
        cluster.create_database("shop")
        cluster.sql("CREATE TABLE orders (id serial PRIMARY KEY, note text)", "shop")
        root = cluster.base_dir.parent
        (root / "store").mkdir()
        store = LocalObjectStore(root / "store")
        manifest = take_base_backup(cluster, store, "prod", "shop")
        cluster.sql(
            "INSERT INTO orders (note) SELECT 'after the base backup' FROM generate_series(1, 100)", "shop"
        )
        switch_and_archive(cluster)
        cluster.sql("INSERT INTO orders (note) VALUES ('later')", "shop")
        switch_and_archive(cluster)
        PostgresDatabase(
            host=cluster.host,
            port=cluster.port,
            database="shop",
            user=cluster.superuser,
            password=cluster.password,
        ).save("pitr-drill-shop", overwrite=True)
        storage = make_local_block("pitr-drill-store", root / "store")
        from flows.nightly_dump import nightly_dump

        nightly_dump(database="pitr-drill-shop", storage=storage, prefix="prod")  # the tables to expect
        scratch_root = Path(tempfile.mkdtemp(prefix="dbops-drill-root-"))
        os.chmod(scratch_root, 0o755)
        try:
            yield Production(cluster, archive_dir, store, manifest, "pitr-drill-shop", storage, scratch_root)
        finally:
            shutil.rmtree(scratch_root, ignore_errors=True)


def _run(production: Production, canary: bool = True):
    from flows.pitr_drill import PitrDrillOptions, pitr_drill

    return pitr_drill(
        database=production.block,
        storage=production.storage,
        prefix="prod",
        canary=canary,
        archive=ArchiveLocation(directory=str(production.archive_dir)),
        options=PitrDrillOptions(
            scratch_root=str(production.scratch_root), archive_timeout_s=60, timeout_hours=0.05
        ),
        return_state=True,
    )


def _sidecar(production: Production) -> PitrDrillRecord:
    key = pitr_drill_key(production.manifest.tar_key.removesuffix(".tar.zst"))
    return PitrDrillRecord.model_validate_json(production.store.get_bytes(key))


def test_the_drill_without_a_base_backup_is_refused_before_writing_to_production(
    production: Production,
) -> None:
    from flows.pitr_drill import PitrDrillOptions, pitr_drill

    state = pitr_drill(
        database=production.block,
        storage=production.storage,
        prefix="nowhere",
        archive=ArchiveLocation(directory=str(production.archive_dir)),
        options=PitrDrillOptions(scratch_root=str(production.scratch_root)),
        return_state=True,
    )
    assert state.is_failed()
    assert "no base backup" in (state.message or "")
    assert production.cluster.sql("SELECT to_regclass('dbops.pitr_canary')", "shop") == [(None,)]
    assert list(production.scratch_root.iterdir()) == []


def test_the_drill_passes_on_a_healthy_chain_and_records_rpo_and_rto(production: Production) -> None:
    state = _run(production)
    assert state.is_completed(), state.message
    record = _sidecar(production)
    assert record.passed
    assert record.message == ""
    assert {c.name for c in record.checks} == {"canary", "tables", "amcheck", "position"}
    assert all(c.ok for c in record.checks)
    assert "all 1 table(s) of the latest dump exist" in {c.detail for c in record.checks}
    assert record.rpo_seconds is not None
    assert record.rto_seconds
    assert record.rto_seconds > 0
    assert record.wal_segments_replayed
    assert record.wal_segments_replayed >= 3
    assert record.timeline == 2  # promoted onto a new timeline, as the position check expects
    tokens = production.cluster.sql("SELECT count(*) FROM dbops.pitr_canary", "shop")
    assert tokens == [(1,)]
    assert list(production.scratch_root.iterdir()) == []  # the scratch server and its files are gone
    from flows.core.listing import list_backups

    assert "last PITR drill passed" in list_backups(production.store, "prod", "shop").describe()


def test_the_drill_fails_naming_a_segment_deleted_after_the_base_backup(production: Production) -> None:
    after = sorted(
        p.name
        for p in production.archive_dir.iterdir()
        if len(p.name) == 24 and p.name > production.manifest.stop_wal
    )
    victim = after[0]
    (production.archive_dir / victim).unlink()
    state = _run(production, canary=False)  # and canary=false writes no token
    assert state.is_failed()
    assert victim in (state.message or "")
    assert production.cluster.sql("SELECT count(*) FROM dbops.pitr_canary", "shop") == [(1,)]
    record = _sidecar(production)
    assert not record.passed
    assert record.missing_segment == victim
    assert victim in record.message
    from flows.core.listing import list_backups

    assert "last PITR drill FAILED" in list_backups(production.store, "prod", "shop").describe()
    assert list(production.scratch_root.iterdir()) == []
