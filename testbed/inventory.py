"""The inventory of the simulated vCenter: a small YAML file, its model, and how it is applied.

`load_inventory(path)` reads and validates a YAML inventory (see `testbed/inventory.yaml`);
`apply_inventory(si, inv, ...)` builds it in a connected vCenter (the test bed's vcsim):
datacenters, clusters, hosts, datastores and port groups that are missing, VM folders,
then every VM with its real hardware and real disk files, and powers on the VMs declared
`poweredOn`. The code only needs a pyvmomi ServiceInstance; it does not care how the
simulator was started.

Disk files in the datastore (one directory per VM, named after the VM like vCenter does):

    [<datastore>] <dir>/<dir>.vmdk         the disk: a streamOptimized VMDK (real bytes)
    [<datastore>] <dir>/<dir>-flat.vmdk    empty placeholder (see below)
    [<datastore>] <dir>/<dir>_1.vmdk       second disk, and so on (`_2`, ...)

govmomi 0.24.2's simulator attaches an existing disk (no fileOperation) only if
`<X>-flat.vmdk` exists: that is its whole check, it never reads the files. The backing
`fileName` is `<X>.vmdk`, which is what an export serves, so `<X>.vmdk` holds the
streamOptimized VMDK (the format an ExportVm/NFC download has on real vSphere) and
`<X>-flat.vmdk` is an empty file that only satisfies the check.
"""

from __future__ import annotations

import logging
import re
import shutil
import ssl
import tempfile
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import quote

import httpx
import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from testbed import images
from testbed.paths import cache_dir

log = logging.getLogger("testbed.inventory")

DEFAULT_INVENTORY = Path(__file__).with_name("inventory.yaml")

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB
MAX_DISK = 62 * TiB

_UNITS = {
    "": 1,
    "b": 1,
    "k": KiB,
    "kb": KiB,
    "kib": KiB,
    "m": MiB,
    "mb": MiB,
    "mib": MiB,
    "g": GiB,
    "gb": GiB,
    "gib": GiB,
    "t": TiB,
    "tb": TiB,
    "tib": TiB,
}


class InventoryError(ValueError):
    """A bad inventory, or one that cannot be applied to this vCenter."""


def parse_size(value: object) -> int:
    """Bytes from an int or a string like `64MiB`, `1 GiB`, `512K` (units are binary)."""
    if isinstance(value, bool):
        raise ValueError("a size must be a number of bytes or a string like '64MiB'")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", value)
        if m and m.group(2).lower() in _UNITS:
            return int(m.group(1)) * _UNITS[m.group(2).lower()]
    raise ValueError(f"bad size {value!r}: use bytes or a string like '64MiB', '1GiB'")


def format_size(n: int) -> str:
    for unit, factor in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n % factor == 0:
            return f"{n // factor}{unit}"
    return f"{n}B"


Size = Annotated[int, BeforeValidator(parse_size)]

_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


def vcenter_name(name: str) -> str:
    """The name as vCenter stores it: `%`, `/` and `\\` escaped as `%25`, `%2f`, `%5c`."""
    return name.replace("%", "%25").replace("/", "%2f").replace("\\", "%5c")


def safe_component(name: str) -> str:
    """A name usable as one directory in a datastore (no `/`, no leading dot)."""
    out = re.sub(r"[^A-Za-z0-9 ._()+,=-]", "_", name).strip(" ")
    out = out.lstrip(".")
    return out or "vm"


def _check_entity_name(value: str, what: str) -> str:
    if not value or not value.strip():
        raise ValueError(f"{what} name must not be empty")
    if len(value) > 80:
        raise ValueError(f"{what} name {value!r} is longer than 80 characters")
    # vCenter takes a tab in a name, not other control characters (a newline).
    if any((ord(c) < 32 and c != "\t") or ord(c) == 127 for c in value):
        raise ValueError(f"{what} name {value!r} holds a control character")
    return value


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Disk(_Model):
    """One virtual disk. Its file is uploaded into the datastore before the VM is made."""

    size: Size = Field(description="virtual size: bytes or '64MiB', '1GiB'")
    datastore: str
    controller: Literal["scsi", "sata"] = "scsi"
    mode: Literal[
        "persistent", "independent_persistent", "independent_nonpersistent", "nonpersistent"
    ] = "persistent"
    thin: bool = True
    content: Literal["synthetic", "debian-guest"] = "synthetic"
    seed: int = 0
    fill: Size | None = Field(
        default=None, description="bytes of random data at the start (default up to 4 MiB)"
    )

    @model_validator(mode="after")
    def _check(self) -> Disk:
        if self.size <= 0:
            raise ValueError(f"disk size must be positive, got {self.size}")
        if self.size % KiB:
            raise ValueError(f"disk size {self.size} is not a whole number of KiB")
        if self.size > MAX_DISK:
            raise ValueError(f"disk size {format_size(self.size)} is larger than 62TiB")
        if self.fill is not None and not 0 <= self.fill <= self.size:
            raise ValueError(f"disk fill {self.fill} must be between 0 and size {self.size}")
        return self


class Nic(_Model):
    mac: str
    adapter: Literal["vmxnet3", "e1000e", "e1000"] = "vmxnet3"
    network: str = Field(description="a standard port group or a distributed port group")
    start_connected: bool = True

    @field_validator("mac")
    @classmethod
    def _mac(cls, value: str) -> str:
        mac = value.strip().lower().replace("-", ":")
        if not _MAC_RE.match(mac):
            raise ValueError(
                f"bad MAC address {value!r}: want six hex pairs like 00:50:56:01:02:03"
            )
        if int(mac[:2], 16) & 1:
            raise ValueError(f"MAC address {value!r} is multicast")
        return mac


class Vm(_Model):
    name: str
    folder: str = Field(default="", description="path under the datacenter's VM folder, 'A/B'")
    cluster: str | None = None
    host: str | None = None
    guest_id: str
    firmware: Literal["bios", "efi"] = "bios"
    secure_boot: bool = False
    power: Literal["poweredOn", "poweredOff"] = "poweredOff"
    num_cpu: int = 1
    cores_per_socket: int = 1
    memory_mb: int = 1024
    instance_uuid: uuidlib.UUID
    uuid: uuidlib.UUID | None = Field(default=None, description="BIOS UUID; default from instance")
    annotation: str = ""
    scsi_controller: Literal["pvscsi", "lsilogic", "lsilogic-sas", "buslogic"] = "pvscsi"
    hardware_version: str = "vmx-19"
    disks: list[Disk] = []
    nics: list[Nic] = []

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _check_entity_name(value, "VM")

    @field_validator("folder")
    @classmethod
    def _folder(cls, value: str) -> str:
        return normalize_folder(value)

    @field_validator("guest_id")
    @classmethod
    def _guest_id(cls, value: str) -> str:
        from pyVmomi import vim

        if value not in vim.vm.GuestOsDescriptor.GuestOsIdentifier.values:
            raise ValueError(f"unknown VMware guestId {value!r} (e.g. debian12_64Guest)")
        return value

    @field_validator("hardware_version")
    @classmethod
    def _hw(cls, value: str) -> str:
        if not re.fullmatch(r"vmx-\d+", value):
            raise ValueError(f"hardware_version must look like 'vmx-19', got {value!r}")
        return value

    @model_validator(mode="after")
    def _check(self) -> Vm:
        where = f"VM {self.name!r}"
        if not 1 <= self.num_cpu <= 768:
            raise ValueError(f"{where}: num_cpu must be between 1 and 768, got {self.num_cpu}")
        if self.cores_per_socket < 1 or self.num_cpu % self.cores_per_socket:
            raise ValueError(
                f"{where}: cores_per_socket {self.cores_per_socket} does not divide "
                f"num_cpu {self.num_cpu}"
            )
        if self.memory_mb < 4 or self.memory_mb % 4:
            raise ValueError(f"{where}: memory_mb must be a positive multiple of 4")
        if self.secure_boot and self.firmware != "efi":
            raise ValueError(f"{where}: secure_boot needs firmware efi")
        if sum(d.controller == "scsi" for d in self.disks) > 15:
            raise ValueError(f"{where}: at most 15 SCSI disks (one controller)")
        if sum(d.controller == "sata" for d in self.disks) > 30:
            raise ValueError(f"{where}: at most 30 SATA disks (one controller)")
        if len(self.nics) > 10:
            raise ValueError(f"{where}: at most 10 NICs")
        return self

    @property
    def bios_uuid(self) -> uuidlib.UUID:
        return self.uuid or uuidlib.uuid5(self.instance_uuid, "bios")

    @property
    def vcenter_name(self) -> str:
        return vcenter_name(self.name)


_STORED_NAME = re.compile(r"(?:[^%/\\]|%[0-9A-Fa-f]{2})*")


def normalize_folder(value: str) -> str:
    """A folder path `A/B`, its names written as vCenter stores them: a `/`, `\\` or `%`
    in a folder's name as `%2f`, `%5c`, `%25` (`team%2fblue` is the folder `team/blue`)."""
    parts = [p for p in value.strip().strip("/").split("/")] if value.strip("/ ") else []
    for part in parts:
        if not part.strip() or part in (".", ".."):
            raise ValueError(f"bad folder path {value!r}: empty, '.' or '..' component")
        if not _STORED_NAME.fullmatch(part):
            raise ValueError(
                f"bad folder name {part!r}: write '%', '\\' in it as %25, %5c (and '/' as %2f)"
            )
        _check_entity_name(part, "folder")
    return "/".join(parts)


class Cluster(_Model):
    name: str
    hosts: list[str] = []

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _check_entity_name(value, "cluster")


class Datastore(_Model):
    name: str
    path: str | None = Field(
        default=None, description="local directory, used only when it must be created"
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        _check_entity_name(value, "datastore")
        if any(c in value for c in "[]/"):
            raise ValueError(f"datastore name {value!r} must not hold '[', ']' or '/'")
        return value


class DistributedSwitch(_Model):
    name: str
    portgroups: list[str]


class Networks(_Model):
    standard: list[str] = ["VM Network"]
    distributed: list[DistributedSwitch] = []


class Datacenter(_Model):
    name: str
    clusters: list[Cluster] = []
    hosts: list[str] = Field(default=[], description="standalone hosts (not in a cluster)")
    datastores: list[Datastore]
    networks: Networks = Networks()
    folders: list[str] = Field(default=[], description="extra (possibly empty) VM folders")
    vms: list[Vm] = []

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _check_entity_name(value, "datacenter")

    @field_validator("folders")
    @classmethod
    def _folders(cls, value: list[str]) -> list[str]:
        return [normalize_folder(v) for v in value]

    @model_validator(mode="after")
    def _check(self) -> Datacenter:
        where = f"datacenter {self.name!r}"
        _no_duplicates([c.name for c in self.clusters], f"{where}: duplicate cluster")
        _no_duplicates(
            [h for c in self.clusters for h in c.hosts] + list(self.hosts),
            f"{where}: duplicate host",
        )
        _no_duplicates([d.name for d in self.datastores], f"{where}: duplicate datastore")
        nets = list(self.networks.standard)
        for dvs in self.networks.distributed:
            nets += dvs.portgroups
        _no_duplicates(nets, f"{where}: duplicate network name")
        _no_duplicates([d.name for d in self.networks.distributed], f"{where}: duplicate switch")
        seen: set[tuple[str, str]] = set()
        datastores = {d.name for d in self.datastores}
        clusters = {c.name: c for c in self.clusters}
        for vm in self.vms:
            key = (vm.folder, vm.vcenter_name)
            if key in seen:
                folder = f"{self.name}/vm/{vm.folder}".rstrip("/")
                raise ValueError(f"duplicate VM name {vm.name!r} in folder {folder!r}")
            seen.add(key)
            if not clusters and not self.hosts:
                raise ValueError(
                    f"{where}: VM {vm.name!r} needs a cluster or a host, none declared"
                )
            if vm.cluster is not None and vm.cluster not in clusters:
                raise ValueError(f"VM {vm.name!r}: unknown cluster {vm.cluster!r} in {where}")
            if vm.cluster is not None and vm.host is not None:
                if vm.host not in clusters[vm.cluster].hosts:
                    raise ValueError(
                        f"VM {vm.name!r}: host {vm.host!r} is not in cluster {vm.cluster!r}"
                    )
            elif vm.host is not None and self.placement(vm) is None:
                raise ValueError(f"VM {vm.name!r}: unknown host {vm.host!r} in {where}")
            for disk in vm.disks:
                if disk.datastore not in datastores:
                    raise ValueError(
                        f"VM {vm.name!r}: unknown datastore {disk.datastore!r} in {where}"
                    )
            for nic in vm.nics:
                if nic.network not in nets:
                    raise ValueError(f"VM {vm.name!r}: unknown network {nic.network!r} in {where}")
        return self

    def placement(self, vm: Vm) -> tuple[str | None, str | None] | None:
        """(cluster, host) the VM runs on: host None means any host of the cluster, cluster
        None a standalone host. Default: the first cluster, else the first standalone host."""
        if vm.cluster is not None:
            return vm.cluster, vm.host
        if vm.host is not None:
            for cluster in self.clusters:
                if vm.host in cluster.hosts:
                    return cluster.name, vm.host
            return (None, vm.host) if vm.host in self.hosts else None
        if self.clusters:
            return self.clusters[0].name, None
        return None, self.hosts[0]

    def switch_of(self, network: str) -> DistributedSwitch | None:
        for dvs in self.networks.distributed:
            if network in dvs.portgroups:
                return dvs
        return None


class Inventory(_Model):
    version: Literal[1] = 1
    datacenters: list[Datacenter]

    @model_validator(mode="after")
    def _check(self) -> Inventory:
        _no_duplicates([d.name for d in self.datacenters], "duplicate datacenter")
        vms = [vm for dc in self.datacenters for vm in dc.vms]
        _no_duplicates([n.mac for vm in vms for n in vm.nics], "duplicate MAC address")
        _no_duplicates([str(vm.instance_uuid) for vm in vms], "duplicate instance_uuid")
        _no_duplicates([str(vm.bios_uuid) for vm in vms], "duplicate uuid")
        return self

    def vms(self) -> Iterator[tuple[Datacenter, Vm]]:
        for dc in self.datacenters:
            for vm in dc.vms:
                yield dc, vm

    def vm(self, name: str) -> Vm:
        for _, vm in self.vms():
            if vm.name == name:
                return vm
        raise KeyError(name)


def for_esx(
    inv: Inventory,
    *,
    datacenter: str = "ha-datacenter",
    host: str = "localhost.localdomain",
    network: str = "VM Network",
) -> Inventory:
    """The same VMs as they would sit on one standalone ESXi host.

    ESXi has one datacenter (`ha-datacenter`), one host, no VM folders and no distributed
    switches: every VM goes to the root VM folder, every NIC to `network`. Datastores
    are kept.
    """
    datastores = {}
    vms = []
    for dc in inv.datacenters:
        for ds in dc.datastores:
            datastores.setdefault(ds.name, ds)
        for vm in dc.vms:
            nics = [n.model_copy(update={"network": network}) for n in vm.nics]
            vms.append(
                vm.model_copy(update={"folder": "", "cluster": None, "host": None, "nics": nics})
            )
    data = {
        "version": inv.version,
        "datacenters": [
            {
                "name": datacenter,
                "hosts": [host],
                "datastores": [d.model_dump() for d in datastores.values()],
                "networks": {"standard": [network]},
                "vms": [vm.model_dump(mode="json") for vm in vms],
            }
        ],
    }
    return parse_inventory(data, source="ESX inventory")


def _no_duplicates(values: list, message: str) -> None:
    seen = set()
    for v in values:
        if v in seen:
            raise ValueError(f"{message}: {v!r}")
        seen.add(v)


def load_inventory(path: Path | str = DEFAULT_INVENTORY) -> Inventory:
    """Read and validate a YAML inventory; errors name the file and the bad field."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise InventoryError(f"{path}: not valid YAML: {exc}") from exc
    return parse_inventory(data, source=str(path))


def parse_inventory(data: object, source: str = "inventory") -> Inventory:
    try:
        return Inventory.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = _describe_loc(data, err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"  {loc}: {msg}" if loc else f"  {msg}")
        raise InventoryError(f"{source}: invalid inventory:\n" + "\n".join(lines)) from None


def _describe_loc(data: object, loc: tuple) -> str:
    """`datacenters[0].vms[2].disks[0].size` with names where the YAML gives them."""
    out = []
    node = data
    for part in loc:
        if isinstance(part, int):
            label = f"[{part}]"
            try:
                node = node[part]
                if isinstance(node, dict) and isinstance(node.get("name"), str):
                    label = f"[{node['name']!r}]"
            except (IndexError, KeyError, TypeError):
                node = None
            out.append(label)
        else:
            out.append(("." if out else "") + str(part))
            node = node.get(part) if isinstance(node, dict) else None
    return "".join(out)


# ---------------------------------------------------------------------------------------
# Datastore file upload
# ---------------------------------------------------------------------------------------

Uploader = Callable[[Path, str, str, str], None]
"""`uploader(local_file, datacenter_path, datastore_name, path_in_datastore)`"""


def service_base_url(si) -> str:
    """`https://host:port` of the endpoint a pyvmomi ServiceInstance is connected to."""
    from http.client import HTTPSConnection

    stub = si._stub
    scheme = stub.scheme
    https = isinstance(scheme, type) and issubclass(scheme, HTTPSConnection)
    return f"{'https' if https else 'http'}://{stub.host}"


def session_cookie(si) -> tuple[str, str]:
    """(name, value) of the SOAP session cookie, to use the datastore HTTP interface."""
    raw = si._stub.cookie or ""
    first = raw.split(";", 1)[0].strip()
    if "=" not in first:
        raise InventoryError("the ServiceInstance has no session cookie: log in first")
    name, value = first.split("=", 1)
    return name.strip(), value.strip()


@dataclass
class DatastoreHttp:
    """PUT files to `/folder/<path>?dcPath=..&dsName=..` with the session's cookie."""

    base_url: str
    cookie: tuple[str, str]
    verify: bool | str | Path = False  # False, or a CA bundle file
    timeout: float = 300.0

    @classmethod
    def from_service_instance(cls, si, verify: bool | str = False) -> DatastoreHttp:
        return cls(service_base_url(si), session_cookie(si), verify)

    def url(self, ds_path: str) -> str:
        return f"{self.base_url}/folder/{quote(ds_path, safe='/')}"

    def _client(self) -> httpx.Client:
        name, value = self.cookie
        verify: bool | ssl.SSLContext = (
            self.verify
            if isinstance(self.verify, bool)
            else (ssl.create_default_context(cafile=str(self.verify)))
        )
        return httpx.Client(
            verify=verify,
            timeout=httpx.Timeout(self.timeout, connect=15.0),
            headers={"Cookie": f"{name}={value}"},
        )

    def put(self, local: Path, dc_path: str, ds_name: str, ds_path: str) -> None:
        size = local.stat().st_size

        def chunks() -> Iterator[bytes]:
            with open(local, "rb") as fh:
                yield from iter(lambda: fh.read(4 * MiB), b"")

        with self._client() as client:
            resp = client.put(
                self.url(ds_path),
                params={"dcPath": dc_path, "dsName": ds_name},
                content=chunks() if size else b"",
                headers={
                    "Content-Type": "application/octet-stream",
                    "Content-Length": str(size),
                },
            )
        if resp.status_code not in (200, 201, 204):
            raise InventoryError(
                f"upload of {local} to [{ds_name}] {ds_path} failed: HTTP {resp.status_code}"
            )

    def exists(self, dc_path: str, ds_name: str, ds_path: str) -> bool:
        with self._client() as client:
            resp = client.head(self.url(ds_path), params={"dcPath": dc_path, "dsName": ds_name})
        return resp.status_code == 200

    __call__ = put


# ---------------------------------------------------------------------------------------
# Apply
# ---------------------------------------------------------------------------------------


@dataclass
class AppliedVm:
    name: str  # as declared in the inventory
    vcenter_name: str  # as vCenter shows it (`/` escaped as `%2f`)
    moref: str
    datacenter: str
    folder: str
    directory: str  # directory of the VM in its datastores
    disk_files: list[str]  # "[ds] dir/dir.vmdk", in disk order
    seconds: float


@dataclass
class ApplyResult:
    vms: dict[str, AppliedVm] = field(default_factory=dict)
    created: list[str] = field(default_factory=list)  # "datacenter DC1", "folder DC0/vm/A"...
    datastore_dirs: list[Path] = field(default_factory=list)  # local dirs of made datastores
    seconds: float = 0.0


def apply_inventory(
    si,
    inv: Inventory,
    *,
    guest_image: Path | str | None = None,
    uploader: Uploader | DatastoreHttp | None = None,
    verify: bool | str = False,
    datastore_root: Path | str | None = None,
    work_dir: Path | str | None = None,
    power_on: bool = True,
    task_timeout: float = 300.0,
) -> ApplyResult:
    """Build `inv` in the vCenter behind `si` (a connected pyvmomi ServiceInstance).

    - guest_image: the streamOptimized VMDK for disks with `content: debian-guest`
      (`testbed.images.debian_guest()`); None puts a synthetic disk of the declared size
      in its place (fast tests).
    - uploader: how disk files reach the datastore; default a `DatastoreHttp` built from
      the session (`verify`: False, or a CA bundle path).
    - datastore_root: local directory under which missing datastores are created (each in
      `<root>/<datacenter>-<name>`); default a new temporary directory, reported in the
      result's `datastore_dirs`.
    - work_dir: where synthetic VMDKs are made; default a cache under `cache_dir()`.

    Existing datacenters, clusters, hosts, datastores, networks and folders with the
    declared names are used as they are. A VM whose name already exists in its folder
    is an error.
    """
    started = time.monotonic()
    applier = _Applier(
        si,
        inv,
        guest_image=Path(guest_image) if guest_image else None,
        uploader=uploader or DatastoreHttp.from_service_instance(si, verify),
        datastore_root=Path(datastore_root) if datastore_root else None,
        work_dir=Path(work_dir) if work_dir else cache_dir() / "images" / "synthetic",
        task_timeout=task_timeout,
    )
    applier.run(power_on=power_on)
    applier.result.seconds = round(time.monotonic() - started, 2)
    log.info("inventory applied in %.1f s", applier.result.seconds)
    return applier.result


def wait_task(task, timeout: float = 300.0, what: str = "task"):
    """Wait for a vSphere task; return its result or raise InventoryError with the fault."""
    from pyVmomi import vim

    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        info = task.info
        if info.state == vim.TaskInfo.State.success:
            return info.result
        if info.state == vim.TaskInfo.State.error:
            err = info.error
            msg = getattr(err, "msg", None) or type(err).__name__
            raise InventoryError(f"{what} failed: {msg} ({type(err).__name__})")
        if time.monotonic() > deadline:
            raise InventoryError(f"{what} did not finish in {timeout:.0f} s")
        time.sleep(delay)
        delay = min(delay * 2, 0.5)


def _walk(folder, kind) -> list:
    """Entities of `kind` below a folder, through sub-folders, each once."""
    from pyVmomi import vim

    out, seen, todo = [], set(), [folder]
    while todo:
        node = todo.pop(0)
        for child in node.childEntity:
            if child._moId in seen:
                continue
            seen.add(child._moId)
            if isinstance(child, kind):
                out.append(child)
            if isinstance(child, vim.Folder):
                todo.append(child)
    return out


def _child(parent, name: str, kind=None):
    for child in parent.childEntity:
        if child.name == name and (kind is None or isinstance(child, kind)):
            return child
    return None


class _Applier:
    def __init__(
        self,
        si,
        inv: Inventory,
        *,
        guest_image: Path | None,
        uploader: Uploader,
        datastore_root: Path | None,
        work_dir: Path,
        task_timeout: float,
    ) -> None:
        self.si = si
        self.content = si.RetrieveContent()
        self.inv = inv
        self.guest_image = guest_image
        self.uploader = uploader
        self.datastore_root = datastore_root
        self.work_dir = work_dir
        self.task_timeout = task_timeout
        self.result = ApplyResult()
        self._guest_checked = False
        self._guest_size = 0
        self._used_dirs: dict[str, set[str]] = {}

    # -- infrastructure ---------------------------------------------------------------

    def run(self, *, power_on: bool) -> None:
        from pyVmomi import vim

        self._preflight()
        to_power_on = []
        for dc_spec in self.inv.datacenters:
            dc = self._datacenter(dc_spec)
            clusters = {c.name: self._cluster(dc, c) for c in dc_spec.clusters}
            standalone = {h: self._standalone_host(dc, h) for h in dc_spec.hosts}
            hosts = [h for c in clusters.values() for h in c.host]
            hosts += [cr.host[0] for cr in standalone.values()]
            datastores = {
                d.name: self._datastore(dc, dc_spec, d, hosts) for d in dc_spec.datastores
            }
            networks = self._networks(dc, dc_spec, hosts)
            for folder in dc_spec.folders:
                self._folder(dc, dc_spec.name, folder)
            for vm_spec in dc_spec.vms:
                vm = self._vm(dc, dc_spec, vm_spec, clusters, standalone, datastores, networks)
                if vm_spec.power == "poweredOn":
                    to_power_on.append((vm_spec, vm))
        if power_on:
            for vm_spec, vm in to_power_on:
                if vm.runtime.powerState != vim.VirtualMachinePowerState.poweredOn:
                    wait_task(vm.PowerOnVM_Task(), self.task_timeout, f"power on {vm_spec.name!r}")

    def _preflight(self) -> None:
        """Refuse before changing anything: VMs that exist already, a wrong guest image."""
        from pyVmomi import vim

        for dc_spec, vm in self.inv.vms():
            dc = _child(self.content.rootFolder, dc_spec.name, vim.Datacenter)
            folder = dc.vmFolder if dc is not None else None
            for part in vm.folder.split("/") if vm.folder else []:
                folder = _child(folder, part, vim.Folder) if folder is not None else None
            if folder is not None and _child(folder, vm.vcenter_name, vim.VirtualMachine):
                where = f"{dc_spec.name}/vm/{vm.folder}".rstrip("/")
                raise InventoryError(f"VM {vm.name!r} already exists in {where}")
            for disk in vm.disks:
                if disk.content == "debian-guest" and self.guest_image is not None:
                    self._check_guest(vm, disk)

    def _check_guest(self, vm: Vm, disk: Disk) -> None:
        if not self._guest_checked:
            if not self.guest_image.is_file():
                raise InventoryError(f"guest image {self.guest_image} does not exist")
            info = images.vmdk_info(self.guest_image)
            create_type = info.get("format-specific", {}).get("data", {}).get("create-type")
            if create_type != "streamOptimized":
                raise InventoryError(
                    f"guest image {self.guest_image} is {create_type}, not streamOptimized"
                )
            self._guest_size = info["virtual-size"]
            self._guest_checked = True
        if disk.size != self._guest_size:
            raise InventoryError(
                f"VM {vm.name!r}: disk size {format_size(disk.size)} differs from the "
                f"guest image's virtual size {format_size(self._guest_size)}"
            )

    def _task(self, task, what: str):
        return wait_task(task, self.task_timeout, what)

    def _datacenter(self, spec: Datacenter):
        from pyVmomi import vim

        root = self.content.rootFolder
        dc = _child(root, spec.name, vim.Datacenter)
        if dc is None:
            dc = root.CreateDatacenter(name=spec.name)
            self.result.created.append(f"datacenter {spec.name}")
        return dc

    def _cluster(self, dc, spec: Cluster):
        from pyVmomi import vim

        cluster = _child(dc.hostFolder, spec.name, vim.ClusterComputeResource)
        if cluster is None:
            cluster = dc.hostFolder.CreateClusterEx(name=spec.name, spec=vim.cluster.ConfigSpecEx())
            self.result.created.append(f"cluster {spec.name}")
        present = {h.name for h in cluster.host}
        for host in spec.hosts:
            if host in present:
                continue
            connect = vim.host.ConnectSpec(
                hostName=host, userName="root", password="v2k-testbed", force=True
            )
            self._task(cluster.AddHost_Task(spec=connect, asConnected=True), f"add host {host}")
            self.result.created.append(f"host {host}")
        return cluster

    def _standalone_host(self, dc, name: str):
        """The ComputeResource of a standalone host, added if missing."""
        from pyVmomi import vim

        for cr in _walk(dc.hostFolder, vim.ComputeResource):
            if not isinstance(cr, vim.ClusterComputeResource) and any(
                h.name == name for h in cr.host
            ):
                return cr
        connect = vim.host.ConnectSpec(
            hostName=name, userName="root", password="v2k-testbed", force=True
        )
        self._task(
            dc.hostFolder.AddStandaloneHost_Task(spec=connect, addConnected=True),
            f"add host {name}",
        )
        self.result.created.append(f"host {name}")
        for cr in _walk(dc.hostFolder, vim.ComputeResource):
            if any(h.name == name for h in cr.host):
                return cr
        raise InventoryError(f"host {name!r} was added but cannot be found")

    def _datastore(self, dc, dc_spec: Datacenter, spec: Datastore, hosts: list):
        from pyVmomi import vim

        for ds in _walk(dc.datastoreFolder, vim.Datastore):
            if ds.name == spec.name:
                return ds
        if not hosts:
            raise InventoryError(
                f"datastore {spec.name!r} is missing and {dc_spec.name!r} has no host to add it to"
            )
        if spec.path:
            path = Path(spec.path)
        else:
            if self.datastore_root is None:
                self.datastore_root = Path(tempfile.mkdtemp(prefix="v2k-datastores-"))
            path = self.datastore_root / f"{dc_spec.name}-{spec.name}"
        path.mkdir(parents=True, exist_ok=True)
        dss = hosts[0].configManager.datastoreSystem
        ds = dss.CreateLocalDatastore(name=spec.name, path=str(path))
        self.result.created.append(f"datastore {spec.name}")
        self.result.datastore_dirs.append(path)
        return ds

    def _networks(self, dc, spec: Datacenter, hosts: list) -> dict:
        """{name: backing-maker}: standard names map to a Network, DVPGs to (dvs, pg)."""
        from pyVmomi import vim

        present = {n.name: n for n in _walk(dc.networkFolder, vim.Network)}
        out: dict[str, object] = {}
        for name in spec.networks.standard:
            net = present.get(name)
            if net is None or isinstance(net, vim.dvs.DistributedVirtualPortgroup):
                if net is not None:
                    raise InventoryError(f"{name!r} exists as a distributed port group")
                if not hosts:
                    raise InventoryError(f"port group {name!r} is missing and there is no host")
                pg = vim.host.PortGroup.Specification(
                    name=name, vlanId=0, vswitchName="vSwitch0", policy=vim.host.NetworkPolicy()
                )
                hosts[0].configManager.networkSystem.AddPortGroup(portgrp=pg)
                self.result.created.append(f"port group {name}")
                net = next(n for n in _walk(dc.networkFolder, vim.Network) if n.name == name)
            out[name] = net
        for dvs_spec in spec.networks.distributed:
            dvs = next(
                (
                    d
                    for d in _walk(dc.networkFolder, vim.DistributedVirtualSwitch)
                    if d.name == dvs_spec.name
                ),
                None,
            )
            if dvs is None:
                create = vim.DistributedVirtualSwitch.CreateSpec(
                    configSpec=vim.dvs.VmwareDistributedVirtualSwitch.ConfigSpec(name=dvs_spec.name)
                )
                dvs = self._task(
                    dc.networkFolder.CreateDVS_Task(spec=create), f"create switch {dvs_spec.name}"
                )
                self.result.created.append(f"distributed switch {dvs_spec.name}")
            pgs = {pg.name: pg for pg in dvs.portgroup}
            for name in dvs_spec.portgroups:
                if name not in pgs:
                    pg_spec = vim.dvs.DistributedVirtualPortgroup.ConfigSpec(
                        name=name, type="earlyBinding", numPorts=16
                    )
                    self._task(dvs.AddDVPortgroup_Task(spec=[pg_spec]), f"add port group {name}")
                    self.result.created.append(f"distributed port group {name}")
                    pgs = {pg.name: pg for pg in dvs.portgroup}
                out[name] = (dvs, pgs[name])
            # Every host of the declared clusters joins the switch (a VM on a host that is
            # not a member cannot use its port groups). Done after the port groups, so
            # they get the hosts too.
            members = {m._moId for m in dvs.summary.hostMember}
            missing = [h for h in hosts if h._moId not in members]
            if missing:
                reconfig = vim.dvs.VmwareDistributedVirtualSwitch.ConfigSpec(
                    configVersion=dvs.config.configVersion,
                    host=[vim.dvs.HostMember.ConfigSpec(operation="add", host=h) for h in missing],
                )
                self._task(dvs.ReconfigureDvs_Task(spec=reconfig), f"add hosts to {dvs.name}")
        return out

    def _folder(self, dc, dc_name: str, path: str):
        from pyVmomi import vim

        folder = dc.vmFolder
        walked = []
        for part in path.split("/") if path else []:
            walked.append(part)
            child = _child(folder, part, vim.Folder)
            if child is None:
                child = folder.CreateFolder(name=part)
                self.result.created.append(f"folder {dc_name}/vm/{'/'.join(walked)}")
            folder = child
        return folder

    # -- disks ------------------------------------------------------------------------

    def _disk_source(self, vm: Vm, disk: Disk) -> Path:
        if disk.content == "debian-guest" and self.guest_image is not None:
            self._check_guest(vm, disk)
            return self.guest_image
        return self._synthetic(disk)

    def _synthetic(self, disk: Disk) -> Path:
        """A cached streamOptimized synthetic VMDK for this size, seed and fill."""
        fill = images.default_fill(disk.size) if disk.fill is None else disk.fill
        path = self.work_dir / f"synthetic-{disk.size}-{disk.seed}-{fill}.vmdk"
        if not path.is_file():
            self.work_dir.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".synth-", dir=self.work_dir))
            try:
                made = tmp / path.name
                images.synthetic_vmdk(made, disk.size, "streamOptimized", disk.seed, fill)
                made.rename(path)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return path

    def _vm_directory(self, dc_spec: Datacenter, vm: Vm) -> str:
        """A directory name free on every datastore the VM uses ('name', 'name_1', ...)."""
        base = safe_component(vm.name)
        used = self._used_dirs.setdefault(dc_spec.name, set())
        datastores = sorted({d.datastore for d in vm.disks}) or [dc_spec.datastores[0].name]
        exists = getattr(self.uploader, "exists", None)
        for i in range(1000):
            candidate = base if i == 0 else f"{base}_{i}"
            if candidate in used:
                continue
            if exists and any(exists(dc_spec.name, ds, candidate + "/") for ds in datastores):
                continue
            used.add(candidate)
            return candidate
        raise InventoryError(f"no free directory for VM {vm.name!r}")

    # -- VMs ----------------------------------------------------------------------------

    def _vm(self, dc, dc_spec: Datacenter, spec: Vm, clusters, standalone, datastores, networks):
        from pyVmomi import vim

        start = time.monotonic()
        folder = self._folder(dc, dc_spec.name, spec.folder)
        if _child(folder, spec.vcenter_name, vim.VirtualMachine) is not None:
            raise InventoryError(
                f"VM {spec.name!r} already exists in {dc_spec.name}/vm/{spec.folder}".rstrip("/")
            )
        cluster_name, host_name = dc_spec.placement(spec)
        compute = clusters[cluster_name] if cluster_name else standalone[host_name]
        host = None
        if host_name:
            host = next((h for h in compute.host if h.name == host_name), None)
            if host is None:
                raise InventoryError(f"VM {spec.name!r}: host {host_name!r} not found")

        directory = self._vm_directory(dc_spec, spec)
        vmx_ds = spec.disks[0].datastore if spec.disks else dc_spec.datastores[0].name

        # Upload the disks: <dir>/<dir>.vmdk (streamOptimized) + <dir>-flat.vmdk (empty).
        disk_files = []
        empty = self.work_dir / "empty-flat.vmdk"
        self.work_dir.mkdir(parents=True, exist_ok=True)
        if not empty.exists():
            empty.write_bytes(b"")
        for i, disk in enumerate(spec.disks):
            stem = directory if i == 0 else f"{directory}_{i}"
            rel = f"{directory}/{stem}.vmdk"
            source = self._disk_source(spec, disk)
            self.uploader(source, dc_spec.name, disk.datastore, rel)
            self.uploader(empty, dc_spec.name, disk.datastore, f"{directory}/{stem}-flat.vmdk")
            disk_files.append(f"[{disk.datastore}] {rel}")

        create_name = spec.vcenter_name
        if create_name != safe_component(spec.name) or create_name.startswith("."):
            create_name = f"v2k-creating-{spec.instance_uuid.hex[:12]}"

        config = vim.vm.ConfigSpec(
            name=create_name,
            guestId=spec.guest_id,
            firmware=spec.firmware,
            numCPUs=spec.num_cpu,
            numCoresPerSocket=spec.cores_per_socket,
            memoryMB=spec.memory_mb,
            instanceUuid=str(spec.instance_uuid),
            uuid=str(spec.bios_uuid),
            annotation=spec.annotation,
            version=spec.hardware_version,
            files=vim.vm.FileInfo(vmPathName=f"[{vmx_ds}] {directory}/{directory}.vmx"),
            bootOptions=vim.vm.BootOptions(efiSecureBootEnabled=spec.secure_boot)
            if spec.firmware == "efi"
            else None,
            deviceChange=self._device_changes(spec, datastores, networks, disk_files),
        )
        vm = self._task(
            folder.CreateVM_Task(config=config, pool=compute.resourcePool, host=host),
            f"create VM {spec.name!r}",
        )
        if create_name != spec.vcenter_name:
            self._task(vm.Rename_Task(newName=spec.vcenter_name), f"rename VM {spec.name!r}")
            if vm.config.name != spec.vcenter_name:  # the simulator renames only `name`
                self._task(
                    vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(name=spec.vcenter_name)),
                    f"rename VM {spec.name!r}",
                )
        seconds = round(time.monotonic() - start, 2)
        self.result.vms[spec.name] = AppliedVm(
            name=spec.name,
            vcenter_name=spec.vcenter_name,
            moref=vm._moId,
            datacenter=dc_spec.name,
            folder=spec.folder,
            directory=directory,
            disk_files=disk_files,
            seconds=seconds,
        )
        log.info("VM %r created in %.2f s (%d disks)", spec.name, seconds, len(spec.disks))
        return vm

    def _device_changes(self, spec: Vm, datastores, networks, disk_files) -> list:
        from pyVmomi import vim

        add = vim.vm.device.VirtualDeviceSpec.Operation.add
        changes = []
        scsi_key, sata_key = -100, -200
        if any(d.controller == "scsi" for d in spec.disks):
            kind = {
                "pvscsi": vim.vm.device.ParaVirtualSCSIController,
                "lsilogic": vim.vm.device.VirtualLsiLogicController,
                "lsilogic-sas": vim.vm.device.VirtualLsiLogicSASController,
                "buslogic": vim.vm.device.VirtualBusLogicController,
            }[spec.scsi_controller]
            ctrl = kind(key=scsi_key, busNumber=0, sharedBus="noSharing")
            changes.append(vim.vm.device.VirtualDeviceSpec(operation=add, device=ctrl))
        if any(d.controller == "sata" for d in spec.disks):
            ctrl = vim.vm.device.VirtualAHCIController(key=sata_key, busNumber=0)
            changes.append(vim.vm.device.VirtualDeviceSpec(operation=add, device=ctrl))

        units = {"scsi": iter(u for u in range(16) if u != 7), "sata": iter(range(30))}
        for i, (disk, file_name) in enumerate(zip(spec.disks, disk_files, strict=True)):
            backing = vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
                fileName=file_name,
                diskMode=disk.mode,
                thinProvisioned=disk.thin,
                datastore=datastores[disk.datastore],
            )
            device = vim.vm.device.VirtualDisk(
                key=-1000 - i,
                controllerKey=scsi_key if disk.controller == "scsi" else sata_key,
                unitNumber=next(units[disk.controller]),
                capacityInKB=disk.size // KiB,
                capacityInBytes=disk.size,
                backing=backing,
            )
            changes.append(vim.vm.device.VirtualDeviceSpec(operation=add, device=device))

        for i, nic in enumerate(spec.nics):
            kind = {
                "vmxnet3": vim.vm.device.VirtualVmxnet3,
                "e1000e": vim.vm.device.VirtualE1000e,
                "e1000": vim.vm.device.VirtualE1000,
            }[nic.adapter]
            net = networks[nic.network]
            if isinstance(net, tuple):
                dvs, pg = net
                backing = vim.vm.device.VirtualEthernetCard.DistributedVirtualPortBackingInfo(
                    port=vim.dvs.PortConnection(switchUuid=dvs.uuid, portgroupKey=pg.key)
                )
            else:
                backing = vim.vm.device.VirtualEthernetCard.NetworkBackingInfo(
                    deviceName=nic.network, network=net
                )
            device = kind(
                key=-2000 - i,
                addressType="manual",
                macAddress=nic.mac,
                backing=backing,
                wakeOnLanEnabled=True,
                connectable=vim.vm.device.VirtualDevice.ConnectInfo(
                    startConnected=nic.start_connected,
                    connected=False,
                    allowGuestControl=True,
                ),
            )
            changes.append(vim.vm.device.VirtualDeviceSpec(operation=add, device=device))
        return changes


# ---------------------------------------------------------------------------------------
# Read back (for tests and checks): the same vocabulary as the model
# ---------------------------------------------------------------------------------------


def expected_vm(dc: Datacenter, spec: Vm) -> dict:
    """What `observe_vm` should read for a VM made from `spec`."""
    return {
        "name": spec.vcenter_name,
        "datacenter": dc.name,
        "folder": spec.folder,
        "guest_id": spec.guest_id,
        "firmware": spec.firmware,
        "secure_boot": spec.secure_boot,
        "power": spec.power,
        "num_cpu": spec.num_cpu,
        "cores_per_socket": spec.cores_per_socket,
        "memory_mb": spec.memory_mb,
        "instance_uuid": str(spec.instance_uuid),
        "uuid": str(spec.bios_uuid),
        "annotation": spec.annotation,
        "disks": [
            {
                "size": d.size,
                "datastore": d.datastore,
                "controller": d.controller,
                "mode": d.mode,
                "thin": d.thin,
            }
            for d in spec.disks
        ],
        "nics": [{"mac": n.mac, "adapter": n.adapter, "network": n.network} for n in spec.nics],
    }


def observe_vm(vm) -> dict:
    """Read a VM's hardware from vCenter into the vocabulary of the inventory."""
    from pyVmomi import vim

    config = vm.config
    folder_parts = []
    parent = vm.parent
    while parent is not None and not isinstance(parent.parent, vim.Datacenter):
        folder_parts.append(parent.name)
        parent = parent.parent
    dc = parent.parent if parent is not None else None
    devices = sorted(config.hardware.device, key=lambda d: d.key)
    by_key = {d.key: d for d in devices}
    networks = {}
    if dc is not None:
        for net in _walk(dc.networkFolder, vim.dvs.DistributedVirtualPortgroup):
            networks[net.key] = net.name

    disks = []
    for dev in devices:
        if not isinstance(dev, vim.vm.device.VirtualDisk):
            continue
        ctrl = by_key.get(dev.controllerKey)
        kind = (
            "sata"
            if isinstance(ctrl, vim.vm.device.VirtualSATAController)
            else ("scsi" if isinstance(ctrl, vim.vm.device.VirtualSCSIController) else "other")
        )
        file_name = dev.backing.fileName
        disks.append(
            {
                "size": dev.capacityInBytes or dev.capacityInKB * KiB,
                "datastore": file_name[1 : file_name.index("]")]
                if file_name.startswith("[")
                else None,
                "controller": kind,
                "mode": dev.backing.diskMode,
                "thin": bool(dev.backing.thinProvisioned),
            }
        )
    adapters = {
        vim.vm.device.VirtualVmxnet3: "vmxnet3",
        vim.vm.device.VirtualE1000e: "e1000e",
        vim.vm.device.VirtualE1000: "e1000",
    }
    nics = []
    for dev in devices:
        if not isinstance(dev, vim.vm.device.VirtualEthernetCard):
            continue
        backing = dev.backing
        if isinstance(backing, vim.vm.device.VirtualEthernetCard.DistributedVirtualPortBackingInfo):
            network = networks.get(backing.port.portgroupKey, backing.port.portgroupKey)
        else:
            network = backing.deviceName
        nics.append(
            {
                "mac": (dev.macAddress or "").lower(),
                "adapter": adapters.get(type(dev), type(dev).__name__),
                "network": network,
            }
        )
    boot = config.bootOptions
    return {
        "name": vm.name,
        "datacenter": dc.name if dc is not None else None,
        "folder": "/".join(reversed(folder_parts)),
        "guest_id": config.guestId,
        "firmware": config.firmware,
        "secure_boot": bool(boot and boot.efiSecureBootEnabled),
        "power": str(vm.runtime.powerState),
        "num_cpu": config.hardware.numCPU,
        "cores_per_socket": config.hardware.numCoresPerSocket,
        "memory_mb": config.hardware.memoryMB,
        "instance_uuid": config.instanceUuid,
        "uuid": config.uuid,
        "annotation": config.annotation or "",
        "disks": disks,
        "nics": nics,
    }


def find_vm(si, datacenter: str, folder: str, name: str):
    """The VM `name` (as vCenter stores it) in `datacenter`'s VM folder `folder`, or None."""
    from pyVmomi import vim

    dc = _child(si.RetrieveContent().rootFolder, datacenter, vim.Datacenter)
    if dc is None:
        return None
    node = dc.vmFolder
    for part in folder.split("/") if folder else []:
        node = _child(node, part, vim.Folder)
        if node is None:
            return None
    return _child(node, name, vim.VirtualMachine)
