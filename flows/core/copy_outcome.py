"""What a backup run with copies ends as, when a copy did not land: the primary backup is safe (its manifest
is written and verified before any copy starts), so the run still did its most important job; it ends
Failed all the same, because a backup that exists in one place only is not what was asked for, and an
automation must wake someone up to fix the copy location. No Prefect.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from flows.core.errors import DbopsError

SYNC_HINT = "run `dbops backups sync` once it is fixed"


@dataclass(frozen=True)
class CopyFault:
    """One copy location that did not get this run's backup (`step` copy), or whose own retention failed
    (`step` retention), with the sentence that says why."""

    location: str
    step: Literal["copy", "retention"]
    why: str


class CopiesIncomplete(DbopsError):
    """The primary backup is safe, at least one copy is not: one sentence names each copy that failed.

    Not transient: the flow has already finished its work; the copy is brought up to date by a sync run.
    """

    def __init__(
        self,
        message: str = "",
        *,
        transient: bool | None = None,
        primary: str = "",
        faults: list[CopyFault] | None = None,
    ) -> None:
        super().__init__(message, transient=transient)
        self.primary = primary
        self.faults = list(faults or [])


def copies_sentence(primary: str, faults: list[CopyFault]) -> str:
    """`the backup is safe in PRIMARY; copy to SLUG failed: WHY; ...; run dbops backups sync ...`.

    `primary` is where the backup is (the primary store's URL and the backup's key); a fault's location
    is the block slug as the person wrote it in `storage`.
    """
    parts = [f"the backup is safe in {primary}"]
    for fault in faults:
        what = "copy to" if fault.step == "copy" else "retention in"
        # A transient store error says "; retrying", true inside the task and no longer true here.
        why = fault.why.rstrip(". ").removesuffix("; retrying")
        parts.append(f"{what} {fault.location} failed: {why}")
    if any(f.step == "copy" for f in faults):
        parts.append(SYNC_HINT)
    else:
        parts.append("the copy itself is complete; fix the location and the next run's retention retries")
    return "; ".join(parts)


def copies_failure(primary: str, faults: list[CopyFault]) -> CopiesIncomplete | None:
    """The error a run ends with, or None when every copy landed."""
    if not faults:
        return None
    return CopiesIncomplete(copies_sentence(primary, faults), primary=primary, faults=faults)
