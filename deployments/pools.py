"""The Docker and Kubernetes variants of prefect.yaml, checked without Docker or a cluster.

`prefect deploy` sends a deployment's `job_variables` to the server, which checks their types but not
their names: a typo (`memory_requst`) is accepted and silently ignored, and the flow run then starts in a
container without the memory it was meant to have, or from the wrong image. What a worker will really
start is the pool's base job template with the deployment's variables applied. This module builds exactly
that with Prefect's own code (the worker type's default template and its job configuration class, as
`prefect work-pool create --type docker|kubernetes` and the worker use them), so a test can look at the
container a flow run would get and refuse a variable the template does not know.
"""

from __future__ import annotations

import uuid
from typing import Any

from flows.core.errors import ConfigurationError

#: variant file -> the work pool type its deployments run on (the one deployment on a host pool aside)
VARIANTS: dict[str, str] = {"prefect.docker.yaml": "docker", "prefect.k8s.yaml": "kubernetes"}


def default_base_job_template(pool_type: str) -> dict[str, Any]:
    """The template `prefect work-pool get-default-base-job-template --type <pool_type>` prints.

    It comes from the installed collection's worker (prefect-docker, prefect-kubernetes: dev dependencies)
    rather than from the collections registry, so the check sees the template of the worker version this
    repository pins, whether or not the machine can reach the registry.
    """
    from prefect.workers.base import BaseWorker

    worker = BaseWorker.get_worker_class_from_type(pool_type)
    if worker is None:
        raise ConfigurationError(
            f"no Prefect worker of type {pool_type!r} is installed; they are the `pools` dependency group: "
            "`uv run --with-requirements` on `uv export --only-group pools` (tests/test_pool_variants.py)"
        )
    return worker.get_default_base_job_template()


def job_variable_problems(
    deployment: str, job_variables: dict[str, Any], template: dict[str, Any]
) -> list[str]:
    """One sentence per job variable the template does not define or whose value its schema refuses."""
    from prefect.utilities.schema_tools.validation import ValidationError, validate

    schema = template.get("variables") or {}
    known = set((schema.get("properties") or {}).keys())
    problems = [
        f"deployment {deployment}: job variable {name!r} is not in the work pool's base job template "
        f"(it would be ignored); use one of {', '.join(sorted(known))}"
        for name in job_variables
        if name not in known
    ]
    try:
        # What the server does when the deployment is created (ignore_required: a deployment sets some).
        validate(job_variables, schema, raise_on_error=True, preprocess=True, ignore_required=True)
    except ValidationError as exc:
        problems.append(f"deployment {deployment}: job variables refused by the base job template: {exc}")
    return problems


async def render_job(
    pool_type: str, template: dict[str, Any], job_variables: dict[str, Any], name: str
) -> Any:
    """The job configuration a worker of `pool_type` would start for a run of this deployment.

    The worker's own configuration class renders the template with the variables, then prepares it for a
    flow run (environment, command, and for Kubernetes the Job manifest), as `worker.submit` does.
    """
    from prefect.client.schemas.objects import FlowRun
    from prefect.workers.base import BaseWorker

    worker = BaseWorker.get_worker_class_from_type(pool_type)
    if worker is None:
        raise ConfigurationError(f"no Prefect worker of type {pool_type!r} is installed")
    config = await worker.job_configuration.from_template_and_values(template, job_variables)
    config.prepare_for_flow_run(FlowRun(flow_id=uuid.uuid4(), name=f"{name}-run"))
    return config


async def render_variants(root: str) -> dict[str, Any]:
    """Everything the variant checks need from the Docker and Kubernetes workers, as JSON: each pool type's
    default template (from the worker, and from the path `prefect work-pool get-default-base-job-template`
    takes), and the job each container deployment of each variant file would get.

    Run in an environment with the `pools` dependency group (`python -m deployments.pools ROOT`): the
    project's own environment leaves those workers out, because Prefect imports every installed
    collection in every process that loads a block.
    """
    from pathlib import Path

    import yaml
    from prefect.workers.utilities import get_default_base_job_template_for_infrastructure_type

    out: dict[str, Any] = {"templates": {}, "cli_templates": {}, "jobs": {}}
    for variant, pool_type in sorted(VARIANTS.items()):
        template = default_base_job_template(pool_type)
        out["templates"][pool_type] = template
        out["cli_templates"][pool_type] = await get_default_base_job_template_for_infrastructure_type(
            pool_type
        )
        for spec in yaml.safe_load((Path(root) / variant).read_text())["deployments"]:
            variables = spec["work_pool"].get("job_variables")
            if not variables:
                continue  # a deployment on the host process pool
            job = await render_job(pool_type, template, variables, spec["name"])
            out["jobs"][f"{pool_type}/{spec['name']}"] = job.model_dump(mode="json")
    return out


if __name__ == "__main__":  # pragma: no cover - run by tests/test_pool_variants.py in the pools environment
    import asyncio
    import json
    import sys

    print(json.dumps(asyncio.run(render_variants(sys.argv[1]))))
