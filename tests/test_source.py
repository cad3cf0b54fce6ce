"""Clones of running VMs (tasks/source.py) against the real simulator: timeouts cancel the
vSphere task, one clone per VM at a time, the space check, and the ownership mark."""

from __future__ import annotations

import os
import time

import pytest
from pyVim.task import WaitForTask
from pyVmomi import vim, vmodl

from blocks.settings import CLONE_TIMEOUT_FLOOR, MigrationSettings
from tasks import vcenter as vc
from tasks.errors import Refused, Transient
from tasks.source import (
    CLONE_TASK,
    clone_annotation,
    clone_for_export,
    clone_name,
    prepare_clone,
    remove_clones,
)
from testbed.vcsim import VcSim

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory):
    with VcSim(tmp_path_factory.mktemp("vcsim-source"), model={"ds": 1}) as s:
        yield s


@pytest.fixture()
def si(sim: VcSim):
    sim.knob(clone_min_ms=0, clone_rate_kbps=0)
    with sim.connect() as si:
        yield si
    sim.knob(clone_min_ms=0, clone_rate_kbps=0)
    sim.knob(datastore="LocalDS_0", capacity_bytes=0)


def running_vm(sim: VcSim, si, name: str, size: int = 2 * MIB, annotation: str | None = None):
    """A powered-on VM with one monolithicFlat disk of random bytes."""
    dc = si.content.rootFolder.childEntity[0]
    pool = dc.hostFolder.childEntity[0].resourcePool
    sim.upload(f"{name}/{name}-flat.vmdk", os.urandom(size))
    descriptor = (
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n"
        f'createType="monolithicFlat"\n\nRW {size // 512} FLAT "{name}-flat.vmdk" 0\n'
    )
    sim.upload(f"{name}/{name}.vmdk", descriptor.encode())
    disk = vim.vm.device.VirtualDisk(
        key=-101,
        controllerKey=-100,
        unitNumber=0,
        capacityInKB=size // 1024,
        backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
            fileName=f"[LocalDS_0] {name}/{name}.vmdk", diskMode="persistent"
        ),
    )
    controller = vim.vm.device.ParaVirtualSCSIController(
        key=-100, busNumber=0, sharedBus="noSharing"
    )
    spec = vim.vm.ConfigSpec(
        name=name,
        guestId="debian11_64Guest",
        annotation=annotation,
        files=vim.vm.FileInfo(vmPathName=f"[LocalDS_0] {name}/{name}.vmx"),
        deviceChange=[
            vim.vm.device.VirtualDeviceSpec(operation="add", device=controller),
            vim.vm.device.VirtualDeviceSpec(operation="add", device=disk),
        ],
    )
    task = dc.vmFolder.CreateVM_Task(spec, pool)
    WaitForTask(task)
    vm = task.info.result
    WaitForTask(vm.PowerOnVM_Task())
    return dc, vm


def vms_named(si, dc, name: str) -> list:
    return [
        obj
        for obj, p in vc.retrieve(si, dc.vmFolder, vim.VirtualMachine, ["name"])
        if p["name"] == name
    ]


def clone_tasks(si, vm) -> list:
    return [
        t
        for t in si.content.taskManager.recentTask
        if t.info.descriptionId == CLONE_TASK and t.info.entity == vm
    ]


def start_clone(vm, name: str, annotation: str | None):
    """A CloneVM_Task started as an earlier try (or someone else) would, not waited for."""
    spec = vim.vm.CloneSpec(location=vim.vm.RelocateSpec(), powerOn=False)
    if annotation:
        spec.config = vim.vm.ConfigSpec(annotation=annotation)
    return vm.CloneVM_Task(folder=vm.parent, name=name, spec=spec)


def wait_ended(task, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while task.info.state in ("queued", "running"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    return task.info


def test_clone_timeout_scales_with_disk_size():
    settings = MigrationSettings()
    assert settings.clone_timeout_seconds(0) == CLONE_TIMEOUT_FLOOR
    assert settings.clone_timeout_seconds(500 * 10**9) == CLONE_TIMEOUT_FLOOR + 10_000
    assert MigrationSettings(clone_rate=100).clone_timeout_seconds(500 * 10**9) == 5600
    assert MigrationSettings(clone_timeout=42).clone_timeout_seconds(10**12) == 42


def test_a_clone_that_times_out_is_cancelled_and_leaves_nothing(sim: VcSim, si):
    dc, vm = running_vm(sim, si, "slow")
    sim.knob(clone_min_ms=20_000)
    started = time.monotonic()
    with pytest.raises(Transient, match="did not finish in 1 s") as raised:
        clone_for_export(si, dc, vm, "run-timeout", vm_path="/DC0/vm/slow", timeout=1)
    assert time.monotonic() - started < 10  # cancelled, not waited out
    assert "clone_timeout" in str(raised.value)
    (task,) = clone_tasks(si, vm)
    assert task.info.state == "error"
    assert isinstance(task.info.error, vmodl.fault.RequestCanceled)
    assert not vms_named(si, dc, clone_name("run-timeout"))
    assert not (sim.datastore_path() / clone_name("run-timeout")).exists()


def test_a_retry_cancels_its_own_running_clone_and_clones_once(sim: VcSim, si):
    dc, vm = running_vm(sim, si, "retried")
    run = "run-retry"
    sim.knob(clone_min_ms=30_000)
    # The first try's clone still runs (its worker died, or it timed out uncancelled).
    first = start_clone(vm, clone_name(run), clone_annotation(run, "/DC0/vm/retried", vm._moId))
    time.sleep(0.5)
    assert first.info.state == "running"
    sim.knob(clone_min_ms=500)
    messages = []
    clone = prepare_clone(
        si, dc, vm, run, vm_path="/DC0/vm/retried", timeout=60, log=messages.append
    )
    assert isinstance(first.info.error, vmodl.fault.RequestCanceled)
    assert any(first._moId in m for m in messages)
    assert vms_named(si, dc, clone_name(run)) == [clone]
    assert clone.config.annotation.startswith(f"v2k run {run}: export clone of /DC0/vm/retried")
    states = sorted(t.info.state for t in clone_tasks(si, vm))
    assert states == ["error", "success"]  # never two clones running at once
    assert remove_clones(si, dc, run).removed == [clone._moId]


def test_someone_elses_running_clone_is_a_refusal(sim: VcSim, si):
    dc, vm = running_vm(sim, si, "busy")
    sim.knob(clone_min_ms=30_000)
    other = start_clone(vm, "backup-copy", None)
    try:
        with pytest.raises(Refused, match=f"{other._moId}.*'backup-copy'"):
            prepare_clone(si, dc, vm, "run-busy", vm_path="/DC0/vm/busy", timeout=60)
        assert other.info.state == "running"  # left alone
        assert len(clone_tasks(si, vm)) == 1
    finally:
        other.CancelTask()
        wait_ended(other)


def test_a_small_datastore_is_refused_before_anything_is_created(sim: VcSim, si):
    dc, vm = running_vm(sim, si, "big", size=8 * MIB)
    root = sim.datastore_path()
    used = sum(p.stat().st_blocks * 512 for p in root.rglob("*") if p.is_file())
    sim.knob(datastore="LocalDS_0", capacity_bytes=used + 4 * MIB)
    with pytest.raises(Refused, match="'LocalDS_0' has .* bytes free") as raised:
        prepare_clone(si, dc, vm, "run-small", vm_path="/DC0/vm/big", timeout=60)
    assert "committed bytes" in str(raised.value) and "Fix:" in str(raised.value)
    assert not clone_tasks(si, vm)
    assert not vms_named(si, dc, clone_name("run-small"))


def test_a_vm_named_like_the_clone_without_the_mark_is_never_removed(sim: VcSim, si):
    run = "run-mark"
    dc, impostor = running_vm(sim, si, clone_name(run))
    _, other_run = running_vm(
        sim, si, "marked-elsewhere", annotation=clone_annotation("run-other", "/x", "vm-1")
    )
    # One name per folder in vCenter: the other one lives in a subfolder.
    WaitForTask(dc.vmFolder.CreateFolder("elsewhere").MoveIntoFolder_Task([other_run]))
    WaitForTask(other_run.Rename_Task(clone_name(run)))

    removal = remove_clones(si, dc, run)
    assert removal.removed == []
    assert sorted(removal.left) == sorted([impostor._moId, other_run._moId])
    assert len(vms_named(si, dc, clone_name(run))) == 2
    assert impostor.runtime.powerState == "poweredOn"

    _, source = running_vm(sim, si, "source-of-mark")
    with pytest.raises(Refused, match="do not carry this run's annotation"):
        prepare_clone(si, dc, source, run, vm_path="/DC0/vm/source-of-mark", timeout=60)
    assert len(vms_named(si, dc, clone_name(run))) == 2
