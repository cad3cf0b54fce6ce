"""The inventory of a datacenter: every VM in one paged PropertyCollector retrieval.

`list_vms` reads every VM, VM folder, vApp and distributed or opaque port group of a
datacenter with ONE `RetrievePropertiesEx` over a container view (paged with
`RetrieveOptions.maxObjects` and `ContinueRetrievePropertiesEx`), and puts inventory
paths together locally. Reading VMs through pyvmomi's managed object attributes
(`vm.config.hardware.numCPU`...) costs one round trip per attribute and per VM instead;
`bench/inventory.py` measures the difference.

It works the same on vCenter and on a standalone ESXi host (`ha-datacenter`, no
folders, no distributed switches).
"""

from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatchcase

from pyVmomi import vim, vmodl

from tasks.models import VmSummary
from tasks.progress import human_bytes
from tasks.vcenter import _count_snapshots, _portgroup, inventory_path

POWER_STATES = ("poweredOn", "poweredOff", "suspended")

# Objects per page of the retrieval; vCenter may send fewer and says so with a token.
PAGE_SIZE = 500

_VM_PROPS = [
    "name",
    "parent",
    "parentVApp",
    "runtime.powerState",
    "config.guestId",
    "config.guestFullName",
    "config.hardware.numCPU",
    "config.hardware.memoryMB",
    "config.hardware.device",
    "config.firmware",
    "config.instanceUuid",
    "snapshot",
    "summary.guest.toolsStatus",
    "guest.toolsRunningStatus",
]

# What one retrieval reads, by type. The container view is rooted at the datacenter.
_PROPS: dict[type, list[str]] = {
    vim.VirtualMachine: _VM_PROPS,
    vim.Folder: ["name", "parent"],
    vim.VirtualApp: ["name", "parentFolder", "parentVApp"],
    vim.dvs.DistributedVirtualPortgroup: ["key", "name"],
    vim.OpaqueNetwork: ["name", "summary"],
}


def retrieve_many(
    si, root, props: dict[type, list[str]], page_size: int = PAGE_SIZE
) -> list[tuple[object, dict]]:
    """Objects of several types under root with their properties: one paged retrieval.

    One container view and one `RetrievePropertiesEx`; further pages, if the server
    splits the answer, come with `ContinueRetrievePropertiesEx` and its token. A
    retrieval stopped half way is cancelled so the server frees its state.
    """
    pc = vmodl.query.PropertyCollector
    content = si.RetrieveContent()
    view = content.viewManager.CreateContainerView(root, list(props), True)
    try:
        spec = pc.FilterSpec(
            objectSet=[
                pc.ObjectSpec(
                    obj=view,
                    skip=True,
                    selectSet=[
                        pc.TraversalSpec(
                            name="view", path="view", skip=False, type=vim.view.ContainerView
                        )
                    ],
                )
            ],
            propSet=[pc.PropertySpec(type=t, pathSet=paths) for t, paths in props.items()],
        )
        collector = content.propertyCollector
        found: list[tuple[object, dict]] = []
        result = collector.RetrievePropertiesEx([spec], pc.RetrieveOptions(maxObjects=page_size))
        token = None
        try:
            while result:
                token = result.token
                for item in result.objects:
                    found.append((item.obj, {p.name: p.val for p in item.propSet or []}))
                if not token:
                    break
                result = collector.ContinueRetrievePropertiesEx(token)
            token = None
        finally:
            if token:
                try:
                    collector.CancelRetrievePropertiesEx(token)
                except Exception:  # noqa: BLE001 - the original error matters more
                    pass
        return found
    finally:
        view.DestroyView()


def _escape(name: str) -> str:
    # vCenter escapes "/" in names itself; a simulator or old host may not.
    return name.replace("/", "%2f")


def list_vms(si, dc: vim.Datacenter, *, page_size: int = PAGE_SIZE) -> list[VmSummary]:
    """Every VM of a datacenter, sorted by inventory path.

    Besides the retrieval, only a few constant calls: the datacenter's own path and its
    VM folder. Paths are `/<datacenter path>/vm/<folders>/<name>`, as vCenter's
    FindByInventoryPath reads them; a VM in a vApp sits below the vApp's name.
    """
    dc_path = inventory_path(dc)
    vm_root = dc.vmFolder._moId
    objects = retrieve_many(si, dc, _PROPS, page_size)

    folders: dict[str, tuple[str, object]] = {}
    vapps: dict[str, tuple[str, object, object]] = {}
    dvpg: dict[str, str] = {}
    opaque: dict[str, str] = {}
    vms: list[tuple[object, dict]] = []
    for obj, props in objects:
        if isinstance(obj, vim.VirtualMachine):
            vms.append((obj, props))
        elif isinstance(obj, vim.VirtualApp):
            vapps[obj._moId] = (
                props.get("name", ""),
                props.get("parentFolder"),
                props.get("parentVApp"),
            )
        elif isinstance(obj, vim.Folder):
            folders[obj._moId] = (props.get("name", ""), props.get("parent"))
        elif isinstance(obj, vim.dvs.DistributedVirtualPortgroup):
            dvpg[props.get("key")] = props.get("name")
        elif isinstance(obj, vim.OpaqueNetwork):
            summary = props.get("summary")
            if summary is not None and getattr(summary, "opaqueNetworkId", None):
                opaque[summary.opaqueNetworkId] = props.get("name")

    def parts_of(parent, vapp) -> list[str]:
        """Names from below the datacenter's VM folder down to this parent."""
        parts: list[str] = []
        seen: set[str] = set()
        node = vapp if parent is None else parent
        while node is not None and node._moId not in seen and node._moId != vm_root:
            seen.add(node._moId)
            if node._moId in vapps:
                name, parent_folder, parent_vapp = vapps[node._moId]
                parts.append(_escape(name))
                node = parent_vapp if parent_vapp is not None else parent_folder
            elif node._moId in folders:
                name, node = folders[node._moId]
                parts.append(_escape(name))
            else:  # outside the datacenter's VM folder: should not happen
                break
        return list(reversed(parts))

    summaries = []
    for obj, props in vms:
        folder = "/".join(parts_of(props.get("parent"), props.get("parentVApp")))
        name = props.get("name", obj._moId)
        devices = props.get("config.hardware.device") or []
        disks = [d for d in devices if isinstance(d, vim.vm.device.VirtualDisk)]
        nics = [d for d in devices if isinstance(d, vim.vm.device.VirtualEthernetCard)]
        snapshot = props.get("snapshot")
        tools = props.get("summary.guest.toolsStatus") or props.get("guest.toolsRunningStatus")
        summaries.append(
            VmSummary(
                name=name,
                moref=obj._moId,
                path="/".join(p for p in (f"{dc_path}/vm", folder, _escape(name)) if p),
                folder=folder,
                power_state=str(props.get("runtime.powerState")),
                guest_id=props.get("config.guestId"),
                guest_full_name=props.get("config.guestFullName"),
                num_cpu=props.get("config.hardware.numCPU"),
                memory_mb=props.get("config.hardware.memoryMB"),
                disks=len(disks),
                disk_bytes=sum(d.capacityInBytes or (d.capacityInKB or 0) * 1024 for d in disks),
                nics=[f"{(n.macAddress or '').lower()}@{_network(n, dvpg, opaque)}" for n in nics],
                firmware=props.get("config.firmware"),
                instance_uuid=props.get("config.instanceUuid"),
                snapshot_count=_count_snapshots(getattr(snapshot, "rootSnapshotList", None)),
                tools_status=str(tools) if tools else None,
            )
        )
    return sorted(summaries, key=lambda s: s.path)


def _network(nic, dvpg: dict[str, str], opaque: dict[str, str]) -> str | None:
    """Port group of a NIC: standard by name, distributed by key, NSX opaque by id."""
    backing = nic.backing
    if isinstance(backing, vim.vm.device.VirtualEthernetCard.OpaqueNetworkBackingInfo):
        return opaque.get(backing.opaqueNetworkId, backing.opaqueNetworkId)
    return _portgroup(nic, dvpg)


def check_power_state(value: str | None) -> str | None:
    """The power state spelled as vSphere does (`poweredOn`...), from any case; None stays.

    Raises:
        ValueError: not one of poweredOn, poweredOff, suspended.
    """
    if value is None or not value.strip():
        return None
    for state in POWER_STATES:
        if value.strip().lower() in (state.lower(), state.lower().removeprefix("powered")):
            return state
    raise ValueError(f"power state {value!r}: use one of {', '.join(POWER_STATES)}")


def filter_vms(
    vms: Iterable[VmSummary],
    name_glob: str = "*",
    folder: str | None = None,
    power_state: str | None = None,
) -> list[VmSummary]:
    """The VMs that match every filter given.

    - name_glob: shell glob on the VM name (`web-*`), case-insensitive.
    - folder: the folder and everything below it, relative to the datacenter's VM
      folder (`Prod/Web`) or as an inventory path (`/DC0/vm/Prod`). Whole names only:
      `Prod` does not match `Production`.
    - power_state: poweredOn, poweredOff or suspended (any case, or on/off).
    """
    state = check_power_state(power_state)
    glob = (name_glob or "*").lower()
    want = (folder or "").strip()
    absolute = want.startswith("/")
    want = want.strip("/")

    def in_folder(vm: VmSummary) -> bool:
        if not want:
            return True
        where = vm.path.rsplit("/", 1)[0].lstrip("/") if absolute else vm.folder
        return where == want or where.startswith(want + "/")

    return [
        vm
        for vm in vms
        if fnmatchcase(vm.name.lower(), glob)
        and (state is None or vm.power_state == state)
        and in_folder(vm)
    ]


# Columns of the inventory table: the same in the Prefect artifact and on the terminal.
COLUMNS = (
    "path",
    "power",
    "guest OS",
    "vCPU",
    "memory",
    "disks",
    "NICs",
    "firmware",
    "snapshots",
    "tools",
)


def table_rows(vms: Iterable[VmSummary]) -> list[dict[str, str]]:
    """One dict per VM with the table's columns, as text."""
    return [
        {
            "path": vm.path,
            "power": vm.power_state,
            "guest OS": vm.guest_id or "unknown",
            "vCPU": str(vm.num_cpu) if vm.num_cpu is not None else "?",
            "memory": f"{vm.memory_mb} MiB" if vm.memory_mb is not None else "?",
            "disks": f"{vm.disks} ({human_bytes(vm.disk_bytes)})",
            "NICs": ", ".join(vm.nics),
            "firmware": vm.firmware or "?",
            "snapshots": str(vm.snapshot_count),
            "tools": vm.tools_status or "?",
        }
        for vm in vms
    ]
