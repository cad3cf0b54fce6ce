"""The export stage (run_export: the export-vm task and its download tasks) against the
test bed's vCenter: the threads_on_ms cap as the server
sees it, resume after a cut connection and after a failed try, the lease's end, and the
OVF descriptor.

The simulator counts the downloads it serves (VcSim.stats): `nfc_max_active` is how many
disk bodies were on the wire at once. A rate fault slows each body to about a second, so
downloads that may overlap do."""

from __future__ import annotations

import time
import uuid
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import yaml
from prefect import flow
from pyVmomi import vim, vmodl
from pyVmomi.SoapAdapter import SoapStubAdapter

from blocks import MigrationSettings, StagePolicy
from blocks.vcenter import VCenterRefused, VCenterUnreachable
from tasks import vcenter as vc
from tasks.export import (
    OVF_NAME,
    LeaseLost,
    StorageFull,
    _new_lease_helps,
    disk_file_name,
    run_export,
)
from tasks.models import ExportResult, VmSpec
from tasks.transfer import TAIL_CHECK, TransferError, TransferFailed, TransferRefused
from testbed.bed import TestBed
from testbed.images import sha256_file
from testbed.vcsim import VcSim

MiB = 1 << 20
VM = "export-4disks"
DISKS = 4
RATE_KBPS = 8 * 1024  # 8 MiB/s: a little over a second per disk
OVF = "{http://schemas.dmtf.org/ovf/envelope/1}"

INVENTORY = {
    "version": 1,
    "datacenters": [
        {
            "name": "DC0",
            "clusters": [{"name": "DC0_C0", "hosts": ["DC0_C0_H0", "DC0_C0_H1"]}],
            "datastores": [{"name": "LocalDS_0"}],
            "vms": [
                {
                    "name": VM,
                    "guest_id": "debian12_64Guest",
                    "instance_uuid": "5003a1b2-8888-4c5e-8a00-000000000001",
                    "num_cpu": 2,
                    "cores_per_socket": 2,
                    "memory_mb": 512,
                    # Random bytes throughout, a different seed per disk: a mixed-up
                    # disk order shows in the hashes.
                    "disks": [
                        {"size": "8MiB", "fill": "8MiB", "datastore": "LocalDS_0", "seed": 10 + i}
                        for i in range(DISKS)
                    ],
                    "nics": [{"mac": "00:50:56:08:00:01", "network": "VM Network"}],
                }
            ],
        }
    ],
}


@dataclass
class Source:
    bed: TestBed
    vcenter_block: str
    spec: VmSpec
    sha256: list[str]  # of each disk file in the datastore, in disk order
    sizes: list[int]

    @property
    def sim(self) -> VcSim:
        return self.bed.vcsim


@pytest.fixture(scope="module")
def source(prefect_harness, tmp_path_factory: pytest.TempPathFactory) -> Source:
    work = tmp_path_factory.mktemp("export-bed")
    inventory = work / "inventory.yaml"
    inventory.write_text(yaml.safe_dump(INVENTORY))
    with TestBed(work / "bed", hosts=0, libvirt=False, inventory=inventory) as bed:
        names = bed.save_blocks("export-test")
        applied = bed.applied.vms[VM]
        root = bed.vcsim.datastore_path("LocalDS_0")
        files = [root / f.partition("] ")[2] for f in applied.disk_files]
        with bed.vcsim.connect() as si:
            vm = vc.find_vm(si, vc.datacenter(si, "DC0"), applied.moref)
            spec = vc.read_spec(si, vm)
        assert len(spec.disks) == DISKS
        yield Source(
            bed=bed,
            vcenter_block=names["vcenter"],
            spec=spec,
            sha256=[sha256_file(f) for f in files],
            sizes=[f.stat().st_size for f in files],
        )


@dataclass
class SeenLease:
    moref: str = ""
    urls: tuple[str, ...] = ()


@pytest.fixture
def lease(source: Source, monkeypatch: pytest.MonkeyPatch):
    """Records the lease the export opens (through tasks.vcenter.disk_urls); faults
    cleared and download counters zeroed before and after."""
    seen = SeenLease()
    real = vc.disk_urls

    def spy(lease, host, port):
        urls = real(lease, host, port)
        seen.moref, seen.urls = lease._moId, tuple(u for _, u, _ in urls)
        return urls

    monkeypatch.setattr(vc, "disk_urls", spy)
    source.sim.fault(clear=1)
    source.sim.reset_stats()
    yield seen
    source.sim.fault(clear=1)


def settings(threads: int, retries: int = 0) -> MigrationSettings:
    return MigrationSettings(
        threads_on_ms=threads,
        http_timeout=10,
        export=StagePolicy(retries=retries, retry_delay_seconds=0, timeout_seconds=120),
    )


@flow(name="test-export")
def export_flow(
    source_block: str, spec: VmSpec, directory: str, config: MigrationSettings, run_key: str
) -> ExportResult:
    return run_export(source_block, spec, Path(directory), config, run_key)


def export(source: Source, directory: Path, config: MigrationSettings) -> ExportResult:
    """run_export in a flow run, as migrate_vm calls it."""
    return export_flow(
        source.vcenter_block, source.spec, str(directory), config, f"test-{uuid.uuid4().hex[:8]}"
    )


def check_export(source: Source, result: ExportResult, directory: Path) -> None:
    """Every disk exported whole with the datastore's bytes, and a descriptor naming them."""
    names = [disk_file_name(i) for i in range(DISKS)]
    assert result.directory == str(directory) and result.ovf == OVF_NAME
    assert result.source_moref == source.spec.moref
    assert [d.file_name for d in result.disks] == names
    assert [d.sha256 for d in result.disks] == source.sha256
    assert [sha256_file(directory / n) for n in names] == source.sha256
    assert [d.bytes for d in result.disks] == source.sizes
    assert sorted(p.name for p in directory.iterdir()) == sorted([*names, OVF_NAME])

    root = ET.fromstring((directory / OVF_NAME).read_text())
    refs = root.findall(f"{OVF}References/{OVF}File")
    assert [f.get(f"{OVF}href") for f in refs] == names
    assert [int(f.get(f"{OVF}size")) for f in refs] == source.sizes
    disks = root.findall(f"{OVF}DiskSection/{OVF}Disk")
    assert [d.get(f"{OVF}fileRef") for d in disks] == [f.get(f"{OVF}id") for f in refs]
    assert root.find(f"{OVF}VirtualSystem").findtext(f"{OVF}Name") == VM


def check_lease_ended(source: Source, seen: SeenLease, state: str) -> vim.HttpNfcLease:
    """The lease is in `state` and its device URLs are gone."""
    assert seen.moref and len(seen.urls) == DISKS
    with source.sim.connect() as si:
        lease = vim.HttpNfcLease(seen.moref, si._stub)
        assert lease.state == state
        error = lease.error
    with httpx.Client(verify=source.sim.ssl_context(), timeout=10) as client:
        assert [client.get(u).status_code for u in seen.urls] == [404] * DISKS
    return error


@pytest.mark.parametrize(
    ("threads_on_ms", "at_once"),
    [(2, 2), (0, DISKS), (1, 1), (-1, 1)],
    ids=["two", "zero-one-per-disk", "one", "minus-one"],
)
def test_threads_on_ms_caps_the_downloads_on_the_wire(
    source: Source, lease: SeenLease, tmp_path: Path, threads_on_ms: int, at_once: int
):
    source.sim.fault(nfc_rate_kbps=RATE_KBPS, times=DISKS)
    started = time.monotonic()
    result = export(source, tmp_path, settings(threads_on_ms))
    seconds = time.monotonic() - started

    stats = source.sim.stats()
    assert stats["nfc_max_active"] == at_once, stats
    assert stats["nfc_requests"] == DISKS and stats["nfc_completed"] == DISKS
    assert stats["nfc_active"] == 0 and stats["nfc_range_requests"] == 0
    # Rounds of about a second each: 4 disks 1, 2 or 4 at a time.
    one_disk = min(source.sizes) / (RATE_KBPS * 1024)
    assert seconds >= DISKS / at_once * one_disk * 0.9
    check_export(source, result, tmp_path)
    assert all(d.resumed_from == 0 for d in result.disks)
    assert check_lease_ended(source, lease, "done") is None


def test_the_export_asks_for_the_service_content_once_and_logs_out(
    source: Source, lease: SeenLease, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # Every vCenter call is a round trip; a real vCenter answers in milliseconds, not the
    # simulator's fraction of one.
    calls: list[str] = []
    real = SoapStubAdapter.InvokeMethod

    def counted(self, mo, info, args, outerStub=None):  # noqa: N803 - pyvmomi's name
        calls.append(info.name)
        return real(self, mo, info, args, outerStub)

    monkeypatch.setattr(SoapStubAdapter, "InvokeMethod", counted)
    directory = tmp_path / "out"
    check_export(source, export(source, directory, settings(threads=0)), directory)
    # pyvmomi's login asks for it once, v2k once more for the whole session.
    assert calls.count("RetrieveContent") == 2
    assert calls.count("CreateContainerView") == 0  # no datacenter lookup for a moref
    assert calls[-1] == "Logout" and calls.count("Logout") == 1


def test_a_cut_connection_resumes_from_the_bytes_reached(
    source: Source, lease: SeenLease, tmp_path: Path
):
    # The first two downloads break after 3 MiB; each asks for the rest with Range.
    source.sim.fault(nfc_cut_after=3 * MiB, times=2)
    result = export(source, tmp_path, settings(0))
    stats = source.sim.stats()
    assert stats["nfc_broken"] == 2 and stats["nfc_range_requests"] == 2
    assert stats["nfc_requests"] == DISKS + 2
    # Nothing was sent twice: the resumes started where the cut left off.
    assert stats["nfc_bytes"] == sum(source.sizes)
    check_export(source, result, tmp_path)
    check_lease_ended(source, lease, "done")


def test_a_failed_try_is_retried_from_the_partial_file(
    source: Source, lease: SeenLease, tmp_path: Path
):
    """The first download breaks after 3 MiB and its resume gets a 503: the task fails,
    and its retry goes on from the 3 MiB already on disk."""
    sim = source.sim
    sim.fault(nfc_cut_after=3 * MiB, times=1)
    sim.fault(nfc_rate_kbps=RATE_KBPS, times=1)
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(export, source, tmp_path, settings(1, retries=2))
        # Arm the 503 once the first body is on the wire, before its cut (0.4 s later).
        deadline = time.monotonic() + 30
        while sim.stats()["nfc_active"] < 1:
            assert time.monotonic() < deadline and not running.done()
            time.sleep(0.01)
        sim.fault(nfc_status=503, times=1)
        result = running.result(timeout=120)

    stats = sim.stats()
    assert stats["nfc_status_faults"] == 1 and stats["nfc_broken"] == 1
    assert stats["nfc_requests"] == DISKS + 2 and stats["nfc_range_requests"] == 2
    # The retry asked again for the partial file's last TAIL_CHECK bytes, to compare them.
    assert stats["nfc_bytes"] == sum(source.sizes) + TAIL_CHECK
    resumed = [d.resumed_from for d in result.disks]
    assert sorted(resumed) == [0] * (DISKS - 1) + [3 * MiB], resumed
    check_export(source, result, tmp_path)
    check_lease_ended(source, lease, "done")


def test_a_failed_export_aborts_the_lease(source: Source, lease: SeenLease, tmp_path: Path):
    source.sim.fault(nfc_status=500, times=100)
    with pytest.raises(TransferError, match="server answered 500"):
        export(source, tmp_path, settings(0, retries=1))
    error = check_lease_ended(source, lease, "error")
    assert isinstance(error, vmodl.fault.SystemError)
    assert "v2k export failed: TransferFailed" in error.reason
    assert not (tmp_path / OVF_NAME).exists()
    # Every request that reached the live lease was refused, the failing disk's retry
    # too; no body went out. (Requests after the abort get the simulator's 404 and are
    # not counted, see test_no_download_runs_against_the_aborted_lease.)
    stats = source.sim.stats()
    assert stats["nfc_status_faults"] == stats["nfc_requests"] >= 2
    assert stats["nfc_bytes"] == 0


def test_no_download_runs_against_the_aborted_lease(
    source: Source, lease: SeenLease, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import tasks.export

    errors: list[str] = []
    real = tasks.export.download

    def recording(*args, **kwargs):
        try:
            return real(*args, **kwargs)
        except Exception as exc:
            errors.append(str(exc))
            raise

    monkeypatch.setattr(tasks.export, "download", recording)
    # Disk 0 (first in line, one at a time) is refused; the others are slow.
    source.sim.fault(nfc_status=500, times=1)
    source.sim.fault(nfc_rate_kbps=RATE_KBPS, times=DISKS - 1)
    with pytest.raises(TransferError, match="disk-0.vmdk: server answered 500"):
        export(source, tmp_path, settings(1))
    check_lease_ended(source, lease, "error")
    assert errors and "answered 500" in errors[0]
    # "answered 404", not "404": the simulator's port may hold those digits (40409).
    assert not [e for e in errors if "answered 404" in e], errors


def _task_runs(flow_run_id, expected: int) -> list:
    """The flow run's task runs, once the server has recorded `expected` of them (events)."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + 30
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
            done = [r for r in runs if r.state and r.state.is_final()]
            if len(done) >= expected or time.monotonic() > deadline:
                return runs
            time.sleep(0.2)


def test_the_export_is_a_task_of_the_flow_run_with_a_download_task_per_disk(
    source: Source, lease: SeenLease, tmp_path: Path
):
    """No subflow (its end costs whole seconds in prefect 3.9): the export-vm task and
    one download-disk task per disk, all in the caller's flow run, downloads under the
    export task; each disk's progress artifact reaches 100 %."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
    )

    run_key = f"test-{uuid.uuid4().hex[:8]}"
    state = export_flow(
        source.vcenter_block, source.spec, str(tmp_path), settings(0), run_key, return_state=True
    )
    check_export(source, state.result(), tmp_path)
    flow_run_id = state.state_details.flow_run_id
    runs = _task_runs(flow_run_id, DISKS + 1)
    by_name = {r.name: r for r in runs}
    assert set(by_name) == {f"export-{VM}", *(f"download-disk-{i}" for i in range(DISKS))}
    assert all(r.state.is_completed() for r in runs)
    parent = by_name[f"export-{VM}"].id
    for i in range(DISKS):
        parents = by_name[f"download-disk-{i}"].task_inputs.get("__parents__", [])
        assert [p.id for p in parents] == [parent]
    with get_client(sync_client=True) as client:
        subflows = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])
            )
        )
        assert subflows == []
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    progress = {a.key: a.data for a in artifacts if a.type == "progress"}
    assert progress == {f"{run_key}-disk-{i}": 100.0 for i in range(DISKS)}


def _raises(error: BaseException):
    def result():
        raise error

    return result


@pytest.mark.parametrize(
    ("error", "retried"),
    [
        # A SOAP call that timed out or found vCenter gone (pyvmomi's fault for both).
        (vim.fault.HostConnectFault(msg="The read operation timed out"), True),
        (vim.fault.NotAuthenticated(), True),
        (LeaseLost("gone"), True),
        (TransferFailed("connections kept breaking"), True),
        (TransferFailed("server error", status=500), False),
        (TransferRefused("refused", status=403), False),
        (VCenterRefused("login refused", "check the password"), False),
        (VCenterUnreachable("no answer"), True),
        (StorageFull("full"), False),
        (ValueError("a bug"), False),
    ],
)
def test_the_export_asks_for_a_new_lease_after_what_a_new_session_can_cure(
    error: BaseException, retried: bool
):
    state = SimpleNamespace(result=_raises(error))
    assert _new_lease_helps(None, None, state) is retried
