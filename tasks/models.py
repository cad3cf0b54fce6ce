"""The data that flows between stages: plain pydantic models, no live clients."""

from __future__ import annotations

import hashlib
import re
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from blocks.vcenter import InlineVCenter
from tasks.vmpath import unescape

_LIBVIRT_NAME_BAD = re.compile(r"[^A-Za-z0-9._+-]+")


def libvirt_name(source_name: str) -> str:
    """A domain name libvirt and every shell take, derived from a VMware VM name.

    The name is read as the vSphere Client shows it (`app%2fdb` is `app/db`). Runs of
    other characters become `-`; a name that starts with `.` or `-` gets a `vm` prefix so
    it can never be read as a path or an option.
    """
    name = _LIBVIRT_NAME_BAD.sub("-", unescape(source_name)).strip("-")
    if not name or name[0] in ".-":
        name = f"vm-{name}".rstrip("-")
    return name[:100]


class MigrationRequest(BaseModel):
    """What to migrate, from where, to where. The Prefect UI renders it as the run form."""

    vcenter: str | None = Field(
        default=None, description="Name of the VCenter block of the source (or vcenter_inline)."
    )
    vcenter_inline: InlineVCenter | None = Field(
        default=None,
        description=(
            "The source given inline instead of a saved block; its password comes from a "
            "Prefect Secret block, never from the run's parameters."
        ),
    )
    vm: str = Field(
        description=(
            "The VM: its name, inventory path (`/DC/vm/Folder/Name`), moref (`vm-42`) "
            "or instance UUID."
        )
    )
    cluster: str = Field(description="Name of the destination KvmCluster block.")
    temporary_storage: str = Field(description="Name of the TemporaryStorage block.")
    settings: str | None = Field(
        default=None, description="Name of a MigrationSettings block. Empty: the defaults."
    )
    target_name: str | None = Field(
        default=None,
        description="Domain name on KVM. Empty: the source name, made valid for libvirt.",
    )
    export_host: str | None = Field(
        default=None, description="KvmHost block that exports (ovftool). Empty: the worker."
    )
    convert_host: str | None = Field(
        default=None, description="KvmHost block that runs virt-v2v. Empty: chosen at random."
    )
    import_host: str | None = Field(
        default=None, description="KvmHost block that gets the domain. Empty: chosen at random."
    )
    verify_boot: bool = Field(
        default=False, description="Start the new domain and wait for its login prompt."
    )
    reuse_exports: bool = Field(
        default=False,
        description=(
            "Reuse a finished export of the VM in the same state (same instance UUID and "
            "change version) from an earlier run, and keep this run's export when it "
            "fails so that a later run can reuse it."
        ),
    )

    @field_validator("vm", "vcenter", "cluster", "temporary_storage")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be empty")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> MigrationRequest:
        if (self.vcenter is None) == (self.vcenter_inline is None):
            raise ValueError("give either vcenter (a VCenter block name) or vcenter_inline")
        return self

    @field_validator("target_name")
    @classmethod
    def _valid_target(cls, value: str | None) -> str | None:
        if value is not None and value != libvirt_name(value):
            raise ValueError(
                f"{value!r} is not a valid domain name; use letters, digits, . _ + - "
                f"(for example {libvirt_name(value)!r})"
            )
        return value


class DiskSpec(BaseModel):
    """One virtual disk of the source VM."""

    key: int = Field(description="vSphere device key.")
    label: str
    capacity_bytes: int
    file_name: str = Field(description="Datastore path, e.g. `[ds1] vm/vm.vmdk`.")
    datastore: str
    controller: str = Field(description="Controller type and bus, e.g. `scsi0:1`.")
    mode: str = Field(description="Disk mode: persistent, independent_persistent, ...")
    thin: bool | None = None
    rdm: bool = False
    sharing: str | None = None
    change_id: str | None = Field(
        default=None, description="CBT changeId of the disk (change tracking on), else None."
    )
    files_stamp: str | None = Field(
        default=None,
        description="Name, size and modification time of the disk's files from the datastore "
        "browser; None when the browser could not tell.",
    )


class NicSpec(BaseModel):
    """One network adapter of the source VM."""

    key: int
    label: str
    mac: str
    adapter: str = Field(description="vmxnet3, e1000e, e1000, ...")
    portgroup: str | None = Field(description="Port group name (standard or distributed).")
    connected: bool = True


class VmSpec(BaseModel):
    """Everything v2k needs to know about the source VM, read once in preflight."""

    name: str
    moref: str
    instance_uuid: str | None
    inventory_path: str
    inventory_names: list[str] = Field(
        default_factory=list, description="Datacenter, folders and VM name, as vCenter stores them."
    )
    guest_id: str | None
    guest_full_name: str | None = None
    power_state: Literal["poweredOn", "poweredOff", "suspended"]
    num_cpu: int
    cores_per_socket: int
    memory_mb: int
    firmware: Literal["bios", "efi"]
    secure_boot: bool = False
    disks: list[DiskSpec]
    nics: list[NicSpec]
    snapshot_count: int = 0
    tools_status: str | None = None
    change_version: str | None = None
    vcenter_uuid: str | None = Field(
        default=None, description="Instance UUID of the vCenter (or ESXi host) that has the VM."
    )
    host: str | None = Field(default=None, description="ESXi host that runs the VM.")
    standalone: bool = Field(
        default=False, description="The source is a standalone ESXi host, not vCenter."
    )

    @property
    def total_disk_bytes(self) -> int:
        return sum(d.capacity_bytes for d in self.disks)

    @property
    def is_windows(self) -> bool:
        return (self.guest_id or "").lower().startswith("win")

    @property
    def data_version(self) -> str | None:
        """What identifies the VM's data now: the same value means the same bytes.

        Made of the vCenter's and the VM's instance UUIDs, the configuration version, and
        per disk the CBT changeId or else its files' sizes and modification times (a
        powered-on VM writes its files). None when a disk's state cannot be told: then
        nothing exported earlier may stand in for the VM's current data.
        """
        disks = [d.change_id or d.files_stamp for d in self.disks]
        if not self.instance_uuid or not all(disks):
            return None
        parts = [self.vcenter_uuid or "", self.instance_uuid, self.change_version or "", *disks]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


class HostProbe(BaseModel):
    """What one KVM host offers, as found over SSH."""

    name: str
    reachable: bool
    error: str | None = None
    virt_v2v: str | None = None
    nbdkit: str | None = None
    ovftool: str | None = None
    qemu_img: str | None = None
    virtio_win: bool = False
    ovmf: bool = Field(default=False, description="UEFI firmware (OVMF) is installed.")
    ovmf_secure_boot: bool = Field(default=False, description="A secure-boot OVMF build is.")
    free_bytes: int | None = Field(default=None, description="Free bytes in the host's workdir.")
    scratch_path: str | None = Field(
        default=None, description="Local temporary storage probed on this host, if any."
    )
    scratch_free_bytes: int | None = Field(
        default=None,
        description="Free bytes there; None when it is not a writable directory on the host.",
    )
    seconds: float = Field(default=0.0, description="Wall time of the probe, SSH session included.")

    def can_convert(self, windows: bool) -> str | None:
        """Why this host cannot run virt-v2v for the guest, or None when it can."""
        if not self.reachable:
            return f"unreachable: {self.error}"
        missing = [
            tool for tool in ("virt_v2v", "nbdkit", "qemu_img") if getattr(self, tool) is None
        ]
        if missing:
            return "missing " + ", ".join(m.replace("_", "-") for m in missing)
        if windows and not self.virtio_win:
            return "virtio-win is not installed (needed for Windows guests)"
        return None


class HostChoice(BaseModel):
    """The hosts picked for a run, and why."""

    convert: str
    import_: str = Field(alias="import")
    export: str | None = Field(default=None, description="None: the worker exports.")
    probes: list[HostProbe]
    reasons: list[str] = Field(default_factory=list)

    model_config = {"populate_by_name": True}


class ExportedDisk(BaseModel):
    """A disk written into temporary storage."""

    key: int
    file_name: str = Field(description="File name inside the export directory.")
    bytes: int
    sha256: str
    seconds: float
    resumed_from: int = 0


class ExportResult(BaseModel):
    directory: str = Field(description="Export directory on the worker.")
    ovf: str = Field(description="Descriptor file name in the directory.")
    disks: list[ExportedDisk]
    source_moref: str


class ConvertedDisk(BaseModel):
    path: str = Field(description="qcow2 file as the worker sees it.")
    virtual_size: int
    actual_size: int


class ConvertResult(BaseModel):
    output_dir: str = Field(description="virt-v2v output directory on the worker.")
    disks: list[ConvertedDisk]
    domain_xml: str = Field(description="The libvirt XML virt-v2v wrote.")
    osinfo: str | None
    host: str
    seconds: float
    warnings: list[str] = Field(default_factory=list)
    command_seconds: float = Field(
        default=0.0,
        description="Wall time of every command on the convert host: virt-v2v, the output "
        "checks and the XML read, SSH session included.",
    )


class ImportResult(BaseModel):
    domain_name: str
    domain_uuid: str
    host: str
    pool: str
    volumes: list[str]
    osinfo: str | None
    domain_type: str
    upload_seconds: float = Field(default=0.0, description="Disk uploads into the pool.")
    check_seconds: float = Field(default=0.0, description="`qemu-img check` of the volumes.")


class StageReport(BaseModel):
    name: str
    seconds: float
    detail: str = ""
    external_seconds: float = Field(
        default=0.0,
        description="Part of `seconds` spent in external commands and transfers: SSH "
        "probes, disk downloads, virt-v2v and its checks, volume uploads, qemu-img check.",
    )


class MigrationResult(BaseModel):
    """What a migration did: shown as an artifact and returned by the flow."""

    vm: str
    source_moref: str
    domain_name: str
    domain_uuid: str
    import_host: str
    convert_host: str
    export_host: str | None
    stages: list[StageReport]
    bytes_exported: int
    checksums: dict[str, str]
    osinfo: str | None
    booted: bool | None = None
    verify_error: str | None = Field(
        default=None, description="Why the boot check failed (the domain is kept)."
    )
    warnings: list[str] = Field(default_factory=list)
    cleanup_left: list[str] = Field(
        default_factory=list,
        description="What the run could not verify as removed (`v2k cleanup` goes on).",
    )


class VmSummary(BaseModel):
    """One line of the inventory."""

    name: str
    moref: str
    path: str
    power_state: str
    guest_id: str | None
    guest_full_name: str | None = None
    num_cpu: int | None
    memory_mb: int | None
    disks: int
    disk_bytes: int
    nics: list[str] = Field(default_factory=list, description="MAC@portgroup per NIC.")
    firmware: str | None = None
    instance_uuid: str | None = None
    folder: str = Field(
        default="", description="Folder below the datacenter's VM folder, e.g. `Prod/Web`."
    )
    snapshot_count: int = 0
    tools_status: str | None = Field(
        default=None, description="VMware Tools: toolsOk, toolsNotInstalled, toolsNotRunning..."
    )
