"""Which base backup a point-in-time recovery starts from, on the window `dbops backups list` prints.

The window and the choice are flows/core/chain.py's (recoverable_window, pick_base_backup) over the one
base-backup catalog (flows/core/base_catalog.py): PITR refuses exactly what the listing says is outside
the window. What is PITR's own, on top of that:
- the refusal sentences ("recoverable from ... to ...; the target ... is after the last archived segment",
  "... is past WAL segment X, which is missing ...", "... is before the oldest base backup ...");
- targets the window cannot place: restore_point (a name has no position the archive can be searched by
  without reading the WAL, so the newest base backup the window reaches is chosen; an older restore point
  makes recovery end before the target, reported with the last replayed LSN and the missing segment),
  latest (the newest base backup whose chain reaches the last archived segment: a hole on the way is
  refused, naming the segment) and immediate (the newest base backup the window reaches);
- the segment the target is expected in (for the ETA) and the timeline view the WAL spool restores from
  (chain.TimelineView: the newest timeline's lineage, history files included).
Nothing here downloads anything: it reads manifests and lists the archive once.
"""

from __future__ import annotations

from dataclasses import dataclass

from flows.core.base_catalog import BaseBackup, BaseCatalog
from flows.core.base_layout import BaseBackupManifest
from flows.core.chain import (
    NotRecoverable,
    RecoverableWindow,
    TimelineView,
    Window,
    needed_from,
    pick_base_backup,
    recoverable_window,
)
from flows.core.pitr.errors import RecoveryRefused
from flows.core.pitr.targets import RecoveryTarget
from flows.core.wal import parse_lsn, parse_wal_name, segno_of_lsn
from flows.core.wal_archive import WalArchive


def window_sentence(window: RecoverableWindow) -> str:
    """The window in the words of PITR's refusals and reports (ISO times, the first missing segment)."""
    if not window.windows:
        return "nothing is recoverable yet (no base backup whose WAL is in the archive)"
    spans = " and ".join(
        f"from {w.start.isoformat(timespec='seconds')} to {w.end.isoformat(timespec='seconds')}"
        for w in window.windows
    )
    text = f"recoverable {spans}"
    if window.first_hole:
        text += f" (WAL segment {window.first_hole} is missing from the archive)"
    return text


@dataclass
class Choice:
    """The base backup to restore, the window, and the last segment the recovery is expected to need."""

    base: BaseBackup
    window: RecoverableWindow
    scan: TimelineView
    end_segno: int | None  # for the ETA: the segment the target is expected in (None: unknown)

    @property
    def manifest(self) -> BaseBackupManifest:
        return self.base.manifest

    def sentence(self) -> str:
        return window_sentence(self.window)


def _stop_segno(m: BaseBackupManifest) -> int:
    return parse_wal_name(m.stop_wal, m.wal_segment_size).segno


def choose_base_backup(
    catalog: BaseCatalog, target: RecoveryTarget, archive: WalArchive, where: str = ""
) -> Choice:
    """The newest base backup that ends before the target and whose WAL chain reaches it (module
    docstring for the rules per target kind); RecoveryRefused with the window otherwise."""
    in_where = f" in {where}" if where else ""
    if not catalog.backups:
        raise RecoveryRefused(
            f"there is no base backup{in_where}; take one (base-backup flow) before a point-in-time "
            "recovery is possible"
        )
    window = recoverable_window(catalog.backups[0].manifest.database, catalog, archive)
    what = target.describe()
    scan = window.view()
    if window.unknown is not None or scan is None:
        raise RecoveryRefused(f"cannot choose a base backup{in_where} for {what}: {window.unknown}")
    reached = [(b, w) for b in window.bases if (w := window.window_of(b)) is not None]
    reached.sort(key=lambda bw: bw[0].manifest.ended_at, reverse=True)  # newest first
    if not reached:
        why = "; ".join(f"{b.manifest.tar_key}: {why}" for b, why in window.broken)
        raise RecoveryRefused(
            f"no base backup{in_where} has its WAL in {archive.url} ({why}); {window_sentence(window)}"
        )
    if target.kind in ("immediate", "restore_point", "latest"):
        b, w = reached[0]
        if target.kind == "latest" and w.hole:
            raise RecoveryRefused(
                f"{window_sentence(window)}; {what} cannot be reached: WAL segment {w.hole} is missing from "
                f"{archive.url} and later segments are there; copy it back from the server's pg_wal if it "
                "is still there, or take a new base backup"
            )
        end = _stop_segno(b.manifest) if target.kind == "immediate" else w.through_segno
        return Choice(b, window, scan, end)
    try:
        if target.kind == "lsn":
            assert target.lsn is not None
            picked = pick_base_backup(window, target.lsn)
            end_segno: int | None = segno_of_lsn(parse_lsn(target.lsn), picked.base.manifest.wal_segment_size)
        else:
            assert target.time is not None
            picked = pick_base_backup(window, target.time)
            first, through = needed_from(picked.base), picked.window.through_segno
            end_segno = scan.first_archived_at_or_after(first, through, target.time)
    except NotRecoverable:
        raise _refusal(reached, target, window, archive) from None
    return Choice(picked.base, window, scan, end_segno)


def _refusal(
    reached: list[tuple[BaseBackup, Window]],
    target: RecoveryTarget,
    window: RecoverableWindow,
    archive: WalArchive,
) -> RecoveryRefused:
    """Why no base backup reaches a time or LSN target: before them all, past a hole, or past the end."""
    what, sentence = target.describe(), window_sentence(window)
    if target.kind == "lsn":
        lsn = target.lsn_int
        assert lsn is not None
        before = [(b, w) for b, w in reached if parse_lsn(b.manifest.stop_lsn) <= lsn]
        if not before:
            oldest = reached[-1][0].manifest.stop_lsn
            return RecoveryRefused(
                f"{sentence}; the target {what} is before the oldest base backup's consistent point "
                f"({oldest})"
            )
    else:
        assert target.time is not None
        when = target.time
        before = [(b, w) for b, w in reached if b.manifest.ended_at <= when]
        if not before:
            return RecoveryRefused(
                f"{sentence}; the target {what} is before the oldest base backup with its WAL archived ended"
            )
    w = before[0][1]
    if w.hole:
        return RecoveryRefused(
            f"{sentence}; the target {what} is past WAL segment {w.hole}, which is missing from "
            f"{archive.url} while later segments are there, so no base backup's WAL chain reaches it"
        )
    return RecoveryRefused(
        f"{sentence}; the target {what} is after the last archived segment ({w.through_name}): wait for it "
        "to be archived, or choose an earlier target"
    )
