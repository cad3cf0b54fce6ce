"""A standalone ESXi host as the source (`ha-datacenter`, no vCenter): stopped VMs go
through the export, running VMs are refused because ESXi cannot clone."""

from __future__ import annotations

import os

import pytest

from flows.migrate import migrate_vm
from tasks import vcenter as vc
from tasks.inventory import list_vms
from tasks.preflight import PreflightError
from testbed.bed import TestBed
from testbed.testing import request_for


@pytest.fixture(scope="module")
def esxi(tmp_path_factory, prefect_harness):
    slot = int(os.environ.get("V2K_TEST_ESXI_SLOT", "4"))
    with TestBed(
        tmp_path_factory.mktemp("esxi"), hosts=1, libvirt=True, esx=True, slot=slot
    ) as bed:
        yield bed, bed.save_blocks("esxi")


def _vms(bed) -> list[tuple[str, str]]:
    with bed.vcsim.connect() as si:
        return sorted(
            (v.path, v.power_state) for v in list_vms(si, vc.datacenter(si, bed.vcsim.datacenter))
        )


def test_the_source_is_a_standalone_host(esxi):
    bed, _ = esxi
    with bed.vcsim.connect() as si:
        assert si.content.about.apiType == "HostAgent"
        spec = vc.read_spec(si, vc.find_vm(si, vc.datacenter(si, None), "debian-running"))
    assert spec.standalone and spec.inventory_path.startswith("/ha-datacenter/vm/")


def test_running_vm_on_esxi_refused(esxi):
    bed, blocks = esxi
    before = _vms(bed)
    with pytest.raises(PreflightError, match="standalone ESXi host, which cannot clone"):
        migrate_vm(request_for(blocks, "debian-running"))
    assert _vms(bed) == before


def test_stopped_vm_on_esxi_is_exported_and_converted(esxi):
    bed, blocks = esxi
    before = _vms(bed)
    # The export from ESXi works; virt-v2v then refuses the synthetic disk (no OS on it).
    with pytest.raises(Exception, match="virt-v2v exited 1: inspection could not detect"):
        migrate_vm(request_for(blocks, "web server 01"))
    assert _vms(bed) == before
    assert not list(bed.scratch.iterdir())
