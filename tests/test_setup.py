"""`dbops setup` against a real Prefect API: idempotent, secrets kept secret, bad config refused early."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from prefect.automations import EventTrigger
from prefect.client.orchestration import get_client

from deployments.crash_detection import CRASH_AUTOMATION
from deployments.setup import AUTOMATION_NAME, load_config, run_setup
from flows.core.errors import ConfigurationError
from tests.harness.pg import PgCluster
from tests.harness.runs import saved_database
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
    # a run whose host is lost is marked Crashed (other tests' setups may have created it first)
    crash = {(kind, status) for kind, name, status in first.items if name == CRASH_AUTOMATION}
    assert crash & {("automation", "created"), ("automation", "exists")}
    second = run_setup(config, environ=env_for(pg, unique))
    assert not second.changed, second.render()
    block = saved_database(f"prod-{unique}")
    assert block.protected
    assert block.password is not None
    assert block.password.get_secret_value() == pg.password
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
    assert isinstance(trigger, EventTrigger)
    assert trigger.expect == {"prefect.flow-run.Failed", "prefect.flow-run.Crashed"}


def test_a_database_setup_cannot_reach_gets_no_limit_and_the_report_says_why(unique: str) -> None:
    from tests.harness.pg import free_port

    config = load_config(
        None, environ={f"DBOPS_DATABASE_GONE_{unique.upper()}": f"postgresql://u:p@127.0.0.1:{free_port()}/x"}
    )
    report = run_setup(config, environ={})
    (item,) = [(name, status) for kind, name, status in report.items if kind == "concurrency limit"]
    assert item[1] == "not created"
    assert item[0].startswith(f"for gone-{unique} (cannot connect")
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
    assert config.storage["nightly"].bucket == "bucket"
    assert config.storage["nightly"].folder == "folder"


def test_invalid_toml_is_one_sentence(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("work_pool = ")
    with pytest.raises(ConfigurationError, match="is not valid TOML"):
        load_config(bad, environ={})


# -- no password in any error, whatever the input ---------------------------------------------------------

PASSWORD = "S3cr3tPw"

MALFORMED_URLS = [
    f"postgresql://u:{PASSWORD}@h:notaport/db",  # int() of the port
    f"postgresql://u:{PASSWORD}@[h/db",  # libpq: unterminated IPv6 bracket, quotes the whole URI
    f"postgresql://u:{PASSWORD}@h/db?sslmode=bogus",  # pydantic: not one of the sslmodes
    f"postgresql://u:{PASSWORD}%zz@h/db",  # libpq: bad percent-escape, quotes the token
    f"postgresql://u:{PASSWORD}@h/db?sslmode",  # libpq: query parameter without "="
    f"postgresql://u:{PASSWORD}@h:99999/db",  # pydantic: port out of range
    f"postgresql://u:{PASSWORD}@h/db?connect_timeout=soon",  # int() of connect_timeout
    f"postgresql://u:{PASSWORD}@h/db?nonsense=1",  # libpq: unknown URI parameter
    f"http://u:{PASSWORD}@h/db",  # libpq: not a URI it knows, quotes it as conninfo
    f"host=h password={PASSWORD} port=x",  # conninfo form, bad port
    f"host=h password='{PASSWORD}",  # conninfo form, unterminated quote
    f"host=h {PASSWORD}=x",  # conninfo form, the password where an option name goes
]


@pytest.mark.parametrize("url", MALFORMED_URLS)
def test_malformed_database_url_fails_naming_the_field_never_the_password(url: str) -> None:
    from blocks import PostgresDatabase

    config = load_config(None, environ={"DBOPS_DATABASE_PROD": url})
    with pytest.raises(ConfigurationError) as info:
        run_setup(config, environ={})
    message = str(info.value)
    assert message.startswith("database prod: "), message
    assert PASSWORD not in message, message
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__  # no chained libpq/pydantic text
    with pytest.raises(ConfigurationError) as direct:
        PostgresDatabase.from_url(url)
    assert PASSWORD not in str(direct.value)


def test_bad_port_names_the_port_and_bad_sslmode_names_sslmode() -> None:
    from blocks import PostgresDatabase

    with pytest.raises(ConfigurationError, match="the port in the database URL is not a number"):
        PostgresDatabase.from_url(f"postgresql://u:{PASSWORD}@h:notaport/db")
    with pytest.raises(ConfigurationError, match="sslmode: Input should be 'disable'"):
        PostgresDatabase.from_url(f"postgresql://u:{PASSWORD}@h/db?sslmode=bogus")
    block = PostgresDatabase.from_url(f"postgresql://u:{PASSWORD}@h:6543/db?sslmode=verify-full")
    assert block.password is not None
    assert (block.port, block.sslmode, block.password.get_secret_value()) == (6543, "verify-full", PASSWORD)


def test_database_url_written_where_a_table_belongs_is_refused_without_echoing_it(tmp_path: Path) -> None:
    cfg = tmp_path / "dbops.toml"
    cfg.write_text(f'[databases]\nprod = "postgresql://u:{PASSWORD}@h/db"\n')
    with pytest.raises(ConfigurationError) as info:
        load_config(cfg, environ={})
    assert "databases.prod" in str(info.value)
    assert PASSWORD not in str(info.value)


def test_storage_url_with_a_credential_is_refused_without_echoing_it() -> None:
    with pytest.raises(ConfigurationError) as info:
        load_config(None, environ={"DBOPS_STORAGE_NIGHTLY": f"https://key:{PASSWORD}@minio/bucket"})
    assert "DBOPS_STORAGE_NIGHTLY" in str(info.value)
    assert PASSWORD not in str(info.value)


@pytest.mark.parametrize("url", [MALFORMED_URLS[0], MALFORMED_URLS[1], MALFORMED_URLS[3]])
def test_dbops_setup_cli_never_prints_the_password_of_a_malformed_url(
    url: str, tmp_path: Path, prefect_api: None
) -> None:
    """The real command line, in its own process: what a person or a CI log sees (with a server to talk
    to, so it gets as far as reading the config)."""
    from prefect.settings import get_current_settings

    env = {
        **os.environ,
        "DBOPS_DATABASE_PROD": url,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_API_URL": str(get_current_settings().api.url),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "deployments.cli", "setup"],
        cwd=Path(__file__).resolve().parent.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert "dbops: database prod: " in proc.stderr
    assert PASSWORD not in proc.stdout + proc.stderr


@pytest.mark.usefixtures("prefect_api")
def test_a_changed_crash_detection_window_updates_the_automation_in_place() -> None:
    """The update path of ensure_automation (a window changed between two setups), not only create."""
    from deployments.crash_detection import ensure_crash_detection

    ensure_crash_detection(600)
    assert ensure_crash_detection(600) == "exists"
    assert ensure_crash_detection(900) == "updated"
    with get_client(sync_client=True) as client:
        [automation] = client.read_automations_by_name(CRASH_AUTOMATION)
    assert isinstance(automation.trigger, EventTrigger)
    assert automation.trigger.within.total_seconds() == 900
    ensure_crash_detection(600)  # as the other tests of this session expect it
