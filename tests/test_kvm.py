"""Domain XML and libvirt helpers, against libvirt's test driver (no daemon)."""

import xml.etree.ElementTree as ET

import libvirt
import pytest

from tasks import kvm
from tasks.models import DiskSpec, NicSpec, VmSpec

V2V_XML = """<domain type='kvm'>
  <name>web</name>
  <metadata><libosinfo:libosinfo xmlns:libosinfo='http://libosinfo.org/xmlns/libvirt/domain/1.0'>
    <libosinfo:os id='http://debian.org/debian/12'/></libosinfo:libosinfo></metadata>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'><target dev='vda' bus='virtio'/></disk>
    <disk type='file' device='disk'><target dev='vdb' bus='virtio'/></disk>
    <interface type='bridge'><model type='virtio'/></interface>
    <interface type='bridge'><model type='e1000'/></interface>
    <vsock model='virtio'/>
  </devices>
</domain>"""


def _spec(**overrides) -> VmSpec:
    base = dict(
        name="web 01",
        moref="vm-42",
        instance_uuid="5003a1b2-0001-4c5e-8a00-000000000001",
        inventory_path="/DC0/vm/web 01",
        guest_id="debian12_64Guest",
        power_state="poweredOff",
        num_cpu=4,
        cores_per_socket=2,
        memory_mb=2048,
        firmware="bios",
        disks=[
            DiskSpec(
                key=2000 + i,
                label=f"Hard disk {i + 1}",
                capacity_bytes=1 << 30,
                file_name=f"[ds] web/web_{i}.vmdk",
                datastore="ds",
                controller=f"scsi0:{i}",
                mode="persistent",
            )
            for i in range(2)
        ],
        nics=[
            NicSpec(
                key=4000,
                label="Network adapter 1",
                mac="00:50:56:01:00:01",
                adapter="vmxnet3",
                portgroup="VM Network",
            ),
            NicSpec(
                key=4001,
                label="Network adapter 2",
                mac="00:50:56:01:00:02",
                adapter="e1000e",
                portgroup="DPG",
                connected=False,
            ),
        ],
    )
    base.update(overrides)
    return VmSpec(**base)


def _xml(spec: VmSpec) -> str:
    return kvm.domain_xml(
        name="web-01",
        spec=spec,
        dom_type="qemu",
        volumes=[("default-pool", "web-01-disk0.qcow2"), ("other", "web-01-disk1.qcow2")],
        nics=[(spec.nics[0], "network", "default"), (spec.nics[1], "bridge", "br0")],
        v2v=kvm.parse_v2v_xml(V2V_XML),
        source_note={"moref": spec.moref},
    )


def test_parse_v2v_xml_reads_osinfo_machine_buses_models():
    found = kvm.parse_v2v_xml(V2V_XML)
    assert found["osinfo"] == "http://debian.org/debian/12"
    assert found["machine"] == "q35"
    assert found["disk_buses"] == ["virtio", "virtio"]
    assert found["nic_models"] == ["virtio", "e1000"]


def test_domain_xml_carries_source_hardware_and_macs():
    root = ET.fromstring(_xml(_spec()))
    assert root.get("type") == "qemu"
    assert root.findtext("name") == "web-01"
    assert root.findtext("memory") == "2048" and root.find("memory").get("unit") == "MiB"
    assert root.findtext("vcpu") == "4"
    topology = root.find("cpu/topology")
    assert (topology.get("sockets"), topology.get("cores")) == ("2", "2")
    assert [m.get("address") for m in root.iterfind("devices/interface/mac")] == [
        "00:50:56:01:00:01",
        "00:50:56:01:00:02",
    ]
    assert root.find("devices/interface[2]/link").get("state") == "down"
    sources = [(s.get("pool"), s.get("volume")) for s in root.iterfind("devices/disk/source")]
    assert sources == [("default-pool", "web-01-disk0.qcow2"), ("other", "web-01-disk1.qcow2")]
    assert [t.get("dev") for t in root.iterfind("devices/disk/target")] == ["vda", "vdb"]
    osinfo = root.find(f"metadata/{{{kvm.OSINFO_NS}}}libosinfo/{{{kvm.OSINFO_NS}}}os")
    assert osinfo.get("id") == "http://debian.org/debian/12"
    assert root.find("devices/vsock") is None


def test_efi_source_gets_uefi_without_secure_boot_unless_asked():
    root = ET.fromstring(_xml(_spec(firmware="efi")))
    assert root.find("os").get("firmware") == "efi"
    assert root.find("os/firmware/feature[@name='secure-boot']").get("enabled") == "no"
    secure = ET.fromstring(_xml(_spec(firmware="efi", secure_boot=True)))
    assert secure.find("os/firmware/feature[@name='secure-boot']").get("enabled") == "yes"
    assert secure.find("features/smm").get("state") == "on"


def test_odd_topology_falls_back_to_one_core_per_socket():
    root = ET.fromstring(_xml(_spec(num_cpu=3, cores_per_socket=2)))
    assert root.find("cpu/topology").get("sockets") == "3"


def test_definable_by_libvirt_and_removable():
    conn = libvirt.open("test:///default")
    spec = _spec()
    xml = kvm.domain_xml(
        name="v2k-unit",
        spec=spec,
        dom_type="test",
        volumes=[],
        nics=[(spec.nics[0], "network", "default")],
        v2v={},
        source_note={},
    )
    dom = kvm.define_domain(conn, xml)
    assert kvm.domain_exists(conn, "v2k-unit")
    assert kvm.macs_in_use(conn)["00:50:56:01:00:01"] == "v2k-unit"
    assert dom.info()[3] == 4
    assert kvm.remove_domain(conn, "v2k-unit") is True
    assert not kvm.domain_exists(conn, "v2k-unit")
    assert kvm.remove_domain(conn, "v2k-unit") is False


def test_network_target_uses_map_then_default():
    nic = _spec().nics[1]
    assert kvm.network_target(nic, {"DPG": "bridge:br1"}, None) == ("bridge", "br1")
    assert kvm.network_target(nic, {}, "network:fallback") == ("network", "fallback")
    with pytest.raises(KeyError):
        kvm.network_target(nic, {"VM Network": "network:x"}, None)


def test_missing_pool_names_the_pools_there_are():
    conn = libvirt.open("test:///default")
    with pytest.raises(kvm.KvmImportError, match="default-pool"):
        kvm.lookup_pool(conn, "nope")
