"""The migrate-wave flow: wave files, in-flight and per-host caps, failures that stop no
other VM, summary and progress artifacts.

The cap tests put a stand-in for migrate-vm that sleeps (a real conversion takes minutes);
the last test runs the real migrate-vm on VMs that are refused or missing, in seconds.
"""

from __future__ import annotations

import pickle
import threading
import time

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect.concurrency.sync import concurrency
from pydantic import ValidationError

import flows.wave as wave
from flows.limits import limit_name
from flows.wave import (
    ResolvedVm,
    WaveFailed,
    WaveFile,
    WaveSummary,
    WaveVm,
    migrate_wave,
)
from tasks.models import MigrationRequest, MigrationResult

# --- plain units ---------------------------------------------------------------------


def test_wave_file_items_and_overrides(tmp_path):
    path = tmp_path / "wave.yaml"
    path.write_text(
        "vcenter: vc\ncluster: c\ntemporary_storage: s\nmax_in_flight: 3\n"
        "vms:\n  - web-01\n  - vm: /DC0/vm/db 02\n    target_name: db02\n"
        "    convert_host: kvm1\n    verify_boot: true\n"
    )
    plan = WaveFile.load(path)
    assert plan.max_in_flight == 3
    assert plan.vms == [
        WaveVm(vm="web-01"),
        WaveVm(vm="/DC0/vm/db 02", target_name="db02", convert_host="kvm1", verify_boot=True),
    ]
    path.write_text("vms:\n  - vm: a\n    target: typo\n")
    with pytest.raises(ValidationError, match="target"):
        WaveFile.load(path)
    path.write_text("vms:\n  - vm: a\n    target_name: not valid!\n")
    with pytest.raises(ValidationError, match="not a valid domain name.*'not-valid'"):
        WaveFile.load(path)
    with pytest.raises(ValueError, match="cannot read wave file"):
        WaveFile.load(tmp_path / "missing.yaml")


def test_interleave_takes_the_esxi_hosts_in_turn():
    items = [
        ResolvedVm(item=WaveVm(vm=n), esxi_host=h)
        for n, h in [("a", "h0"), ("b", "h0"), ("c", "h0"), ("d", "h1"), ("e", None)]
    ]
    assert [r.item.vm for r in wave._interleave(items)] == ["a", "d", "e", "b", "c"]


def test_wave_failed_carries_the_summary():
    summary = WaveSummary(
        total=3,
        completed=1,
        failed=2,
        seconds=1.0,
        max_in_flight=2,
        vms=[
            wave.VmOutcome(vm="a", result="failed", seconds=1, error="x"),
            wave.VmOutcome(vm="b", result="completed", seconds=1),
            wave.VmOutcome(vm="c", result="failed", seconds=1, error="y"),
        ],
    )
    error = pickle.loads(pickle.dumps(WaveFailed(summary)))
    assert str(error) == "2 of 3 VM(s) failed: a, c (1 migrated)"
    assert error.summary == summary


# --- caps and failures, with a stand-in for migrate-vm ---------------------------------

_lock = threading.Lock()
_runs: list[tuple[str, str | None, float, float]] = []  # (vm, ESXi host, start, end)


def _fake_result(request: MigrationRequest) -> MigrationResult:
    return MigrationResult(
        vm=request.vm,
        source_moref="vm-0",
        domain_name=request.target_name or request.vm,
        domain_uuid="00000000-0000-0000-0000-000000000000",
        import_host="bed-kvm2",
        convert_host="bed-kvm1",
        export_host=None,
        stages=[],
        bytes_exported=1024,
        checksums={},
        osinfo=None,
    )


def _stand_in(seconds: float, hosts: dict[str, str]):
    @flow(name="migrate-vm-stand-in")
    def migrate_vm(request: MigrationRequest) -> MigrationResult:
        started = time.monotonic()
        with concurrency(limit_name("kvm", "bed-kvm1"), occupy=1, strict=True):
            time.sleep(seconds)
        with _lock:
            _runs.append((request.vm, hosts.get(request.vm), started, time.monotonic()))
        if request.vm.startswith("win"):
            raise RuntimeError(f"{request.vm}: refused by the stand-in")
        return _fake_result(request)

    return migrate_vm


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    edges = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    best = now = 0
    for _, step in edges:
        now += step
        best = max(best, now)
    return best


@pytest.fixture()
def esxi_of(bed, bed_blocks):
    """{VM name: ESXi host} of the test bed's VMs."""
    found = wave.find_vms(bed_blocks["vcenter"], [], "*")
    return {r.name: r.esxi_host for r in found}


def _artifacts(flow_run_id) -> dict:
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {a.key: a for a in found}


def test_wave_caps_in_flight_and_goes_on_after_failures(bed_blocks, esxi_of, monkeypatch):
    monkeypatch.setattr(wave, "migrate_vm", _stand_in(1.5, esxi_of))
    _runs.clear()
    vms = [
        "debian-stopped",
        "win2019-stopped",
        "multi-disk-efi",
        "web server 01",
        "Prod/app%2fdb 02",
    ]
    state = migrate_wave(
        vms=vms + ["no-such-vm"],
        vcenter=bed_blocks["vcenter"],
        cluster=bed_blocks["cluster"],
        temporary_storage=bed_blocks["scratch"],
        max_in_flight=2,
        per_esxi_host=20,
        per_kvm_host=5,
        return_state=True,
    )
    assert state.is_failed()
    assert state.message == ("2 of 6 VM(s) failed: win2019-stopped, no-such-vm (4 migrated)"), (
        state.message
    )
    error = state.result(raise_on_failure=False)
    assert isinstance(error, WaveFailed)
    summary = error.summary
    # VMs are named as vCenter names them (it escapes "/" in a name as %2f).
    assert [v.vm for v in summary.vms] == vms[:4] + ["app%2fdb 02", "no-such-vm"]
    assert [v.result for v in summary.vms] == ["completed", "failed"] + ["completed"] * 3 + [
        "failed"
    ]
    assert "no VM named 'no-such-vm'" in summary.vms[-1].error
    assert "refused by the stand-in" in summary.vms[1].error
    assert summary.vms[0].bytes_exported == 1024
    assert summary.vms[0].esxi_host == esxi_of["debian-stopped"]
    assert all(v.flow_run_id for v in summary.vms[:-1])
    # Every VM ran, never more than two at once. (How often two overlap depends on the
    # test server: its SQLite answers 503 "database is locked" under concurrent writes
    # and the client waits ~2 s before retrying.)
    assert sorted(r[0] for r in _runs) == sorted(vms)  # as given: by name or path
    assert _max_overlap([(s, e) for _, _, s, e in _runs]) <= 2

    artifacts = _artifacts(state.state_details.flow_run_id)
    assert artifacts["wave-progress"].data == 100.0
    table = artifacts["wave-summary"].data
    assert "win2019-stopped" in table and "no VM named" in table
    assert "4 of 6 VM(s) migrated, 2 failed" in artifacts["wave-summary"].description


def test_esxi_cap_holds_across_two_waves(bed_blocks, esxi_of, monkeypatch):
    monkeypatch.setattr(wave, "migrate_vm", _stand_in(1.0, esxi_of))
    _runs.clear()
    one_host = sorted({h for h in esxi_of.values() if h})[0]
    on_it = sorted(n for n, h in esxi_of.items() if h == one_host and not n.startswith("win"))
    assert len(on_it) >= 2, esxi_of
    common = dict(
        vcenter=bed_blocks["vcenter"],
        cluster=bed_blocks["cluster"],
        temporary_storage=bed_blocks["scratch"],
        max_in_flight=4,
        per_esxi_host=1,
        per_kvm_host=4,
    )
    results = {}

    def run(name, vms):
        results[name] = migrate_wave(vms=vms, **common)

    threads = [threading.Thread(target=run, args=(f"wave{i}", on_it[i::2])) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(r.failed == 0 for r in results.values()), results
    assert sorted(r[0] for r in _runs) == on_it
    assert _max_overlap([(s, e) for _, _, s, e in _runs]) == 1
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(limit_name("esxi", one_host))
    assert limit.limit == 1 and limit.active_slots == 0


# --- the real migrate-vm ---------------------------------------------------------------


def test_real_wave_reports_each_refusal(bed_blocks, tmp_path, caplog):
    path = tmp_path / "wave.yaml"
    path.write_text(
        f"vcenter: {bed_blocks['vcenter']}\ncluster: {bed_blocks['cluster']}\n"
        f"temporary_storage: {bed_blocks['scratch']}\nsettings: {bed_blocks['settings']}\n"
        "vms:\n  - win2019-running\n  - vm: independent-disk\n    target_name: indep\n"
    )
    with pytest.raises(WaveFailed) as caught:
        migrate_wave(vms=["no-such-vm"], wave_file=str(path), max_in_flight=3)
    summary = caught.value.summary
    assert (summary.total, summary.failed, summary.completed) == (3, 3, 0)
    errors = {v.vm: v.error for v in summary.vms}
    assert "PreflightError" in errors["win2019-running"]
    assert "independent_persistent" in errors["independent-disk"]
    assert "no VM named" in errors["no-such-vm"]
    # The runs are threads of the wave, where Prefect's task timeout cannot interrupt: v2k
    # sets none there, so Prefect does not warn about it for every stage.
    assert not [r for r in caplog.records if "running in a worker thread" in r.getMessage()]


def test_cli_wave_prints_json_and_exits_1_on_failures(bed_blocks):
    from typer.testing import CliRunner

    from flows.cli import app

    args = ["wave", "no-such-vm", "win2019-running", "--vcenter", bed_blocks["vcenter"]]
    args += ["--cluster", bed_blocks["cluster"], "--storage", bed_blocks["scratch"], "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    summary = WaveSummary.model_validate_json(result.stdout)
    assert [(v.vm, v.result) for v in summary.vms] == [
        ("no-such-vm", "failed"),
        ("win2019-running", "failed"),
    ]
    bad = CliRunner().invoke(app, ["wave", "--vcenter", bed_blocks["vcenter"]])
    assert bad.exit_code == 2 and "set cluster, temporary_storage" in bad.output
