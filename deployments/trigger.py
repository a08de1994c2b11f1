"""Trigger-and-wait for deploy pipelines: start a deployment through the Prefect API, follow its state and
logs, and turn the final state into an exit code a pipeline can gate on.

    0  the run Completed           2  still running when --timeout expired (the run is NOT cancelled:
    1  it ended in any other state    a migration half-way through must finish or fail on its own)
    3  the Prefect API cannot be reached (nothing was started)
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

from flows.core.errors import ConfigurationError

EXIT_COMPLETED = 0
EXIT_FAILED = 1
EXIT_TIMEOUT = 2
EXIT_UNREACHABLE = 3


def parse_params(pairs: Iterable[str]) -> dict[str, Any]:
    """`k=v` pairs; a value that parses as JSON is taken as JSON (numbers, true/false, objects)."""
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigurationError(f"parameter {pair!r} is not KEY=VALUE")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


def brief_log(message: str) -> str:
    """One line for a log message: a traceback becomes its first line and the exception it ended with
    (`--verbose` prints the whole of it)."""
    lines = [line for line in message.splitlines() if line.strip()]
    if not lines:
        return ""
    if len(lines) == 1:
        return lines[0]
    if any(line.startswith("Traceback (most recent call last)") for line in lines):
        head = lines[0].rstrip(": ")
        return f"{head}: {lines[-1].strip()}" if head != lines[-1] else head
    return " ".join(line.strip() for line in lines)


_WRAPPED = re.compile(r"^(Flow run|Task run) encountered an exception: [\w.]+: ")


def final_sentence(message: str | None) -> str:
    """The run's own sentence, without Prefect's 'Flow run encountered an exception: XError:' wrapper."""
    return _WRAPPED.sub("", (message or "").strip())


def flow_run_url(flow_run_id: object) -> str:
    """The run's page in the Prefect UI (PREFECT_UI_URL, or the API URL without /api)."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    ui = settings.ui_url or str(settings.api.url or "").removesuffix("/api")
    return f"{ui}/runs/flow-run/{flow_run_id}"


def trigger_and_wait(
    deployment: str,
    parameters: dict[str, Any] | None = None,
    *,
    wait: bool = True,
    timeout: float | None = None,
    poll_interval: float = 2.0,
    out: Callable[[str], None] = print,
    tags: Iterable[str] = ("trigger:api",),
    verbose: bool = False,
) -> int:
    """Start `flow-name/deployment-name` and, with `wait`, follow it to a final state. The run's log lines
    are printed one line each (tracebacks folded to their last line unless `verbose`); at the end, the
    run's final sentence and its page in the UI."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort
    from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError

    try:
        client_cm = get_client(sync_client=True)
        client = client_cm.__enter__()
        healthy = client.api_healthcheck()
    except Exception as exc:  # no server, wrong URL, refused connection
        out(f"cannot reach the Prefect API ({exc}); check PREFECT_API_URL")
        return EXIT_UNREACHABLE
    try:
        if healthy is not None:
            out(f"cannot reach the Prefect API ({healthy}); check PREFECT_API_URL")
            return EXIT_UNREACHABLE
        try:
            dep = client.read_deployment_by_name(deployment)
        except ObjectNotFound:
            out(
                f"deployment {deployment!r} does not exist; "
                "deploy it with `prefect deploy --all` (name: FLOW/NAME)"
            )
            return EXIT_FAILED
        try:
            run = client.create_flow_run_from_deployment(dep.id, parameters=parameters or {}, tags=list(tags))
        except PrefectHTTPStatusError as exc:  # e.g. 409: parameters the flow's schema refuses
            try:
                detail = exc.response.json().get("detail", "")
            except ValueError:
                detail = exc.response.text[:300]
            out(f"the Prefect API refused to start {deployment}: {detail}; nothing was started")
            return EXIT_FAILED
        out(f"started flow run {run.name} ({run.id}) of {deployment}")
        if not wait:
            return EXIT_COMPLETED
        deadline = None if timeout is None else time.monotonic() + timeout
        seen = 0

        def print_new_logs() -> int:
            nonlocal seen
            logs = client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])),
                offset=seen,
                sort=LogSort.TIMESTAMP_ASC,
            )
            for log in logs:
                text = log.message if verbose else brief_log(log.message)
                if text:
                    out(f"  {log.timestamp:%H:%M:%S} {text}")
            seen += len(logs)
            return len(logs)

        while True:
            print_new_logs()
            run = client.read_flow_run(run.id)
            state = run.state
            if state is not None and state.is_final():
                # The run's process ships its last log lines in a batch after the final state is set.
                for _ in range(3):
                    time.sleep(poll_interval)
                    if not print_new_logs():
                        break
                sentence = state.message if verbose else final_sentence(state.message)
                message = f": {sentence}" if sentence else ""
                out(f"flow run {run.name} ended {state.name}{message}")
                out(f"run page: {flow_run_url(run.id)}")
                return EXIT_COMPLETED if state.is_completed() else EXIT_FAILED
            if deadline is not None and time.monotonic() > deadline:
                out(
                    f"flow run {run.name} is still {state.name if state else 'pending'} "
                    f"after {timeout:.0f} s; it was not cancelled, follow it in the Prefect UI: "
                    f"{flow_run_url(run.id)}"
                )
                return EXIT_TIMEOUT
            time.sleep(poll_interval)
    finally:
        client_cm.__exit__(*sys.exc_info())
