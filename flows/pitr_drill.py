"""pitr_drill: prove the recovery point every week, not only that a restore starts. Sunday 06:00.

1. RPO        how old the newest archived WAL segment is now (what a disaster now would lose)
2. canary     on production: a random token into dbops.pitr_canary (canary=false skips it), then
              pg_create_restore_point('dbops-drill-<run>'), pg_switch_wal(), and wait until that segment
              is in the archive
3. recover    the newest base backup whose WAL reaches it, into a scratch directory on the worker, to that
              restore point (pitr-restore's own tasks, on a free local port); with a storage list, read
              from the first location whose copy is intact, as pitr-restore
4. check      the token is there; pg_amcheck is clean; the tables of the latest dump's manifest exist;
              replay reached the restore point's LSN and the copy was promoted onto a new timeline
5. record     <base backup stem>.pitr-drill.json (in the location read): RPO, RTO, WAL replayed, checks,
              result, the location read and any passed over
6. clean up   always: the scratch server is stopped and its directories removed, also on failure
"""

from __future__ import annotations

import os
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.runtime import flow_run
from pydantic import BaseModel, Field

from blocks.storage import load_locations
from flows.core.drill import CheckResult
from flows.core.layout import check_location
from flows.core.locations import StorageList
from flows.core.pitr.drill import Canary, PitrDrillCheck, PitrDrillRecord, restore_point_name, rpo_seconds
from flows.core.pitr.errors import PitrDrillFailed, RecoveryFailed
from flows.core.pitr.recovery import PitrReport
from flows.core.pitr.server import PgServer
from flows.core.pitr.targets import parse_target
from flows.core.pitr.workdir import free_local_port, work_directory
from flows.core.restore_sources import read_from_line
from flows.core.wal_archive import ArchiveLocation
from flows.tasks.common import artifact_key, database_name_of, failure_sentence, publish_failure
from flows.tasks.pitr import (
    RecoveryPlan,
    check_recovered_copy,
    measure_rpo,
    plan_recovery,
    read_latest_dump_manifest,
    replay_to_target,
    restore_base_backup,
    write_drill_canary,
    write_pitr_drill_record,
)
from flows.tasks.restore import location_ref


class PitrDrillOptions(BaseModel):
    """Less common knobs."""

    scratch_root: str | None = Field(
        default=None,
        description="Where the scratch data directory is created (default: the system temp dir); needs room "
        "for the whole base backup unpacked.",
    )
    archive_timeout_s: float = Field(
        default=300, gt=0, description="How long to wait for the restore point's segment to be archived."
    )
    wal_ahead: int = Field(default=16, ge=1, le=1024, description="WAL segments fetched ahead of replay.")
    timeout_hours: float = Field(default=6.0, gt=0, description="The recovery is stopped after this long.")
    pg_bindir: str | None = Field(
        default=None,
        description="Directory with pg_ctl, pg_verifybackup and pg_amcheck; default: the server's.",
    )


def _scratch(root: str | None) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix="dbops-pitr-drill-", dir=root))
    if os.geteuid() == 0:
        os.chmod(tmp, 0o755)  # the server's OS user must reach its data directory inside
    return tmp


@flow(name="pitr-drill", log_prints=True)
def pitr_drill(
    database: str,
    storage: StorageList,
    archive: ArchiveLocation,
    prefix: str = "",
    canary: bool = True,
    options: PitrDrillOptions | None = None,
) -> PitrDrillRecord:
    """Recover production's cluster to a fresh restore point in a scratch directory and prove it holds
    what production held at that point; record the result beside the base backup used.

    Args:
        database: Name of the PostgresDatabase block of production: the canary and the restore point are
            written there (needs CREATE on the database, or an existing dbops schema, and EXECUTE on
            pg_create_restore_point and pg_switch_wal); its base backups and dumps are filed under its
            database name.
        storage: Storage block slug holding the base backups and dumps (s3-bucket/NAME or
            local-file-system/NAME), or a list of them (the primary first, then its copies; a list, or
            slugs separated by commas): the base backup is read from the first location whose copy is
            intact, and the drill record is written where it was read.
        archive: Where the WAL is (the WAL archive check's location).
        prefix: Folder inside the storage (e.g. prod); may be empty.
        canary: Write a random token into dbops.pitr_canary before the restore point and check it in the
            copy; false writes nothing but the restore point (a WAL record, no table).
        options: Scratch location, archive wait, prefetch depth, timeout, client tool directory.
    """
    logger = get_run_logger()
    options = options or PitrDrillOptions()
    started = datetime.now(UTC)
    run_id = (flow_run.get_id() or "")[:8] or f"manual-{started:%Y%m%dT%H%M%S}"
    name = database_name_of(database)
    restore_point = restore_point_name(run_id)
    plan: RecoveryPlan | None = None
    report: PitrReport | None = None
    server: PgServer | None = None
    cn: Canary | None = None
    checks: list[CheckResult] = []
    rpo: float | None = None
    scratch = _scratch(options.scratch_root)
    data = scratch / "data"
    try:
        load_locations(storage)  # every slug a storage block, no place named twice (or under two names)
        check_location(prefix, name)
        rpo = rpo_seconds(measure_rpo(database, storage, prefix, archive), started)
        cn = write_drill_canary(database, archive, restore_point, run_id, canary, options.archive_timeout_s)
        target = parse_target(restore_point=restore_point)
        plan = plan_recovery(database, storage, prefix, archive, target, str(data), free_local_port())
        restored = restore_base_backup(plan, run_id, options.pg_bindir)
        report, server = replay_to_target(
            plan,
            restored,
            cluster_name=f"dbops-pitr-drill-{name}"[:63],
            ahead=options.wal_ahead,
            timeout_s=options.timeout_hours * 3600,
            pg_bindir=options.pg_bindir,
        )
        dump = read_latest_dump_manifest(storage, prefix, name)
        checks = check_recovered_copy(
            report,
            server,
            cn if canary else Canary("", cn.restore_point, cn.restore_point_lsn, cn.walfile, cn.timeline),
            dump,
            name,
            options.pg_bindir,
            plan.choice.manifest.server_version_num,
        )
        bad = [c for c in checks if not c.ok]
        if bad:
            raise PitrDrillFailed(
                f"the PITR drill of {name} recovered to {restore_point} but the copy is not right: "
                + "; ".join(f"{c.name}: {c.detail}" for c in bad)
            )
        record = _record(name, plan, report, cn, checks, rpo, started, restore_point, passed=True)
        where = location_ref(storage, record.location or plan.location)
        write_pitr_drill_record(where, plan.choice.manifest.tar_key, record)
        _publish(record)
        logger.info("PITR drill passed: RPO %s s, RTO %.1f s", record.rpo_seconds, report.rto_seconds)
        return record
    except Exception as exc:
        if plan is not None:
            record = _record(
                name, plan, report, cn, checks, rpo, started, restore_point, passed=False, exc=exc
            )
            try:
                where = location_ref(storage, record.location or plan.location)
                write_pitr_drill_record(where, plan.choice.manifest.tar_key, record)
            except Exception as rec_exc:  # the drill's own failure matters more
                logger.warning("could not record the failed drill: %s", failure_sentence(rec_exc))
        # the Failed state is the flow's result on failure (Prefect's convention), not a report
        return publish_failure(
            artifact_key("pitr-drill", name), f"PITR drill of {name} to {restore_point}", exc
        )
    finally:
        if server is not None:
            server.stop("immediate")
        shutil.rmtree(work_directory(data), ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)


def _record(
    name: str,
    plan: RecoveryPlan,
    report: PitrReport | None,
    canary: Canary | None,
    checks: list[CheckResult],
    rpo: float | None,
    started: datetime,
    restore_point: str,
    *,
    passed: bool,
    exc: BaseException | None = None,
) -> PitrDrillRecord:
    return PitrDrillRecord(
        database=name,
        base_backup=plan.choice.manifest.tar_key,
        flow_run_id=flow_run.get_id(),
        started_at=started,
        finished_at=datetime.now(UTC),
        passed=passed,
        message=failure_sentence(exc) if exc else "",
        restore_point=restore_point,
        restore_point_lsn=canary.restore_point_lsn if canary else None,
        rpo_seconds=rpo,
        rto_seconds=report.rto_seconds if report else None,
        download_seconds=report.download_seconds if report else None,
        replay_seconds=report.replay_seconds if report else None,
        start_seconds=report.start_seconds if report else None,
        wal_segments_replayed=report.segments_replayed if report else None,
        bytes_downloaded=report.bytes_downloaded if report else None,
        reached_lsn=report.reached_lsn if report else None,
        timeline=report.timeline if report else None,
        missing_segment=exc.missing_segment if isinstance(exc, RecoveryFailed) else None,
        checks=[PitrDrillCheck(name=c.name, ok=c.ok, detail=c.detail) for c in checks],
        location=report.location if report else plan.location,
        fallbacks=report.fallbacks if report else [],
    )


def _publish(record: PitrDrillRecord) -> None:
    rows = [
        {"item": "result", "value": "passed" if record.passed else f"failed: {record.message}"},
        {"item": "base backup", "value": record.base_backup},
        {"item": "read from", "value": read_from_line(record.location or "-", record.fallbacks)},
        {"item": "restore point", "value": f"{record.restore_point} at {record.restore_point_lsn}"},
        {
            "item": "RPO",
            "value": f"{record.rpo_seconds:.0f} s" if record.rpo_seconds is not None else "unknown",
        },
        {
            "item": "RTO",
            "value": f"{record.rto_seconds:.1f} s (download {record.download_seconds:.1f} s, replay "
            f"{record.replay_seconds:.1f} s, start {record.start_seconds:.1f} s)"
            if record.rto_seconds is not None
            else "-",
        },
        {"item": "WAL segments replayed", "value": str(record.wal_segments_replayed)},
        {"item": "reached", "value": f"{record.reached_lsn} on timeline {record.timeline}"},
    ] + [
        {"item": f"check {c.name}", "value": ("ok: " if c.ok else "FAILED: ") + c.detail}
        for c in record.checks
    ]
    create_table_artifact(
        key=artifact_key("pitr-drill", record.database),
        table=rows,
        description=f"PITR drill of {record.database}: {'passed' if record.passed else 'failed'}",
    )
