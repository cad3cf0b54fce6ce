"""The import stage against the real libvirtd: storage and network maps, MACs, rollback."""

from __future__ import annotations

import subprocess
import xml.etree.ElementTree as ET

import libvirt
import pytest

from blocks import KvmCluster, KvmHost
from tasks import kvm
from tasks import vcenter as vc

V2V_XML = "<domain type='kvm'><os><type arch='x86_64' machine='q35'>hvm</type></os></domain>"


@pytest.fixture()
def second_pool(bed, tmp_path):
    """Another dir pool, for the datastore LocalDS_1."""
    path = tmp_path / "pool2"
    path.mkdir()
    name = f"{bed.prefix}pool-ds1"
    pool = bed.libvirt_conn("kvm1").storagePoolDefineXML(
        f"<pool type='dir'><name>{name}</name><target><path>{path}</path></target></pool>"
    )
    pool.create()
    yield name
    for vol in pool.listAllVolumes():
        vol.delete()
    pool.destroy()
    pool.undefine()


def _qcow2(path, size: int):
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)], check=True)
    return path


def test_disks_land_in_their_mapped_pools_and_nics_on_their_networks(
    bed, bed_blocks, second_pool, tmp_path
):
    with bed.vcsim.connect() as si:
        dc = vc.datacenter(si, bed.vcsim.datacenter)
        spec = vc.read_spec(si, vc.find_vm(si, dc, "multi-disk-efi"))
    assert {d.datastore for d in spec.disks} == {"LocalDS_0", "LocalDS_1"}
    cluster = KvmCluster.load(bed_blocks["cluster"])
    storage_map = {"LocalDS_1": second_pool}
    pools = [storage_map.get(d.datastore, cluster.storage_pool) for d in spec.disks]
    sources = [
        (_qcow2(tmp_path / f"d{i}.qcow2", d.capacity_bytes), d.capacity_bytes)
        for i, d in enumerate(spec.disks)
    ]
    nics = [(n, *kvm.network_target(n, cluster.network_map, None)) for n in spec.nics]
    host = KvmHost.load(bed_blocks["kvm1"])
    conn = kvm.open_connection(host.get_libvirt_uri())
    try:
        with host.get_connection() as ssh:
            dom, volumes, dom_type = kvm.import_disks_and_define(
                conn,
                ssh,
                target="v2k-import-test",
                spec=spec,
                sources=sources,
                pools=pools,
                nics=nics,
                v2v_xml=V2V_XML,
                source_note={"flow-run": "test-run", "run-id": "0123456789ab"},
                wanted_type="qemu",
                run_id="0123456789ab",
            )
        try:
            root = ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
            disk_pools = [s.get("pool") for s in root.iterfind("devices/disk/source")]
            assert disk_pools == pools and second_pool in disk_pools
            assert [(m.get("address")) for m in root.iterfind("devices/interface/mac")] == [
                n.mac for n in spec.nics
            ]
            assert [s.get("network") for s in root.iterfind("devices/interface/source")] == [
                bed.networks[0],
                bed.networks[1],
            ]
            assert root.find("os").get("firmware") == "efi"
            assert kvm.run_domains(conn, "test-run") == ["v2k-import-test"]
            # Each volume carries the run's id: its ownership mark.
            assert all(kvm.carries_mark(v, "0123456789ab") for _, v in volumes)
        finally:
            kvm.remove_migrated_domain(conn, "v2k-import-test")
        assert not kvm.domain_exists(conn, "v2k-import-test")
        for pool_name, vol_name in volumes:
            assert not kvm.volume_exists(conn.storagePoolLookupByName(pool_name), vol_name)
    finally:
        conn.close()


def test_a_failed_import_removes_the_volumes_it_made(bed, bed_blocks, tmp_path):
    with bed.vcsim.connect() as si:
        dc = vc.datacenter(si, bed.vcsim.datacenter)
        spec = vc.read_spec(si, vc.find_vm(si, dc, "multi-disk-efi"))
    pool = bed.pool
    sources = [
        (_qcow2(tmp_path / f"d{i}.qcow2", d.capacity_bytes), d.capacity_bytes)
        for i, d in enumerate(spec.disks)
    ]
    sources[2] = (tmp_path / "missing.qcow2", spec.disks[2].capacity_bytes)
    host = KvmHost.load(bed_blocks["kvm1"])
    conn = kvm.open_connection(host.get_libvirt_uri())
    before = sorted(conn.storagePoolLookupByName(pool).listVolumes())
    try:
        with host.get_connection() as ssh, pytest.raises(FileNotFoundError):
            kvm.import_disks_and_define(
                conn,
                ssh,
                target="v2k-import-fail",
                spec=spec,
                sources=sources,
                pools=[pool] * 3,
                nics=[],
                v2v_xml=V2V_XML,
                source_note={},
                wanted_type="qemu",
                run_id="0123456789ab",
            )
        conn.storagePoolLookupByName(pool).refresh()
        assert sorted(conn.storagePoolLookupByName(pool).listVolumes()) == before
        assert not kvm.domain_exists(conn, "v2k-import-fail")
    finally:
        conn.close()


def test_a_run_removes_only_its_own_domain_and_the_volumes_it_made(bed):
    """A domain of the run with a disk attached by hand afterwards, and a volume of another
    run with the same target: removing the run's domain takes only its marked volume."""
    run_id, other = "0123456789ab", "ba9876543210"
    conn = bed.libvirt_conn("kvm1")
    pool = conn.storagePoolLookupByName(bed.pool)
    names = [kvm.volume_name("v2k-own", 0, run_id), "by-hand.qcow2"]
    names.append(kvm.volume_name("v2k-own", 0, other))
    for name in names:
        pool.createXML(f"<volume><name>{name}</name><capacity>1048576</capacity></volume>", 0)
    disks = "".join(
        f"<disk type='volume' device='disk'><source pool='{bed.pool}' volume='{name}'/>"
        f"<target dev='vd{letter}' bus='virtio'/></disk>"
        for letter, name in zip("ab", names[:2], strict=True)
    )
    conn.defineXML(
        "<domain type='qemu'><name>v2k-own</name><memory unit='MiB'>32</memory>"
        f"<metadata><v2k:migration xmlns:v2k='{kvm.V2K_NS}'><v2k:flow-run>flow-1</v2k:flow-run>"
        f"<v2k:run-id>{run_id}</v2k:run-id></v2k:migration></metadata>"
        f"<os><type arch='x86_64'>hvm</type></os><devices>{disks}</devices></domain>"
    )
    try:
        with pytest.raises(ValueError, match="not defined by run"):
            kvm.remove_run_domain(conn, "v2k-own", "flow-2", other)
        assert kvm.remove_run_domain(conn, "v2k-own", "flow-1", run_id) == [
            f"{bed.pool}/{names[0]}"
        ]
        assert kvm.remove_run_domain(conn, "v2k-own", "flow-1", run_id) is None  # gone
        assert not kvm.domain_exists(conn, "v2k-own")
        pool.refresh()
        assert sorted(names[1:]) == sorted(v for v in pool.listVolumes() if v in names)
    finally:
        for name in names[1:]:
            kvm.remove_volume(conn, bed.pool, name)
