"""Retention over a realistic decade-plus of history: more than 100,000 objects in one listing."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

from flows.core.catalog import deletion_order, read_catalog
from flows.core.layout import backup_stem, dump_key, globals_key, manifest_key
from flows.core.localstore import LocalObjectStore
from flows.core.manifest import Verification
from flows.core.retention import BackupRecord, RetentionPolicy, plan_retention
from tests.harness.factories import make_manifest

BACKUPS = 34_000  # x3 objects (dump, manifest, globals) = 102,000 objects


def write_history(root: Path, now: datetime) -> list[str]:
    template = make_manifest(
        when=now, bytes=10, raw_bytes=10, verified=True, verification=Verification(method="list")
    )
    stems = []
    for i in range(BACKUPS):
        # several backups a day, going back years
        when = now - timedelta(hours=6 * i + 1)
        stem = backup_stem("prod", "imagemanager", when)
        stems.append(stem)
        base = root / stem
        base.parent.mkdir(parents=True, exist_ok=True)
        m = template.model_copy(
            update={"started_at": when, "ended_at": when, "dump_key": dump_key(stem, ".zst")}
        )
        (root / manifest_key(stem)).write_bytes(m.to_json())
        (root / dump_key(stem, ".zst")).write_bytes(b"d")
        (root / globals_key(stem)).write_bytes(b"g")
    return stems


def test_retention_plans_and_deletes_over_100k_objects(tmp_path: Path) -> None:
    now = datetime(2026, 11, 24, 3, 0, tzinfo=UTC)
    stems = write_history(tmp_path, now)
    store = LocalObjectStore(tmp_path)
    catalog = read_catalog(store, "prod", "imagemanager")
    assert len(catalog.backups) == BACKUPS
    assert not catalog.orphans
    assert sum(len(b.keys) for b in catalog.backups) == 3 * BACKUPS > 100_000

    policy = RetentionPolicy(keep_last=7, keep_daily=30, keep_weekly=12, keep_monthly=24)
    records = [BackupRecord(b.stem, b.manifest.ended_at, b.manifest.verified) for b in catalog.backups]
    plan = plan_retention(records, policy, now)
    kept = {k.record.stem for k in plan.keep}
    assert stems[0] in kept
    assert 30 <= len(kept) <= 7 + 30 + 12 + 24

    keys_of = {b.stem: b.keys for b in catalog.backups}
    manifests, rest = deletion_order(k for r in plan.delete for k in keys_of[r.stem])
    assert len(manifests) == len(plan.delete)
    assert all(k.endswith(".manifest.json") for k in manifests)
    assert store.delete(manifests) + store.delete(rest) == 3 * len(plan.delete)

    after = read_catalog(store, "prod", "imagemanager")
    assert {b.stem for b in after.backups} == kept
    assert sum(len(files) for _, _, files in os.walk(tmp_path)) == 3 * len(kept)
