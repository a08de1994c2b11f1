"""The parameters of every deployed flow: what the Prefect UI form shows and what a deployment run gets."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml
from pydantic.fields import FieldInfo

ROOT = Path(__file__).resolve().parent.parent
DEPLOYMENTS = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]


def load_flow(entrypoint: str):
    path, name = entrypoint.split(":")
    return getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), name)


@pytest.mark.parametrize("spec", DEPLOYMENTS, ids=[d["name"] for d in DEPLOYMENTS])
def test_every_parameter_has_a_description_in_the_ui_form(spec: dict) -> None:
    from prefect.utilities.callables import parameter_schema

    schema = parameter_schema(load_flow(spec["entrypoint"]).fn)
    assert schema.properties
    assert [k for k, v in schema.properties.items() if not v.get("description")] == []


@pytest.mark.parametrize("spec", DEPLOYMENTS, ids=[d["name"] for d in DEPLOYMENTS])
def test_a_deployment_run_that_omits_parameters_gets_real_defaults(spec: dict) -> None:
    # A `param: T = Field(default, ...)` signature hands the flow a FieldInfo object for every parameter
    # the run does not set; the flow would then compare numbers with FieldInfo at 03:00.
    flow = load_flow(spec["entrypoint"])
    given = {
        k: ({"directory": "/wal"} if k == "archive" else "x") if "{{" in str(v) else v
        for k, v in (spec.get("parameters") or {}).items()
    }
    validated = flow.validate_parameters(given)
    assert [k for k, v in validated.items() if isinstance(v, FieldInfo)] == []
