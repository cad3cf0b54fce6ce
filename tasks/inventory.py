"""The inventory of a datacenter: every VM in one paged PropertyCollector retrieval.

`list_vms` reads every VM, VM folder, vApp and distributed or opaque port group of a
datacenter with ONE `RetrievePropertiesEx` over a container view (paged with
`RetrieveOptions.maxObjects` and `ContinueRetrievePropertiesEx`), and puts inventory
paths together locally. Reading VMs through pyvmomi's managed object attributes
(`vm.config.hardware.numCPU`...) costs one round trip per attribute and per VM instead;
`bench/inventory.py` measures the difference.

Reading the answer: about 97 % of the time pyvmomi spends on a big retrieval goes into
turning every XML element of it into Python objects (each VM's whole device list:
controllers, keyboard, video card...), about 1.2 ms per VM. By default `list_vms`
therefore sends the same request through pyvmomi's own connection and reads only the
values it needs from the SOAP answer with ElementTree (`parser="xml"`), about five
times faster; `parser="pyvmomi"` reads it through pyvmomi's objects. Both give the same
rows (the tests compare them). Faults still come back as pyvmomi exceptions.

It works the same on vCenter and on a standalone ESXi host (`ha-datacenter`, no
folders, no distributed switches).
"""

from __future__ import annotations

import io
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from http.client import HTTPException
from typing import Literal

from pyVmomi import SoapAdapter, VmomiSupport, vim, vmodl

from blocks.vcenter import service_content
from tasks import vmpath
from tasks.models import VmSummary
from tasks.progress import human_bytes
from tasks.vcenter import _count_snapshots, inventory_names

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

# What the one retrieval reads, by type. The container view is rooted at the datacenter.
PROPS: dict[type, list[str]] = {
    vim.VirtualMachine: _VM_PROPS,
    vim.Folder: ["name", "parent"],
    vim.VirtualApp: ["name", "parentFolder", "parentVApp"],
    vim.dvs.DistributedVirtualPortgroup: ["key", "name"],
    vim.OpaqueNetwork: ["name", "summary"],
}

_REFS = ("parent", "parentVApp", "parentFolder")


# --- the retrieval ------------------------------------------------------------------


def _filter_spec(view, props: dict[type, list[str]]):
    pc = vmodl.query.PropertyCollector
    return pc.FilterSpec(
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


def retrieve_many(
    si, root, props: dict[type, list[str]], page_size: int = PAGE_SIZE
) -> list[tuple[object, dict]]:
    """Objects of several types under root with their properties, as pyvmomi objects.

    One container view and one `RetrievePropertiesEx`; further pages, if the server
    splits the answer, come with `ContinueRetrievePropertiesEx` and its token. A
    retrieval stopped half way is cancelled so the server frees its state.
    """
    pc = vmodl.query.PropertyCollector
    content = service_content(si)
    collector = content.propertyCollector
    view = content.viewManager.CreateContainerView(root, list(props), True)
    try:
        spec = _filter_spec(view, props)
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
            _cancel(collector, token)
        return found
    finally:
        view.DestroyView()


def _cancel(collector, token: str | None) -> None:
    if token:
        try:
            collector.CancelRetrievePropertiesEx(token)
        except Exception:  # noqa: BLE001 - the original error matters more
            pass


# Plain values both readers produce: {"type": "VirtualMachine", "moref": "vm-42",
# "name": ..., "parent": "folder-3" (moref or None), "disks": [bytes, ...],
# "nics": [_Nic, ...], "snapshots": N, ...}.


@dataclass(frozen=True)
class _Nic:
    mac: str
    kind: Literal["dvpg", "opaque", "name"]
    ref: str | None  # port group key, opaque network id, or the standard port group name


@dataclass
class _Plain:
    type: str
    moref: str
    values: dict = field(default_factory=dict)


def _from_pyvmomi(obj, props: dict) -> _Plain:
    plain = _Plain(type(obj).__name__.rsplit(".", 1)[-1], obj._moId)
    for name, val in props.items():
        if name in _REFS:
            plain.values[name] = val._moId if val is not None else None
        elif name == "config.hardware.device":
            disks, nics = [], []
            for d in val or []:
                if isinstance(d, vim.vm.device.VirtualDisk):
                    disks.append(d.capacityInBytes or (d.capacityInKB or 0) * 1024)
                elif isinstance(d, vim.vm.device.VirtualEthernetCard):
                    nics.append(_nic_from_pyvmomi(d))
            plain.values["disks"], plain.values["nics"] = disks, nics
        elif name == "snapshot":
            plain.values["snapshots"] = _count_snapshots(getattr(val, "rootSnapshotList", None))
        elif name == "summary":  # of an opaque network
            plain.values["opaqueNetworkId"] = getattr(val, "opaqueNetworkId", None)
        elif val is not None:
            plain.values[name] = val if isinstance(val, int) else str(val)
    return plain


def _nic_from_pyvmomi(nic) -> _Nic:
    backing = nic.backing
    mac = (nic.macAddress or "").lower()
    card = vim.vm.device.VirtualEthernetCard
    if isinstance(backing, card.DistributedVirtualPortBackingInfo):
        return _Nic(mac, "dvpg", backing.port.portgroupKey if backing.port else None)
    if isinstance(backing, card.OpaqueNetworkBackingInfo):
        return _Nic(mac, "opaque", backing.opaqueNetworkId)
    return _Nic(mac, "name", getattr(backing, "deviceName", None))


def _read_pyvmomi(si, root, page_size: int) -> list[_Plain]:
    return [_from_pyvmomi(obj, props) for obj, props in retrieve_many(si, root, PROPS, page_size)]


# --- the same retrieval, read from the SOAP answer directly --------------------------

_NS = "{urn:vim25}"
_XSI_TYPE = "{http://www.w3.org/2001/XMLSchema-instance}type"


def _invoke_raw(stub, mo, method: str, args: list) -> bytes:
    """Call a vSphere method through pyvmomi's connection; return the SOAP answer's bytes.

    Same request, cookie and connection pool as pyvmomi's own call. A fault (HTTP 500)
    is read by pyvmomi and raised as its exception.
    """
    info = type(mo)._GetMethodInfo(method)
    request = stub.SerializeRequest(mo, info, args)
    for modifier in stub.requestModifierList:
        request = modifier(request)
    headers = {
        "Cookie": stub.cookie,
        "SOAPAction": stub.versionId,
        "Content-Type": "text/xml; charset=UTF-8",
        **(stub._customHeaders or {}),
    }
    conn = stub.GetConnection()
    try:
        conn.request("POST", stub.path, request, headers)
        response = conn.getresponse()
        body = response.read()
    except (OSError, HTTPException):
        conn.close()
        stub.DropConnections()
        raise
    stub.ReturnConnection(conn)
    if response.status == 200:
        return body
    if response.status == 500:
        fault = SoapAdapter.SoapResponseDeserializer(stub).Deserialize(
            io.BytesIO(body), info.result
        )
        if isinstance(fault, BaseException):
            raise fault
    raise HTTPException(f"{method}: HTTP {response.status} {response.reason}")


@lru_cache(maxsize=512)
def _device_kind(xsi_type: str) -> str | None:
    """ "disk", "nic" or None for a device's xsi:type, through pyvmomi's type registry."""
    try:
        cls = VmomiSupport.GetWsdlType("urn:vim25", xsi_type.rpartition(":")[2])
    except KeyError:
        return None
    if issubclass(cls, vim.vm.device.VirtualDisk):
        return "disk"
    if issubclass(cls, vim.vm.device.VirtualEthernetCard):
        return "nic"
    return None


def _text(element, tag: str) -> str | None:
    child = element.find(_NS + tag)
    return child.text if child is not None else None


def _plain_from_xml(obj_element) -> _Plain:
    ref = obj_element.find(_NS + "obj")
    plain = _Plain(ref.get("type"), ref.text)
    for prop in obj_element.iterfind(_NS + "propSet"):
        name = _text(prop, "name")
        val = prop.find(_NS + "val")
        if val is None:
            continue
        if name == "config.hardware.device":
            disks, nics = [], []
            for device in val:
                kind = _device_kind(device.get(_XSI_TYPE, ""))
                if kind == "disk":
                    size = _text(device, "capacityInBytes")
                    kb = _text(device, "capacityInKB")
                    disks.append(int(size) if size else int(kb or 0) * 1024)
                elif kind == "nic":
                    nics.append(_nic_from_xml(device))
            plain.values["disks"], plain.values["nics"] = disks, nics
        elif name == "snapshot":
            plain.values["snapshots"] = sum(
                1
                for e in val.iter()
                if e.tag in (_NS + "rootSnapshotList", _NS + "childSnapshotList")
            )
        elif name == "summary":
            plain.values["opaqueNetworkId"] = _text(val, "opaqueNetworkId")
        elif name in ("config.hardware.numCPU", "config.hardware.memoryMB"):
            plain.values[name] = int(val.text)
        else:
            plain.values[name] = val.text or ""
    return plain


def _nic_from_xml(device) -> _Nic:
    mac = (_text(device, "macAddress") or "").lower()
    backing = device.find(_NS + "backing")
    if backing is None:
        return _Nic(mac, "name", None)
    backing_type = backing.get(_XSI_TYPE, "").rpartition(":")[2]
    if backing_type.endswith("DistributedVirtualPortBackingInfo"):
        port = backing.find(_NS + "port")
        return _Nic(mac, "dvpg", _text(port, "portgroupKey") if port is not None else None)
    if backing_type.endswith("OpaqueNetworkBackingInfo"):
        return _Nic(mac, "opaque", _text(backing, "opaqueNetworkId"))
    return _Nic(mac, "name", _text(backing, "deviceName"))


def _read_xml(si, root, page_size: int) -> list[_Plain]:
    pc = vmodl.query.PropertyCollector
    content = service_content(si)
    collector = content.propertyCollector
    stub = collector._stub
    view = content.viewManager.CreateContainerView(root, list(PROPS), True)
    try:
        body = _invoke_raw(
            stub,
            collector,
            "RetrievePropertiesEx",
            [[_filter_spec(view, PROPS)], pc.RetrieveOptions(maxObjects=page_size)],
        )
        found: list[_Plain] = []
        token = None
        try:
            while body:
                returnval = ET.fromstring(body).find(f".//{_NS}returnval")
                if returnval is None:  # nothing matched
                    break
                token = _text(returnval, "token")
                found.extend(_plain_from_xml(o) for o in returnval.iterfind(_NS + "objects"))
                if not token:
                    break
                body = _invoke_raw(stub, collector, "ContinueRetrievePropertiesEx", [token])
            token = None
        finally:
            _cancel(collector, token)
        return found
    finally:
        view.DestroyView()


def _xml_possible(si) -> bool:
    stub = si._stub
    return isinstance(stub, SoapAdapter.SoapStubAdapter) and hasattr(stub, "GetConnection")


# --- the rows ---------------------------------------------------------------------------


def list_vms(
    si,
    dc: vim.Datacenter,
    *,
    page_size: int = PAGE_SIZE,
    parser: Literal["xml", "pyvmomi"] = "xml",
) -> list[VmSummary]:
    """Every VM of a datacenter, sorted by inventory path.

    Besides the one retrieval, only a few constant calls: the datacenter's own path and
    its VM folder. Paths are `/<datacenter path>/vm/<folders>/<name>`, as vCenter's
    FindByInventoryPath reads them; a VM in a vApp sits below the vApp's name.
    `parser` says how the answer is read (see the module docstring); "xml" falls back
    to "pyvmomi" when the connection is not pyvmomi's SOAP stub.
    """
    dc_names = inventory_names(dc)
    vm_root = dc.vmFolder._moId
    if parser == "xml" and _xml_possible(si):
        objects = _read_xml(si, dc, page_size)
    else:
        objects = _read_pyvmomi(si, dc, page_size)

    folders: dict[str, tuple[str, str | None]] = {}
    vapps: dict[str, tuple[str, str | None, str | None]] = {}
    networks: dict[tuple[str, str | None], str] = {}
    vms: list[_Plain] = []
    for o in objects:
        v = o.values
        if o.type == "VirtualMachine":
            vms.append(o)
        elif o.type == "VirtualApp":
            vapps[o.moref] = (v.get("name", ""), v.get("parentFolder"), v.get("parentVApp"))
        elif o.type == "Folder":
            folders[o.moref] = (v.get("name", ""), v.get("parent"))
        elif o.type == "DistributedVirtualPortgroup":
            networks[("dvpg", v.get("key"))] = v.get("name")
        elif o.type == "OpaqueNetwork" and v.get("opaqueNetworkId"):
            networks[("opaque", v["opaqueNetworkId"])] = v.get("name")

    def folder_of(parent: str | None, vapp: str | None) -> list[str]:
        """Names from below the datacenter's VM folder down to this parent."""
        parts: list[str] = []
        seen: set[str] = set()
        node = vapp if parent is None else parent
        while node is not None and node not in seen and node != vm_root:
            seen.add(node)
            if node in vapps:
                name, parent_folder, parent_vapp = vapps[node]
                node = parent_vapp if parent_vapp is not None else parent_folder
            elif node in folders:
                name, node = folders[node]
            else:  # outside the datacenter's VM folder: should not happen
                break
            parts.append(name)
        return list(reversed(parts))

    def network(nic: _Nic) -> str | None:
        if nic.kind == "name":
            return nic.ref
        return networks.get((nic.kind, nic.ref), nic.ref)

    summaries = []
    for o in vms:
        v = o.values
        folder = folder_of(v.get("parent"), v.get("parentVApp"))
        name = v.get("name", o.moref)
        disks = v.get("disks", [])
        tools = v.get("summary.guest.toolsStatus") or v.get("guest.toolsRunningStatus")
        summaries.append(
            VmSummary(
                name=vmpath.escape(name),
                moref=o.moref,
                path=vmpath.format_path([*dc_names, "vm", *folder, name]),
                folder=vmpath.join_names(folder),
                power_state=v.get("runtime.powerState", "unknown"),
                guest_id=v.get("config.guestId"),
                guest_full_name=v.get("config.guestFullName"),
                num_cpu=v.get("config.hardware.numCPU"),
                memory_mb=v.get("config.hardware.memoryMB"),
                disks=len(disks),
                disk_bytes=sum(disks),
                nics=[f"{nic.mac}@{network(nic)}" for nic in v.get("nics", [])],
                firmware=v.get("config.firmware"),
                instance_uuid=v.get("config.instanceUuid"),
                snapshot_count=v.get("snapshots", 0),
                tools_status=tools or None,
            )
        )
    return sorted(summaries, key=lambda s: s.path)


# --- filters and the table -----------------------------------------------------------


def check_power_state(value: str | None) -> str | None:
    """The power state spelled as vSphere does (`poweredOn`...), from any case; None stays.

    Raises:
        ValueError: not one of poweredOn, poweredOff, suspended (or on, off).
    """
    if value is None or not value.strip():
        return None
    for state in POWER_STATES:
        if value.strip().lower() in (state.lower(), state.lower().removeprefix("powered")):
            return state
    raise ValueError(f"power state {value!r}: use one of {', '.join(POWER_STATES)}")


def check_folder(folder: str | None) -> list[str]:
    """The names of a folder filter (none for None or blank).

    Raises:
        ValueError: the folder is not a path (an empty name in it).
    """
    return vmpath.split_path(folder) if folder and folder.strip() else []


def filter_vms(
    vms: Iterable[VmSummary],
    name_glob: str = "*",
    folder: str | None = None,
    power_state: str | None = None,
) -> list[VmSummary]:
    """The VMs that match every filter given.

    - name_glob: shell glob on the VM name (`web-*`), case-insensitive; a `/` in a name
      may be written as vCenter stores it (`%2f`) or as it shows it (`/`).
    - folder: the folder and everything below it, relative to the datacenter's VM
      folder (`Prod/Web`) or as an inventory path (`/DC0/vm/Prod`), names written as
      in paths (tasks/vmpath.py). Whole names only: `Prod` does not match `Production`.

    Raises:
        ValueError: the folder is not a path (an empty name in it).
    - power_state: poweredOn, poweredOff or suspended (any case, or on/off).
    """
    state = check_power_state(power_state)
    glob = name_glob or "*"
    want = check_folder(folder)
    absolute = bool(want) and folder.startswith("/")

    def in_folder(vm: VmSummary) -> bool:
        if not want:
            return True
        if absolute:
            where = vmpath.split_path(vm.path)[:-1]
        else:
            where = vmpath.split_path(vm.folder) if vm.folder else []
        return where[: len(want)] == want

    return [
        vm
        for vm in vms
        if vmpath.name_matches(vm.name, glob, ignore_case=True)
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
