"""Ownership and identity (issue 14): a run touches only what it made, and always
migrates the VM's current data.

The first part checks the pieces on their own (reservations and the ledger in a Prefect
test server, marks on a libvirt test driver); the scenarios against the test bed follow.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import libvirt
import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.states import Crashed
from pyVmomi import vim

from blocks import KvmHost, MigrationSettings
from flows.cleanup import run_id_of
from flows.migrate import migrate_vm, select_hosts_task
from tasks import kvm, resume
from tasks import vcenter as vc
from tasks.cleanup import remove_tree
from tasks.errors import Refused
from tasks.models import DiskSpec, VmSpec
from tasks.ownership import Ledger, Owned, Reserved, holder, release, reserve, target_key
from testbed.testing import assert_nothing_left, request_for, snapshot, write_disk


@pytest.fixture
def harness(prefect_harness):
    return prefect_harness


def _finished_run(state=None) -> str:
    """The id of a real flow run that has ended (completed, or forced into `state`)."""

    @flow
    def ended() -> None:
        return None

    done = ended(return_state=True)
    run_id = str(done.state_details.flow_run_id)
    if state is not None:
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(run_id, state, force=True)
    return run_id


def _running_run() -> str:
    """The id of a flow run that is still running (created, set RUNNING, never ended)."""
    from prefect.states import Running

    @flow(name="v2k-ownership-holder")
    def holder_flow() -> None:
        return None

    with get_client(sync_client=True) as client:
        run = client.create_flow_run(holder_flow)
        client.set_flow_run_state(run.id, Running(), force=True)
    return str(run.id)


def test_a_reserved_target_is_refused_naming_the_holder(harness):
    key = target_key("cluster-a", f"web-{uuid.uuid4().hex[:6]}")
    first = _running_run()
    reserve(key, first, "migrate-web 01")
    with pytest.raises(Reserved) as refused:
        reserve(key, str(uuid.uuid4()), "migrate-web-01")
    assert isinstance(refused.value, Refused)  # never retried
    assert first in str(refused.value) and "migrate-web 01" in str(refused.value)
    assert "running" in str(refused.value) and "Fix:" in str(refused.value)
    # The holder itself may reserve again (a retried flow run); others may not release it.
    assert reserve(key, first).flow_run_id == first
    assert not release(key, str(uuid.uuid4()))
    assert holder(key).flow_run_id == first
    assert release(key, first)
    assert holder(key) is None
    second = str(uuid.uuid4())
    assert reserve(key, second).flow_run_id == second
    release(key, second)


def test_a_finished_holder_gives_way_but_a_crashed_one_does_not(harness):
    key = target_key("cluster-a", f"db-{uuid.uuid4().hex[:6]}")
    reserve(key, _finished_run())  # completed without releasing: stale
    taker = str(uuid.uuid4())
    assert reserve(key, taker).flow_run_id == taker
    release(key, taker)
    reserve(key, str(uuid.uuid4()))  # a flow run that does not exist: stale too
    assert reserve(key, taker).flow_run_id == taker
    release(key, taker)

    crashed = _finished_run(Crashed())
    reserve(key, crashed)
    with pytest.raises(Reserved, match="crashed"):
        reserve(key, taker)
    release(key, crashed)


def test_the_ledger_persists_what_a_run_made(harness):
    run_id = uuid.uuid4().hex[:12]
    ledger = Ledger(run_id)
    volume = Owned(kind="volume", name=kvm.volume_name("web", 0, run_id), host="kvm1", place="p")
    ledger.record(volume)
    ledger.record(volume)  # recorded once
    ledger.record(Owned(kind="domain", name="web", host="kvm1"))
    again = Ledger(run_id)  # another process reads the same ledger
    assert [o.kind for o in again.entries()] == ["volume", "domain"]
    assert again.of_kind("volume") == [volume]
    assert "volume p/web-disk0-" in volume.describe() and "on kvm1" in volume.describe()
    again.drop(volume)
    again.drop(Owned(kind="domain", name="web", host="kvm1"))
    assert Ledger(run_id).entries() == []


def _spec(**disk) -> VmSpec:
    base = dict(key=2000, label="Hard disk 1", capacity_bytes=1 << 30)
    base |= dict(file_name="[ds1] web/web.vmdk", datastore="ds1", controller="scsi0:0")
    return VmSpec(
        name="web",
        moref="vm-1",
        instance_uuid="5003-aaaa",
        inventory_path="/DC0/vm/web",
        guest_id="debian12_64Guest",
        power_state="poweredOff",
        num_cpu=1,
        cores_per_socket=1,
        memory_mb=512,
        firmware="bios",
        disks=[DiskSpec(mode="persistent", **(base | disk))],
        nics=[],
        change_version="2026-12-01T10:00:00Z",
        vcenter_uuid="vc-1",
    )


def test_the_data_version_follows_the_disks_not_the_configuration():
    stamped = _spec(files_stamp="web-flat.vmdk:1073741824:2026-12-01T10:00:00")
    written = _spec(files_stamp="web-flat.vmdk:1073741824:2026-12-01T11:30:00")
    assert stamped.data_version and stamped.data_version != written.data_version
    # Change tracking on: the changeId speaks for the disk.
    cbt = _spec(change_id="52 1a/7", files_stamp="x")
    assert cbt.data_version != _spec(change_id="52 1a/8", files_stamp="x").data_version
    # The same VM UUID in another vCenter (a DR pair) is other data.
    other_vc = stamped.model_copy(update={"vcenter_uuid": "vc-2"})
    assert other_vc.data_version != stamped.data_version
    # Nothing tells the disk's state: no identity, so nothing is reused.
    assert _spec().data_version is None


def test_volume_marks_and_domain_marks_guard_every_removal():
    conn = libvirt.open("test:///default")
    try:
        pool = conn.storagePoolLookupByName("default-pool")
        run_id = "0123456789ab"
        ours = kvm.volume_name("web", 0, run_id)
        assert kvm.carries_mark(ours, run_id)
        assert not kvm.carries_mark("web-disk0.qcow2", run_id)
        assert not kvm.carries_mark(kvm.volume_name("web", 0, "ffffffffffff"), run_id)
        for name in (ours, "web-disk0.qcow2"):
            pool.createXML(f"<volume><name>{name}</name><capacity>1048576</capacity></volume>", 0)
        # A ledger that names a volume without the mark is not trusted.
        with pytest.raises(ValueError, match="not made by run"):
            kvm.remove_run_volumes(conn, run_id, [("default-pool", "web-disk0.qcow2")])
        assert kvm.remove_run_volumes(conn, run_id, [("default-pool", ours)]) == [
            f"default-pool/{ours}"
        ]
        assert kvm.remove_run_volumes(conn, run_id, [("default-pool", ours)]) == []  # gone
        assert "web-disk0.qcow2" in pool.listVolumes()
        # A domain without this run's metadata is never removed.
        with pytest.raises(ValueError, match="not defined by run"):
            kvm.remove_run_domain(conn, "test", str(uuid.uuid4()), run_id)
        assert kvm.domain_exists(conn, "test")
        with pytest.raises(ValueError, match="v2k did not define it"):
            kvm.remove_migrated_domain(conn, "test")
    finally:
        conn.close()


def test_a_directory_that_cannot_be_removed_is_reported(tmp_path):
    """Removal errors are not swallowed: cleanup must be able to say what is left."""
    run = tmp_path / "v2k-0123456789ab"
    busy = run / "export"
    busy.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "v2k-test", str(busy)], check=True)
    try:
        with pytest.raises(OSError):
            remove_tree(run, tmp_path)  # a mount point cannot be removed
    finally:
        subprocess.run(["umount", str(busy)], check=True)
    remove_tree(run, tmp_path)
    assert not run.exists()
    remove_tree(run, tmp_path)  # already gone: done


# ---- against the test bed ---------------------------------------------------------------
#
# After every scenario, every domain and volume that existed before is byte-identical
# (`_estate`), and what a run made carries its mark.


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _estate(bed) -> dict[str, dict[str, str]]:
    """Every host's domains (their XML) and pool volumes (sha256 of their files)."""
    found: dict[str, dict[str, str]] = {}
    for host in bed.hosts.hosts:
        conn = bed.libvirt_conn(host.name)
        pool = conn.storagePoolLookupByName(bed.pool)
        pool.refresh()
        found[host.name] = {
            f"domain {d.name()}": d.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
            for d in conn.listAllDomains()
        } | {f"volume {v}": _sha256_file(bed.pool_path(host.name) / v) for v in pool.listVolumes()}
    return found


def _unchanged_except(before: dict, after: dict, made: set[str] = frozenset()) -> None:
    """Everything of `before` is in `after` as it was; `after` has only `made` besides."""
    for host, objects in before.items():
        for name, digest in objects.items():
            assert after[host].get(name) == digest, f"{name} on {host} was changed or removed"
    new = {f"{h}:{n}" for h, objects in after.items() for n in objects if n not in before[h]}
    assert new == set(made), f"made: {sorted(new)}, expected {sorted(made)}"


FOREIGN_XML = """<domain type='qemu'><name>{name}</name><memory unit='MiB'>32</memory>
<os><type arch='x86_64'>hvm</type></os><devices>
<disk type='volume' device='disk'><driver name='qemu' type='qcow2'/>
<source pool='{pool}' volume='{volume}'/><target dev='vda' bus='virtio'/></disk>
</devices></domain>"""


@pytest.fixture()
def foreign(bed):
    """On every host, a domain and volumes that no v2k run made, with the names a run for
    `debian-data` would have used before volume names carried the run's id (and the
    domain name a second target will ask for). Removed afterwards."""
    made = []
    for host in bed.hosts.hosts:
        conn = bed.libvirt_conn(host.name)
        pool = conn.storagePoolLookupByName(bed.pool)
        for index in range(2):
            name = f"debian-data-disk{index}.qcow2"
            vol = pool.createXML(
                f"<volume><name>{name}</name><capacity>1048576</capacity>"
                "<target><format type='qcow2'/></target></volume>",
                0,
            )
            made.append((host.name, "volume", name))
            # Content of its own, so that any write to it shows in the digest.
            with open(vol.path(), "r+b") as f:
                f.seek(65536)
                f.write(os.urandom(4096))
        conn.defineXML(
            FOREIGN_XML.format(
                name="taken-by-hand", pool=bed.pool, volume="debian-data-disk0.qcow2"
            )
        )
        made.append((host.name, "domain", "taken-by-hand"))
    yield made
    for host, kind, name in reversed(made):
        conn = bed.libvirt_conn(host)
        if kind == "domain":
            conn.lookupByName(name).undefine()
        else:
            conn.storagePoolLookupByName(bed.pool).storageVolLookupByName(name).delete(0)


def test_a_retried_refused_run_is_refused_again_and_touches_nothing(bed, bed_blocks, foreign):
    """The UI's Retry of a run that preflight refused: the retry runs every rule again
    (nothing is skipped because it is a retry) and removes nothing it did not make."""
    before, snap = _estate(bed), snapshot(bed)
    request = request_for(bed_blocks, "debian-data", target_name="taken-by-hand")
    state = migrate_vm.with_options(retries=1, retry_delay_seconds=0)(request, return_state=True)
    assert state.is_failed()
    assert "'taken-by-hand' is already defined" in state.message, state.message
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(state.state_details.flow_run_id).run_count == 2
    _unchanged_except(before, _estate(bed))
    assert_nothing_left(bed, snap)
    assert holder(target_key(bed_blocks["cluster"], "taken-by-hand")) is None


def test_a_run_pins_its_hosts(bed, bed_blocks):
    """select-hosts is persisted with the run: a resumed run gets the same hosts, which
    hold its host-local export and conversion."""
    request = request_for(bed_blocks, "debian-data")
    run_id = uuid.uuid4().hex[:12]

    @flow
    def choose_twice():
        with bed.vcsim.connect() as si:
            spec = vc.read_spec(si, vc.find_vm(si, vc.datacenter(si, None), "debian-data"))
        token = resume.resume_token(run_id)
        first = select_hosts_task(request, spec, True, run_id, token, return_state=True)
        again = select_hosts_task(request, spec, True, run_id, token, return_state=True)
        other = select_hosts_task(request, spec, True, "another", token, return_state=True)
        return first, again, other

    try:
        first, again, other = choose_twice()
        assert again.name == "Cached" and again.result() == first.result()
        assert other.name != "Cached"
    finally:
        resume.forget(run_id)


def test_cleanup_that_cannot_reach_a_host_says_so_and_v2k_cleanup_finishes(bed, bed_blocks):
    """An unreachable host is not assumed to hold nothing: what may be left there stays
    in the run's ledger and is named (`v2k cleanup` exits 1); once the host is back,
    `v2k cleanup RUN` finishes the job."""
    from typer.testing import CliRunner

    from flows.cli import app

    # A real flow run to clean up after (refused in preflight: fast).
    state = migrate_vm(request_for(bed_blocks, "win2019-running"), return_state=True)
    assert state.is_failed()
    flow_run_id = str(state.state_details.flow_run_id)
    run_id = run_id_of(flow_run_id)
    # What the run would have left: a volume on kvm2, which cannot be reached yet (its
    # block's libvirtd socket answers nothing), and its directory.
    volume = kvm.volume_name("own-cleanup", 0, run_id)
    conn = bed.libvirt_conn("kvm2")
    conn.storagePoolLookupByName(bed.pool).createXML(
        f"<volume><name>{volume}</name><capacity>1048576</capacity></volume>", 0
    )
    directory = Path(bed.scratch) / f"v2k-{run_id}"
    (directory / "export").mkdir(parents=True)
    down = f"own-down-{run_id}"
    KvmHost.load(bed_blocks["kvm2"]).model_copy(
        update={"libvirt_uri": "qemu+unix:///system?socket=/run/v2k-nothing/libvirt-sock"}
    ).save(down)
    ledger = Ledger(run_id)
    ledger.record(Owned(kind="directory", name=str(directory)))
    ledger.record(Owned(kind="volume", name=volume, host=down, place=bed.pool))
    try:
        first = CliRunner().invoke(app, ["cleanup", flow_run_id], env={"COLUMNS": "400"})
        assert first.exit_code == 1, first.output
        assert "may be left" in first.output and volume in first.output and down in first.output
        assert not directory.exists()  # what could be removed is gone
        assert [o.name for o in ledger.entries()] == [volume]
        assert volume in conn.storagePoolLookupByName(bed.pool).listVolumes()

        back = KvmHost.load(down)  # the host is back
        back.libvirt_uri = KvmHost.load(bed_blocks["kvm2"]).libvirt_uri
        back.save(down, overwrite=True)
        again = CliRunner().invoke(app, ["cleanup", flow_run_id])
        assert again.exit_code == 0, again.output
        assert "cleaned up after" in again.output
        assert volume not in conn.storagePoolLookupByName(bed.pool).listVolumes()
        assert ledger.entries() == []
    finally:
        kvm.remove_run_volumes(conn, run_id, [(bed.pool, volume)])
        KvmHost.delete(down)
        for entry in ledger.entries():
            ledger.drop(entry)


def _raw_sha256(path: Path, fmt: str) -> str:
    """sha256 of a disk image's raw content (qemu-img convert to raw first)."""
    with tempfile.TemporaryDirectory(prefix="v2k-raw-") as tmp:
        raw = Path(tmp) / "raw"
        subprocess.run(
            ["qemu-img", "convert", "-f", fmt, "-O", "raw", str(path), str(raw)],
            check=True,
            timeout=300,
        )
        return _sha256_file(raw)


def _source_disk_sha256(bed, vm, index: int) -> str:
    """sha256 of a source disk's raw content, read through the datastore."""
    disks = [d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)]
    datastore, _, path = disks[index].backing.fileName[1:].partition("] ")
    with tempfile.TemporaryDirectory(prefix="v2k-src-") as tmp:
        local = Path(tmp) / "disk.vmdk"
        local.write_bytes(bed.vcsim.download(path, datastore))
        return _raw_sha256(local, "vmdk")


@pytest.mark.slow
def test_one_migration_owns_only_what_it_made_and_carries_the_current_data(
    bed, bed_blocks, foreign
):
    """One real conversion serves the scenarios of same target, same VM twice, stale data
    and pre-existing names: while it runs, a second run for its VM and a third for its
    target are refused naming it; the guest's last write is on KVM; nothing that existed
    before is changed. Its boot check cannot succeed (1 s): the migration is kept all the
    same, and the run ends as 'Migrated, not verified'."""
    with bed.vcsim.connect() as si:
        vm = vc.find_vm(si, vc.datacenter(si, None), "debian-data")
        write_disk(bed.vcsim, vm, 3 << 20, os.urandom(1 << 20), disk=1)  # the guest writes
        want = _source_disk_sha256(bed, vm, 1)
    before, snap = _estate(bed), snapshot(bed)
    MigrationSettings(force_ms_export=True, boot_timeout=1).save("own-settings", overwrite=True)
    request = request_for(bed_blocks, "debian-data", settings="own-settings", verify_boot=True)
    key = target_key(bed_blocks["cluster"], "debian-data")
    ended: dict = {}
    migration = threading.Thread(
        target=lambda: ended.update(state=migrate_vm(request, return_state=True))
    )
    migration.start()
    try:
        deadline = time.monotonic() + 120
        while holder(key) is None and migration.is_alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        held = holder(key)
        assert held is not None, "the migration never reserved its target"
        with pytest.raises(Reserved, match=held.flow_run_id):
            migrate_vm(request_for(bed_blocks, "debian-data"))  # the same VM again
        with pytest.raises(Reserved, match="target .*/debian-data is reserved"):
            migrate_vm(request_for(bed_blocks, "debian-stopped", target_name="debian-data"))
    finally:
        migration.join(900)
    state = ended["state"]
    assert state.is_completed(), state.message
    assert state.name == "Migrated, not verified" and "boot check failed" in state.message
    result = state.result()
    assert result.booted is False and "login" in result.verify_error
    host = next(h.name for h in bed.hosts.hosts if bed_blocks[h.name] == result.import_host)
    run_id = held.flow_run_id.replace("-", "")[:12]
    try:
        volumes = [kvm.volume_name("debian-data", i, run_id) for i in range(2)]
        assert _raw_sha256(bed.pool_path(host) / volumes[1], "qcow2") == want
        made = {f"{host}:domain debian-data", *(f"{host}:volume {v}" for v in volumes)}
        _unchanged_except(before, _estate(bed), made)  # the unverified domain is kept
        assert not bed.libvirt_conn(host).lookupByName("debian-data").isActive()
        assert holder(key) is None  # released, with the source's
        assert Ledger(run_id).entries() == []  # the domain and volumes are the user's now
    finally:
        kvm.remove_migrated_domain(bed.libvirt_conn(host), "debian-data")
    assert_nothing_left(bed, snap)
