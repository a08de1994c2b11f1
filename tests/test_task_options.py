"""Every dbops task is declared through one decorator (flows.tasks.common.dbops_task): no result cache,
and retries for transient errors only, except the steps that must never run twice on their own."""

from __future__ import annotations

import importlib
import os
import pkgutil

from prefect import Task
from prefect.cache_policies import NONE

import flows.tasks
from flows.tasks.common import retry_if_transient

# A retried migration step could apply a revision twice; a retried check could hide a flaky restore.
# A retried replay would start a second server on a data directory the first one already recovered; a
# retried canary would write a second token and restore point on production; the PITR drill's checks, like
# the restore drill's, must not hide a flaky copy. Confirming a base backup's WAL already waits its whole
# timeout; a retry would only double the wait before the run fails naming the missing segment. The
# health flow's VACUUM reports a table another session locks instead of waiting: the next hourly run
# tries again, so a retry here would only hold the db: slot longer.
NEVER_RETRIED = {
    "vacuum_flagged_tables",
    "confirm_wal_archived",
    "upgrade_database",
    "downgrade_database",
    "check_restored_database",
    "replay_to_target",
    "write_drill_canary",
    "check_recovered_copy",
}


def all_tasks() -> dict[str, Task]:
    found: dict[str, Task] = {}
    for info in pkgutil.iter_modules(flows.tasks.__path__):
        module = importlib.import_module(f"flows.tasks.{info.name}")
        for value in vars(module).values():
            if isinstance(value, Task) and value.fn.__module__ == module.__name__:
                found[value.name] = value
    return found


def test_no_task_result_is_cached_between_runs() -> None:
    tasks = all_tasks()
    assert len(tasks) >= 40
    assert [name for name, t in tasks.items() if t.cache_policy is not NONE] == []


def test_migration_steps_and_restored_database_checks_are_never_retried() -> None:
    tasks = all_tasks()
    assert tasks.keys() >= NEVER_RETRIED
    assert {name: tasks[name].retries for name in NEVER_RETRIED} == dict.fromkeys(NEVER_RETRIED, 0)


def test_every_other_task_retries_transient_errors_only() -> None:
    retries = int(os.environ["DBOPS_TASK_RETRIES"])  # tests/conftest.py sets it before any import
    for name, t in all_tasks().items():
        if name in NEVER_RETRIED:
            continue
        assert (t.retries, t.retry_condition_fn) == (retries, retry_if_transient), name
