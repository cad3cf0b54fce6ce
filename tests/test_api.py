"""Starting runs through the Prefect REST API (httpx) and `run_deployment`, against a real
`prefect server start` and a process worker, as docs/api.md shows.

A repeated request with the same idempotency key gives back the same flow run and starts
nothing new. The inventory deployment completes in seconds; the migration started over
the API is one that preflight refuses (a running Windows VM), so it fails in seconds too:
the one real migration of these tests is in test_ui.py.
"""

from __future__ import annotations

import time
import uuid

import httpx
import pytest

pytest_plugins = ["deployments.testing"]


def _start(served, deployment: str, parameters: dict, key: str) -> dict:
    """POST /deployments/{id}/create_flow_run, as docs/api.md does."""
    response = httpx.post(
        f"{served.api}/deployments/{served.deployment_id(deployment)}/create_flow_run",
        json={"parameters": parameters, "idempotency_key": key},
        timeout=30,
    )
    response.raise_for_status()
    return response.json()


def test_httpx_inventory_once_and_completed(served):
    key = f"inventory-{uuid.uuid4()}"
    params = {"vcenter": served.blocks["vcenter"]}
    first = _start(served, "inventory/inventory", params, key)
    again = _start(served, "inventory/inventory", params, key)
    assert again["id"] == first["id"]

    run = served.wait_for_run(first["id"], timeout=180)
    assert run["state_type"] == "COMPLETED", run["state"]
    artifacts = httpx.post(
        f"{served.api}/artifacts/filter",
        json={"artifacts": {"flow_run_id": {"any_": [first["id"]]}}},
        timeout=10,
    ).json()
    table = next(a for a in artifacts if a["key"] == "inventory")
    assert "debian-stopped" in str(table["data"])
    runs = httpx.post(
        f"{served.api}/flow_runs/filter",
        json={"flow_runs": {"idempotency_key": {"any_": [key]}}},
        timeout=10,
    )
    if runs.status_code == 200:  # the filter on the key exists in this server version
        assert [r["id"] for r in runs.json()] == [first["id"]]


def test_httpx_migration_refused_reports_why(served):
    key = f"migrate-win2019-running-{uuid.uuid4()}"
    request = {
        "vcenter": served.blocks["vcenter"],
        "vm": "win2019-running",
        "cluster": served.blocks["cluster"],
        "temporary_storage": served.blocks["scratch"],
    }
    first = _start(served, "migrate-vm/migrate-vm", {"request": request}, key)
    assert _start(served, "migrate-vm/migrate-vm", {"request": request}, key)["id"] == first["id"]
    run = served.wait_for_run(first["id"], timeout=180)
    assert run["state_type"] == "FAILED"
    assert "PreflightError" in run["state"]["message"], run["state"]


def test_httpx_rejects_an_invalid_request(served):
    # The parameter schema is enforced: a request without a VM is refused at once.
    response = httpx.post(
        f"{served.api}/deployments/{served.deployment_id('migrate-vm/migrate-vm')}/create_flow_run",
        json={"parameters": {"request": {"vcenter": "x", "cluster": "y"}}},
        timeout=30,
    )
    assert response.status_code == 409, response.text
    assert "'vm' is a required property" in response.text


def test_run_deployment_waits_and_is_idempotent(served):
    from prefect.deployments import run_deployment

    key = f"inventory-{uuid.uuid4()}"
    with served.settings():
        run = run_deployment(
            "inventory/inventory",
            parameters={"vcenter": served.blocks["vcenter"], "name_glob": "debian-*"},
            idempotency_key=key,
            timeout=180,
            poll_interval=1,
            as_subflow=False,
        )
        again = run_deployment(
            "inventory/inventory",
            parameters={"vcenter": served.blocks["vcenter"], "name_glob": "debian-*"},
            idempotency_key=key,
            timeout=0,
            as_subflow=False,
        )
    assert run.state.is_completed(), run.state
    assert again.id == run.id


# --- events and the automation of docs/api.md ------------------------------------------


def _spec():
    from tasks.models import VmSpec

    return VmSpec(
        name="web 01",
        moref="vm-42",
        instance_uuid="5003a1b2-0006-4c5e-8a00-000000000006",
        inventory_path="/DC0/vm/Prod/web 01",
        guest_id="ubuntu64Guest",
        power_state="poweredOff",
        num_cpu=1,
        cores_per_socket=1,
        memory_mb=512,
        firmware="bios",
        disks=[],
        nics=[],
        host="DC0_C0_H0",
    )


def test_stage_events_name_the_vm(monkeypatch):
    from types import SimpleNamespace

    from prefect.states import Failed

    from tasks import events

    sent = []
    monkeypatch.setattr(events, "emit_event", lambda **kw: sent.append(kw) or kw)
    monkeypatch.setattr(events, "_flow_run_id", lambda: "run-1")
    events.bind(_spec())
    events.emit("exported", _spec(), bytes=1024, disks=1, seconds=1.5)
    assert sent[-1]["event"] == "v2k.vm.exported"
    assert sent[-1]["resource"] == {
        "prefect.resource.id": "v2k.vm.5003a1b2-0006-4c5e-8a00-000000000006",
        "prefect.resource.name": "web 01",
        "v2k.moref": "vm-42",
        "v2k.path": "/DC0/vm/Prod/web 01",
        "v2k.esxi-host": "DC0_C0_H0",
    }
    assert sent[-1]["payload"] == {"bytes": 1024, "disks": 1, "seconds": 1.5}
    with pytest.raises(ValueError, match="unknown stage"):
        events.emit("exportd", _spec())

    run = SimpleNamespace(id="run-1", name="migrate-web 01", parameters={})
    events.failed_hook(None, run, Failed(message="virt-v2v exited 1"))
    assert sent[-1]["event"] == "v2k.vm.failed"
    assert sent[-1]["resource"]["prefect.resource.name"] == "web 01"
    assert sent[-1]["payload"]["after_stage"] == "exported"
    assert "virt-v2v exited 1" in sent[-1]["payload"]["error"]
    assert sent[-1]["related"][0]["prefect.resource.id"] == "prefect.flow-run.run-1"

    # Failed before the VM was found: named after the reference given.
    run = SimpleNamespace(id="run-2", name="migrate-x", parameters={"request": {"vm": "nope"}})
    events.failed_hook(None, run, Failed(message="no VM named 'nope'"))
    assert sent[-1]["resource"]["prefect.resource.id"] == "v2k.vm.nope"
    assert sent[-1]["payload"]["after_stage"] is None


def test_documented_automation_fires_on_a_failed_event(served):
    from prefect.events import Event

    from tasks.events import vm_resource

    api = served.api
    deployment = httpx.get(f"{api}/deployments/name/migrate-wave/nightly-wave").json()
    notify = {  # as docs/api.md, with do-nothing for the notification block
        "name": "v2k: a VM failed",
        "enabled": True,
        "trigger": {
            "type": "event",
            "posture": "Reactive",
            "expect": ["v2k.vm.failed"],
            "match": {"prefect.resource.id": "v2k.vm.*"},
            "threshold": 1,
            "within": 0,
        },
        "actions": [{"type": "do-nothing"}],
    }
    pause = {
        "name": "v2k: pause the nightly wave after 3 failures",
        "trigger": {
            "type": "event", "posture": "Reactive", "expect": ["v2k.vm.failed"],
            "match": {"prefect.resource.id": "v2k.vm.*"}, "threshold": 3, "within": 3600,
        },
        "actions": [{"type": "pause-deployment", "source": "selected",
                     "deployment_id": deployment["id"]}],
    }  # fmt: skip
    ids = []
    for automation in (notify, pause):
        response = httpx.post(f"{api}/automations/", json=automation, timeout=10)
        assert response.status_code == 201, response.text
        ids.append(response.json()["id"])
    time.sleep(2)  # the triggers service picks up new automations
    event = Event(
        event="v2k.vm.failed",
        resource=vm_resource(_spec()),
        payload={"error": "PreflightError: test", "after_stage": None, "state": "Failed"},
    )
    httpx.post(f"{api}/events", json=[event.model_dump(mode="json")], timeout=10)
    deadline = time.monotonic() + 60
    fired = []
    while not fired and time.monotonic() < deadline:
        time.sleep(1)
        found = httpx.post(
            f"{api}/events/filter",
            json={"filter": {"event": {"prefix": ["prefect.automation."]}}},
            timeout=10,
        ).json()["events"]
        fired = [e for e in found if e["resource"]["prefect.resource.id"].endswith(ids[0])]
    assert fired, "the automation did not fire"
    # One failure is not three: the nightly wave is not paused.
    assert not httpx.get(f"{api}/deployments/{deployment['id']}").json()["paused"]
    for automation_id in ids:
        httpx.delete(f"{api}/automations/{automation_id}", timeout=10)
