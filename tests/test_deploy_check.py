"""`dbops deploy` refuses bad configuration before anything is deployed or run, one sentence per problem."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from deployments.deploy import check_deployments
from deployments.setup import SetupReport, ensure_work_pool, set_variables
from flows.core.errors import ConfigurationError
from tests.conftest import make_database_block, make_local_block
from tests.harness.pg import PgCluster

pytestmark = pytest.mark.usefixtures("prefect_api")

ROOT = Path(__file__).resolve().parent.parent


def write_yaml(tmp_path: Path, deployments: list[dict]) -> Path:
    path = tmp_path / "prefect.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "deployments": deployments}))
    return path


def dump_deployment(unique: str, **overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": f"nightly-{unique}",
        "entrypoint": "flows/nightly_dump.py:nightly_dump",
        "work_pool": {"name": f"pool-{unique}"},
        "schedules": [{"cron": "0 2 * * *", "timezone": "UTC"}],
        "parameters": {"database": f"db-{unique}", "storage": f"local-file-system/store-{unique}"},
    }
    spec.update(overrides)
    return spec


@pytest.fixture
def configured(pg: PgCluster, tmp_path: Path, unique: str) -> str:
    make_database_block(pg, f"db-{unique}", "postgres")
    make_local_block(f"store-{unique}", tmp_path / "store")
    ensure_work_pool(f"pool-{unique}", SetupReport())
    return unique


def test_a_correct_file_has_no_problems(tmp_path: Path, configured: str) -> None:
    assert check_deployments(write_yaml(tmp_path, [dump_deployment(configured)])) == []


def test_unknown_block_is_named_with_the_fix(tmp_path: Path, configured: str) -> None:
    spec = dump_deployment(configured, parameters={"database": "nope", "storage": "s3-bucket/nope-too"})
    problems = check_deployments(write_yaml(tmp_path, [spec]))
    assert len(problems) == 2
    assert "parameter database" in problems[0]
    assert "'postgres-database/nope' does not exist" in problems[0]
    assert "dbops setup" in problems[0]
    assert "'s3-bucket/nope-too' does not exist" in problems[1]


def test_cron_that_does_not_parse_and_a_bad_time_zone_are_refused(tmp_path: Path, configured: str) -> None:
    spec = dump_deployment(
        configured,
        schedules=[{"cron": "0 25 * * *", "timezone": "UTC"}, {"cron": "0 2 * * *", "timezone": "Mars/Base"}],
    )
    problems = check_deployments(write_yaml(tmp_path, [spec]))
    assert len(problems) == 2
    assert "'0 25 * * *'" in problems[0]
    assert "does not parse" in problems[0]
    assert "'Mars/Base'" in problems[1]


def test_missing_work_pool_names_the_command_that_creates_it(tmp_path: Path, configured: str) -> None:
    spec = dump_deployment(configured, work_pool={"name": f"absent-{configured}"})
    [problem] = check_deployments(write_yaml(tmp_path, [spec]))
    assert f"work pool 'absent-{configured}' does not exist" in problem
    assert "prefect work-pool create" in problem


def test_variables_are_resolved_and_an_unset_one_is_named(tmp_path: Path, configured: str) -> None:
    templated = "{{ prefect.variables.storage_" + configured + " }}"
    spec = dump_deployment(configured, parameters={"database": f"db-{configured}", "storage": templated})
    path = write_yaml(tmp_path, [spec])
    [problem] = check_deployments(path)
    assert f"Prefect Variable 'storage_{configured}'" in problem
    assert "[variables]" in problem
    set_variables({f"storage_{configured}": f"local-file-system/store-{configured}"})
    assert check_deployments(path) == []


def test_list_backups_database_is_a_name_in_the_layout_not_a_block(tmp_path: Path, configured: str) -> None:
    spec = {
        "name": f"list-{configured}",
        "entrypoint": "flows/restore.py:list_backups",
        "work_pool": {"name": f"pool-{configured}"},
        "parameters": {"database": "imagemanager", "storage": f"local-file-system/store-{configured}"},
    }
    assert check_deployments(write_yaml(tmp_path, [spec])) == []


def test_a_file_without_deployments_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "prefect.yaml"
    path.write_text("name: empty\n")
    with pytest.raises(ConfigurationError, match="has no deployments"):
        check_deployments(path)


def test_setting_variables_twice_reports_exists(unique: str) -> None:
    first = set_variables({f"v_{unique}": "a", f"w_{unique}": {"directory": "/wal"}})
    second = set_variables({f"v_{unique}": "a", f"w_{unique}": {"directory": "/wal"}})
    assert [s for _, _, s in first.items] == ["created", "created"]
    assert [s for _, _, s in second.items] == ["exists", "exists"]
    assert not second.changed
    with pytest.raises(ConfigurationError, match="not allowed"):
        set_variables({"Bad-Name": "x"})


def test_a_paused_deployment_may_name_a_block_that_does_not_exist_yet(
    tmp_path: Path, configured: str
) -> None:
    """pgbouncer-check ships paused: an installation without PgBouncer deploys prefect.yaml as it is."""
    paused = dump_deployment(
        configured,
        parameters={"database": "no-pgbouncer-here", "storage": f"local-file-system/store-{configured}"},
        schedules=[{"cron": "*/15 * * * *", "timezone": "UTC", "active": False}],
    )
    assert check_deployments(write_yaml(tmp_path, [paused])) == []
    paused["schedules"][0]["active"] = True
    [problem] = check_deployments(write_yaml(tmp_path, [paused]))
    assert "'postgres-database/no-pgbouncer-here' does not exist" in problem


def test_a_storage_list_in_the_variable_checks_every_block_in_it(tmp_path: Path, configured: str) -> None:
    """dbops_storage may hold a primary and its copies ("a,b"): each block must exist."""
    templated = "{{ prefect.variables.storage_list_" + configured + " }}"
    spec = dump_deployment(configured, parameters={"database": f"db-{configured}", "storage": templated})
    path = write_yaml(tmp_path, [spec])
    primary = f"local-file-system/store-{configured}"
    set_variables({f"storage_list_{configured}": f"{primary}, local-file-system/copy-{configured}"})
    problems = check_deployments(path)
    assert len(problems) == 1
    assert f"'local-file-system/copy-{configured}' does not exist" in problems[0]
    make_local_block(f"copy-{configured}", tmp_path / "copy")
    assert check_deployments(path) == []


def test_a_storage_list_has_each_of_its_blocks_checked_and_copy_backups_names_no_database_block(
    tmp_path: Path, configured: str
) -> None:
    store = f"local-file-system/store-{configured}"
    spec: dict[str, Any] = {
        "name": f"copies-{configured}",
        "entrypoint": "flows/copy_backups.py:copy_backups",
        "work_pool": {"name": f"pool-{configured}"},
        "parameters": {"database": "imagemanager", "storage": f"{store}, s3-bucket/gone-{configured}"},
    }
    problems = check_deployments(write_yaml(tmp_path, [spec]))
    assert len(problems) == 1
    assert f"'s3-bucket/gone-{configured}' does not exist" in problems[0]
    spec["parameters"]["storage"] = store
    assert check_deployments(write_yaml(tmp_path, [spec])) == []
