"""Retention planning for nightly database backups.

This module decides which backups to keep and which to delete. It does not delete anything and does
not import Prefect: the flow that owns the S3 bucket calls :func:`plan_retention`, logs the plan and
acts on it. Keeping the decision pure means every rule below can be tested with synthetic histories,
and a dry run shows exactly the same plan that a real run would carry out.

The rules follow restic/borg "forget" semantics, as Barman's retention policies do for base backups,
with these choices:

* Backup times come from the manifest's ``end_time``, never from object key names: keys get renamed
  and re-prefixed, a manifest is what the backup actually recorded.
* Only verified backups can fill a ``keep_last`` or GFS slot. A slot filled by a backup that never
  passed verification would give a false sense of coverage and push a good backup out of its slot.
* An unverified backup newer than the newest verified one is kept ("awaiting verification"): it may
  be a run still in progress or waiting for its verification step. Once a newer backup has been
  verified, an unverified one is a failed run and is deleted.
* The newest verified backup is always kept, whatever the policy says: it is the only restore point
  we trust, and deleting it because dumps stopped for a while would turn an outage into data loss.
* Backups dated after ``now`` are kept ("in the future") and do not fill slots. A backup that looks
  like it comes from the future means the clocks disagree; deleting it or letting a bogus timestamp
  occupy the ``keep_last`` slot of the real newest backup would both be wrong.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from flows.core.catalog import Catalog
from flows.core.errors import DuplicateBackupError, NaiveDatetimeError, RetentionError

__all__ = [
    "BackupRecord",
    "DuplicateBackupError",
    "Kept",
    "NaiveDatetimeError",
    "RetentionError",
    "RetentionPlan",
    "RetentionPolicy",
    "plan_retention",
]


@dataclass(frozen=True)
class BackupRecord:
    """One backup as described by its manifest."""

    stem: str
    end_time: datetime
    verified: bool


@dataclass(frozen=True)
class Kept:
    """A backup the plan keeps, with every rule that wanted it (so a log line can explain why)."""

    record: BackupRecord
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class RetentionPlan:
    """The outcome of :func:`plan_retention`; ``keep`` and ``delete`` are both sorted newest first."""

    keep: list[Kept]
    delete: list[BackupRecord]

    def summary(self) -> str:
        """One line for flow logs and run notifications."""
        total = len(self.keep) + len(self.delete)
        text = f"keep {len(self.keep)} of {total} backups, delete {len(self.delete)}"
        if self.keep:
            oldest = self.keep[-1].record.end_time.astimezone(UTC)
            text += f" (oldest kept {oldest:%Y-%m-%dT%H:%M:%SZ})"
        return text


_COUNT_HINTS = {
    "keep_last": "the number of newest backups to keep",
    "keep_daily": "the number of daily backups to keep",
    "keep_weekly": "the number of weekly backups to keep",
    "keep_monthly": "the number of monthly backups to keep",
}


class RetentionPolicy(BaseModel):
    """How many backups to keep.

    ``max_age_days`` means two things depending on whether a GFS rule (daily/weekly/monthly) is set:

    * without GFS rules it is a window: every verified backup from the last ``max_age_days`` days is
      kept, which is what "keep 30 days" means to most people;
    * with GFS rules it is a hard cap: GFS picks older than ``max_age_days`` are not kept, so a
      ``keep_monthly=12`` cannot hold data longer than a compliance limit allows.

    ``keep_last`` ignores ``max_age_days`` on purpose. When dumps have silently stopped for weeks, an
    age-based policy alone would delete every backup; ``keep_last`` is the safety net that keeps the
    newest N restore points no matter how old they are.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    keep_last: int = Field(
        default=0,
        description="Always keep this many newest verified backups, however old they are.",
    )
    keep_daily: int = Field(
        default=0,
        description="Keep the newest verified backup of each of this many most recent UTC days that have "
        "backups (days without backups don't count).",
    )
    keep_weekly: int = Field(
        default=0,
        description="Keep the newest verified backup of each of this many most recent ISO weeks that have "
        "backups (weeks without backups don't count).",
    )
    keep_monthly: int = Field(
        default=0,
        description="Keep the newest verified backup of each of this many most recent calendar months "
        "that have backups (months without backups don't count).",
    )
    max_age_days: int | None = Field(
        default=None,
        description="Alone: keep every verified backup younger than this many days. With daily/weekly/"
        "monthly rules: never keep their picks beyond this age. Leave empty for no age limit.",
    )

    @field_validator("keep_last", "keep_daily", "keep_weekly", "keep_monthly")
    @classmethod
    def _count_not_negative(cls, value: int, info: ValidationInfo) -> int:
        # PydanticCustomError rather than ValueError: the message reaches the Prefect form verbatim,
        # without pydantic's "Value error, " prefix.
        if value < 0:
            field = info.field_name or "value"
            raise PydanticCustomError(
                "retention_count_negative",
                f"{field} must be 0 or more (got {value}); set it to {_COUNT_HINTS.get(field, 'a count')}",
            )
        return value

    @field_validator("max_age_days")
    @classmethod
    def _age_at_least_one_day(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise PydanticCustomError(
                "retention_max_age_too_small",
                f"max_age_days must be 1 or more (got {value}); set it to a number of days or leave it "
                "empty for no age limit",
            )
        return value

    @model_validator(mode="after")
    def _keeps_something(self) -> RetentionPolicy:
        # An all-zero policy is almost always a form submitted with defaults; running it would leave
        # only the newest verified backup, which nobody asks for on purpose.
        if not self.keep_last and not self.uses_gfs and self.max_age_days is None:
            raise PydanticCustomError(
                "retention_keeps_nothing",
                "retention policy keeps nothing: set keep_last, keep_daily/weekly/monthly or max_age_days",
            )
        return self

    @property
    def uses_gfs(self) -> bool:
        """Whether a calendar rule is set, which turns ``max_age_days`` from a window into a cap."""
        return bool(self.keep_daily or self.keep_weekly or self.keep_monthly)


def _day(moment: datetime) -> str:
    return moment.astimezone(UTC).date().isoformat()


def _iso_week(moment: datetime) -> str:
    # ISO year, not calendar year: 2027-01-01 belongs to 2026-W53.
    year, week, _ = moment.astimezone(UTC).isocalendar()
    return f"{year}-W{week:02d}"


def _month(moment: datetime) -> str:
    utc = moment.astimezone(UTC)
    return f"{utc.year}-{utc.month:02d}"


def _newest_per_period(
    newest_first: list[BackupRecord], period_of: Callable[[datetime], str], count: int
) -> Iterator[tuple[BackupRecord, str]]:
    """Yield the newest record of each of the ``count`` most recent periods that have records.

    The input is sorted newest first, so each period is one contiguous run and its first record is
    its newest; stopping after ``count`` periods keeps this linear at worst.
    """
    previous: str | None = None
    found = 0
    for record in newest_first:
        if found >= count:
            return
        period = period_of(record.end_time)
        if period != previous:
            previous = period
            found += 1
            yield record, period


def _newest_first_key(record: BackupRecord) -> tuple[datetime, str]:
    # The stem breaks ties so the plan never depends on the order the bucket listing came back in.
    return record.end_time, record.stem


def _require_aware(name: str, moment: datetime) -> None:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise NaiveDatetimeError(f"{name} has no timezone ({moment.isoformat()}); pass a UTC-aware datetime")


def _check_records(records: list[BackupRecord]) -> None:
    seen: set[str] = set()
    duplicates: set[str] = set()
    for record in records:
        _require_aware(f"end_time of {record.stem!r}", record.end_time)
        if record.stem in seen:
            duplicates.add(record.stem)
        seen.add(record.stem)
    if duplicates:
        shown = ", ".join(sorted(duplicates)[:3])
        more = f" and {len(duplicates) - 3} more" if len(duplicates) > 3 else ""
        raise DuplicateBackupError(
            f"{len(duplicates)} backup stem(s) appear more than once ({shown}{more}); "
            "fix the listing so each backup is passed once"
        )


def plan_retention(backups: Iterable[BackupRecord], policy: RetentionPolicy, now: datetime) -> RetentionPlan:
    """Split ``backups`` into those to keep and those to delete under ``policy`` at time ``now``.

    ``now`` is a parameter rather than read from the clock so a plan can be reproduced from a flow
    run's logs and tested without freezing time. Every input record ends up in exactly one of
    ``keep``/``delete``; the result does not depend on input order.

    Raises:
        DuplicateBackupError: two records share a stem.
        NaiveDatetimeError: ``now`` or an ``end_time`` has no timezone.
    """
    _require_aware("now", now)
    records = list(backups)
    _check_records(records)
    records.sort(key=_newest_first_key, reverse=True)

    reasons: dict[str, list[str]] = {record.stem: [] for record in records}
    present: list[BackupRecord] = []
    for record in records:
        if record.end_time > now:
            reasons[record.stem].append("in the future")
        else:
            present.append(record)

    verified = [record for record in present if record.verified]
    newest_verified = verified[0] if verified else None
    if newest_verified is not None:
        reasons[newest_verified.stem].append("newest verified")
    for record in present:
        if newest_verified is not None and record.end_time <= newest_verified.end_time:
            break
        if not record.verified:
            reasons[record.stem].append("awaiting verification")

    for rank, record in enumerate(verified[: policy.keep_last], start=1):
        reasons[record.stem].append(f"last {rank}")

    cutoff = None if policy.max_age_days is None else now - timedelta(days=policy.max_age_days)
    calendar_rules = (
        ("daily", policy.keep_daily, _day),
        ("weekly", policy.keep_weekly, _iso_week),
        ("monthly", policy.keep_monthly, _month),
    )
    for label, count, period_of in calendar_rules:
        for record, period in _newest_per_period(verified, period_of, count):
            if cutoff is None or record.end_time >= cutoff:
                reasons[record.stem].append(f"{label} {period}")

    if cutoff is not None and not policy.uses_gfs:
        days = policy.max_age_days
        window = f"within {days} day{'s' if days != 1 else ''}"
        for record in verified:
            if record.end_time < cutoff:
                break
            reasons[record.stem].append(window)

    keep: list[Kept] = []
    delete: list[BackupRecord] = []
    for record in records:
        why = reasons[record.stem]
        if why:
            keep.append(Kept(record, tuple(why)))
        else:
            delete.append(record)
    return RetentionPlan(keep=keep, delete=delete)


def plan_from_catalog(catalog: Catalog, policy: RetentionPolicy, now: datetime) -> RetentionPlan:
    """The retention plan for the backups of a catalog (only backups with a manifest are candidates)."""
    records = [BackupRecord(b.stem, b.manifest.ended_at, b.manifest.verified) for b in catalog.backups]
    return plan_retention(records, policy, now)
