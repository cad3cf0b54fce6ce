"""Reading the source side with pyvmomi: find a VM, read its spec, export it through a lease."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from pyVmomi import vim, vmodl

from blocks.vcenter import service_content
from tasks import vmpath
from tasks.errors import Refused
from tasks.models import DiskSpec, NicSpec, VmSpec

_MOREF = re.compile(r"^vm-\d+$")
_UUID = re.compile(r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")


class SourceError(Refused):
    """The source VM cannot be found or read; the message says what to fix. Not retried:
    the VM's path, or the VM itself, must change first."""


def retrieve(
    si, root, obj_type: type, properties: list[str], recursive: bool = True
) -> list[tuple[object, dict]]:
    """All objects of a type under root with the given properties, in one paged retrieval.

    One PropertyCollector call over a container view instead of a round trip per attribute.
    """
    content = service_content(si)
    view = content.viewManager.CreateContainerView(root, [obj_type], recursive)
    try:
        spec = vmodl.query.PropertyCollector.FilterSpec(
            objectSet=[
                vmodl.query.PropertyCollector.ObjectSpec(
                    obj=view,
                    skip=True,
                    selectSet=[
                        vmodl.query.PropertyCollector.TraversalSpec(
                            name="view", path="view", skip=False, type=vim.view.ContainerView
                        )
                    ],
                )
            ],
            propSet=[vmodl.query.PropertyCollector.PropertySpec(type=obj_type, pathSet=properties)],
        )
        collector = content.propertyCollector
        found: list[tuple[object, dict]] = []
        result = collector.RetrievePropertiesEx(
            [spec], vmodl.query.PropertyCollector.RetrieveOptions()
        )
        while result:
            for item in result.objects:
                found.append((item.obj, {p.name: p.val for p in item.propSet}))
            if not result.token:
                break
            result = collector.ContinueRetrievePropertiesEx(result.token)
        return found
    finally:
        view.DestroyView()


def datacenter(si, name: str | None) -> vim.Datacenter:
    """The datacenter by name, or the only one when name is None."""
    found = retrieve(si, service_content(si).rootFolder, vim.Datacenter, ["name"])
    if name is not None:
        for obj, props in found:
            if props["name"] == name:
                return obj
        names = ", ".join(sorted(p["name"] for _, p in found)) or "none"
        raise SourceError(f"datacenter {name!r} not found (there are: {names})")
    if len(found) != 1:
        names = ", ".join(sorted(p["name"] for _, p in found))
        raise SourceError(
            f"vCenter has {len(found)} datacenters ({names}): set datacenter in the VCenter block"
        )
    return found[0][0]


def inventory_names(obj) -> list[str]:
    """The names from the datacenter down to the entity, as vCenter stores them."""
    parts = []
    while obj.parent is not None:
        parts.append(obj.name)
        obj = obj.parent
    return list(reversed(parts))


def inventory_path(obj) -> str:
    """`/DC/vm/Folder/Name` of a managed entity, as vCenter's FindByInventoryPath reads it."""
    return vmpath.format_path(inventory_names(obj))


def vm_by_moref(si, moref: str) -> vim.VirtualMachine:
    """The VM with this moref (`vm-42`), which needs no datacenter to find.

    Raises:
        SourceError: no VM has it (any more).
    """
    vm = vim.VirtualMachine(moref, si._stub)
    try:
        vm.name  # noqa: B018 - a read proves the moref exists
    except vmodl.fault.ManagedObjectNotFound:
        raise SourceError(f"no VM with moref {moref!r}") from None
    return vm


def find_vm(si, dc: vim.Datacenter, ref: str) -> vim.VirtualMachine:
    """Find one VM by moref, instance UUID, inventory path or name.

    A path is what v2k prints (`/DC0/vm/Prod/app%2fdb 02`, see tasks/vmpath.py), or
    one relative to the datacenter's VM folder (`Prod/app%2fdb 02`). Names and paths are
    taken as they are (spaces, tabs and quotes are parts of names); only when nothing
    matches is the text tried again without surrounding white space.

    Raises:
        SourceError: nothing matches, or a name matches several VMs (their paths listed).
    """
    key = ref.strip()
    if _MOREF.match(key):
        return vm_by_moref(si, key)
    if _UUID.match(key):
        content = service_content(si)
        vm = content.searchIndex.FindByUuid(dc, key, vmSearch=True, instanceUuid=True)
        if vm is None:
            vm = content.searchIndex.FindByUuid(dc, key, vmSearch=True, instanceUuid=False)
        if vm is None:
            raise SourceError(f"no VM with instance UUID {key}")
        return vm
    tries = [ref] if key == ref else [ref, key]
    if "/" in key:
        for text in tries:
            found = _vm_at_path(si, dc, text)
            if found is not None:
                return found
        # A name as the vSphere Client shows it (`app/db 02`) reads as a path: take the
        # VM of that name when no path matched.
        named = _vms_named(si, dc, tries)
        if len(named) == 1:
            return named[0]
        raise SourceError(
            f"no VM at inventory path {_absolute(si, dc, key)!r}"
            + (f" ({_listed(named)} are named so)" if named else "")
            + ". Give the path as `v2k inventory` prints it: a `/` inside a name is written "
            "%2f, as vCenter does"
        )
    named = _vms_named(si, dc, tries)
    if not named:
        raise SourceError(
            f"no VM named {ref!r} in datacenter {dc.name!r}; check the name, or give its "
            "inventory path, moref or instance UUID"
        )
    if len(named) > 1:
        raise SourceError(
            f"{len(named)} VMs are named {ref!r}: {_listed(named)}. "
            "Give the inventory path or moref."
        )
    return named[0]


def _absolute(si, dc: vim.Datacenter, text: str) -> str:
    """The absolute path of a path given absolute, or relative to the datacenter's VM
    folder. A path that starts with the datacenter's own path is absolute too.

    Raises:
        SourceError: the text is not a path (an empty name in it).
    """
    try:
        names = vmpath.split_path(text)
    except vmpath.PathError as exc:
        raise SourceError(str(exc)) from None
    if not text.startswith("/"):
        dc_names = [vmpath.escape(n) for n in inventory_names(dc)]
        if names[: len(dc_names) + 1] != [*dc_names, "vm"]:
            names = [*dc_names, "vm", *names]
    return vmpath.format_path(names)


def _vm_at_path(si, dc: vim.Datacenter, text: str) -> vim.VirtualMachine | None:
    found = service_content(si).searchIndex.FindByInventoryPath(_absolute(si, dc, text))
    return found if isinstance(found, vim.VirtualMachine) else None


def _vms_named(si, dc: vim.Datacenter, names: list[str]) -> list[vim.VirtualMachine]:
    """VMs of the datacenter with the first of these names that any VM has."""
    found = retrieve(si, dc.vmFolder, vim.VirtualMachine, ["name"])
    for name in names:
        wanted = vmpath.escape(name)
        matches = [obj for obj, props in found if vmpath.escape(props["name"]) == wanted]
        if matches:
            return matches
    return []


def _listed(vms: list[vim.VirtualMachine]) -> str:
    return "; ".join(sorted(f"{inventory_path(vm)} ({vm._moId})" for vm in vms))


_CONTROLLERS = {
    vim.vm.device.ParaVirtualSCSIController: "scsi",
    vim.vm.device.VirtualLsiLogicController: "scsi",
    vim.vm.device.VirtualLsiLogicSASController: "scsi",
    vim.vm.device.VirtualBusLogicController: "scsi",
    vim.vm.device.VirtualAHCIController: "sata",
    vim.vm.device.VirtualIDEController: "ide",
    vim.vm.device.VirtualNVMEController: "nvme",
}

_ADAPTERS = {
    vim.vm.device.VirtualVmxnet3: "vmxnet3",
    vim.vm.device.VirtualE1000e: "e1000e",
    vim.vm.device.VirtualE1000: "e1000",
    vim.vm.device.VirtualPCNet32: "pcnet32",
    vim.vm.device.VirtualVmxnet2: "vmxnet2",
}


def _controller_name(device) -> str:
    for cls, name in _CONTROLLERS.items():
        if isinstance(device, cls):
            return name
    return type(device).__name__


def _adapter_name(device) -> str:
    for cls, name in _ADAPTERS.items():
        if isinstance(device, cls):
            return name
    return type(device).__name__


def _portgroup(nic, dvpg_names: dict[str, str]) -> str | None:
    """Port group name of a NIC: standard by name, distributed by key looked up."""
    backing = nic.backing
    if isinstance(backing, vim.vm.device.VirtualEthernetCard.DistributedVirtualPortBackingInfo):
        return dvpg_names.get(backing.port.portgroupKey, backing.port.portgroupKey)
    return getattr(backing, "deviceName", None)


def _count_snapshots(trees) -> int:
    return sum(1 + _count_snapshots(t.childSnapshotList) for t in trees or [])


def read_spec(si, vm: vim.VirtualMachine) -> VmSpec:
    """Read the full spec of a VM in one property retrieval."""
    collector = service_content(si).propertyCollector
    props = [
        "name",
        "config",
        "runtime.powerState",
        "runtime.host",
        "snapshot",
        "network",
        "summary.guest.toolsStatus",
    ]
    spec = vmodl.query.PropertyCollector.FilterSpec(
        objectSet=[vmodl.query.PropertyCollector.ObjectSpec(obj=vm)],
        propSet=[
            vmodl.query.PropertyCollector.PropertySpec(type=vim.VirtualMachine, pathSet=props)
        ],
    )
    result = collector.RetrievePropertiesEx([spec], vmodl.query.PropertyCollector.RetrieveOptions())
    values = {p.name: p.val for p in result.objects[0].propSet}
    config = values.get("config")
    if config is None:
        raise SourceError(f"VM {values.get('name')!r} has no configuration (is it orphaned?)")

    portgroups = {
        net.key: net.name
        for net in values.get("network") or []
        if isinstance(net, vim.dvs.DistributedVirtualPortgroup)
    }
    devices = {d.key: d for d in config.hardware.device}
    disks: list[DiskSpec] = []
    nics: list[NicSpec] = []
    for device in config.hardware.device:
        if isinstance(device, vim.vm.device.VirtualDisk):
            backing = device.backing
            controller = devices.get(device.controllerKey)
            bus = getattr(controller, "busNumber", 0)
            rdm = isinstance(backing, vim.vm.device.VirtualDisk.RawDiskMappingVer1BackingInfo)
            disks.append(
                DiskSpec(
                    key=device.key,
                    label=device.deviceInfo.label if device.deviceInfo else f"disk {device.key}",
                    capacity_bytes=device.capacityInBytes or device.capacityInKB * 1024,
                    file_name=backing.fileName,
                    datastore=backing.datastore.name
                    if backing.datastore
                    else backing.fileName.partition("]")[0].lstrip("["),
                    controller=f"{_controller_name(controller)}{bus}:{device.unitNumber}",
                    mode=getattr(backing, "diskMode", "persistent") or "persistent",
                    thin=getattr(backing, "thinProvisioned", None),
                    rdm=rdm,
                    sharing=getattr(backing, "sharing", None),
                    change_id=getattr(backing, "changeId", None)
                    if config.changeTrackingEnabled
                    else None,
                )
            )
        elif isinstance(device, vim.vm.device.VirtualEthernetCard):
            portgroup = _portgroup(device, portgroups)
            nics.append(
                NicSpec(
                    key=device.key,
                    label=device.deviceInfo.label if device.deviceInfo else f"nic {device.key}",
                    mac=(device.macAddress or "").lower(),
                    adapter=_adapter_name(device),
                    portgroup=portgroup,
                    connected=bool(device.connectable.startConnected)
                    if device.connectable
                    else True,
                )
            )
    stamps = _disk_file_stamps(config.hardware.device)
    for disk in disks:
        disk.files_stamp = stamps.get(disk.key)
    boot = config.bootOptions
    host = values.get("runtime.host")
    return VmSpec(
        name=values["name"],
        moref=vm._moId,
        instance_uuid=config.instanceUuid,
        inventory_path=inventory_path(vm),
        inventory_names=inventory_names(vm),
        guest_id=config.guestId,
        guest_full_name=config.guestFullName,
        power_state=str(values["runtime.powerState"]),
        num_cpu=config.hardware.numCPU,
        cores_per_socket=config.hardware.numCoresPerSocket or 1,
        memory_mb=config.hardware.memoryMB,
        firmware="efi" if config.firmware == "efi" else "bios",
        secure_boot=bool(boot and getattr(boot, "efiSecureBootEnabled", False)),
        disks=disks,
        nics=nics,
        snapshot_count=_count_snapshots(getattr(values.get("snapshot"), "rootSnapshotList", None)),
        tools_status=str(values.get("summary.guest.toolsStatus") or "") or None,
        change_version=config.changeVersion,
        vcenter_uuid=service_content(si).about.instanceUuid or None,
        host=host.name if host is not None else None,
        standalone=service_content(si).about.apiType == "HostAgent",
    )


def _disk_file_stamps(devices, timeout: float = 60) -> dict[int, str]:
    """disk key -> `name:size:mtime;...` of its files (descriptor, flat, deltas).

    Read with each datastore's browser (`SearchDatastore_Task`), one search per folder.
    A disk whose folder could not be searched gets no stamp.
    """
    wanted: dict[tuple[vim.Datastore, str], list[tuple[int, str]]] = {}
    for device in devices:
        if not isinstance(device, vim.vm.device.VirtualDisk) or not device.backing.datastore:
            continue
        folder, _, base = device.backing.fileName.partition("] ")[2].rpartition("/")
        wanted.setdefault((device.backing.datastore, folder), []).append(
            (device.key, base.removesuffix(".vmdk"))
        )
    stamps: dict[int, str] = {}
    for (datastore, folder), disks in wanted.items():
        details = vim.host.DatastoreBrowser.FileInfo.Details(fileSize=True, modification=True)
        search = vim.host.DatastoreBrowser.SearchSpec(
            matchPattern=[f"{base}*.vmdk" for _, base in disks], details=details
        )
        try:
            found = wait_for_task(
                datastore.browser.SearchDatastore_Task(f"[{datastore.name}] {folder}", search),
                timeout,
            )
        except (vim.fault.VimFault, vmodl.MethodFault, TimeoutError):
            continue
        files = [(f.path, f.fileSize, f.modification) for f in found.file or []]
        for key, base in disks:
            mine = sorted(
                f"{name}:{size}:{mtime.isoformat() if mtime else ''}"
                for name, size, mtime in files
                if name == f"{base}.vmdk" or name.startswith(f"{base}-")
            )
            if mine and all(m.rpartition(":")[2] for m in mine):
                stamps[key] = ";".join(mine)
    return stamps


def wait_for_task(task, timeout: float) -> object:
    """Wait for a vSphere task; raise its fault, or TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        state = task.info.state
        if state == vim.TaskInfo.State.success:
            return task.info.result
        if state == vim.TaskInfo.State.error:
            raise task.info.error
        if time.monotonic() > deadline:
            raise TimeoutError(f"vSphere task {task._moId} did not finish in {timeout:.0f} s")
        time.sleep(0.5)


@contextmanager
def export_lease(
    vm: vim.VirtualMachine,
    *,
    timeout: float = 300,
    progress: Callable[[], int] | None = None,
    keepalive_seconds: float = 30,
) -> Iterator[vim.HttpNfcLease]:
    """Open an export lease on a powered-off VM and keep it alive while the body runs.

    The lease is completed when the body returns and aborted when it raises, so vCenter
    never holds a stale lease. `progress` gives the percent to report on each keep-alive.
    """
    lease = vm.ExportVm()
    deadline = time.monotonic() + timeout
    while lease.state == vim.HttpNfcLease.State.initializing:
        if time.monotonic() > deadline:
            lease.HttpNfcLeaseAbort()
            raise TimeoutError(f"export lease not ready after {timeout:.0f} s")
        time.sleep(0.2)
    if lease.state == vim.HttpNfcLease.State.error:
        raise SourceError(f"export lease failed: {lease.error.msg if lease.error else 'unknown'}")

    stop = threading.Event()

    def keep_alive() -> None:
        while not stop.wait(keepalive_seconds):
            try:
                lease.HttpNfcLeaseProgress(min(99, progress() if progress else 0))
            except Exception:  # noqa: BLE001 - a failed keep-alive shows up in the downloads
                return

    keeper = threading.Thread(target=keep_alive, name="nfc-keepalive", daemon=True)
    keeper.start()
    try:
        yield lease
    except BaseException as exc:
        stop.set()
        keeper.join()
        try:
            fault = vmodl.fault.SystemError(reason=f"v2k export failed: {type(exc).__name__}")
            lease.HttpNfcLeaseAbort(fault)
        except Exception:  # noqa: BLE001 - the original error matters more
            pass
        raise
    stop.set()
    keeper.join()
    lease.HttpNfcLeaseProgress(100)
    lease.HttpNfcLeaseComplete()


def disk_urls(lease: vim.HttpNfcLease, host: str, port: int) -> list[tuple[str, str, int | None]]:
    """(device id, URL, file size or None) of each exported disk, in the VM's disk order.

    Device URLs may name the host `*`: the client puts in the host it reached vCenter on.
    """
    found = []
    for device in lease.info.deviceUrl:
        if device.disk:
            url = re.sub(r"^(https?)://\*(?=[:/])", rf"\1://{host}:{port}", device.url)
            url = re.sub(rf"(://{re.escape(host)}:{port}):\d+/", r"\1/", url)
            found.append((device.key, url, device.fileSize or None))
    return found


def create_descriptor(
    si, vm: vim.VirtualMachine, name: str, files: list[tuple[str, str, int]]
) -> str:
    """The OVF descriptor of the VM, named `name`, for the (device id, file path, size) list."""
    params = vim.OvfManager.CreateDescriptorParams(
        name=name,
        ovfFiles=[
            vim.OvfManager.OvfFile(deviceId=device_id, path=path, size=size)
            for device_id, path, size in files
        ],
    )
    result = service_content(si).ovfManager.CreateDescriptor(obj=vm, cdp=params)
    if result.error:
        raise SourceError(f"CreateDescriptor failed: {result.error[0].msg}")
    return result.ovfDescriptor
