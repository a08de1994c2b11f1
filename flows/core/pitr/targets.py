"""The recovery target: exactly one of a time, an LSN, a restore point, the end of the archive or the
first consistent point, and what the server does on reaching it.

The recovery_target_* settings it becomes are PostgreSQL's (12+, src/backend/utils/misc/guc_tables.c);
`latest` is "no target": the server replays until the archive has nothing more and promotes.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import AwareDatetime, BaseModel, Field

from flows.core.pitr.errors import RecoveryRefused
from flows.core.wal import format_lsn, parse_lsn

TargetKind = Literal["time", "lsn", "restore_point", "latest", "immediate"]
TargetAction = Literal["promote", "pause"]


class RecoveryTarget(BaseModel):
    """A validated target (see `parse_target`); `value` is its text form for messages."""

    kind: TargetKind
    time: AwareDatetime | None = None
    lsn: str | None = Field(default=None, description="Normalised pg_lsn text, e.g. 0/3000060.")
    restore_point: str | None = None
    inclusive: bool = True
    action: TargetAction = "promote"

    @property
    def lsn_int(self) -> int | None:
        return parse_lsn(self.lsn) if self.lsn else None

    def describe(self) -> str:
        if self.kind == "time":
            assert self.time is not None
            return f"time {self.time.isoformat()}"
        if self.kind == "lsn":
            return f"LSN {self.lsn}"
        if self.kind == "restore_point":
            return f"restore point {self.restore_point!r}"
        if self.kind == "latest":
            return "the end of the archive (latest)"
        return "the first consistent point (immediate)"

    def settings(self) -> dict[str, str]:
        """The recovery_target_* settings (values unquoted; the config writer quotes them).

        `recovery_target_timeline = latest` (PostgreSQL's default since 12, said explicitly): recovery
        follows production's own promotions through the `.history` files in the archive, which is what a
        person recovering "the database as it was at T" means. The restored server never archives, so no
        timeline of ours can appear there to be followed by mistake.
        """
        out: dict[str, str] = {"recovery_target_timeline": "latest"}
        if self.kind == "latest":
            return out  # no target: replay to the end of the archive, then promote
        if self.kind == "time":
            assert self.time is not None
            out["recovery_target_time"] = self.time.astimezone(UTC).isoformat(sep=" ")
        elif self.kind == "lsn":
            assert self.lsn is not None
            out["recovery_target_lsn"] = self.lsn
        elif self.kind == "restore_point":
            assert self.restore_point is not None
            out["recovery_target_name"] = self.restore_point
        else:
            out["recovery_target"] = "immediate"
        if self.kind in ("time", "lsn"):
            out["recovery_target_inclusive"] = "on" if self.inclusive else "off"
        out["recovery_target_action"] = self.action
        return out


def parse_time(text: str | datetime) -> datetime:
    """ISO 8601 with a zone; a naive time is refused (whose 09:00 would it be?)."""
    if isinstance(text, datetime):
        when = text
    else:
        raw = text.strip()
        try:
            when = datetime.fromisoformat(raw.replace("Z", "+00:00") if raw.endswith("Z") else raw)
        except ValueError:
            raise RecoveryRefused(
                f"target time {text!r} is not ISO 8601; give it like 2026-11-29T09:15:00+00:00"
            ) from None
    if when.tzinfo is None or when.utcoffset() is None:
        raise RecoveryRefused(
            f"target time {text!s} has no time zone; add one (e.g. +00:00 or Z) so it names one instant"
        )
    return when


def parse_target(
    *,
    time: str | datetime | None = None,
    lsn: str | None = None,
    restore_point: str | None = None,
    latest: bool = False,
    immediate: bool = False,
    inclusive: bool = True,
    action: TargetAction = "promote",
    now: datetime | None = None,
) -> RecoveryTarget:
    """Exactly one target; a time in the future is refused (nothing there to recover yet)."""
    given = [
        name
        for name, value in (
            ("time", time),
            ("lsn", lsn),
            ("restore_point", restore_point),
            ("latest", latest),
            ("immediate", immediate),
        )
        if value not in (None, "", False)
    ]
    if len(given) != 1:
        which = ", ".join(given) if given else "none"
        raise RecoveryRefused(
            f"give exactly one recovery target (time, lsn, restore_point, latest or immediate); got {which}"
        )
    if action not in ("promote", "pause"):
        raise RecoveryRefused(f"action {action!r} is not promote or pause")
    kind = given[0]
    if kind == "time":
        assert time is not None
        when = parse_time(time)
        current = now or datetime.now(UTC)
        if when > current:
            raise RecoveryRefused(
                f"target time {when.isoformat()} is in the future "
                f"(now {current.isoformat(timespec='seconds')}); "
                "nothing has been archived for it yet"
            )
        return RecoveryTarget(kind="time", time=when, inclusive=inclusive, action=action)
    if kind == "lsn":
        assert lsn is not None
        try:
            normal = format_lsn(parse_lsn(lsn))
        except ValueError:
            raise RecoveryRefused(f"target LSN {lsn!r} is not an LSN like 16/B374D848") from None
        return RecoveryTarget(kind="lsn", lsn=normal, inclusive=inclusive, action=action)
    if kind == "restore_point":
        assert restore_point is not None
        if len(restore_point) > 63 or "'" in restore_point or "\n" in restore_point:
            raise RecoveryRefused(
                f"restore point {restore_point!r} cannot be a pg_create_restore_point name (at most 63 "
                "characters, no quotes or newlines)"
            )
        return RecoveryTarget(kind="restore_point", restore_point=restore_point, action=action)
    if kind == "latest":
        if action == "pause":
            raise RecoveryRefused(
                "action=pause needs a target to pause at; with latest the server replays the whole archive "
                "and promotes: use a time or LSN near the end to inspect before promoting"
            )
        return RecoveryTarget(kind="latest", action="promote")
    return RecoveryTarget(kind="immediate", action=action)
