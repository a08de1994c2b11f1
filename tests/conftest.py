"""Session-wide real components: PostgreSQL clusters, an S3 endpoint (moto server over HTTP) and a
Prefect API (prefect_test_harness: a real API server on SQLite, started once)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.testing.utilities import prefect_test_harness

    harness = prefect_test_harness(server_startup_timeout=120)
    harness.__enter__()
    server = SubprocessASGIServer()  # the harness's own: it registers itself as the default server
    try:
        yield
    finally:
        leave_harness(harness, server)


def leave_harness(harness: Any, server: Any, timeout: float = 60.0) -> None:
    """Leaving prefect_test_harness drains Prefect's client-side log and event workers with no time limit
    before it stops its server. Once, after a worker had run all three stack modules, that drain never
    returned and the whole `make test` hung. So they are drained here first, within `timeout`; if one is
    stuck, the harness's server is stopped here and the session goes on without the harness's drain."""
    import sys

    from tests.harness.stack import drain_prefect_clients

    stuck = drain_prefect_clients(timeout)
    if stuck:
        print(f"{', '.join(stuck)} did not drain in {timeout:.0f} s; stopping its server", file=sys.stderr)
        server.stop()
        return
    harness.__exit__(None, None, None)


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


#: The modules that start a whole stack of their own (a Prefect server, workers, the sandbox PostgreSQL).
#: Two stacks at once on 2 cores slow each other down several-fold and made timing-sensitive checks (an
#: alert delivered once) flaky, so `make test` (`pytest -n 2 --dist loadfile`) runs them one after another
#: on the first worker, in this order, while the other worker takes the rest.
STACKS = ("test_stack_e2e", "test_multiworker", "test_alerts_e2e")
#: The other modules that take longest (measured, rough): handed out first, so that the last modules
#: handed out are short ones and both workers finish at about the same time. Not a contract: a module
#: missing here is handed out after these, in collection order.
LONGEST_FIRST = (
    "test_migrate_flow",
    "test_wal_archive_check_flow",
    "test_drill_flow",
    "test_migrate_safety_flow",
    "test_alembic_guards",
    "test_base_backup",
    "test_nightly_dump_flow",
    "test_restore_flow",
    "test_restore_fallback",
    "test_reindex_flow",
    "test_dump_copies",
    "test_retention_at_scale",
    "test_stack_lifecycle",
    "test_pool_variants",
    "test_pooler",
    "test_pitr_recovery",
    "test_target_identity",
    "test_error_rule",
    "test_setup",
    "test_alembic_runner",
    "test_objectstore",
    "test_pitr_drill",
    "test_wal_chain",
)


def _stem(scope: str) -> str:
    return scope.split("::", 1)[0].rsplit("/", 1)[-1].removesuffix(".py")


@pytest.hookimpl(tryfirst=True, optionalhook=True)  # optional: pytest -p no:xdist
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """xdist's loadfile scheduling, choosing which module a worker gets next (see STACKS and LONGEST_FIRST)
    instead of taking them in queue order (which xdist sorts by test count: the few-test stack modules came
    last, overlapping each other at the end)."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class StacksOnOneWorker(LoadFileScheduling):
        def _assign_work_unit(self, node: object) -> None:
            first = node is self.nodes[0]

            def rank(scope: str) -> tuple[int, int]:
                stem = _stem(scope)
                # the first worker's, in order; another worker's only when nothing else is left
                if stem in STACKS:
                    return (0 if first else 2, STACKS.index(stem))
                return (1, LONGEST_FIRST.index(stem) if stem in LONGEST_FIRST else len(LONGEST_FIRST))

            scope = min(self.workqueue, key=rank)  # the first of equals: collection order
            work_unit = self.workqueue.pop(scope)
            self.assigned_work.setdefault(node, {})[scope] = work_unit
            collection = self.registered_collections[node]
            node.send_runtest_some(  # type: ignore[attr-defined]
                [collection.index(nodeid) for nodeid, done in work_unit.items() if not done]
            )

    return StacksOnOneWorker(config, log)
