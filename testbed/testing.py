"""Helpers for tests that run v2k's flows in the test bed."""

from __future__ import annotations

import contextlib
import re
import subprocess
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import libvirt
from pyVmomi import vim

from tasks import vcenter as vc
from tasks.inventory import list_vms
from tasks.models import MigrationRequest

STOP_AFTER_EXPORT = 2 / 3600
"""A `convert_timeout` (hours) for runs that only need to get through the export: virt-v2v
gets 2 s (it needs about 30 s to refuse a synthetic disk), so the run fails right after
the export, with a message that says so."""


def request_for(blocks: dict[str, str], vm: str, **overrides) -> MigrationRequest:
    """A MigrationRequest for `vm` on the test bed's saved blocks (TestBed.save_blocks)."""
    values = dict(
        vcenter=blocks["vcenter"],
        vm=vm,
        cluster=blocks["cluster"],
        temporary_storage=blocks["scratch"],
        settings=blocks["settings"],
    )
    values.update(overrides)
    return MigrationRequest(**values)


def host_of(block_name: str) -> str:
    """The test bed host (`kvm1`) a KvmHost block saved by `TestBed.save_blocks` is for."""
    return block_name.rsplit("-", 1)[-1]


@dataclass(frozen=True)
class Snapshot:
    """What a run could leave behind, at one moment (see `snapshot`)."""

    vms: frozenset[str]  # every VM of the datacenter, its inventory summary as JSON
    clones: frozenset[str]  # VMs named v2k-clone-*
    export_leases: int  # export leases the simulator still holds ready
    files: frozenset[str]  # every path below `dirs`
    domains: frozenset[str]  # `host:domain` of every domain on every host
    volumes: frozenset[str]  # `host:volume` of the pool of every host
    dirs: tuple[str, ...]  # the temporary storage directories looked at


def _domains(conn) -> set[str]:
    found = set()
    for dom in conn.listAllDomains():
        with contextlib.suppress(libvirt.libvirtError):  # undefined meanwhile
            found.add(dom.name())
    return found


def snapshot(bed, *dirs: Path) -> Snapshot:
    """The vCenter VM list and leases, temporary storage files and every host's libvirt
    domains and pool volumes (each host has a libvirtd of its own).

    Args:
        bed: The session's TestBed.
        dirs: The temporary storage the run uses; default the bed's scratch directory.
            Every host's local storage (`bed.local_backing`) is always looked at too.
    """
    looked_at = [*(dirs or (bed.scratch,)), *(bed.local_backing(h) for h in bed.libvirt)]
    dirs = tuple(dict.fromkeys(str(d) for d in looked_at))
    with bed.vcsim.connect() as si:
        vms = list_vms(si, vc.datacenter(si, bed.vcsim.datacenter))
    domains, volumes = set(), set()
    for host in bed.libvirt:
        conn = bed.libvirt_conn(host)
        domains |= {f"{host}:{name}" for name in _domains(conn)}
        pool = conn.storagePoolLookupByName(bed.pool)
        pool.refresh()
        volumes |= {f"{host}:{name}" for name in pool.listVolumes()}
    return Snapshot(
        vms=frozenset(v.model_dump_json() for v in vms),
        clones=frozenset(v.name for v in vms if v.name.startswith("v2k-clone-")),
        export_leases=bed.vcsim.stats()["export_leases"],
        files=frozenset(str(p) for d in dirs for p in Path(d).rglob("*")),
        domains=frozenset(domains),
        volumes=frozenset(volumes),
        dirs=dirs,
    )


def assert_nothing_left(bed, before: Snapshot) -> None:
    """Everything as in `before`: no clone, no lease, no run files, no domain or volume."""
    after = snapshot(bed, *before.dirs)
    assert not after.clones, f"clones left in vCenter: {sorted(after.clones)}"
    assert after.export_leases == 0, "an export lease is still ready in the simulator"
    assert after.files == before.files, f"left in storage: {after.files - before.files}"
    assert after.domains == before.domains, f"domains left: {after.domains - before.domains}"
    assert after.volumes == before.volumes, f"volumes left: {after.volumes - before.volumes}"
    assert after.vms == before.vms, "the vCenter inventory changed"
    # A lease of another test's killed worker may time out meanwhile (test_resume.py).
    assert after == replace(before, export_leases=0)


_EXTENT = re.compile(r'^(?:RW|RDONLY)\s+(\d+)\s+FLAT\s+"([^"/]+)"\s+(\d+)', re.MULTILINE)


def write_disk(sim, vm, offset: int, data: bytes, disk: int = 0) -> None:
    """Write `data` at byte `offset` of a VM's disk through the datastore, as a guest would.

    The disk's data file is read with `/folder` GET and put back whole with PUT (vCenter's
    `/folder` has no partial PUT): its modification time changes and, with change
    tracking on, so does the disk's `changeId`. A monolithicFlat disk is written in its
    flat extent; a streamOptimized one is unpacked with qemu-img, written and packed again.

    Args:
        sim: The running VcSim.
        vm: The pyvmomi VM (its disks are read from `config.hardware.device`).
        offset: Byte offset in the disk's content.
        data: The bytes to write.
        disk: Which disk, in device order.
    """
    disks = [d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)]
    match = re.match(r"^\[([^\]]+)\] (.+)$", disks[disk].backing.fileName)
    if not match:
        raise ValueError(f"not a datastore path: {disks[disk].backing.fileName!r}")
    datastore, path = match.groups()
    head = sim.download(path, datastore)
    if head.startswith(b"# Disk DescriptorFile"):
        extent = _EXTENT.search(head.decode(errors="replace"))
        if not extent or int(extent.group(3)) != 0:
            raise ValueError(f"{path}: only a single FLAT extent is supported")
        folder = path.rsplit("/", 1)[0] + "/" if "/" in path else ""
        flat_path = folder + extent.group(2)
        content = bytearray(sim.download(flat_path, datastore))
        if offset + len(data) > len(content):
            raise ValueError(f"write past the end of {flat_path} ({len(content)} bytes)")
        content[offset : offset + len(data)] = data
        sim.upload(flat_path, bytes(content), datastore)
        return
    with tempfile.TemporaryDirectory(prefix="v2k-write-disk-") as tmp:
        vmdk, raw = Path(tmp) / "disk.vmdk", Path(tmp) / "disk.raw"
        vmdk.write_bytes(head)
        subprocess.run(
            ["qemu-img", "convert", "-O", "raw", str(vmdk), str(raw)],
            check=True,
            capture_output=True,
            timeout=600,
        )
        if offset + len(data) > raw.stat().st_size:
            raise ValueError(f"write past the end of {path} ({raw.stat().st_size} bytes)")
        with open(raw, "r+b") as f:
            f.seek(offset)
            f.write(data)
        vmdk.unlink()
        subprocess.run(
            ["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized"]
            + [str(raw), str(vmdk)],
            check=True,
            capture_output=True,
            timeout=600,
        )
        sim.upload(path, vmdk, datastore)


def stand_in_conversion(bed, bed_blocks: dict[str, str]):
    """debian-stopped's spec and a 16 MiB qcow2 standing for its conversion, in the bed's
    temporary storage: the import stage's input without 2-3 min of virt-v2v.

    Returns:
        (VmSpec, ConvertResult); the caller removes `Path(result.output_dir).parent`.
    """
    import uuid

    from tasks.models import ConvertedDisk, ConvertResult

    with bed.vcsim.connect() as si:
        spec = vc.read_spec(si, vc.find_vm(si, vc.datacenter(si, None), "debian-stopped"))
    out = Path(bed.scratch) / f"v2k-{uuid.uuid4().hex[:12]}" / "out"
    out.mkdir(parents=True)
    qcow2 = out / "debian-stopped-sda"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), "16M"], check=True)
    return spec, ConvertResult(
        output_dir=str(out),
        disks=[ConvertedDisk(path=str(qcow2), virtual_size=16 << 20, actual_size=0)],
        domain_xml="<domain type='kvm'><name>debian-stopped</name></domain>",
        osinfo=None,
        host=bed_blocks["kvm1"],
        seconds=0,
    )
