"""Ownership and identity (issue 14): a run touches only what it made, and always
migrates the VM's current data.

The first part checks the pieces on their own (reservations and the ledger in a Prefect
test server, marks on a libvirt test driver); the scenarios against the test bed follow.
"""

from __future__ import annotations

import uuid

import libvirt
import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.states import Crashed

from tasks import kvm
from tasks.errors import Refused
from tasks.models import DiskSpec, VmSpec
from tasks.ownership import Ledger, Owned, Reserved, holder, release, reserve, target_key


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
