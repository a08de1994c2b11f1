"""The alert settings a person writes, checked without a server (delivery: tests/test_alerts_e2e.py)."""

from __future__ import annotations

import json
import urllib.request
from datetime import timedelta
from pathlib import Path

import pytest

from deployments.alert_receiver import AlertReceiver
from deployments.alerts import base_backup_window, parse_duration
from flows.core.errors import ConfigurationError


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("26h", 93600),
        ("1h", 3600),
        ("90m", 5400),
        ("1h30m", 5400),
        ("12s", 12),
        ("2d", 172800),
        ("1d 2h", 93600),
    ],
)
def test_alert_windows_are_written_like_a_person_would(text: str, seconds: int) -> None:
    assert parse_duration(text, "w") == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "26", "h", "26 hours", "1h-5m", "26h!"])
def test_a_window_that_is_not_a_duration_is_one_sentence_naming_it(text: str) -> None:
    with pytest.raises(
        ConfigurationError, match=r"windows\.nightly-dump: .* is not a duration; write it like 26h"
    ):
        parse_duration(text, "windows.nightly-dump")


def test_base_backup_window_is_the_longest_gap_of_its_active_schedules_plus_the_margin() -> None:
    from prefect.client.schemas.objects import DeploymentSchedule
    from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule

    def item(schedule: object, active: bool = True) -> DeploymentSchedule:
        return DeploymentSchedule(schedule=schedule, active=active)

    daily = item(CronSchedule(cron="0 1 * * *"))
    weekly_paused = item(CronSchedule(cron="0 1 * * 0"), active=False)
    six_hourly = item(IntervalSchedule(interval=timedelta(hours=6)))
    # weekday nights only: the weekend gap (Friday 01:00 to Monday 01:00) is the one to wait for
    weekdays = item(CronSchedule(cron="0 1 * * 1-5"))
    margin = timedelta(hours=2)
    assert base_backup_window([daily, weekly_paused], margin) == timedelta(hours=26)
    assert base_backup_window([six_hourly], margin) == timedelta(hours=8)
    assert base_backup_window([weekdays], margin) == timedelta(days=3, hours=2)
    assert base_backup_window([weekly_paused], margin) is None
    assert base_backup_window([], margin) is None


def test_the_receiver_keeps_what_it_is_sent_even_when_it_is_not_a_webhook_payload() -> None:
    printed: list[str] = []
    with AlertReceiver(on_alert=lambda a: printed.append(a.subject)) as receiver:
        for data in (json.dumps({"subject": "s1", "body": "b1"}).encode(), b"plain text"):
            urllib.request.urlopen(urllib.request.Request(receiver.url, data=data, method="POST"), timeout=10)
        (first,) = receiver.wait_for("s1", timeout=10)
        assert first.body == "b1"
        (other,) = receiver.wait_for("not a dbops webhook payload", timeout=10)
        assert other.body == "plain text"
    assert printed == ["s1", "(not a dbops webhook payload)"]


def test_alert_windows_come_from_the_setup_config(tmp_path: Path) -> None:
    from deployments.setup import load_config

    cfg = tmp_path / "dbops.toml"
    cfg.write_text(
        'notify = "slack-webhook/dbops-alerts"\n'
        "[alerts]\n"
        'windows = { nightly-dump = "30h", restore-drill = "8d" }\n'
        'base_backup_margin = "3h"\n'
    )
    config = load_config(cfg, environ={})
    assert config.alerts.windows == {"nightly-dump": "30h", "restore-drill": "8d"}
    assert config.alerts.base_backup_margin == "3h"


def test_a_window_shorter_than_prefect_allows_is_refused_before_anything_is_asked_of_the_server() -> None:
    from deployments.alerts import AlertConfig, watched_deployments

    with pytest.raises(
        ConfigurationError, match=r"window nightly-dump: 5s is shorter than Prefect's minimum of 10s"
    ):
        watched_deployments(AlertConfig(windows={"nightly-dump": "5s"}))
