"""`dbops migrate`: the pre-deploy trigger's exit codes against a real Prefect API and a real migrate
deployment, whose runs a small in-process worker (below) executes with Prefect's own flow engine."""

from __future__ import annotations

import argparse
import threading
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter
from prefect.deployments.runner import RunnerDeployment
from prefect.flow_engine import run_flow
from prefect.settings import PREFECT_API_URL, temporary_settings

from deployments.migrate_cli import register
from flows.migrate import migrate
from tests.harness.migrate_env import MIGRATE_APP, Env, env_fixture  # noqa: F401 - the env fixture
from tests.harness.pg import free_port, wait_until
from tests.harness.runs import artifact_table

REPO_ROOT = Path(__file__).resolve().parents[1]


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dbops")
    register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["migrate", *argv])


def run_cli(*argv: str) -> int:
    args = parse(*argv)
    return int(args.func(args))


def test_arguments_and_defaults() -> None:
    args = parse("--param", "dry_run=true", "--param", "target=0002_x", "--wait", "--timeout", "60")
    assert args.deployment == "migrate/migrate"
    assert args.wait
    assert args.timeout == 60.0
    assert args.param == ["dry_run=true", "target=0002_x"]
    assert args.tag == []


def test_bad_param_starts_nothing_and_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("--param", "no-equals-sign") == 1
    assert "is not KEY=VALUE" in capsys.readouterr().err


def test_unreachable_api_exits_3(capsys: pytest.CaptureFixture[str]) -> None:
    with temporary_settings({PREFECT_API_URL: f"http://127.0.0.1:{free_port()}/api"}):
        assert run_cli("--wait", "--timeout", "5") == 3
    assert "cannot reach the Prefect API" in capsys.readouterr().out


@pytest.mark.usefixtures("prefect_api")
def test_missing_deployment_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("--deployment", "migrate/no-such-deployment", "--wait") == 1
    assert "does not exist" in capsys.readouterr().out


def deploy(name: str) -> UUID:
    """The migrate flow as deployment `name` of this API; its id."""
    deployment = migrate.to_deployment(name=name)
    assert isinstance(deployment, RunnerDeployment)  # to_deployment is sync outside an event loop
    deployment_id = deployment.apply()
    assert isinstance(deployment_id, UUID)
    return deployment_id


def _worker(deployment_id: Any, box: dict[str, Any]) -> threading.Thread:
    """Run the deployment's next flow run in this process, as a worker would (Scheduled → Running → ...)."""

    def scheduled() -> list:
        with get_client(sync_client=True) as client:
            return client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
                flow_run_filter=FlowRunFilter(),
            )

    def work() -> None:
        found: list = []

        def picked_one() -> bool:
            found.extend(scheduled())
            return bool(found)

        wait_until(picked_one, timeout=60, what="a flow run to pick up")
        flow_run = found[0]
        box["state"] = run_flow(
            migrate, flow_run=flow_run, parameters=flow_run.parameters, return_type="state"
        )

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread


@pytest.mark.usefixtures("prefect_api")
@pytest.mark.parametrize("outcome", ["completed", "failed"])
def test_exit_code_follows_the_final_state_of_the_run(
    env: Env,
    unique: str,
    outcome: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    name = f"migrate-{outcome}-{unique}"
    deployment_id = deploy(name)
    box: dict[str, Any] = {}
    worker = _worker(deployment_id, box)
    target = "head" if outcome == "completed" else "0099_not_in_the_tree"
    params = [
        f"database={env.prod_block}",
        f"staging_database={env.staging_block}",
        f"storage={env.storage}",
        f"alembic={MIGRATE_APP}",
        f"target={target}",
        "dry_run=true",
    ]
    argv = ["--deployment", f"migrate/{name}", "--wait", "--timeout", "120", "--poll-interval", "0.2"]
    code = run_cli(*argv, *[a for p in params for a in ("--param", p)])
    worker.join(timeout=60)
    out = capsys.readouterr().out
    if outcome == "completed":
        assert code == 0, out
        assert "ended Completed: dry run: would apply 0002_nickname, 0003_email_unique" in out
        table = artifact_table(f"migrate-{env.prod}".replace("_", "-"))
        assert {r["item"]: r["value"] for r in table}["trigger"] == "api"  # the tag dbops migrate sets
    else:
        assert code == 1, out
        assert "ended Failed" in out
        assert "0099_not_in_the_tree" in out
        # The run's sentence, its page and the exit code; the traceback only with --verbose.
        assert "Traceback" not in out, out
        assert "/runs/flow-run/" in out
        assert out.rstrip().endswith("exit code 1 (the run did not complete)")
    assert box["state"].is_completed() == (outcome == "completed")


@pytest.mark.usefixtures("prefect_api")
def test_timeout_exits_2_and_leaves_the_run_alone(unique: str, capsys: pytest.CaptureFixture[str]) -> None:
    name = f"migrate-nobody-runs-it-{unique}"
    deploy(name)  # no worker: the run stays Scheduled
    argv = ["--deployment", f"migrate/{name}", "--wait", "--timeout", "0.5", "--poll-interval", "0.1"]
    # the server checks the parameters against the flow's schema: nothing starts without the required ones
    assert run_cli(*argv) == 1
    said = capsys.readouterr()
    assert "'database' is a required property" in said.out + said.err
    required = ["database=prod", "staging_database=staging", "storage=local-file-system/x"]
    code = run_cli(*argv, *[a for p in required for a in ("--param", p)])
    out = capsys.readouterr().out
    assert code == 2, out
    assert "it was not cancelled" in out, out
