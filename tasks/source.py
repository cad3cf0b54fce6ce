"""Preparing the source for export: a running VM is exported through a powered-off clone.

The source VM itself is only read. The clone is named after the flow run, so whatever
ends the run (success, failure, cancellation, a crash) can find and remove it.
"""

from __future__ import annotations

from pyVmomi import vim

from tasks import vcenter as vc

CLONE_PREFIX = "v2k-clone-"


def clone_name(run_id: str) -> str:
    """The clone's name for a flow run: fixed, so cleanup finds it from the run id alone."""
    return f"{CLONE_PREFIX}{run_id}"


def clone_for_export(si, vm: vim.VirtualMachine, name: str, timeout: float) -> vim.VirtualMachine:
    """Make a full, thin, powered-off clone of a running VM in the same folder.

    Its disks are a crash-consistent copy of the running VM's disks.
    """
    disks = [d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)]
    locators = [
        vim.vm.RelocateSpec.DiskLocator(
            diskId=disk.key,
            datastore=disk.backing.datastore,
            diskBackingInfo=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
                thinProvisioned=True, diskMode="persistent", fileName=""
            ),
        )
        for disk in disks
    ]
    spec = vim.vm.CloneSpec(
        location=vim.vm.RelocateSpec(disk=locators), powerOn=False, template=False
    )
    task = vm.CloneVM_Task(folder=vm.parent, name=name, spec=spec)
    return vc.wait_for_task(task, timeout)


def remove_clones(si, dc: vim.Datacenter, name: str, timeout: float = 300) -> list[str]:
    """Power off and destroy every VM with the clone's name; return their morefs.

    Only names with the clone prefix are accepted, so this can never remove a source VM.
    """
    if not name.startswith(CLONE_PREFIX):
        raise ValueError(f"{name!r} is not a v2k clone name")
    removed = []
    for obj, props in vc.retrieve(si, dc.vmFolder, vim.VirtualMachine, ["name"]):
        if props["name"] != name:
            continue
        if obj.runtime.powerState != vim.VirtualMachinePowerState.poweredOff:
            vc.wait_for_task(obj.PowerOffVM_Task(), timeout)
        vc.wait_for_task(obj.Destroy_Task(), timeout)
        removed.append(obj._moId)
    return removed
