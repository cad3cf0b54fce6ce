"""Helpers for tests that run v2k's flows in the test bed."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from pathlib import Path

import libvirt

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


@dataclass(frozen=True)
class Snapshot:
    """What a run could leave behind, at one moment (see `snapshot`)."""

    vms: frozenset[str]  # every VM of the datacenter, its inventory summary as JSON
    clones: frozenset[str]  # VMs named v2k-clone-*
    export_leases: int  # export leases the simulator still holds ready
    files: frozenset[str]  # every path below `dirs`
    domains: frozenset[str]  # domains on the bed's pool or networks
    volumes: frozenset[str]  # volumes of the bed's pool
    dirs: tuple[str, ...]  # the temporary storage directories looked at


def _bed_domains(bed) -> frozenset[str]:
    # libvirtd is shared with other test beds: only domains that use this bed's pool or
    # networks can come from a run of this one.
    marks = [str(bed.libvirtd.pool_path), *(f"'{n}'" for n in bed.libvirtd.networks)]
    found = set()
    for dom in bed.libvirtd.conn.listAllDomains():
        with contextlib.suppress(libvirt.libvirtError):  # undefined meanwhile
            xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
            if any(mark in xml for mark in marks):
                found.add(dom.name())
    return frozenset(found)


def snapshot(bed, *dirs: Path) -> Snapshot:
    """The vCenter VM list and leases, temporary storage files and the bed's libvirt objects.

    Args:
        bed: The session's TestBed.
        dirs: The temporary storage the run uses; default the bed's scratch directory.
    """
    dirs = dirs or (bed.scratch,)
    with bed.vcsim.connect() as si:
        vms = list_vms(si, vc.datacenter(si, bed.vcsim.datacenter))
    pool = bed.libvirtd.conn.storagePoolLookupByName(bed.libvirtd.pool)
    pool.refresh()
    return Snapshot(
        vms=frozenset(v.model_dump_json() for v in vms),
        clones=frozenset(v.name for v in vms if v.name.startswith("v2k-clone-")),
        export_leases=bed.vcsim.stats()["export_leases"],
        files=frozenset(str(p) for d in dirs for p in Path(d).rglob("*")),
        domains=_bed_domains(bed),
        volumes=frozenset(pool.listVolumes()),
        dirs=tuple(str(d) for d in dirs),
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
