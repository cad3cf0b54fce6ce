"""The test bed's KVM hosts: sshd per network namespace, reached with fabric, host keys
checked; each host with its own libvirt directories and host-local storage."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import paramiko
import pytest
from fabric import Connection, ThreadingGroup

from testbed.kvmhosts import SSHD, HostInfo, KvmHosts

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not Path(SSHD).exists(), reason="needs root and openssh-server"
)


def connect(host: HostInfo, known_hosts: Path | None = None) -> Connection:
    """A fabric connection that trusts only the keys in known_hosts and rejects the rest."""
    conn = Connection(
        host.address,
        port=host.port,
        user=host.user,
        connect_timeout=10,
        connect_kwargs={
            "key_filename": str(host.key_path),
            "look_for_keys": False,
            "allow_agent": False,
        },
    )
    conn.client.set_missing_host_key_policy(paramiko.RejectPolicy())
    conn.client.get_host_keys().load(str(known_hosts or host.known_hosts))
    return conn


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    with KvmHosts(tmp_path_factory.mktemp("kvmhosts"), count=2) as kvm:
        yield kvm


def test_info_is_json_ready(hosts):
    import json

    info = json.loads(json.dumps(hosts.info()))
    assert [h["name"] for h in info] == ["kvm1", "kvm2"]
    for h, item in zip(hosts.hosts, info, strict=True):
        assert item["address"] == h.address and item["port"] == h.port
        assert item["user"] == "root" and item["pid"] == h.pid
        assert Path(item["workdir"]).is_dir()
        assert (h.netns is not None) == hosts.use_netns


def test_tools_run_on_each_host(hosts):
    for h in hosts.hosts:
        with connect(h) as conn:
            r = conn.run(
                "hostname; id -u; qemu-img --version; virt-v2v --version",
                hide=True,
                in_stream=False,
                timeout=60,
            )
        lines = r.stdout.splitlines()
        if hosts.own_hostnames:
            assert lines[0] == h.name
        assert lines[1] == "0"
        assert "qemu-img version" in r.stdout
        assert "virt-v2v" in r.stdout


def test_session_environment(hosts):
    h = hosts.host("kvm2")
    with connect(h) as conn:
        r = conn.run(
            "echo $V2K_TESTBED_HOST $LIBGUESTFS_BACKEND", hide=True, in_stream=False, timeout=30
        )
    assert r.stdout.split() == ["kvm2", "direct"]


def test_threading_group_over_both_hosts(hosts):
    conns = [connect(h) for h in hosts.hosts]
    group = ThreadingGroup.from_connections(conns)
    try:
        results = group.run("id -u", hide=True, in_stream=False, timeout=30)
    finally:
        group.close()
    assert not results.failed
    assert sorted(c.port for c in results) == sorted(h.port for h in hosts.hosts)
    assert all(r.stdout.strip() == "0" for r in results.values())


def test_each_host_in_its_own_namespace(hosts):
    if not hosts.use_netns:
        pytest.skip("network namespaces are not available here")
    addresses = {h.address for h in hosts.hosts}
    for h in hosts.hosts:
        with connect(h) as conn:
            ns = conn.run(
                "ip netns identify", hide=True, in_stream=False, timeout=30
            ).stdout.strip()
            addrs = conn.run("ip -o -4 addr show", hide=True, in_stream=False, timeout=30).stdout
        assert ns == h.netns
        assert f"inet {h.address}/24" in addrs
        for other in addresses - {h.address}:
            assert other not in addrs


def _run(host: HostInfo, command: str) -> str:
    with connect(host) as conn:
        return conn.run(command, hide=True, in_stream=False, timeout=30).stdout


def test_host_local_storage_is_seen_by_its_host_only(hosts):
    kvm1, kvm2 = hosts.host("kvm1"), hosts.host("kvm2")
    local = hosts.local_dir
    assert kvm1.local_dir == kvm2.local_dir == local
    _run(kvm1, f"echo from-kvm1 > {local}/only-here")
    assert _run(kvm1, f"cat {local}/only-here") == "from-kvm1\n"
    assert _run(kvm2, f"ls -A {local}") == ""
    assert list(local.iterdir()) == []  # the worker (root namespace) sees nothing there
    assert (kvm1.local_backing / "only-here").read_text() == "from-kvm1\n"
    assert kvm1.private_path(local / "only-here") == kvm1.local_backing / "only-here"
    assert not (kvm2.local_backing / "only-here").exists()
    (kvm1.local_backing / "only-here").unlink()


def test_each_host_has_its_own_libvirt_directories(hosts):
    kvm1, kvm2 = hosts.host("kvm1"), hosts.host("kvm2")
    mark = kvm1.private_path("/var/lib/libvirt/v2k-mark")
    assert mark == kvm1.root / "var/lib/libvirt/v2k-mark"
    mark.write_text("kvm1\n")
    try:
        assert _run(kvm1, "cat /var/lib/libvirt/v2k-mark") == "kvm1\n"
        assert _run(kvm2, "ls -A /var/lib/libvirt /run/libvirt /etc/libvirt").split() == [
            "/etc/libvirt:",
            "/run/libvirt:",
            "/var/lib/libvirt:",
        ]
        assert not Path("/var/lib/libvirt/v2k-mark").exists()
    finally:
        mark.unlink()


def test_a_host_does_not_see_the_other_hosts_directories(hosts):
    kvm1, kvm2 = hosts.host("kvm1"), hosts.host("kvm2")
    theirs = kvm1.workdir.parent  # kvm1's keys, pool, libvirt state...
    assert _run(kvm1, f"ls {theirs}").split()  # kvm1 sees its own
    assert _run(kvm2, f"ls -A {theirs}") == ""
    assert _run(kvm2, f"ls {kvm2.workdir.parent}").split()
    assert _run(kvm2, "hostname").strip() == "kvm2"


def test_wrong_host_key_is_refused(hosts, tmp_path):
    kvm1, kvm2 = hosts.hosts
    # kvm1 listed with kvm2's key
    line = kvm2.host_key.with_suffix(".pub").read_text().split()
    bad = tmp_path / "known_hosts"
    bad.write_text(f"{kvm1.known_hosts_name} {line[0]} {line[1]}\n")
    with pytest.raises(paramiko.BadHostKeyException):
        connect(kvm1, bad).run("true", hide=True, in_stream=False, timeout=30)


def test_unknown_host_is_refused(hosts, tmp_path):
    kvm1, kvm2 = hosts.hosts
    only_kvm2 = tmp_path / "known_hosts"
    only_kvm2.write_text(
        "".join(
            line + "\n"
            for line in hosts.known_hosts.read_text().splitlines()
            if line.startswith(kvm2.known_hosts_name + " ")
        )
    )
    with pytest.raises(paramiko.SSHException, match="not found in known_hosts"):
        connect(kvm1, only_kvm2).run("true", hide=True, in_stream=False, timeout=30)
    connect(kvm2, only_kvm2).run("true", hide=True, in_stream=False, timeout=30)


def test_rotated_host_key_is_refused_until_known_hosts_is_rewritten(hosts):
    h = hosts.host("kvm2")
    old_pid = h.pid
    hosts.rotate_host_key("kvm2")
    assert h.pid != old_pid
    with pytest.raises(paramiko.BadHostKeyException):
        connect(h).run("true", hide=True, in_stream=False, timeout=30)
    hosts.write_known_hosts()
    assert connect(h).run("true", hide=True, in_stream=False, timeout=30).ok


def test_fallback_on_loopback_ports(tmp_path):
    with KvmHosts(tmp_path, count=1, use_netns=False) as kvm:
        (h,) = kvm.hosts
        pid = h.pid
        assert h.address == "127.0.0.1" and h.port != 22 and h.netns is None
        assert kvm.known_hosts.read_text().startswith(f"[127.0.0.1]:{h.port} ssh-ed25519 ")
        with connect(h) as conn:
            assert conn.run("id -u", hide=True, in_stream=False, timeout=30).stdout.strip() == "0"
    assert pid and not Path(f"/proc/{pid}").exists()


def _sshd_pids_for(workdir: Path) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "sshd" in cmdline and str(workdir) in cmdline:
            pids.append(int(entry.name))
    return pids


def test_stop_leaves_nothing(tmp_path):
    kvm = KvmHosts(tmp_path, count=2).start()
    pids = [h.pid for h in kvm.hosts] + [h.ns_pid for h in kvm.hosts]
    assert all(pids)
    netns = [h.netns for h in kvm.hosts if h.netns]
    with connect(kvm.hosts[0]) as conn:  # leaves a per-connection sshd behind for a moment
        conn.run("true", hide=True, in_stream=False, timeout=30)
        assert _sshd_pids_for(tmp_path)
        kvm.stop()
    assert all(p is None for p in (h.pid for h in kvm.hosts))
    assert _sshd_pids_for(tmp_path) == []
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for ns in netns:
        assert ns not in listed
        assert not Path("/sys/class/net", ns).exists()
    # The hosts' bind mounts lived in their mount namespaces only, and went with them.
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(tmp_path) not in mounts
