"""Preparing the source for export: a running VM is exported through a powered-off clone.

The source VM itself is only read. The clone carries the run's identity twice: in its
name (`v2k-clone-<run id>`) and in its annotation ("v2k run <run id>: ..."). Cleanup
removes only a VM that carries both, so a VM that merely has the name is never touched.
One VM is never cloned twice at once: a clone task of this run still running (a retry
after a timeout or a dead worker) is cancelled first, anyone else's is a refusal.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from pydantic import BaseModel, Field
from pyVmomi import vim, vmodl

from blocks.vcenter import service_content
from tasks import vcenter as vc
from tasks.errors import Refused, Transient

CLONE_PREFIX = "v2k-clone-"
CLONE_TASK = "VirtualMachine.clone"  # TaskInfo.descriptionId of CloneVM_Task
CANCEL_WAIT = 300.0
"""Seconds a cancelled clone task gets to end (vCenter stops the copy, then cleans up)."""
SPACE_MARGIN = 0.10
"""Extra share of the committed bytes a clone is assumed to need (metadata, growth)."""


class CloneRemoval(BaseModel):
    """What `remove_clones` did: morefs removed, and those left because they lack the mark."""

    removed: list[str] = Field(default_factory=list)
    left: list[str] = Field(
        default_factory=list,
        description="VMs with the clone's name but without this run's annotation: not ours.",
    )


class RunningClone(BaseModel):
    """A CloneVM_Task of the source VM that has not ended."""

    task: str = Field(description="The task's moref.")
    dest_name: str | None = Field(description="The clone's name, from the task's events.")


def clone_name(run_id: str) -> str:
    """The clone's name for a flow run: fixed, so cleanup finds it from the run id alone."""
    return f"{CLONE_PREFIX}{run_id}"


def clone_annotation(run_id: str, vm_path: str, moref: str) -> str:
    """The clone's `config.annotation`: the ownership mark that cleanup checks."""
    return f"v2k run {run_id}: export clone of {vm_path} (moref {moref})"


def is_marked(annotation: str | None, run_id: str) -> bool:
    """Whether an annotation is this run's mark (see `clone_annotation`)."""
    return (annotation or "").startswith(f"v2k run {run_id}:")


def clone_space_needed(vm: vim.VirtualMachine) -> dict[str, int]:
    """Bytes a thin clone needs per datastore: each disk's committed bytes (its files in
    `layoutEx`, the whole snapshot chain) plus SPACE_MARGIN; a disk whose files are not
    listed counts with its full capacity."""
    layout = vm.layoutEx
    sizes = {f.key: f.size or 0 for f in (layout.file if layout else [])}
    chains = {d.key: d.chain for d in (layout.disk if layout else [])}
    needed: dict[str, int] = {}
    for disk in vm.config.hardware.device:
        if not isinstance(disk, vim.vm.device.VirtualDisk):
            continue
        chain = chains.get(disk.key)
        if chain:
            used = sum(sizes.get(k, 0) for unit in chain for k in unit.fileKey)
        else:
            used = disk.capacityInBytes or disk.capacityInKB * 1024
        store = disk.backing.datastore.name
        needed[store] = needed.get(store, 0) + int(used * (1 + SPACE_MARGIN))
    return needed


def check_clone_space(vm: vim.VirtualMachine, vm_path: str) -> None:
    """Refuse before cloning when a target datastore lacks the space the clone needs.

    Raises:
        Refused: naming the datastore, its free bytes and what the clone needs.
    """
    needed = clone_space_needed(vm)
    stores = {ds.name: ds for ds in vm.datastore}
    for name, need in sorted(needed.items()):
        free = stores[name].summary.freeSpace if name in stores else None
        if free is not None and free < need:
            raise Refused(
                f"datastore {name!r} has {free} bytes free, but the clone of {vm_path} needs "
                f"about {need} bytes there (its disks' committed bytes plus "
                f"{SPACE_MARGIN:.0%}; a disk without a file list counts at full capacity).",
                fix=f"free space on {name!r}, or power the VM off so that it is exported "
                "without a clone.",
            )


def _task_info(task: vim.Task):
    try:
        return task.info
    except (vmodl.fault.ManagedObjectNotFound, TypeError, ValueError):
        return None  # gone meanwhile, or a task pyvmomi cannot decode: not a clone


def running_clones(si, vm: vim.VirtualMachine) -> list[RunningClone]:
    """CloneVM_Tasks of `vm` that are queued or running, with the clone's name each makes.

    The name comes from the task's VmBeingClonedEvent (same chain id), as vCenter shows it.
    """
    content = service_content(si)
    tasks = {t._moId: t for t in [*(content.taskManager.recentTask or []), *vm.recentTask]}
    found = []
    for task in tasks.values():
        info = _task_info(task)
        if (
            info is not None
            and info.descriptionId == CLONE_TASK
            and info.state in (vim.TaskInfo.State.queued, vim.TaskInfo.State.running)
            and info.entity is not None
            and info.entity._moId == vm._moId
        ):
            found.append((task._moId, info.eventChainId))
    if not found:
        return []
    events = content.eventManager.QueryEvents(
        vim.event.EventFilterSpec(
            entity=vim.event.EventFilterSpec.ByEntity(entity=vm, recursion="self"),
            eventTypeId=["VmBeingClonedEvent"],
        )
    )
    dest = {e.chainId: e.destName for e in events or []}
    return [RunningClone(task=moref, dest_name=dest.get(chain)) for moref, chain in found]


def cancel_task(task: vim.Task, timeout: float = CANCEL_WAIT) -> str:
    """Cancel a vSphere task and wait until it has really ended; return its final state.

    Raises:
        Transient: it still runs after `timeout` seconds.
    """
    try:
        task.CancelTask()
    except (vim.fault.InvalidState, vmodl.fault.NotSupported):
        pass  # already ended, or past the point where it can stop: wait for its end
    deadline = time.monotonic() + timeout
    while True:
        state = task.info.state
        if state in (vim.TaskInfo.State.success, vim.TaskInfo.State.error):
            return state
        if time.monotonic() > deadline:
            raise Transient(
                f"vSphere task {task._moId} was cancelled but still runs after {timeout:.0f} s.",
                fix="wait until vCenter shows it ended, then retry.",
            )
        time.sleep(0.5)


def clone_for_export(
    si, dc: vim.Datacenter, vm: vim.VirtualMachine, run_id: str, *, vm_path: str, timeout: float
) -> vim.VirtualMachine:
    """Make a full, thin, powered-off clone of a running VM in the same folder, marked as
    this run's (name and annotation). Its disks are a crash-consistent copy.

    On a timeout (or any failure) the clone task is cancelled and waited for, and a clone
    that appeared anyway is removed.

    Raises:
        Transient: the clone did not finish in `timeout` seconds (nothing is left).
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
        location=vim.vm.RelocateSpec(disk=locators),
        config=vim.vm.ConfigSpec(annotation=clone_annotation(run_id, vm_path, vm._moId)),
        powerOn=False,
        template=False,
    )
    task = vm.CloneVM_Task(folder=vm.parent, name=clone_name(run_id), spec=spec)
    try:
        return vc.wait_for_task(task, timeout)
    except TimeoutError:
        _abandon(si, dc, task, run_id)
        raise Transient(
            f"the clone of {vm_path} did not finish in {timeout:.0f} s; its vSphere task "
            f"{task._moId} was cancelled and nothing of it is left.",
            fix="raise clone_timeout (or lower clone_rate) in the MigrationSettings block "
            "if the datastore is slow; a retry clones again.",
        ) from None
    except BaseException:
        _abandon(si, dc, task, run_id)
        raise


def _abandon(si, dc: vim.Datacenter, task: vim.Task, run_id: str) -> None:
    """Stop a clone task of this run and remove its clone if it was made anyway."""
    cancel_task(task)
    remove_clones(si, dc, run_id)


def prepare_clone(
    si,
    dc: vim.Datacenter,
    vm: vim.VirtualMachine,
    run_id: str,
    *,
    vm_path: str,
    timeout: float,
    log: Callable[[str], None] = lambda message: None,
) -> vim.VirtualMachine:
    """Clone a running VM for the export, once: this run's earlier clone task is cancelled
    and its clone removed; anyone else's running clone of the VM, a VM that has the
    clone's name without this run's mark, or too little datastore space is a refusal.

    Raises:
        Refused: what blocks the clone, and the fix.
        Transient: see `clone_for_export`.
    """
    name = clone_name(run_id)
    for running in running_clones(si, vm):
        if running.dest_name != name:
            raise Refused(
                f"{vm_path} is being cloned by vSphere task {running.task} "
                f"(to {running.dest_name or 'an unknown name'!r}); v2k never clones one VM "
                "twice at once.",
                fix="wait until that task ends (or cancel it in vCenter), then retry.",
            )
        log(f"cancelling vSphere task {running.task}, an earlier clone of this run")
        cancel_task(vim.Task(running.task, si._stub))
    removal = remove_clones(si, dc, run_id)
    for moref in removal.removed:
        log(f"removed {name} ({moref}), left unfinished by an earlier try")
    if removal.left:
        raise Refused(
            f"VM(s) {', '.join(removal.left)} are named {name!r} but do not carry this run's "
            "annotation; v2k does not touch them.",
            fix="rename or remove them in vCenter, then retry.",
        )
    check_clone_space(vm, vm_path)
    return clone_for_export(si, dc, vm, run_id, vm_path=vm_path, timeout=timeout)


def remove_clones(si, dc: vim.Datacenter, run_id: str, timeout: float = 300) -> CloneRemoval:
    """Power off and destroy this run's clone: a VM named `clone_name(run_id)` whose
    annotation carries this run's mark. A VM with the name but not the mark is left and
    reported in `left`."""
    name = clone_name(run_id)
    result = CloneRemoval()
    for obj, props in vc.retrieve(
        si, dc.vmFolder, vim.VirtualMachine, ["name", "config.annotation"]
    ):
        if props["name"] != name:
            continue
        if not is_marked(props.get("config.annotation"), run_id):
            result.left.append(obj._moId)
            continue
        if obj.runtime.powerState != vim.VirtualMachinePowerState.poweredOff:
            vc.wait_for_task(obj.PowerOffVM_Task(), timeout)
        vc.wait_for_task(obj.Destroy_Task(), timeout)
        result.removed.append(obj._moId)
    return result
