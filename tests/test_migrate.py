"""The migrate-vm flow against the test bed: refusals, failures that leave nothing, and
one real migration of the Debian guest, booted to its login prompt."""

from __future__ import annotations

import subprocess
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from datetime import UTC, datetime

import libvirt
import paramiko
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    TaskRunFilter,
    TaskRunFilterName,
    TaskRunFilterStartTime,
)
from prefect.concurrency.sync import concurrency

from blocks import KvmCluster, KvmHost, MigrationSettings, TemporaryStorage
from flows.limits import ensure_limits, limit_name
from flows.migrate import _staged, migrate_vm, preflight_task
from tasks import kvm
from tasks import vcenter as vc
from tasks.hosts import HostSelectionError
from tasks.preflight import PreflightError
from tasks.vcenter import SourceError
from testbed.testing import (
    STOP_AFTER_EXPORT,
    assert_nothing_left,
    host_of,
    request_for,
    snapshot,
)

DUMMY_XML = """<domain type='qemu'><name>{name}</name><memory unit='MiB'>32</memory>
<os><type arch='x86_64'>hvm</type></os><devices>
<interface type='network'><mac address='{mac}'/><source network='{network}'/></interface>
</devices></domain>"""


@pytest.fixture()
def unchanged(bed):
    """Asserts that the test leaves the test bed as it found it (list it before fixtures
    that make things for the test, so it is checked after they are gone)."""
    before = snapshot(bed)
    yield
    assert_nothing_left(bed, before)


@pytest.fixture()
def dummy_domain(bed):
    """A domain on one host of the destination cluster (kvm2: every host counts) holding
    a name and a MAC, removed afterwards."""
    made = []
    conn = bed.libvirt_conn("kvm2")

    def define(name: str, mac: str = "52:54:00:aa:bb:cc") -> str:
        xml = DUMMY_XML.format(name=name, mac=mac, network=bed.networks[0])
        conn.defineXML(xml)
        made.append(name)
        return name

    yield define
    for name in made:
        conn.lookupByName(name).undefine()


def _save(block, prefix: str) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    block.save(name)
    return name


def test_vm_not_found(bed_blocks, unchanged):
    with pytest.raises(SourceError, match="no VM named 'no-such-vm'"):
        migrate_vm(request_for(bed_blocks, "no-such-vm"))


def test_running_windows_refused(bed_blocks, unchanged):
    with pytest.raises(PreflightError, match="Windows VM 'win2019-running' is running.*gracefully"):
        migrate_vm(request_for(bed_blocks, "win2019-running"))


@pytest.fixture(scope="module")
def stop_after_export(bed_blocks) -> str:
    """Settings whose runs stop, failing, right after the export (virt-v2v gets 2 s)."""
    return _save(MigrationSettings(force_ms_export=True, convert_timeout=STOP_AFTER_EXPORT), "stop")


def test_running_linux_exports_a_clone_that_is_removed_after_a_failure(
    bed_blocks, unchanged, stop_after_export
):
    # The clone is exported (the source keeps running, untouched); the conversion then
    # fails, and the clone is gone afterwards (checked by `unchanged`).
    with pytest.raises(Exception, match="convert_timeout"):
        migrate_vm(request_for(bed_blocks, "debian-running", settings=stop_after_export))


def test_windows_needs_virtio_win_on_the_convert_host(bed, bed_blocks, tmp_path):
    from tasks.hosts import choose_hosts, probe_hosts

    drivers = tmp_path / "virtio-win"
    drivers.mkdir()
    hosts = KvmCluster.load(bed_blocks["cluster"]).load_hosts()
    names = sorted(hosts)
    without = probe_hosts(hosts)
    with pytest.raises(HostSelectionError, match="virtio-win is not installed"):
        choose_hosts(without, windows=True)
    hosts[names[1]] = hosts[names[1]].model_copy(update={"virtio_win": str(drivers)})
    choice = choose_hosts(probe_hosts(hosts), windows=True)
    assert choice.convert == names[1]
    assert choose_hosts(without, windows=False).convert in names


def test_independent_disk_refused(bed_blocks, unchanged):
    with pytest.raises(PreflightError, match="independent_persistent.*dependent"):
        migrate_vm(request_for(bed_blocks, "independent-disk"))


def test_ambiguous_name_lists_paths(bed, bed_blocks):
    with bed.vcsim.connect() as si:
        dc = vc.datacenter(si, bed.vcsim.datacenter)
        source = vc.find_vm(si, dc, "win2019-stopped")
        folder = dc.vmFolder
        spec = vc.vim.vm.ConfigSpec(
            name="win2019-stopped",
            guestId="otherGuest64",
            files=vc.vim.vm.FileInfo(vmPathName="[LocalDS_0] dup/dup.vmx"),
        )
        pool = source.resourcePool
        twin = vc.wait_for_task(folder.CreateVM_Task(config=spec, pool=pool), 60)
        try:
            with pytest.raises(SourceError, match="2 VMs are named 'win2019-stopped'.*Windows"):
                migrate_vm(request_for(bed_blocks, "win2019-stopped"))
        finally:
            vc.wait_for_task(twin.Destroy_Task(), 60)


def test_target_name_taken_refused(bed_blocks, unchanged, dummy_domain):
    taken = dummy_domain("taken-name")
    with pytest.raises(PreflightError, match="'taken-name' is already defined"):
        migrate_vm(request_for(bed_blocks, "win2019-stopped", target_name=taken))


def test_mac_in_use_refused(bed_blocks, unchanged, dummy_domain):
    dummy_domain("mac-holder", mac="00:50:56:01:00:04")
    with pytest.raises(PreflightError, match="MAC 00:50:56:01:00:04.*'mac-holder'"):
        migrate_vm(request_for(bed_blocks, "win2019-stopped"))


def test_unmapped_portgroup_refused(bed, bed_blocks, unchanged):
    cluster = KvmCluster.load(bed_blocks["cluster"]).model_copy(update={"network_map": {}})
    name = _save(KvmCluster(hosts=cluster.hosts, storage_pool=cluster.storage_pool), "nomap")
    with pytest.raises(PreflightError, match="port group 'VM Network'.*network_map"):
        migrate_vm(request_for(bed_blocks, "win2019-stopped", cluster=name))


def test_temporary_space_refused(bed, bed_blocks, unchanged):
    name = _save(TemporaryStorage(worker_path=str(bed.scratch), reserve_bytes=1 << 60), "full")
    with pytest.raises(PreflightError, match="temporary storage .* bytes free"):
        migrate_vm(request_for(bed_blocks, "win2019-stopped", temporary_storage=name))


def test_named_host_must_exist_and_be_able(bed, bed_blocks, unchanged, stop_after_export):
    with pytest.raises(HostSelectionError, match="'nope' is not a host of the cluster"):
        migrate_vm(request_for(bed_blocks, "win2019-stopped", convert_host="nope"))

    real = KvmHost.load(bed_blocks["kvm1"])
    dead = _save(real.model_copy(update={"port": 1, "libvirt_uri": None}), "dead")
    cluster = KvmCluster.load(bed_blocks["cluster"])
    name = _save(
        KvmCluster(
            hosts=[dead], storage_pool=cluster.storage_pool, network_map=cluster.network_map
        ),
        "deadcluster",
    )
    with pytest.raises(HostSelectionError, match="no host of the cluster can convert.*unreachable"):
        migrate_vm(request_for(bed_blocks, "win2019-stopped", cluster=name))

    # A host that cannot be reached is passed over: the live one does the work (the run
    # then stops, on purpose, right after the export).
    both = _save(
        KvmCluster(
            hosts=[dead, bed_blocks["kvm1"]],
            storage_pool=cluster.storage_pool,
            network_map=cluster.network_map,
        ),
        "halfdead",
    )
    state = migrate_vm(
        request_for(bed_blocks, "Prod/Web/web server 01", cluster=both, settings=stop_after_export),
        return_state=True,
    )
    assert state.is_failed() and "convert_timeout" in str(state.message), state.message
    with pytest.raises(HostSelectionError, match=f"{dead}.*unreachable"):
        migrate_vm(
            request_for(bed_blocks, "Prod/Web/web server 01", cluster=both, convert_host=dead)
        )


def test_failed_conversion_leaves_nothing(bed_blocks, unchanged):
    # A synthetic disk holds no OS: the real virt-v2v fails in inspection, after the export.
    state = migrate_vm(request_for(bed_blocks, "Prod/Web/web server 01"), return_state=True)
    assert state.is_failed()
    assert "virt-v2v exited 1: inspection could not detect" in str(state.message)
    # virt-v2v's own refusal is not retried: the same disk would fail the same way.
    runs = _task_runs(state.state_details.flow_run_id)
    assert [r.run_count for r in runs if r.name.startswith("convert")] == [1]


def test_stage_timeouts_are_given_to_prefect_where_it_can_interrupt():
    settings = MigrationSettings()
    assert _staged(preflight_task, settings, "preflight").timeout_seconds == 300
    in_a_thread: list[float | None] = []
    thread = threading.Thread(
        target=lambda: in_a_thread.append(
            _staged(preflight_task, settings, "preflight").timeout_seconds
        )
    )
    thread.start()
    thread.join()
    assert in_a_thread == [None]


def _task_runs(flow_run_id) -> list:
    with get_client(sync_client=True) as client:
        return client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )


def test_a_kvm_host_cap_holds_the_conversion_until_a_slot_is_free(bed_blocks, unchanged):
    kvm1 = bed_blocks["kvm1"]
    cap = limit_name("kvm", kvm1)
    ensure_limits({cap: 1}, {})
    started = datetime.now(UTC)
    holding, released = threading.Event(), []

    def hold_the_only_slot() -> None:
        # Held until the run below has exported (it then waits for the slot), and 1 s more.
        with concurrency(cap, occupy=1, strict=True):
            holding.set()
            deadline = time.monotonic() + 120
            while not _exported_since(started) and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(1)
            released.append(datetime.now(UTC))

    holder = threading.Thread(target=hold_the_only_slot)
    holder.start()
    try:
        assert holding.wait(30)
        request = request_for(bed_blocks, "Prod/Web/web server 01", convert_host=kvm1)
        state = migrate_vm(request, return_state=True)
    finally:
        holder.join()
        with get_client(sync_client=True) as client:
            client.delete_global_concurrency_limit_by_name(cap)
    # The synthetic disk has no OS: virt-v2v refuses it, after the wait.
    assert state.is_failed() and "inspection could not detect" in str(state.message)
    runs = _task_runs(state.state_details.flow_run_id)
    (export,) = [r for r in runs if r.name.startswith("export-")]
    (convert,) = [r for r in runs if r.name.startswith("convert")]
    assert export.end_time < released[0] <= convert.start_time


def _exported_since(since: datetime) -> bool:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            task_run_filter=TaskRunFilter(
                name=TaskRunFilterName(like_="export-"),
                start_time=TaskRunFilterStartTime(after_=since),
            )
        )
    return any(r.state and r.state.is_completed() for r in runs)


@pytest.mark.slow
def test_real_guest_migrates_and_boots(bed, bed_blocks, unchanged, monkeypatch):
    logins = []
    real_connect = paramiko.SSHClient.connect

    def counted(client, hostname, *args, **kwargs):
        logins.append(hostname)
        return real_connect(client, hostname, *args, **kwargs)

    monkeypatch.setattr(paramiko.SSHClient, "connect", counted)
    result = migrate_vm(request_for(bed_blocks, "debian-stopped", verify_boot=True))
    # One SSH login per host for the stages (tasks.ssh): probe, convert and import share it.
    hosts = [h.address for h in bed.hosts.hosts]
    assert sorted(logins) == sorted(hosts), logins
    conn = bed.libvirt_conn(host_of(result.import_host))
    try:
        dom = conn.lookupByName(result.domain_name)
        root = ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        assert result.domain_name == "debian-stopped"
        assert dom.UUIDString() == result.domain_uuid
        assert root.get("type") == "qemu"
        assert root.findtext("vcpu") == "1"
        assert int(root.findtext("memory")) == 1024 * 1024  # KiB
        assert [m.get("address") for m in root.iterfind("devices/interface/mac")] == [
            "00:50:56:01:00:01"
        ]
        others = [h for h in bed.libvirt if h != host_of(result.import_host)]
        assert not [h for h in others if kvm.domain_exists(bed.libvirt_conn(h), "debian-stopped")]
        networks = [s.get("network") for s in root.iterfind("devices/interface/source")]
        assert networks == [bed.networks[0]]
        disks = list(root.iterfind("devices/disk[@device='disk']"))
        assert len(disks) == 1 and disks[0].find("target").get("dev") == "vda"
        assert "debian" in (result.osinfo or "")
        assert result.booted is True
        # The volume's name carries the run's id (its ownership mark).
        name = disks[0].find("source").get("volume")
        assert name.startswith("debian-stopped-disk0-") and name.endswith(".qcow2")
        volume = conn.storagePoolLookupByName(bed.pool).storageVolLookupByName(name)
        check = subprocess.run(
            ["qemu-img", "check", "-f", "qcow2", volume.path()], capture_output=True, text=True
        )
        assert check.returncode == 0, check.stdout + check.stderr
        assert volume.info()[1] == 1 << 30  # virtual size of the source disk
        assert [s.name for s in result.stages] == [
            "preflight",
            "select_hosts",
            "export",
            "convert",
            "import",
            "verify",
        ]
        assert len(result.checksums) == 1
        with get_client(sync_client=True) as client:
            artifact = client.read_latest_artifacts(key=f"migration-{result.source_moref}")
        assert artifact and "debian-stopped" in str(artifact)
    finally:
        kvm.remove_migrated_domain(conn, result.domain_name)
