"""Prefect events for the stages of a migration: `v2k.vm.<stage>`, with the VM as resource.

Automations (in the Prefect UI or API) react to them, for example to page someone on
`v2k.vm.failed`; docs/api.md has an example. The resource id is stable for one VM across
runs: `v2k.vm.<instance UUID>` (or the moref when the VM has no instance UUID), and its
`prefect.resource.name` is the VM's name. Before the VM has been found (a failed
preflight) the resource is named after the reference the user gave.

Use in a flow:

    events.bind(spec)                        # after preflight: later events name this VM
    events.emit("exported", spec, bytes=n)   # after a stage; "completed" at the end
    @flow(on_failure=[events.failed_hook])   # `v2k.vm.failed`, whichever stage broke

Emitting never raises: an event that cannot be sent is logged and dropped, the migration
goes on.
"""

from __future__ import annotations

import logging
from typing import Any

from prefect.events import emit_event
from pydantic_core import to_jsonable_python

from tasks.models import VmSpec

STAGES = ("exported", "converted", "imported", "verified", "not_verified", "completed", "failed")
EVENT_PREFIX = "v2k.vm."
MAX_ERROR = 2000  # characters of the error in a `failed` event (the run's logs have all)

log = logging.getLogger(__name__)

# The VM and the last stage reached, per flow run id, for the failure hook.
_bound: dict[str, tuple[dict[str, str], str]] = {}


def vm_resource(spec_or_name: VmSpec | str) -> dict[str, str]:
    """The Prefect resource that names a VM: id, name and what else identifies it."""
    if isinstance(spec_or_name, VmSpec):
        spec = spec_or_name
        resource = {
            "prefect.resource.id": f"{EVENT_PREFIX}{spec.instance_uuid or spec.moref}",
            "prefect.resource.name": spec.name,
            "v2k.moref": spec.moref,
            "v2k.path": spec.inventory_path,
        }
        if spec.host:
            resource["v2k.esxi-host"] = spec.host
        return resource
    name = str(spec_or_name).strip() or "unknown"
    return {"prefect.resource.id": f"{EVENT_PREFIX}{name}", "prefect.resource.name": name}


def _flow_run_id() -> str | None:
    from prefect.runtime import flow_run

    run_id = flow_run.get_id()
    return str(run_id) if run_id else None


def bind(spec: VmSpec) -> None:
    """Remember the VM of the current flow run, so `failed_hook` names it like the
    stage events do (call it once preflight has read the spec)."""
    run_id = _flow_run_id()
    if run_id:
        _bound[run_id] = (vm_resource(spec), "preflight")


def emit(stage: str, spec_or_name: VmSpec | str, **payload: Any):
    """Emit `v2k.vm.<stage>` for the VM (a VmSpec, or a name before one is known).

    The flow and task runs around the call are attached as related resources by Prefect.
    Returns the event, or None when events are off or it could not be sent.
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; one of {', '.join(STAGES)}")
    resource = vm_resource(spec_or_name)
    run_id = _flow_run_id()
    if run_id and stage == "completed":
        _bound.pop(run_id, None)
    elif run_id and stage != "failed":
        _bound[run_id] = (resource, stage)
    try:
        return emit_event(
            event=f"{EVENT_PREFIX}{stage}",
            resource=resource,
            payload=to_jsonable_python(payload, fallback=str),
        )
    except Exception as exc:  # noqa: BLE001 - an event is never worth a failed migration
        log.warning("could not emit %s%s: %s", EVENT_PREFIX, stage, exc)
        return None


def _error_of(state) -> str:
    try:
        exc = state.result(raise_on_failure=False)
    except Exception:  # noqa: BLE001 - results may not be available: use the message
        exc = None
    text = f"{type(exc).__name__}: {exc}" if isinstance(exc, BaseException) else None
    text = text or state.message or state.name
    return text if len(text) <= MAX_ERROR else text[: MAX_ERROR - 3] + "..."


def failed_hook(flow, flow_run, state) -> None:
    """`on_failure` / `on_crashed` hook of migrate-vm: emit `v2k.vm.failed`.

    The payload holds the error, the last stage that finished (`after_stage`, None when
    even preflight failed) and the state.
    """
    bound = _bound.pop(str(flow_run.id), None)
    if bound:
        resource, after = bound
    else:
        request = (flow_run.parameters or {}).get("request") or {}
        ref = request.get("vm") if isinstance(request, dict) else getattr(request, "vm", None)
        resource, after = vm_resource(ref or flow_run.name), None
    try:
        emit_event(
            event=f"{EVENT_PREFIX}failed",
            resource=resource,
            related=[
                {
                    "prefect.resource.id": f"prefect.flow-run.{flow_run.id}",
                    "prefect.resource.role": "flow-run",
                    "prefect.resource.name": flow_run.name,
                }
            ],
            payload={"error": _error_of(state), "after_stage": after, "state": state.name},
        )
    except Exception as exc:  # noqa: BLE001 - see emit()
        log.warning("could not emit %sfailed: %s", EVENT_PREFIX, exc)


def forget(flow_run_id: str) -> None:
    """Drop what `bind` remembered for a run (`failed_hook` and `emit("completed")` do)."""
    _bound.pop(str(flow_run_id), None)
