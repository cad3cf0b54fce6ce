"""The test bed hosts' libvirt: a daemon of its own per host (pool, networks, a tiny TCG
domain), reached from the root namespace and through each host's sshd; the hosts do not
see each other's daemons, volumes or files; stopping leaves nothing behind."""

from __future__ import annotations

import json
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from xml.etree import ElementTree

import pytest

libvirt = pytest.importorskip("libvirt")

from testbed.kvmhosts import KvmHosts  # noqa: E402
from testbed.libvirtd import LIBVIRTD, Libvirtd, ssh_uri  # noqa: E402
from testbed.paths import cache_dir  # noqa: E402

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not Path(LIBVIRTD).exists(), reason="needs root and libvirtd"
)

MIB = 1024 * 1024
CAPS = cache_dir() / "libvirt-qemu-capabilities"


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    with KvmHosts(tmp_path_factory.mktemp("kvmhosts"), count=2) as kvm:
        yield kvm


@pytest.fixture(scope="module")
def daemons(hosts):
    """kvm1's and kvm2's libvirtd, started at once."""
    made = {h.name: Libvirtd(h, capabilities_cache=CAPS) for h in hosts.hosts}
    try:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(Libvirtd.start, made.values()))
        yield made
    finally:
        for lv in made.values():
            lv.stop()


@pytest.fixture(scope="module")
def lv(daemons):
    return daemons["kvm1"]


@pytest.fixture(scope="module")
def conn(lv):
    c = libvirt.open(lv.uri)
    yield c
    c.close()


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
    assert info["host"] == "kvm1"
    sock = f"/proc/{lv.host.ns_pid}/root/run/libvirt/libvirt-sock"
    assert info["uri"] == f"qemu:///system?socket={sock}"
    # The socket is in the host's own directory (a bind mount), reachable by its real path.
    assert (lv.host.root / "run/libvirt/libvirt-sock").is_socket()
    assert info["ssh_uri"].startswith(f"qemu+libssh2://root@{lv.host.address}:22/system?")
    assert info["pool"] == "v2k-pool"
    assert set(info["networks"]) == {"v2k-net", "v2k-net2"}
    assert set(info["pids"]) == {"virtlogd", "libvirtd"} and all(info["pids"].values())


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


def test_networks_are_active_with_bridges_in_each_hosts_namespace(daemons):
    for lv in daemons.values():
        for name in lv.networks:
            net = lv.conn.networkLookupByName(name)
            assert net.isActive()
            bridge = lv.bridges[name]
            assert net.bridgeName() == bridge
            shown = subprocess.run(
                ["ip", "-n", lv.host.netns, "-o", "link", "show", bridge],
                capture_output=True,
                text=True,
            )
            assert shown.returncode == 0, shown.stderr
            assert not Path("/sys/class/net", bridge).exists()  # not in the root namespace
            assert ElementTree.fromstring(net.XMLDesc(0)).find("forward") is None  # isolated


def test_tiny_domain_starts_with_a_pool_disk_in_the_hosts_namespaces(lv, conn):
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
        # QEMU runs in kvm1's namespaces: its pid file is in kvm1's own /run/libvirt.
        pid = int(lv.host.private_path(f"/run/libvirt/qemu/{name}.pid").read_text())
        # (Its mount namespace is a child of the host's: libvirt makes one for /dev.)
        for ns in ("net", "uts"):
            assert os.readlink(f"/proc/{pid}/ns/{ns}") == os.readlink(
                f"/proc/{lv.host.ns_pid}/ns/{ns}"
            )
        dom.destroy()
        dom.undefine()
        assert name not in [d.name() for d in conn.listAllDomains(0)]
    finally:
        lv.remove_domains()
        vol.delete(0)


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


def test_each_host_reaches_its_own_daemon(daemons, hosts):
    """What is made through kvm1's sshd is on kvm1's daemon only; the pools differ."""
    remote = {h.name: libvirt.open(ssh_uri(h)) for h in hosts.hosts}
    kvm1, kvm2 = daemons["kvm1"], daemons["kvm2"]
    vol_xml = (
        "<volume><name>v2k-only-kvm1.raw</name><capacity unit='MiB'>1</capacity>"
        "<target><format type='raw'/></target></volume>"
    )
    try:
        assert remote["kvm1"].getHostname() == "kvm1"
        assert remote["kvm2"].getHostname() == "kvm2"
        paths = {}
        for name, c in remote.items():
            xml = c.storagePoolLookupByName("v2k-pool").XMLDesc(0)
            paths[name] = ElementTree.fromstring(xml).findtext("target/path")
            assert Path(paths[name]) == daemons[name].pool_path
        assert paths["kvm1"] != paths["kvm2"]

        remote["kvm1"].defineXML(tiny_domain_xml("v2k-only-kvm1", "v2k-net"))
        vol = remote["kvm1"].storagePoolLookupByName("v2k-pool").createXML(vol_xml, 0)
        assert "v2k-only-kvm1" in [d.name() for d in kvm1.conn.listAllDomains(0)]
        assert "v2k-only-kvm1" not in [d.name() for d in kvm2.conn.listAllDomains(0)]
        assert "v2k-only-kvm1" not in [d.name() for d in remote["kvm2"].listAllDomains(0)]
        pool2 = remote["kvm2"].storagePoolLookupByName("v2k-pool")
        pool2.refresh()
        assert "v2k-only-kvm1.raw" not in pool2.listVolumes()
        assert Path(vol.path()).is_file()  # the worker's view: the real path
        # kvm2 cannot read kvm1's volume by its path either: it sees an empty directory.
        with pytest.raises(libvirt.libvirtError):
            remote["kvm2"].storageVolLookupByPath(vol.path())
        ls = subprocess.run(
            hosts.host("kvm2").nsenter(["ls", "-A", paths["kvm1"]]), capture_output=True, text=True
        )
        assert ls.stdout == ""
        vol.delete(0)
    finally:
        kvm1.remove_domains()
        for c in remote.values():
            c.close()


def test_a_restarted_daemon_starts_with_an_empty_pool_and_no_domains(hosts, daemons):
    # What a domain removed without its volumes leaves in the host's pool directory must
    # not come back as a volume of the next run's pool (make demo twice in a row).
    lv = daemons["kvm2"]
    lv.conn.defineXML(tiny_domain_xml("v2k-left-defined", "v2k-net"))
    (lv.pool_path / "left-disk0.qcow2").write_bytes(b"\0" * 4096)
    lv.stop()
    lv.start()
    assert lv.conn.storagePoolLookupByName(lv.pool).listVolumes() == []
    assert lv.conn.listAllDomains(0) == []  # the host's /etc/libvirt starts empty
    assert not (lv.pool_path / "left-disk0.qcow2").exists()
    assert lv.startup_seconds < 5  # QEMU's capabilities come from the cache


def _mounts_below(path: Path) -> list[str]:
    return [
        line for line in Path("/proc/self/mountinfo").read_text().splitlines() if str(path) in line
    ]


def test_stop_leaves_no_process_mount_or_namespace(tmp_path):
    # Its own namespace names and subnets, beside the module's hosts.
    kvm = KvmHosts(tmp_path, count=2, netns_prefix="v2kt-", subnet="10.240").start()
    daemons = []
    try:
        namespaces = {h.name: os.readlink(f"/proc/{h.ns_pid}/ns/uts") for h in kvm.hosts}
        for h in kvm.hosts:
            daemons.append(Libvirtd(h, prefix="v2kt-", capabilities_cache=CAPS).start())
        lv = daemons[0]
        lv.conn.createXML(tiny_domain_xml("v2kt-running", "v2kt-net"), 0)  # QEMU runs
        inside = [
            pid
            for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
            if _readlink(f"/proc/{pid}/ns/uts") in namespaces.values()
        ]
        names = {Path(f"/proc/{pid}/comm").read_text().strip() for pid in inside}
        assert {"sshd", "libvirtd", "virtlogd", "dnsmasq", "sleep"} <= names, names
        assert any(n.startswith("qemu") for n in names), names
    finally:
        for d in daemons:
            d.stop()
        kvm.stop()
    left = [
        pid
        for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
        if _readlink(f"/proc/{pid}/ns/uts") in namespaces.values()
        and _state(pid) != "Z"  # a zombie waits for init to reap it, it runs nothing
    ]
    assert left == []
    assert _mounts_below(tmp_path) == []
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "v2kt-kvm" not in listed


def _readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def _state(pid: int) -> str | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2]
