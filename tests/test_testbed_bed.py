"""The whole test bed with separate hosts: its API and blocks point at each host's own
libvirtd, and stopping it leaves no process, mount or namespace behind.

It starts a bed of its own in the slot of the tests that start their own parts
(V2K_TESTBED_SLOT), without an inventory (about 5 s)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

libvirt = pytest.importorskip("libvirt")

from testbed.bed import TestBed  # noqa: E402
from testbed.libvirtd import LIBVIRTD  # noqa: E402

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not Path(LIBVIRTD).exists(), reason="needs root and libvirtd"
)


def _uts(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/uts")
    except OSError:
        return None


def _running_in(namespaces: set[str]) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _uts(int(entry.name)) in namespaces:
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if stat[stat.rindex(")") + 2] != "Z":  # a zombie runs nothing; init reaps it
                found.append(f"{entry.name} {stat[stat.index('(') + 1 : stat.rindex(')')]}")
    return found


def test_bed_api_blocks_and_a_clean_stop(tmp_path):
    bed = TestBed(tmp_path, hosts=2, libvirt=True, inventory=None).start()
    try:
        namespaces = {_uts(h.ns_pid) for h in bed.hosts.hosts}
        assert len(namespaces) == 2 and None not in namespaces
        assert bed.pool_path("kvm1") != bed.pool_path("kvm2")
        for name in ("kvm1", "kvm2"):
            conn = bed.libvirt_conn(name)
            assert conn.getHostname() == name
            assert bed.pool in conn.listStoragePools()
            assert sorted(conn.listNetworks()) == sorted(bed.networks)
        with pytest.raises(AttributeError, match="libvirt_conn"):
            bed.libvirtd  # noqa: B018 - the old shared daemon is gone, with a pointer

        blocks = bed.blocks("t")
        for h in bed.hosts.hosts:
            assert blocks[f"t-{h.name}"].libvirt_uri == bed.libvirt[h.name].info()["ssh_uri"]
            assert f"@{h.address}:22/system?" in blocks[f"t-{h.name}"].libvirt_uri
        local = blocks["t-local"]
        assert (local.shared, local.host_path) == (False, str(bed.local_dir))
        assert blocks["t-scratch"].worker_path == str(bed.scratch)
        assert blocks["t-cluster"].storage_pool == bed.pool

        # Something for stop() to end: a running QEMU on kvm1 (its dnsmasqs run already).
        bed.libvirt_conn("kvm1").createXML(
            f"<domain type='qemu'><name>{bed.prefix}stop-me</name>"
            "<memory unit='MiB'>32</memory><os><type arch='x86_64'>hvm</type></os>"
            f"<devices><interface type='network'><source network='{bed.networks[0]}'/>"
            "</interface></devices></domain>",
            0,
        )
        names = " ".join(_running_in(namespaces))
        for program in ("sshd", "libvirtd", "virtlogd", "dnsmasq", "qemu"):
            assert program in names, names
        netns = [h.netns for h in bed.hosts.hosts]
    finally:
        bed.stop()
    assert _running_in(namespaces) == []
    assert str(tmp_path) not in Path("/proc/self/mountinfo").read_text()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not [ns for ns in netns if ns in listed.split()]
