"""deployments/prefect.yaml and `v2k serve`: a local server, the blocks, the deployments and
a worker from one command (the `served` fixture runs it, and checks that it stops cleanly);
then `v2k migrate/wave --via-deployment` and `v2k status` against it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import httpx
import pytest
import yaml

from deployments.serve import PREFECT_FILE, ROOT
from flows.wave import WaveFile

pytest_plugins = ["deployments.testing"]

V2K = [sys.executable, "-m", "flows.cli"]


def test_prefect_yaml_declares_the_deployments():
    spec = yaml.safe_load(PREFECT_FILE.read_text())
    found = {d["name"]: d for d in spec["deployments"]}
    assert set(found) == {"migrate-vm", "wave", "nightly-wave", "inventory"}
    assert {d["work_pool"]["name"] for d in found.values()} == {"v2k"}
    for d in found.values():
        path, _, function = d["entrypoint"].partition(":")
        assert f"def {function}(" in (ROOT / path).read_text(), d["entrypoint"]
    nightly = found["nightly-wave"]
    assert nightly["schedules"] == [
        {"cron": "0 1 * * *", "timezone": "Europe/Paris", "active": True}
    ]
    assert nightly["concurrency_limit"] == {"limit": 1, "collision_strategy": "CANCEL_NEW"}
    wave_file = ROOT / nightly["parameters"]["wave_file"]
    assert WaveFile.load(wave_file).vms


def _v2k(*args: str, env: dict, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*V2K, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_serve_deploys_and_prints_the_ui(served):
    out = served.output
    ui = re.search(r"Prefect UI: (http://\S+)", out).group(1)
    assert httpx.get(ui, timeout=10).status_code == 200
    api = served.api
    deployments = httpx.post(f"{api}/deployments/filter", json={}, timeout=10).json()
    by_name = {d["name"]: d for d in deployments}
    assert set(by_name) == {"migrate-vm", "wave", "nightly-wave", "inventory"}
    nightly = by_name["nightly-wave"]
    assert nightly["schedules"][0]["schedule"]["cron"] == "0 1 * * *"
    assert nightly["schedules"][0]["schedule"]["timezone"] == "Europe/Paris"
    assert nightly["concurrency_options"]["collision_strategy"] == "CANCEL_NEW"
    assert nightly["global_concurrency_limit"]["limit"] == 1
    form = by_name["migrate-vm"]["parameter_openapi_schema"]
    assert form["required"] == ["request"]
    request = form["definitions"]["MigrationRequest"]
    assert {"vm", "cluster", "temporary_storage"} <= set(request["required"])
    assert request["properties"]["vm"]["description"].startswith("The VM")
    pool = httpx.get(f"{api}/work_pools/v2k", timeout=10).json()
    assert pool["type"] == "process"
    workers = httpx.post(f"{api}/work_pools/v2k/workers/filter", json={}, timeout=10).json()
    assert [w["status"] for w in workers] == ["ONLINE"]
    block_types = httpx.post(f"{api}/block_types/filter", json={}, timeout=10).json()
    assert {"v2k-kvm-host", "v2k-kvm-cluster"} <= {t["slug"] for t in block_types}


def test_migrate_via_deployment_and_status(served):
    blocks, env = served.blocks, served.env()
    common = ["--vcenter", blocks["vcenter"], "--cluster", blocks["cluster"]]
    common += ["--storage", blocks["scratch"]]
    key = f"cli-{time.time_ns()}"
    done = _v2k(
        "migrate", "win2019-running", *common, "--via-deployment", "--json",
        "--idempotency-key", key, env=env,
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    run = json.loads(done.stdout)
    assert run["state"]["type"] == "FAILED"
    assert "PreflightError" in run["state"]["message"]
    assert run["deployment"] == "migrate-vm"

    status = _v2k("status", run["id"], env=env)
    assert status.returncode == 1, status.stderr
    assert "Failed" in status.stdout and "PreflightError" in status.stdout
    assert _v2k("status", "not-a-run-id", env=env).returncode == 2


def test_wave_via_deployment_reports_failures(served):
    blocks, env = served.blocks, served.env()
    done = _v2k(
        "wave", "no-such-vm", "--vcenter", blocks["vcenter"], "--cluster", blocks["cluster"],
        "--storage", blocks["scratch"], "--via-deployment", "--json", env=env,
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    run = json.loads(done.stdout)
    assert run["state"]["message"] == "1 of 1 VM(s) failed: no-such-vm (0 migrated)"
    table = next(a for a in run["artifacts"] if a["key"] == "wave-summary")
    assert table["data"][0]["VM"] == "no-such-vm"
    assert "no VM named" in table["data"][0]["error"]


@pytest.mark.slow
def test_scale_out_two_workers_on_postgresql(bed, tmp_path):
    """The Prefect server on PostgreSQL, two process workers on one pool (at most two runs
    each), and a wave whose VMs run as migrate-vm deployment runs: both workers take some.
    The VMs are refused quickly (preflight or host selection), which is all the test needs.
    """
    from prefect.deployments import run_deployment

    from deployments.serve import LocalPrefect
    from deployments.testing import LocalPostgres

    postgres = LocalPostgres().start()
    local = LocalPrefect(
        tmp_path / "prefect",
        database_url=postgres.url,
        extra_env={"PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_WORKER_PREFETCH_SECONDS": "0"},
    )
    try:
        local.start()
        local.register_blocks()
        with local.settings():
            blocks = bed.save_blocks("bed")
        local.deploy()
        for _ in range(2):
            local.start_worker(limit=2)
        local.wait_for_workers(2)
        wave_file = tmp_path / "wave.yaml"
        wave_file.write_text(
            "vms:\n  - win2019-running\n  - independent-disk\n"
            "  - vm: web server 01\n    convert_host: nope\n"
            "  - vm: multi-disk-efi\n    convert_host: nope\n"
        )
        with local.settings():
            run = run_deployment(
                "migrate-wave/wave",
                parameters={
                    "wave_file": str(wave_file),
                    "vcenter": blocks["vcenter"],
                    "cluster": blocks["cluster"],
                    "temporary_storage": blocks["scratch"],
                    "max_in_flight": 4,
                    "via_deployment": True,
                },
                timeout=300,
                poll_interval=2,
                as_subflow=False,
            )
        assert run.state.is_failed(), run.state
        assert run.state.message == (
            "4 of 4 VM(s) failed: win2019-running, independent-disk, web server 01, "
            "multi-disk-efi (0 migrated)"
        )
        api = local.api_url
        children = httpx.post(
            f"{api}/flow_runs/filter",
            json={"flow_runs": {"parent_flow_run_id": {"any_": [str(run.id)]}}},
            timeout=10,
        ).json()
        assert len(children) == 4 and {c["state_type"] for c in children} == {"FAILED"}
        assert all(c["deployment_id"] for c in children)
        logs = httpx.post(
            f"{api}/logs/filter",
            json={"logs": {"flow_run_id": {"any_": [c["id"] for c in children]}}},
            timeout=10,
        ).json()
        workers = {
            m.group(1)
            for log in logs
            if (m := re.match(r"Worker '([^']+)' submitting flow run", log["message"]))
        }
        assert workers == {"v2k-worker-1", "v2k-worker-2"}, workers
        # The ESXi and KVM host caps exist as global concurrency limits, all released.
        limits = httpx.post(f"{api}/v2/concurrency_limits/filter", json={}, timeout=10).json()
        ours = {lim["name"]: lim for lim in limits if lim["name"].startswith("v2k-")}
        assert any(n.startswith("v2k-esxi-") for n in ours), ours
        assert {"v2k-kvm-bed-kvm1", "v2k-kvm-bed-kvm2"} <= set(ours)
        assert all(lim["active_slots"] == 0 for lim in ours.values())
    finally:
        local.stop()
        postgres.stop()
