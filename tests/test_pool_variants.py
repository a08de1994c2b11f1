"""prefect.docker.yaml and prefect.k8s.yaml: the container each flow run would get, rendered without Docker.

Each deployment's job variables are applied to Prefect's default base job template for the pool type (what
`prefect work-pool get-default-base-job-template --type docker|kubernetes` prints, from the
prefect-docker / prefect-kubernetes workers) by the worker's own job configuration class, then prepared
for a flow run the way the worker does before it starts the container or the Kubernetes Job.

The workers are the `pools` dependency group of uv.lock, run once per module in an overlay environment
(`uv run --with-requirements`, `deployments/pools.py`), not installed in the project's environment:
Prefect imports every installed collection in every process that loads a block, ~2 s each for these.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from deployments.deploy import check_deployments
from deployments.pools import VARIANTS, job_variable_problems
from tests.test_flow_parameters import load_flow

pytestmark = pytest.mark.usefixtures("prefect_api")

ROOT = Path(__file__).resolve().parent.parent
MAIN = {d["name"]: d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]}
#: the one deployment that stays on the host process pool: its result is a data directory that must
#: outlive the job
ON_HOST = {"pitr-restore"}
CASES = [
    (variant, spec)
    for variant in sorted(VARIANTS)
    for spec in yaml.safe_load((ROOT / variant).read_text())["deployments"]
]
CONTAINER_CASES = [(v, s) for v, s in CASES if s["name"] not in ON_HOST]


def ids(cases: list[tuple[str, dict[str, Any]]]) -> list[str]:
    return [f"{VARIANTS[v]}-{s['name']}" for v, s in cases]


def job_variables(spec: dict[str, Any]) -> dict[str, Any]:
    return spec["work_pool"]["job_variables"]


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The templates and rendered jobs, from the real Docker and Kubernetes workers of uv.lock's `pools`
    group, in an overlay environment on top of the project's (the project's own is left as it is)."""
    from prefect.settings import PREFECT_API_URL

    uv = shutil.which("uv")
    assert uv, "uv is not on PATH; install it (pip install uv) as README says"
    requirements = tmp_path_factory.mktemp("pools") / "pools.txt"
    export = [uv, "export", "--frozen", "--only-group", "pools", "--no-hashes", "--no-emit-project"]
    subprocess.run([*export, "-o", str(requirements)], cwd=ROOT, check=True, capture_output=True, timeout=120)
    env = {
        **os.environ,
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    out = subprocess.run(
        [
            uv,
            "run",
            "--frozen",
            "--with-requirements",
            str(requirements),
            "python",
            "-m",
            "deployments.pools",
            str(ROOT),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def default_template(workers: dict[str, Any], pool_type: str) -> dict[str, Any]:
    return workers["templates"][pool_type]


def test_the_templates_are_the_ones_the_cli_prints(workers: dict[str, Any]) -> None:
    """Our template source is Prefect's `get-default-base-job-template` path, answered by the workers of the
    lock file (not the collections registry, which would need the network)."""
    for pool_type in VARIANTS.values():
        cli = workers["cli_templates"][pool_type]
        assert cli == default_template(workers, pool_type)
        assert "image" in cli["variables"]["properties"]


def test_the_project_environment_leaves_the_container_workers_out() -> None:
    """Every flow run and CLI would pay their import otherwise (Prefect loads every installed collection)."""
    import importlib.util

    assert importlib.util.find_spec("prefect_docker") is None
    assert importlib.util.find_spec("prefect_kubernetes") is None


@pytest.mark.parametrize(("variant", "spec"), CASES, ids=ids(CASES))
def test_each_deployment_is_prefect_yamls_with_only_the_pool_changed(variant: str, spec: dict) -> None:
    main = MAIN[spec["name"]]
    differs = {"work_pool", "pull"}
    assert {k: v for k, v in spec.items() if k not in differs} == {
        k: v for k, v in main.items() if k not in differs
    }
    flow = load_flow(spec["entrypoint"])
    assert set(spec.get("parameters") or {}) <= set(inspect.signature(flow.fn).parameters)
    if spec["name"] in ON_HOST:
        assert spec["work_pool"]["name"] == main["work_pool"]["name"]
        assert "pull" not in spec  # Prefect's default: the directory it was deployed from, as prefect.yaml
    else:
        assert spec["work_pool"]["name"] != main["work_pool"]["name"]
        assert spec["pull"][0]["prefect.deployments.steps.set_working_directory"]["directory"]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_deployment_of_prefect_yaml_is_in_each_variant(variant: str) -> None:
    names = [s["name"] for v, s in CASES if v == variant]
    assert names == list(MAIN)


def test_the_pull_step_is_prefects() -> None:
    from prefect.utilities.importtools import import_object

    [step] = {next(iter(s["pull"][0])) for _, s in CONTAINER_CASES}
    assert callable(import_object(step))


@pytest.mark.parametrize(("variant", "spec"), CONTAINER_CASES, ids=ids(CONTAINER_CASES))
def test_every_job_variable_is_one_the_template_defines(variant: str, spec: dict, workers: dict) -> None:
    template = default_template(workers, VARIANTS[variant])
    assert job_variable_problems(spec["name"], job_variables(spec), template) == []


@pytest.mark.parametrize(
    ("pool_type", "typo", "says"),
    [
        ("kubernetes", {"memory_requst": "512Mi"}, "'memory_requst' is not in the work pool's base job"),
        ("docker", {"imagee": "dbops-worker:pg15"}, "'imagee' is not in the work pool's base job template"),
        ("docker", {"image_pull_policy": "Sometimes"}, "refused by the base job template"),
    ],
)
def test_a_misspelt_or_invalid_job_variable_is_named(
    pool_type: str, typo: dict, says: str, workers: dict
) -> None:
    [problem] = job_variable_problems("nightly-dump", typo, default_template(workers, pool_type))
    assert "deployment nightly-dump" in problem
    assert says in problem


@pytest.mark.parametrize(("variant", "spec"), [c for c in CONTAINER_CASES if VARIANTS[c[0]] == "docker"])
def test_docker_container_of_each_deployment(variant: str, spec: dict, workers: dict) -> None:
    job = workers["jobs"][f"docker/{spec['name']}"]
    assert job["image"] == "dbops-worker:pg15"
    assert job["image_pull_policy"] == "IfNotPresent"
    assert job["command"] == "prefect flow-run execute"
    assert job["env"]["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert job["env"]["PREFECT_HOME"] == "/home/dbops/.prefect"  # the image user's, not the worker host's
    assert job["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30"  # what crash detection counts on
    assert job["env"]["PREFECT__FLOW_RUN_ID"]
    assert job["mem_limit"] == "1g"
    assert job["auto_remove"] is True


@pytest.mark.parametrize(("variant", "spec"), [c for c in CONTAINER_CASES if VARIANTS[c[0]] == "kubernetes"])
def test_kubernetes_job_of_each_deployment(variant: str, spec: dict, workers: dict) -> None:
    manifest = workers["jobs"][f"kubernetes/{spec['name']}"]["job_manifest"]
    assert manifest["kind"] == "Job"
    assert manifest["metadata"]["namespace"] == "dbops"
    assert manifest["spec"]["backoffLimit"] == 0
    [container] = manifest["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "dbops-worker:pg15"
    assert container["imagePullPolicy"] == "IfNotPresent"
    assert container["args"] == ["prefect", "flow-run", "execute"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert env["PREFECT_HOME"] == "/home/dbops/.prefect"
    assert env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30"
    assert env["PREFECT__FLOW_RUN_ID"]
    # backoff_limit 0: an evicted pod's run is rescheduled by Prefect rather than retried by the Job
    assert env["PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR"] == "reschedule"
    assert container["resources"] == {
        "requests": {"cpu": "1", "memory": "512Mi"},
        "limits": {"memory": "1Gi"},
    }


def test_dbops_deploy_refuses_a_job_variable_the_servers_pool_does_not_define(
    tmp_path: Path, unique: str, workers: dict
) -> None:
    """The same check against the work pool as it is on the server, before anything is deployed."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    pool = f"k8s-{unique}"
    with get_client(sync_client=True) as client:
        client.create_work_pool(
            WorkPoolCreate(
                name=pool, type="kubernetes", base_job_template=default_template(workers, "kubernetes")
            )
        )
    spec: dict[str, Any] = {
        "name": f"health-{unique}",
        "entrypoint": "flows/db_health.py:db_health",
        "work_pool": {"name": pool, "job_variables": {"image": "dbops-worker:pg15", "cpu_requests": "1"}},
        "schedules": [{"cron": "7 * * * *", "timezone": "UTC", "active": False}],
        "parameters": {"database": "not-created-yet"},
    }
    path = tmp_path / "prefect.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "deployments": [spec]}))
    [problem] = check_deployments(path)
    assert f"deployment health-{unique}: job variable 'cpu_requests' is not in" in problem
    spec["work_pool"]["job_variables"] = {"image": "dbops-worker:pg15", "cpu_request": "1"}
    path.write_text(yaml.safe_dump({"name": "t", "deployments": [spec]}))
    assert check_deployments(path) == []


def test_a_missing_container_pool_is_named_with_its_type(tmp_path: Path, unique: str) -> None:
    spec = yaml.safe_load((ROOT / "prefect.k8s.yaml").read_text())["deployments"][0]
    spec["work_pool"] = {**spec["work_pool"], "name": f"absent-{unique}"}
    spec["parameters"] = {}
    path = tmp_path / "prefect.k8s.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "deployments": [spec]}))
    [problem] = check_deployments(path)
    assert f"`prefect work-pool create absent-{unique} --type kubernetes`" in problem


def test_prefect_deploy_takes_both_variant_files(tmp_path: Path, unique: str, workers: dict) -> None:
    """`prefect deploy --all --prefect-file` (Prefect's own CLI, against the test API) on both variants: the
    server stores each deployment's pool, job variables (which it validates against the pool's template)
    and pull steps as the files say, and pitr-restore gets Prefect's default pull step on the host pool.

    One combined file (names and pools made unique, templated parameters given plain values so no
    Prefect Variable of other tests is touched): one CLI start for both. Two deployments of each variant,
    one on the container pool and the one on the host pool, keep it short: the others are the same YAML
    (the tests above compare every one of them with prefect.yaml)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.settings import PREFECT_API_URL

    from deployments.deploy import prefect_bin

    host_pool = f"host-{unique}"
    combined: list[dict[str, Any]] = []
    expected: dict[str, dict[str, Any]] = {}
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=host_pool, type="process"))
        for variant, pool_type in sorted(VARIANTS.items()):
            pool = f"{pool_type}-{unique}"
            client.create_work_pool(
                WorkPoolCreate(
                    name=pool, type=pool_type, base_job_template=default_template(workers, pool_type)
                )
            )
            for spec in yaml.safe_load((ROOT / variant).read_text())["deployments"]:
                if spec["name"] not in {"nightly-dump", *ON_HOST}:
                    continue
                spec = dict(spec)
                on_host = spec["name"] in ON_HOST
                spec["name"] = f"{spec['name']}-{pool_type}-{unique}"
                spec["work_pool"] = {**spec["work_pool"], "name": host_pool if on_host else pool}
                spec["parameters"] = {
                    k: ({"directory": "/nowhere"} if k == "archive" else "local-file-system/x")
                    if "{{" in str(v)
                    else v
                    for k, v in (spec.get("parameters") or {}).items()
                }
                combined.append(spec)
                expected[spec["name"]] = spec
    path = tmp_path / "prefect.variants.yaml"
    path.write_text(yaml.safe_dump({"name": "dbops", "prefect-version": "3.8.8", "deployments": combined}))
    env = {
        **os.environ,
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    out = subprocess.run(
        [prefect_bin(), "--no-prompt", "deploy", "--all", "--prefect-file", str(path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    with get_client(sync_client=True) as client:
        stored = client.read_deployments(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=list(expected)))
        )
    assert sorted(d.name for d in stored) == sorted(expected)
    for deployment in stored:
        spec = expected[deployment.name]
        assert deployment.work_pool_name == spec["work_pool"]["name"], deployment.name
        assert deployment.job_variables == (spec["work_pool"].get("job_variables") or {}), deployment.name
        if spec["work_pool"]["name"] == host_pool:
            assert deployment.pull_steps == [
                {"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}
            ]
        else:
            assert deployment.pull_steps == spec["pull"], deployment.name
        assert deployment.entrypoint == spec["entrypoint"]
