"""Tests for the retention planner: example histories a DBA would recognise, then invariants."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from flows.core.retention import (
    BackupRecord,
    DuplicateBackupError,
    NaiveDatetimeError,
    RetentionError,
    RetentionPlan,
    RetentionPolicy,
    plan_retention,
)

LAST_NIGHT = datetime(2026, 11, 24, 2, 0, tzinfo=UTC)  # a Tuesday, ISO week 2026-W48
NOW = datetime(2026, 11, 24, 6, 0, tzinfo=UTC)


def record(end_time: datetime, verified: bool = True, suffix: str = "") -> BackupRecord:
    utc = end_time.astimezone(UTC)
    stem = f"prod/imagemanager/dumps/{utc:%Y/%m/%d}/imagemanager-{utc:%Y%m%dT%H%M%SZ}{suffix}"
    return BackupRecord(stem=stem, end_time=end_time, verified=verified)


def nightly(count: int, last: datetime = LAST_NIGHT) -> list[BackupRecord]:
    return [record(last - timedelta(days=i)) for i in range(count)]


def kept_days(plan: RetentionPlan) -> list[date]:
    return [kept.record.end_time.astimezone(UTC).date() for kept in plan.keep]


def reasons_by_day(plan: RetentionPlan) -> dict[date, tuple[str, ...]]:
    return {kept.record.end_time.astimezone(UTC).date(): kept.reasons for kept in plan.keep}


def policy_error(**fields: object) -> str:
    with pytest.raises(ValidationError) as excinfo:
        RetentionPolicy(**fields)
    errors = excinfo.value.errors()
    assert len(errors) == 1
    return errors[0]["msg"]


# --- example histories -------------------------------------------------------------------------------


def test_gfs_on_400_nightly_backups_keeps_7_daily_4_weekly_and_12_monthly() -> None:
    policy = RetentionPolicy(keep_daily=7, keep_weekly=4, keep_monthly=12)

    plan = plan_retention(nightly(400), policy, NOW)

    daily = [date(2026, 11, d) for d in range(24, 17, -1)]
    weekly_extra = [date(2026, 11, 15), date(2026, 11, 8)]  # Sundays; 2026-11-22 is already a daily
    monthly_extra = [
        date(2026, 10, 31), date(2026, 9, 30), date(2026, 8, 31), date(2026, 7, 31),
        date(2026, 6, 30), date(2026, 5, 31), date(2026, 4, 30), date(2026, 3, 31),
        date(2026, 2, 28), date(2026, 1, 31), date(2025, 12, 31),
    ]  # fmt: skip
    assert kept_days(plan) == daily + weekly_extra + monthly_extra
    assert len(plan.delete) == 400 - 20


def test_each_kept_backup_lists_every_rule_that_keeps_it() -> None:
    policy = RetentionPolicy(keep_last=1, keep_daily=7, keep_weekly=4, keep_monthly=12)

    reasons = reasons_by_day(plan_retention(nightly(400), policy, NOW))

    assert reasons[date(2026, 11, 24)] == (
        "newest verified", "last 1", "daily 2026-11-24", "weekly 2026-W48", "monthly 2026-11",
    )  # fmt: skip
    assert reasons[date(2026, 11, 22)] == ("daily 2026-11-22", "weekly 2026-W47")
    assert reasons[date(2026, 11, 8)] == ("weekly 2026-W45",)
    assert reasons[date(2025, 12, 31)] == ("monthly 2025-12",)


def test_max_age_days_alone_keeps_every_backup_younger_than_the_limit() -> None:
    plan = plan_retention(nightly(400), RetentionPolicy(max_age_days=30), NOW)

    assert kept_days(plan) == [date(2026, 11, 24) - timedelta(days=i) for i in range(30)]
    assert all("within 30 days" in kept.reasons for kept in plan.keep)
    assert len(plan.delete) == 370


def test_keep_last_alone_keeps_exactly_the_n_newest_backups() -> None:
    plan = plan_retention(nightly(50), RetentionPolicy(keep_last=5), NOW)

    assert kept_days(plan) == [date(2026, 11, 24) - timedelta(days=i) for i in range(5)]
    assert [kept.reasons[-1] for kept in plan.keep] == ["last 1", "last 2", "last 3", "last 4", "last 5"]


def test_keep_last_is_honoured_when_dumps_stopped_for_longer_than_max_age() -> None:
    stopped = LAST_NIGHT - timedelta(days=60)
    policy = RetentionPolicy(keep_last=3, keep_daily=7, max_age_days=30)

    plan = plan_retention(nightly(100, last=stopped), policy, NOW)

    assert kept_days(plan) == [stopped.date() - timedelta(days=i) for i in range(3)]
    assert not any(reason.startswith("daily") for kept in plan.keep for reason in kept.reasons)


def test_max_age_days_caps_how_far_back_gfs_picks_are_kept() -> None:
    policy = RetentionPolicy(keep_monthly=12, max_age_days=60)

    plan = plan_retention(nightly(400), policy, NOW)

    assert kept_days(plan) == [date(2026, 11, 24), date(2026, 10, 31), date(2026, 9, 30)]


def test_max_age_days_with_gfs_does_not_keep_everything_inside_the_window() -> None:
    plan = plan_retention(nightly(400), RetentionPolicy(keep_weekly=2, max_age_days=30), NOW)

    assert kept_days(plan) == [date(2026, 11, 24), date(2026, 11, 22)]


@pytest.mark.parametrize(
    "policy",
    [RetentionPolicy(max_age_days=30), RetentionPolicy(keep_daily=40, max_age_days=30)],
    ids=["window", "cap"],
)
def test_a_backup_exactly_max_age_days_old_is_still_kept(policy: RetentionPolicy) -> None:
    now = LAST_NIGHT + timedelta(days=1)
    history = nightly(40)

    plan = plan_retention(history, policy, now)

    assert [kept.record for kept in plan.keep] == history[:30]  # ages 1..30 days
    assert plan.keep[-1].record.end_time == now - timedelta(days=30)


def test_days_without_backups_do_not_use_up_daily_slots() -> None:
    days = [date(2026, 11, 24), date(2026, 11, 20), date(2026, 11, 3), date(2026, 10, 1), date(2026, 9, 1)]
    history = [record(datetime(d.year, d.month, d.day, 2, tzinfo=UTC)) for d in days]

    plan = plan_retention(history, RetentionPolicy(keep_daily=3), NOW)

    assert kept_days(plan) == days[:3]


def test_weeks_and_months_without_backups_do_not_use_up_slots() -> None:
    history = [
        record(datetime(2026, 11, 24, 2, tzinfo=UTC)),
        record(datetime(2026, 8, 2, 2, tzinfo=UTC)),
        record(datetime(2026, 8, 1, 2, tzinfo=UTC)),
        record(datetime(2025, 1, 15, 2, tzinfo=UTC)),
    ]

    weekly = plan_retention(history, RetentionPolicy(keep_weekly=3), NOW)
    monthly = plan_retention(history, RetentionPolicy(keep_monthly=3), NOW)

    # 2026-08-01 (Sat) and 2026-08-02 (Sun) share ISO week 2026-W31 and month 2026-08.
    assert kept_days(weekly) == [date(2026, 11, 24), date(2026, 8, 2), date(2025, 1, 15)]
    assert kept_days(monthly) == [date(2026, 11, 24), date(2026, 8, 2), date(2025, 1, 15)]


def test_several_backups_a_day_keep_only_the_newest_of_each_day() -> None:
    history = [
        record(datetime(2026, 11, day, hour, tzinfo=UTC)) for day in (22, 23, 24) for hour in (1, 2, 5, 3)
    ]

    plan = plan_retention(history, RetentionPolicy(keep_daily=3), NOW)

    assert [kept.record.end_time for kept in plan.keep] == [
        datetime(2026, 11, 24, 5, tzinfo=UTC),
        datetime(2026, 11, 23, 5, tzinfo=UTC),
        datetime(2026, 11, 22, 5, tzinfo=UTC),
    ]
    assert len(plan.delete) == 9


def test_calendar_periods_are_utc_even_when_end_time_has_another_offset() -> None:
    eastern = timezone(timedelta(hours=-5))
    late_evening = record(datetime(2026, 11, 23, 22, 30, tzinfo=eastern))  # 2026-11-24 03:30 UTC
    earlier = record(datetime(2026, 11, 24, 1, 0, tzinfo=UTC))

    plan = plan_retention([earlier, late_evening], RetentionPolicy(keep_daily=1), NOW)

    assert [kept.record for kept in plan.keep] == [late_evening]
    assert "daily 2026-11-24" in plan.keep[0].reasons


def test_weekly_labels_use_the_iso_year_across_new_year() -> None:
    new_years_day = record(datetime(2027, 1, 1, 2, tzinfo=UTC))

    plan = plan_retention([new_years_day], RetentionPolicy(keep_weekly=1), datetime(2027, 1, 2, tzinfo=UTC))

    assert "weekly 2026-W53" in plan.keep[0].reasons


def test_unverified_backups_never_fill_keep_last_or_gfs_slots() -> None:
    verified = nightly(10)
    unverified = [
        record(LAST_NIGHT - timedelta(days=i, hours=-1), verified=False, suffix="-retry")
        for i in range(1, 10)
    ]

    plan = plan_retention(verified + unverified, RetentionPolicy(keep_last=3, keep_daily=5), NOW)

    assert all(kept.record.verified for kept in plan.keep)
    assert kept_days(plan) == [date(2026, 11, 24) - timedelta(days=i) for i in range(5)]
    assert sorted(plan.delete, key=lambda r: r.stem) == sorted(
        verified[5:] + unverified, key=lambda r: r.stem
    )


def test_unverified_backup_newer_than_newest_verified_is_kept_as_awaiting_verification() -> None:
    in_progress = record(LAST_NIGHT + timedelta(hours=2), verified=False)

    plan = plan_retention([in_progress, *nightly(10)], RetentionPolicy(keep_last=1), NOW)

    assert plan.keep[0].record == in_progress
    assert plan.keep[0].reasons == ("awaiting verification",)
    assert plan.keep[1].reasons == ("newest verified", "last 1")
    assert len(plan.delete) == 9


def test_unverified_backup_older_than_newest_verified_is_deleted_even_within_max_age() -> None:
    failed = record(LAST_NIGHT - timedelta(hours=12), verified=False)

    plan = plan_retention([failed, *nightly(3)], RetentionPolicy(max_age_days=30), NOW)

    assert plan.delete == [failed]


def test_nothing_is_deleted_while_no_backup_has_been_verified_yet() -> None:
    history = [record(LAST_NIGHT - timedelta(days=i), verified=False) for i in range(5)]

    plan = plan_retention(history, RetentionPolicy(keep_last=1), NOW)

    assert plan.delete == []
    assert {kept.reasons for kept in plan.keep} == {("awaiting verification",)}


def test_newest_verified_backup_survives_a_policy_that_would_age_it_out() -> None:
    old = nightly(5, last=LAST_NIGHT - timedelta(days=365))

    plan = plan_retention(old, RetentionPolicy(max_age_days=30), NOW)

    assert [kept.record for kept in plan.keep] == [old[0]]
    assert plan.keep[0].reasons == ("newest verified",)


def test_backups_dated_after_now_are_kept_and_do_not_take_keep_last_slots() -> None:
    skewed = record(NOW + timedelta(minutes=5))

    plan = plan_retention([skewed, *nightly(5)], RetentionPolicy(keep_last=2), NOW)

    assert plan.keep[0].record == skewed
    assert plan.keep[0].reasons == ("in the future",)
    assert [kept.reasons[-1] for kept in plan.keep[1:]] == ["last 1", "last 2"]
    assert len(plan.delete) == 3


def test_empty_history_gives_an_empty_plan() -> None:
    plan = plan_retention([], RetentionPolicy(keep_last=3), NOW)

    assert plan.keep == []
    assert plan.delete == []
    assert plan.summary() == "keep 0 of 0 backups, delete 0"


def test_summary_reports_counts_and_oldest_kept_backup() -> None:
    plan = plan_retention(nightly(400), RetentionPolicy(keep_daily=7, keep_monthly=12), NOW)

    assert plan.summary() == "keep 18 of 400 backups, delete 382 (oldest kept 2025-12-31T02:00:00Z)"


def test_duplicate_stems_are_rejected_instead_of_planned() -> None:
    history = nightly(3)

    with pytest.raises(DuplicateBackupError, match="appear more than once"):
        plan_retention([*history, history[1]], RetentionPolicy(keep_last=1), NOW)


@pytest.mark.parametrize(
    ("history", "now"),
    [
        ([BackupRecord("naive", datetime(2026, 11, 24, 2), True)], NOW),
        (nightly(2), datetime(2026, 11, 24, 6)),
    ],
    ids=["naive end_time", "naive now"],
)
def test_naive_timestamps_are_rejected(history: list[BackupRecord], now: datetime) -> None:
    with pytest.raises(NaiveDatetimeError, match="has no timezone"):
        plan_retention(history, RetentionPolicy(keep_last=1), now)


def test_planner_errors_share_a_base_class_callers_can_catch() -> None:
    assert issubclass(DuplicateBackupError, RetentionError)
    assert issubclass(NaiveDatetimeError, RetentionError)
    assert issubclass(RetentionError, ValueError)


def test_planning_150000_backups_is_fast_enough_for_a_large_bucket() -> None:
    start = datetime(2023, 1, 1, tzinfo=UTC)
    history = [
        BackupRecord(f"b{i:06d}", start + timedelta(minutes=7 * i), verified=i % 11 != 0)
        for i in range(150_000)
    ]
    now = history[-1].end_time + timedelta(hours=1)
    policy = RetentionPolicy(keep_last=10, keep_daily=30, keep_weekly=52, keep_monthly=120, max_age_days=3650)

    plan = plan_retention(reversed(history), policy, now)

    assert len(plan.keep) + len(plan.delete) == 150_000
    assert plan.keep[0].record == history[-1]


# --- policy validation -------------------------------------------------------------------------------


def test_keep_thirty_days_is_expressible_as_max_age_days_alone() -> None:
    policy = RetentionPolicy(max_age_days=30)

    assert (policy.keep_last, policy.keep_daily, policy.keep_weekly, policy.keep_monthly) == (0, 0, 0, 0)
    assert policy.max_age_days == 30


@pytest.mark.parametrize(
    ("field", "message"),
    [
        ("keep_last", "keep_last must be 0 or more (got -1); set it to the number of newest backups to keep"),
        (
            "keep_daily",
            "keep_daily must be 0 or more (got -1); set it to the number of daily backups to keep",
        ),
        (
            "keep_weekly",
            "keep_weekly must be 0 or more (got -1); set it to the number of weekly backups to keep",
        ),
        (
            "keep_monthly",
            "keep_monthly must be 0 or more (got -1); set it to the number of monthly backups to keep",
        ),
    ],
)
def test_negative_counts_are_rejected_with_a_one_sentence_fix(field: str, message: str) -> None:
    assert policy_error(**{field: -1, "max_age_days": 30}) == message


@pytest.mark.parametrize("days", [0, -5])
def test_max_age_days_below_one_is_rejected_with_a_one_sentence_fix(days: int) -> None:
    assert policy_error(max_age_days=days) == (
        f"max_age_days must be 1 or more (got {days}); set it to a number of days or leave it empty "
        "for no age limit"
    )


def test_policy_that_keeps_nothing_is_rejected() -> None:
    expected = "retention policy keeps nothing: set keep_last, keep_daily/weekly/monthly or max_age_days"

    assert policy_error() == expected
    assert policy_error(keep_last=0, keep_daily=0, keep_weekly=0, keep_monthly=0) == expected


def test_policy_errors_are_value_errors() -> None:
    with pytest.raises(ValueError, match="keep_daily must be 0 or more"):
        RetentionPolicy(keep_daily=-1)


def test_misspelled_policy_fields_are_rejected_rather_than_ignored() -> None:
    with pytest.raises(ValidationError, match="keep_dayly"):
        RetentionPolicy(keep_last=1, keep_dayly=7)  # type: ignore[call-arg]  # the misspelling under test


def test_every_policy_field_is_described_for_the_prefect_form() -> None:
    properties = RetentionPolicy.model_json_schema()["properties"]

    assert set(properties) == {"keep_last", "keep_daily", "keep_weekly", "keep_monthly", "max_age_days"}
    assert all(prop.get("description") for prop in properties.values())


# --- invariants --------------------------------------------------------------------------------------

BASE = datetime(2025, 1, 1, tzinfo=UTC)
SPAN_MINUTES = 2 * 365 * 24 * 60
OFFSETS = [timezone(timedelta(hours=h)) for h in (-8, -5, 0, 1, 9, 14)]


@st.composite
def histories(draw: st.DrawFn) -> list[BackupRecord]:
    # Times are drawn from a few clusters as well as the whole span so that several backups land in
    # the same day/week and exact end_time ties occur.
    minute = st.one_of(st.integers(0, SPAN_MINUTES), st.sampled_from([0, 60, 1440, 10_080, 43_200, 43_201]))
    rows = draw(st.lists(st.tuples(minute, st.booleans(), st.sampled_from(OFFSETS)), max_size=60))
    return [
        BackupRecord(f"b{i:03d}", (BASE + timedelta(minutes=m)).astimezone(tz), verified)
        for i, (m, verified, tz) in enumerate(rows)
    ]


def _valid(fields: dict[str, int | None]) -> bool:
    return any(fields[name] for name in ("keep_last", "keep_daily", "keep_weekly", "keep_monthly")) or (
        fields["max_age_days"] is not None
    )


policies = (
    st.fixed_dictionaries(
        {
            "keep_last": st.integers(0, 6),
            "keep_daily": st.integers(0, 6),
            "keep_weekly": st.integers(0, 6),
            "keep_monthly": st.integers(0, 6),
            "max_age_days": st.none() | st.integers(1, 800),
        }
    )
    .filter(_valid)
    .map(lambda fields: RetentionPolicy(**fields))
)

nows = st.integers(0, SPAN_MINUTES + 30 * 1440).map(lambda m: BASE + timedelta(minutes=m))


def newest_first(records: list[BackupRecord]) -> list[BackupRecord]:
    return sorted(records, key=lambda r: (r.end_time, r.stem), reverse=True)


def kept_stems(plan: RetentionPlan) -> set[str]:
    return {kept.record.stem for kept in plan.keep}


PERIODS = {
    "daily": lambda t: t.astimezone(UTC).strftime("%Y-%m-%d"),
    "weekly": lambda t: t.astimezone(UTC).strftime("%G-W%V"),
    "monthly": lambda t: t.astimezone(UTC).strftime("%Y-%m"),
}


@given(histories(), policies, nows)
def test_keep_and_delete_partition_the_input(
    history: list[BackupRecord], policy: RetentionPolicy, now
) -> None:
    plan = plan_retention(history, policy, now)

    stems = [kept.record.stem for kept in plan.keep] + [r.stem for r in plan.delete]
    assert sorted(stems) == sorted(r.stem for r in history)
    assert [kept.record for kept in plan.keep] == newest_first([kept.record for kept in plan.keep])
    assert plan.delete == newest_first(plan.delete)
    assert all(kept.reasons for kept in plan.keep)


@given(histories(), policies, nows)
def test_newest_verified_backup_is_never_deleted(
    history: list[BackupRecord], policy: RetentionPolicy, now
) -> None:
    verified = newest_first([r for r in history if r.verified])
    plan = plan_retention(history, policy, now)

    if verified:
        assert verified[0].stem in kept_stems(plan)
        present = [r for r in verified if r.end_time <= now]
        if present:
            assert present[0].stem in kept_stems(plan)


@given(histories(), policies, nows)
def test_nothing_newer_than_now_is_deleted(history: list[BackupRecord], policy: RetentionPolicy, now) -> None:
    plan = plan_retention(history, policy, now)

    assert all(r.end_time <= now for r in plan.delete)
    for kept in plan.keep:
        assert ("in the future" in kept.reasons) == (kept.record.end_time > now)


@given(histories(), policies, nows)
def test_keep_last_keeps_the_n_newest_verified_backups(history: list[BackupRecord], policy, now) -> None:
    verified = newest_first([r for r in history if r.verified])
    plan = plan_retention(history, policy, now)

    expected = verified[: policy.keep_last]
    assert len(expected) == min(policy.keep_last, len(verified))
    assert {r.stem for r in expected} <= kept_stems(plan)
    labelled = [kept.record for kept in plan.keep if any(x.startswith("last ") for x in kept.reasons)]
    assert labelled == [r for r in verified if r.end_time <= now][: policy.keep_last]


@given(histories(), policies, nows)
def test_gfs_keeps_the_newest_backup_of_each_recent_period_with_verified_backups(
    history: list[BackupRecord], policy: RetentionPolicy, now: datetime
) -> None:
    plan = plan_retention(history, policy, now)
    candidates = newest_first([r for r in history if r.verified and r.end_time <= now])
    cutoff = None if policy.max_age_days is None else now - timedelta(days=policy.max_age_days)

    for label, count in (
        ("daily", policy.keep_daily),
        ("weekly", policy.keep_weekly),
        ("monthly", policy.keep_monthly),
    ):
        newest_in_period: dict[str, BackupRecord] = {}
        for r in candidates:
            newest_in_period.setdefault(PERIODS[label](r.end_time), r)
        recent = sorted(newest_in_period.items(), key=lambda item: item[0], reverse=True)[:count]
        expected = {
            f"{label} {period}": r.stem for period, r in recent if cutoff is None or r.end_time >= cutoff
        }

        actual = {
            reason: kept.record.stem
            for kept in plan.keep
            for reason in kept.reasons
            if reason.startswith(f"{label} ")
        }
        assert actual == expected


@given(histories(), policies, nows)
def test_only_a_named_rule_keeps_a_backup(history: list[BackupRecord], policy: RetentionPolicy, now) -> None:
    """Reference model: recompute the kept set rule by rule, with nothing shared with the planner."""
    plan = plan_retention(history, policy, now)
    verified = newest_first([r for r in history if r.verified and r.end_time <= now])
    cutoff = None if policy.max_age_days is None else now - timedelta(days=policy.max_age_days)

    expected = {r.stem for r in history if r.end_time > now}
    if verified:
        expected.add(verified[0].stem)
    expected |= {
        r.stem
        for r in history
        if not r.verified and r.end_time <= now and all(v.end_time < r.end_time for v in verified)
    }
    expected |= {r.stem for r in verified[: policy.keep_last]}
    for label, count in (
        ("daily", policy.keep_daily),
        ("weekly", policy.keep_weekly),
        ("monthly", policy.keep_monthly),
    ):
        newest_in_period: dict[str, BackupRecord] = {}
        for r in verified:
            newest_in_period.setdefault(PERIODS[label](r.end_time), r)
        recent = sorted(newest_in_period.items(), reverse=True)[:count]
        expected |= {r.stem for _, r in recent if cutoff is None or r.end_time >= cutoff}
    if cutoff is not None and not policy.uses_gfs:
        expected |= {r.stem for r in verified if r.end_time >= cutoff}

    assert kept_stems(plan) == expected


@settings(max_examples=50)
@given(histories(), policies, nows, st.randoms(use_true_random=False))
def test_plan_does_not_depend_on_input_order(history: list[BackupRecord], policy, now, rnd) -> None:
    shuffled = list(history)
    rnd.shuffle(shuffled)

    assert plan_retention(shuffled, policy, now) == plan_retention(history, policy, now)
