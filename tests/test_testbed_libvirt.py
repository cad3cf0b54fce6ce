"""The test bed's libvirt: pool, networks, a tiny TCG domain, and the same daemon over SSH."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import replace
from pathlib import Path
from xml.etree import ElementTree

import pytest

libvirt = pytest.importorskip("libvirt")

from testbed.kvmhosts import KvmHosts  # noqa: E402
from testbed.libvirtd import LIBVIRTD, Libvirtd, ssh_uri  # noqa: E402

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not Path(LIBVIRTD).exists(), reason="needs root and libvirtd"
)

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def lv(tmp_path_factory):
    with Libvirtd(tmp_path_factory.mktemp("libvirt")) as daemon:
        yield daemon


@pytest.fixture(scope="module")
def conn(lv):
    c = libvirt.open(lv.uri)
    yield c
    c.close()


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    with KvmHosts(tmp_path_factory.mktemp("kvmhosts"), count=1) as kvm:
        yield kvm


def tiny_domain_xml(name: str, network: str, disk: str | None = None) -> str:
    disk_xml = (
        f"<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
        f"<source file='{disk}'/><target dev='vda' bus='virtio'/></disk>"
        if disk
        else ""
    )
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    {disk_xml}
    <interface type='network'><source network='{network}'/><model type='virtio'/></interface>
    <serial type='pty'/><console type='pty'/>
  </devices>
</domain>"""


def upload(conn, vol, data: bytes, chunk: int = 256 * 1024) -> None:
    stream = conn.newStream(0)
    vol.upload(stream, 0, len(data), 0)
    for off in range(0, len(data), chunk):
        view = data[off : off + chunk]
        while view:
            sent = stream.send(view)
            view = view[sent:]
    stream.finish()


def download(conn, vol, size: int) -> bytes:
    stream = conn.newStream(0)
    vol.download(stream, 0, size, 0)
    parts = []
    while True:
        part = stream.recv(256 * 1024)
        if not part:
            break
        parts.append(part)
    stream.finish()
    return b"".join(parts)


def test_info(lv):
    info = json.loads(json.dumps(lv.info()))
    assert info["uri"] == "qemu:///system"
    assert info["pool"] == "v2k-pool"
    assert set(info["networks"]) == {"v2k-net", "v2k-net2"}
    assert set(info["pids"]) == {"virtlogd", "libvirtd"}


def test_pool_is_active_at_its_path(lv, conn):
    pool = conn.storagePoolLookupByName(lv.pool)
    assert pool.isActive()
    path = ElementTree.fromstring(pool.XMLDesc(0)).findtext("target/path")
    assert Path(path) == lv.pool_path


def test_volume_upload_and_read_back(lv, conn):
    pool = conn.storagePoolLookupByName(lv.pool)
    data = os.urandom(4 * MIB)
    vol = pool.createXML(
        "<volume><name>v2k-upload.raw</name>"
        f"<capacity unit='bytes'>{len(data)}</capacity>"
        "<target><format type='raw'/></target></volume>",
        0,
    )
    try:
        upload(conn, vol, data)
        assert download(conn, vol, len(data)) == data
        assert Path(vol.path()).read_bytes() == data
    finally:
        vol.delete(0)


def test_networks_are_active(lv, conn):
    for name in lv.networks:
        net = conn.networkLookupByName(name)
        assert net.isActive()
        assert net.bridgeName() == lv.bridges[name]
        assert Path("/sys/class/net", lv.bridges[name]).exists()
        assert ElementTree.fromstring(net.XMLDesc(0)).find("forward") is None  # isolated


def test_tiny_domain_starts_with_a_pool_disk(lv, conn):
    pool = conn.storagePoolLookupByName(lv.pool)
    vol = pool.createXML(
        "<volume><name>v2k-tiny.raw</name><capacity unit='MiB'>1</capacity>"
        "<target><format type='raw'/></target></volume>",
        0,
    )
    name = f"{lv.prefix}tiny"
    dom = conn.defineXML(tiny_domain_xml(name, lv.networks[1], vol.path()))
    try:
        dom.create()  # QEMU (TCG) opens the disk below pytest's 0700 tmp dir
        state, _ = dom.state()
        assert state == libvirt.VIR_DOMAIN_RUNNING
        dom.destroy()
        dom.undefine()
        assert name not in [d.name() for d in conn.listAllDomains(0)]
    finally:
        lv.remove_domains()
        vol.delete(0)


def test_second_bed_shares_the_daemon_and_cleans_up_its_own(lv, conn, tmp_path):
    # 10.240: outside every test bed slot (hosts 10.246-10.250, libvirt 10.251-10.255).
    other = Libvirtd(tmp_path, prefix="v2kt-", ip_prefix="10.240").start()
    try:
        assert other.owned == {"virtlogd": False, "libvirtd": False}
        assert other.pool == "v2kt-pool"
        conn.defineXML(tiny_domain_xml("v2kt-left-behind", "v2kt-net"))
    finally:
        other.stop()
    assert "v2kt-left-behind" not in [d.name() for d in conn.listAllDomains(0)]
    assert "v2kt-pool" not in conn.listStoragePools() + conn.listDefinedStoragePools()
    assert not {"v2kt-net", "v2kt-net2"} & set(conn.listNetworks() + conn.listDefinedNetworks())
    assert conn.storagePoolLookupByName(lv.pool).isActive()  # the first bed is untouched


def test_a_restarted_bed_starts_with_an_empty_pool(lv, conn, tmp_path):
    # What a domain removed without its volumes leaves in the bed's own directory must not
    # come back as a volume of the next run's pool (make demo twice in a row).
    (tmp_path / "pool").mkdir()
    (tmp_path / "pool" / "left-disk0.qcow2").write_bytes(b"\0" * 4096)
    other = Libvirtd(tmp_path, prefix="v2kt-", ip_prefix="10.240").start()
    try:
        assert conn.storagePoolLookupByName(other.pool).listVolumes() == []
        assert not (tmp_path / "pool" / "left-disk0.qcow2").exists()
    finally:
        other.stop()


def test_ssh_uri_through_kvm1_checks_host_keys(lv, hosts, tmp_path):
    h = hosts.host("kvm1")
    uri = ssh_uri(h)
    assert uri.startswith(f"qemu+libssh2://root@{h.address}:{h.port}/system?")
    assert "known_hosts_verify=normal" in uri
    remote = libvirt.open(uri)
    try:
        assert lv.pool in [p.name() for p in remote.listAllStoragePools(0)]
    finally:
        remote.close()

    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(libvirt.libvirtError, match="host key"):
        libvirt.open(ssh_uri(replace(h, known_hosts=empty)))

    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    fields = (tmp_path / "other_key.pub").read_text().split()
    wrong = tmp_path / "wrong_known_hosts"
    wrong.write_text(f"{h.known_hosts_name} {fields[0]} {fields[1]}\n")
    with pytest.raises(libvirt.libvirtError, match="HOST KEY VERIFICATION FAILED"):
        libvirt.open(ssh_uri(replace(h, known_hosts=wrong)))
