"""Session-wide real components: PostgreSQL clusters, an S3 endpoint (moto server over HTTP) and a
Prefect API (prefect_test_harness: a real API server on SQLite, started once)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DBOPS_RETRY_BACKOFF", "0.2")
os.environ.setdefault("DBOPS_TASK_RETRIES", "2")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
# The test API server runs only the services tests rely on (event persister, task run recorder, pause
# expirations). The scheduler, late runs, foreman, repossessor, cleanups and automation triggers watch
# for things no test waits on, and on 2 cores every loop they run is taken from the tests.
for _service in (
    "SCHEDULER",
    "LATE_RUNS",
    "FOREMAN",
    "REPOSSESSOR",
    "CANCELLATION_CLEANUP",
    "CLEANUP_RECONCILER",
    "TRIGGERS",
):
    os.environ.setdefault(f"PREFECT_SERVER_SERVICES_{_service}_ENABLED", "false")

from tests.harness.pg import PgCluster, pg_cluster  # noqa: E402
from tests.harness.s3 import ACCESS_KEY, REGION, SECRET_KEY, S3Endpoint, s3_endpoint  # noqa: E402


@pytest.fixture(scope="session")
def pg() -> Iterator[PgCluster]:
    """A shared cluster; tests create their own databases in it so they stay independent."""
    with pg_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Endpoint]:
    with s3_endpoint() as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def unique() -> str:
    return secrets.token_hex(4)


@pytest.fixture
def bucket(s3: S3Endpoint, unique: str) -> str:
    return s3.create_bucket(f"backups-{unique}")


@pytest.fixture
def source(pg: PgCluster, unique: str) -> tuple[str, str]:
    """(block name, database name) of a sample database to back up (the dump, restore and drill flows)."""
    from tests.harness.factories import sample_database

    name = sample_database(pg, f"src_{unique}")
    return make_database_block(pg, f"src-{unique}", name), name


@pytest.fixture
def storage(s3: S3Endpoint, bucket: str, unique: str) -> str:
    """The S3 storage block the dumps go to: a fresh bucket, under the folder dbops/."""
    return make_s3_block(s3, f"s3-{unique}", bucket, folder="dbops")


def make_database_block(pg: PgCluster, name: str, dbname: str, **fields: object) -> str:
    from blocks import PostgresDatabase

    PostgresDatabase(
        host=pg.host, port=pg.port, database=dbname, user=pg.superuser, password=pg.password, **fields
    ).save(name, overwrite=True)
    return name


def make_s3_block(s3: S3Endpoint, name: str, bucket: str, folder: str = "") -> str:
    from prefect_aws import AwsCredentials, S3Bucket
    from prefect_aws.client_parameters import AwsClientParameters

    creds = AwsCredentials(
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name=REGION,
        aws_client_parameters=AwsClientParameters(endpoint_url=s3.url),
    )
    S3Bucket(bucket_name=bucket, credentials=creds, bucket_folder=folder).save(name, overwrite=True)
    return f"s3-bucket/{name}"


def make_local_block(name: str, path: Path) -> str:
    from prefect.filesystems import LocalFileSystem

    path.mkdir(parents=True, exist_ok=True)
    LocalFileSystem(basepath=str(path)).save(name, overwrite=True)
    return f"local-file-system/{name}"


#: The modules that start a whole stack of their own (a Prefect server, workers, the sandbox PostgreSQL)
#: and the longest other one. `make test` (`pytest -n 2 --dist loadfile`) hands modules out in collection
#: order as workers free up: collected alphabetically, the longest (test_stack_e2e) would start last and run
#: alone at the end, and two stacks at once on 2 cores slow each other down several-fold. So the e2e stack
#: starts first on one worker while the other runs the long retention test and the short modules; the
#: multiworker stack is handed out about when e2e ends (after test_drill_flow), the alerts stack about when
#: that one ends (after test_migrate_flow). The anchors are rough (measured module times), not a contract.
FIRST = ("test_stack_e2e", "test_retention_at_scale")
AFTER = {"test_drill_flow": "test_multiworker", "test_migrate_flow": "test_alerts_e2e"}


def _module(item: pytest.Item) -> str:
    return item.nodeid.split("::", 1)[0].rsplit("/", 1)[-1].removesuffix(".py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    placed = {*FIRST, *AFTER.values()}
    order: list[str] = list(FIRST)
    for module in dict.fromkeys(_module(item) for item in items):
        if module in placed:
            continue
        order.append(module)
        if module in AFTER:
            order.append(AFTER[module])
    order.extend(m for m in AFTER.values() if m not in order)  # an anchor that was not collected
    position = {module: n for n, module in enumerate(order)}
    items.sort(key=lambda item: position.get(_module(item), len(order)))  # stable within a module
