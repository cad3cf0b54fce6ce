"""Start runs of the v2k deployments and follow them, for the command line.

`start` creates a flow run of a deployment (with an idempotency key, so asking twice
starts one run), `follow` polls it and its subflow runs and reports their progress
artifacts until it ends, `describe` gives a run's state and artifacts as JSON-ready data.
They use the Prefect API in PREFECT_API_URL.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any
from uuid import UUID

from tasks.errors import Refused

FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
MIGRATE_VM = "migrate-vm/migrate-vm"
WAVE = "migrate-wave/wave"

# Exit codes of the v2k commands that start or show runs.
EXIT_OK = 0  # the run completed
EXIT_FAILED = 1  # the run (or some VMs of a wave) failed, crashed or was cancelled
EXIT_USAGE = 2  # bad arguments, unknown deployment or block, Prefect not reachable
EXIT_NOT_DONE = 3  # the run is still going (timeout reached, or `status` of a live run)


# Completed runs whose migration needs a person's look: the command exits EXIT_FAILED.
NEEDS_A_LOOK = {"Migrated, not verified"}


def exit_code(state_type: str | None, state_name: str | None = None) -> int:
    if state_type == "COMPLETED" and state_name not in NEEDS_A_LOOK:
        return EXIT_OK
    if state_type in FINAL:
        return EXIT_FAILED
    return EXIT_NOT_DONE


def start(
    deployment: str, parameters: dict[str, Any], idempotency_key: str | None = None
) -> dict[str, Any]:
    """Create a flow run of the deployment; the run as JSON (the existing one when the
    idempotency key was used before)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        found = client.read_deployment_by_name(deployment)
        run = client.create_flow_run_from_deployment(
            found.id, parameters=parameters, idempotency_key=idempotency_key
        )
    return {"id": str(run.id), "name": run.name, "deployment": deployment}


class RunStateError(Refused):
    """The run is in a state that does not allow what was asked."""


def read_stopped(flow_run_id: str | UUID, force: bool = False, cleanup: bool = False):
    """The flow run, when it has stopped (crashed, failed, cancelled), for resume or
    cleanup. A run shown RUNNING whose worker died needs `force`: only the user knows
    that its process is gone. With `cleanup`, a completed run is accepted too: its
    cleanup may have been incomplete (its ledger says what is left).

    Raises:
        RunStateError: the run completed (for resume), or still runs and `force` is not set.
    """
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(UUID(str(flow_run_id)))
    kind = run.state.type.value if run.state else None
    if kind == "COMPLETED" and not cleanup:
        raise RunStateError(f"flow run {flow_run_id} completed: nothing to resume or clean up")
    if kind not in FINAL and not force:
        raise RunStateError(f"flow run {flow_run_id} is {kind}; if its worker is gone, add --force")
    return run


def retry(flow_run_id: str | UUID, force: bool = False) -> dict[str, Any]:
    """Schedule a stopped flow run again, as the UI's Retry does: a worker picks it up and
    the migration goes on from where it stopped (see `tasks.resume`).

    Raises:
        RunStateError: see `read_stopped`.
    """
    from prefect.client.orchestration import get_client
    from prefect.states import AwaitingRetry

    run = read_stopped(flow_run_id, force)
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(
            run.id, AwaitingRetry(message="resumed with v2k resume"), force=True
        )
    return {"id": str(run.id), "name": run.name, "resumed_from": _state(run)}


def _state(run) -> dict[str, Any]:
    state = run.state
    return {
        "type": state.type.value if state else None,
        "name": state.name if state else None,
        "message": state.message if state else None,
    }


def _artifact(a) -> dict[str, Any]:
    data = a.data
    if a.type == "table" and isinstance(data, str):
        try:
            data = json.loads(data)
        except ValueError:
            pass
    return {"key": a.key, "type": a.type, "description": a.description, "data": data}


def describe(flow_run_id: str | UUID) -> dict[str, Any]:
    """A run, its subflow runs and the artifacts of both, as JSON-ready data."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
    )

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(UUID(str(flow_run_id)))
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id])
            )
        )
        ids = [run.id, *[c.id for c in children]]
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=ids))
        )
        deployment = client.read_deployment(run.deployment_id).name if run.deployment_id else None
    by_run: dict[str, list] = {}
    for a in artifacts:
        by_run.setdefault(str(a.flow_run_id), []).append(_artifact(a))
    started = run.start_time
    ended = run.end_time
    return {
        "id": str(run.id),
        "name": run.name,
        "deployment": deployment,
        "state": _state(run),
        "parameters": run.parameters,
        "start_time": started.isoformat() if started else None,
        "end_time": ended.isoformat() if ended else None,
        "seconds": run.total_run_time.total_seconds() if run.total_run_time else None,
        "artifacts": by_run.get(str(run.id), []),
        "subflow_runs": [
            {
                "id": str(c.id),
                "name": c.name,
                "state": _state(c),
                "artifacts": by_run.get(str(c.id), []),
            }
            for c in sorted(children, key=lambda c: c.expected_start_time or c.created)
        ],
    }


def progress_of(described: dict[str, Any]) -> dict[str, tuple[str, float]]:
    """{artifact key: (description, percent)} of every progress artifact of a run and its
    subflow runs (the latest of each key)."""
    found: dict[str, tuple[str, float]] = {}
    runs = [described, *described["subflow_runs"]]
    for run in runs:
        prefix = "" if run is described else f"{run['name']}: "
        for a in run["artifacts"]:
            if a["type"] == "progress" and a["key"]:
                found[f"{run['id']}/{a['key']}"] = (
                    prefix + (a["description"] or a["key"]),
                    float(a["data"] or 0),
                )
    return found


def follow(
    flow_run_id: str | UUID,
    *,
    timeout: float | None = None,
    poll: float = 2.0,
    on_update: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Poll the run until it is final (or the timeout passes); its last description."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        described = describe(flow_run_id)
        if on_update:
            on_update(described)
        if described["state"]["type"] in FINAL:
            return described
        if deadline is not None and time.monotonic() >= deadline:
            return described
        time.sleep(poll)


def watch(flow_run_id: str | UUID, console, *, timeout: float | None = None, poll: float = 2.0):
    """`follow` with rich progress bars on the console: the run's state, and one bar per
    progress artifact (disks, virt-v2v, import, the wave) as they appear."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as bars:
        head = bars.add_task("waiting for the run", total=None)
        shown: dict[str, Any] = {}

        def update(described: dict[str, Any]) -> None:
            state = described["state"]
            bars.update(head, description=f"{described['name']}: {state['name']}")
            if state["type"] in FINAL:
                bars.update(head, total=1, completed=1)
            for key, (text, percent) in progress_of(described).items():
                if key not in shown:
                    shown[key] = bars.add_task(text, total=100)
                bars.update(shown[key], completed=percent, description=text)

        return follow(flow_run_id, timeout=timeout, poll=poll, on_update=update)


def render(described: dict[str, Any], console) -> None:
    """A run for people: state and message, the migration summary or the wave's table."""
    from rich.markdown import Markdown
    from rich.table import Table

    state = described["state"]
    color = {"COMPLETED": "green", "FAILED": "red", "CRASHED": "red"}.get(state["type"], "yellow")
    seconds = described.get("seconds")
    took = f" in {seconds:.0f} s" if seconds else ""
    console.print(
        f"[bold]{described['name']}[/bold] ({described['id']}): [{color}]{state['name']}[/{color}]"
        f"{took}" + (f" - {state['message']}" if state["message"] else "")
    )
    for a in described["artifacts"]:
        if a["type"] == "markdown" and a["key"] and a["key"].startswith("migration-"):
            console.print(Markdown(a["data"]))
        if a["type"] == "table" and a["key"] == "wave-summary" and isinstance(a["data"], list):
            rows = a["data"]
            table = Table(title=a["description"])
            columns = [c for c in (rows[0] if rows else {}) if c != "flow run"]
            for column in columns:
                table.add_column(column, overflow="fold")
            for row in rows:
                table.add_row(*(str(row.get(c, "")) for c in columns))
            console.print(table)
    for child in described["subflow_runs"]:
        console.print(f"  {child['name']}: {child['state']['name']}")
