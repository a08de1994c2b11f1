"""Reading what a flow run left behind: its failure sentence, its artifacts."""

from __future__ import annotations

import json
from typing import Any

from prefect.artifacts import Artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from prefect.client.schemas.objects import Artifact as StoredArtifact
from prefect.client.schemas.objects import State

from blocks import PostgresDatabase


def failure_message(state: State) -> str:
    """The sentence of the error a failed run ended with (what `state.result()` raises)."""
    try:
        state.result()
    except Exception as exc:  # the exception the flow ended with
        return str(exc)
    raise AssertionError(f"expected a failed run, got {state.type}")


def artifact(key: str) -> StoredArtifact:
    """The latest version of the artifact `key`, which must exist."""
    found = Artifact.get(key)
    assert isinstance(found, StoredArtifact), f"no artifact {key!r}"
    return found


def artifact_table(key: str) -> list[dict[str, Any]]:
    """The rows of the table artifact `key`."""
    data = artifact(key).data
    table = json.loads(data) if isinstance(data, str) else data
    assert isinstance(table, list), f"artifact {key!r} is not a table"
    return table


def run_logs(state: State) -> str:
    """Every log line of the flow run that ended in `state`, in order."""
    run_id = state.state_details.flow_run_id
    assert run_id is not None, "the state belongs to no flow run"
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
    return "\n".join(log.message for log in logs)


def saved_database(name: str) -> PostgresDatabase:
    """The PostgresDatabase block saved as `name` (Prefect types `load` as maybe a coroutine)."""
    block = PostgresDatabase.load(name)
    assert isinstance(block, PostgresDatabase)
    return block
