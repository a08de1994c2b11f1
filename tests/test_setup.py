"""`dbops setup` against a real Prefect API: idempotent, secrets kept secret, bad config refused early."""

from __future__ import annotations

from pathlib import Path

import pytest
from prefect.client.orchestration import get_client

from deployments.setup import AUTOMATION_NAME, load_config, run_setup
from flows.core.errors import ConfigurationError
from tests.harness.pg import PgCluster
from tests.harness.s3 import S3Endpoint

pytestmark = pytest.mark.usefixtures("prefect_api")


def write_config(
    tmp_path: Path, pg: PgCluster, s3: S3Endpoint, unique: str, notify: str | None = None
) -> Path:
    cfg = tmp_path / "dbops.toml"
    cfg.write_text(
        f"""
work_pool = "dbops-{unique}"
{f'notify = "{notify}"' if notify else ""}

[databases.prod-{unique}]
url = "postgresql://postgres@{pg.host}:{pg.port}/postgres"
password_env = "PROD_PASSWORD_{unique}"
protected = true

[storage.backups-{unique}]
type = "s3"
bucket = "b-{unique}"
endpoint_url = "{s3.url}"
region = "us-east-1"
access_key_id_env = "KEY_{unique}"
secret_access_key_env = "SECRET_{unique}"

[storage.local-{unique}]
type = "local"
path = "{tmp_path / "backups"}"
"""
    )
    return cfg


def env_for(pg: PgCluster, unique: str) -> dict[str, str]:
    return {f"PROD_PASSWORD_{unique}": pg.password, f"KEY_{unique}": "k", f"SECRET_{unique}": "s"}


def test_setup_twice_creates_then_reports_everything_existing(
    tmp_path: Path, pg: PgCluster, s3: S3Endpoint, unique: str
) -> None:
    from blocks import PostgresDatabase

    config = load_config(write_config(tmp_path, pg, s3, unique), environ={})
    first = run_setup(config, environ=env_for(pg, unique))
    created = {name for kind, name, status in first.items if status == "created"}
    assert {
        f"postgres-database/prod-{unique}",
        f"s3-bucket/backups-{unique}",
        f"local-file-system/local-{unique}",
        f"dbops-{unique}",
    } <= created
    # the limit the flows take: named after the server's identity and the database, not the block
    sysid = pg.sql("SELECT system_identifier FROM pg_control_system()")[0][0]
    limit = f"db:{sysid}:postgres"
    # "exists" when another test's block for the same database created it: one database, one limit
    limits = {(name, status) for kind, name, status in first.items if kind == "concurrency limit"}
    assert limits & {(limit, "created"), (limit, "exists")}
    second = run_setup(config, environ=env_for(pg, unique))
    assert not second.changed, second.render()
    block = PostgresDatabase.load(f"prod-{unique}")
    assert block.protected and block.password.get_secret_value() == pg.password
    assert pg.password not in first.render() + second.render()
    with get_client(sync_client=True) as client:
        assert client.read_work_pool(f"dbops-{unique}").type == "process"
        assert client.read_global_concurrency_limit_by_name(limit).limit == 1


def test_changed_password_updates_the_block(
    tmp_path: Path, pg: PgCluster, s3: S3Endpoint, unique: str
) -> None:
    config = load_config(write_config(tmp_path, pg, s3, unique), environ={})
    run_setup(config, environ=env_for(pg, unique))
    again = run_setup(config, environ={**env_for(pg, unique), f"PROD_PASSWORD_{unique}": "rotated"})
    assert ("block", f"postgres-database/prod-{unique}", "updated") in again.items


def test_missing_password_variable_fails_before_anything_is_created(
    tmp_path: Path, pg: PgCluster, s3: S3Endpoint, unique: str
) -> None:
    config = load_config(write_config(tmp_path, pg, s3, unique), environ={})
    with pytest.raises(ConfigurationError, match=f"PROD_PASSWORD_{unique} is not set"):
        run_setup(config, environ={})
    with get_client(sync_client=True) as client:
        from prefect.exceptions import ObjectNotFound

        with pytest.raises(ObjectNotFound):
            client.read_work_pool(f"dbops-{unique}")


def test_notification_automation_is_created_once(
    tmp_path: Path, pg: PgCluster, s3: S3Endpoint, unique: str
) -> None:
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    CustomWebhookNotificationBlock(name="hook", url="http://127.0.0.1:9/hook").save(f"alerts-{unique}")
    notify = f"custom-webhook/alerts-{unique}"
    config = load_config(write_config(tmp_path, pg, s3, unique, notify=notify), environ={})
    first = run_setup(config, environ=env_for(pg, unique))
    second = run_setup(config, environ=env_for(pg, unique))
    assert ("automation", AUTOMATION_NAME, "created") in first.items
    assert ("automation", AUTOMATION_NAME, "exists") in second.items
    with get_client(sync_client=True) as client:
        automations = client.read_automations_by_name(AUTOMATION_NAME)
    assert len(automations) == 1
    trigger = automations[0].trigger
    assert trigger.expect == {"prefect.flow-run.Failed", "prefect.flow-run.Crashed"}


def test_a_database_setup_cannot_reach_gets_no_limit_and_the_report_says_why(unique: str) -> None:
    from tests.harness.pg import free_port

    config = load_config(
        None, environ={f"DBOPS_DATABASE_GONE_{unique.upper()}": f"postgresql://u:p@127.0.0.1:{free_port()}/x"}
    )
    report = run_setup(config, environ={})
    (item,) = [(name, status) for kind, name, status in report.items if kind == "concurrency limit"]
    assert item[1] == "not created" and item[0].startswith(f"for gone-{unique} (cannot connect")
    assert "p@" not in report.render()


def test_environment_urls_become_blocks(unique: str) -> None:
    config = load_config(
        None,
        environ={
            f"DBOPS_DATABASE_STAGING_{unique.upper()}": "postgresql://app:pw@db2/imagemanager",
            "DBOPS_STORAGE_NIGHTLY": "s3://bucket/folder",
        },
    )
    assert config.databases[f"staging-{unique}"].url.endswith("@db2/imagemanager")
    assert config.storage["nightly"].bucket == "bucket" and config.storage["nightly"].folder == "folder"


def test_invalid_toml_is_one_sentence(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("work_pool = ")
    with pytest.raises(ConfigurationError, match="is not valid TOML"):
        load_config(bad, environ={})
