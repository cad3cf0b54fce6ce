"""The whole test bed in one object: vCenter simulator with its inventory, KVM hosts, libvirt.

`TestBed` starts the parts in order, describes them as JSON, and makes the v2k blocks
that point at them, so a flow run in the test bed uses exactly what a user would save.

The KVM hosts are as separate as real hosts (testbed/kvmhosts.py, testbed/libvirtd.py):
each has its own network, mount and UTS namespaces, its own virtlogd and libvirtd with a
pool `PREFIX-pool` (the same name on every host, in a directory of its own) and the same
two networks, and host-local storage at `local_dir` (one path, a different directory on
each host). The `scratch` directory stands for NFS: the worker and every host see it.

What tests use:

- `bed.libvirt["kvm1"]`: kvm1's `Libvirtd`; `bed.libvirt_conn("kvm1")` a connection to
  it straight from the root namespace (its UNIX socket), `bed.pool_path("kvm1")` its pool
  directory. The KvmHost blocks reach the same daemons through each host's sshd.
- `bed.pool`, `bed.networks`, `bed.prefix`: names that are the same on every host.
- `bed.local_dir` and `bed.local_backing("kvm1")`: the host-local path and the directory
  that backs it for kvm1 (the `local` block is a TemporaryStorage(shared=False) there).
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from testbed.inventory import DEFAULT_INVENTORY, apply_inventory, for_esx, load_inventory
from testbed.kvmhosts import KvmHosts
from testbed.libvirtd import NETWORKS, Libvirtd, ssh_uri
from testbed.netns_forward import LoopbackForwarder
from testbed.paths import cache_dir
from testbed.vcsim import VcSim

log = logging.getLogger("testbed")

# Port groups of the default inventory, in the order of the libvirt networks they land on.
PORTGROUPS = ["VM Network", "DC0_DVPG0"]


def default_slot() -> int:
    """Which of the side-by-side test beds this is: `V2K_TESTBED_SLOT`, default 0."""
    slot = int(os.environ.get("V2K_TESTBED_SLOT", "0"))
    if not 0 <= slot <= 4:
        raise ValueError(f"V2K_TESTBED_SLOT={slot}: use 0 to 4")
    return slot


def _stop_quietly(part) -> None:
    try:
        part.stop()
    except Exception as exc:  # noqa: BLE001 - stop the rest all the same
        log.warning("stopping %s failed: %s", type(part).__name__, exc)


class TestBed:
    """vCenter simulator and N KVM hosts with their libvirtds, started and stopped together.

    Args:
        workdir: Everything of this test bed lives below it.
        hosts: Number of KVM hosts.
        libvirt: Start each host's libvirtd with its pool and networks.
        inventory: YAML inventory for the simulator; None for an empty one.
        real_guest: Put the real Debian guest image where the inventory asks for it
            (built once, cached); False puts synthetic disks there (fast tests).
        esx: A standalone ESXi host instead of vCenter.
        slot: 0 to 4; test beds in different slots use different namespaces, addresses
            and libvirt names, so they can run at once on one machine.
        ovftool_hosts: Hosts that get the ovftool stand-in on their PATH.
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        workdir: Path,
        *,
        hosts: int = 2,
        libvirt: bool = True,
        inventory: Path | None = DEFAULT_INVENTORY,
        real_guest: bool = False,
        esx: bool = False,
        slot: int | None = None,
        ovftool_hosts: tuple[str, ...] = (),
    ) -> None:
        if libvirt and not hosts:
            raise ValueError("libvirt runs on the KVM hosts: give hosts >= 1")
        self.workdir = Path(workdir)
        self.slot = default_slot() if slot is None else slot
        prefix = f"v2k{self.slot}-" if self.slot else "v2k-"
        #: Prefix of the bed's libvirt names (pool, networks, bridges, test domains).
        self.prefix = prefix
        self.pool = f"{prefix}pool"
        self.networks = [f"{prefix}{n}" for n, _, _ in NETWORKS]
        self.vcsim = VcSim(self.workdir / "vcsim", esx=esx)
        self.hosts = (
            KvmHosts(
                self.workdir / "hosts",
                count=hosts,
                netns_prefix=prefix,
                subnet=f"10.{250 - self.slot}",
            )
            if hosts
            else None
        )
        self.with_libvirt = libvirt
        #: Each host's libvirt, by host name (made when the hosts are up).
        self.libvirt: dict[str, Libvirtd] = {}
        self.inventory_path = inventory
        self.real_guest = real_guest
        self.esx = esx
        self.scratch = self.workdir / "scratch"
        self.applied = None
        self.ovftool_hosts = ovftool_hosts
        self._forwarders: list[LoopbackForwarder] = []
        self._libvirt_futures: list = []

    def __enter__(self) -> TestBed:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def libvirtd(self):
        raise AttributeError(
            "TestBed.libvirtd is gone: each KVM host has its own libvirtd. Use "
            "bed.libvirt_conn('kvm1'), bed.libvirt['kvm1'], bed.pool, bed.networks, bed.prefix"
        )

    def libvirt_conn(self, host: str):
        """A connection to `host`'s libvirtd from the root namespace (owned by the bed)."""
        return self.libvirt[host].conn

    def pool_path(self, host: str) -> Path:
        """The directory of `host`'s pool (a different one on each host)."""
        return self.libvirt[host].pool_path

    @property
    def local_dir(self) -> Path:
        """Host-local storage: this path on every host, backed by a directory of its own."""
        return self.hosts.local_dir

    def local_backing(self, host: str) -> Path:
        """The real directory, in the root namespace, behind `local_dir` on `host`."""
        return self.hosts.host(host).local_backing

    def start(self) -> TestBed:
        try:
            self.scratch.mkdir(parents=True, exist_ok=True)
            self.vcsim.start()
            daemons = None
            if self.hosts:
                # The hosts trust the simulator's CA, as real hosts trust vCenter's.
                self.hosts.env["SSL_CERT_FILE"] = str(self.vcsim.ca_cert)
                self.hosts.start()
                self._install_ovftool()
                for host in self.hosts.hosts:
                    if host.netns:
                        forwarder = LoopbackForwarder(host.netns, self.vcsim.port).start()
                        self._forwarders.append(forwarder)
                if self.with_libvirt:
                    daemons = self._start_libvirt()
            try:
                # The inventory goes in while the libvirtds start (a first start: ~8 s).
                self._apply_inventory()
            finally:
                if daemons is not None:
                    daemons.shutdown(wait=True)
            for started in self._libvirt_futures:
                started.result()  # a daemon that did not start raises its LibvirtdError
        except BaseException:
            self.stop()
            raise
        return self

    def _start_libvirt(self) -> ThreadPoolExecutor:
        """Start every host's libvirtd at once, in threads; the caller waits for them."""
        ip_prefix = f"10.{251 + self.slot}"
        caps = cache_dir() / "libvirt-qemu-capabilities"
        for host in self.hosts.hosts:
            self.libvirt[host.name] = Libvirtd(
                host, prefix=self.prefix, ip_prefix=ip_prefix, capabilities_cache=caps
            )
        pool = ThreadPoolExecutor(max_workers=len(self.libvirt), thread_name_prefix="libvirtd")
        self._libvirt_futures = [pool.submit(lv.start) for lv in self.libvirt.values()]
        return pool

    def _apply_inventory(self) -> None:
        if self.inventory_path is None:
            return
        guest = None
        if self.real_guest:
            from testbed.images import debian_guest

            guest = debian_guest()
        inventory = load_inventory(self.inventory_path)
        if self.esx:
            inventory = for_esx(inventory)
        with self.vcsim.connect() as si:
            self.applied = apply_inventory(
                si,
                inventory,
                guest_image=guest,
                verify=str(self.vcsim.ca_cert),
                datastore_root=self.workdir / "datastores",
                work_dir=self.workdir / "images",
            )

    def restart_vcsim(self) -> None:
        """Restart the simulator as the same server (port, certificate, password) and apply
        the inventory again, since the simulator keeps it in memory only.

        What clients see is a vCenter restart: sessions and export leases are gone, the
        VMs are back (same morefs when nothing else was created before the restart).
        """
        self.vcsim.restart()
        self._apply_inventory()

    def _install_ovftool(self) -> None:
        for host in self.hosts.hosts:
            if host.name in self.ovftool_hosts:
                tool = host.bin_dir / "ovftool"
                # This checkout's stand-in, not the one the virtualenv was installed from.
                root = shlex.quote(str(Path(__file__).resolve().parents[1]))
                tool.write_text(
                    "#!/bin/sh\n# Stand-in for VMware ovftool: see testbed/ovftool.py\n"
                    f"PYTHONPATH={root}\nexport PYTHONPATH\n"
                    f'exec {shlex.quote(sys.executable)} -m testbed.ovftool "$@"\n'
                )
                tool.chmod(0o755)

    def stop(self) -> None:
        """Stop every part; each is stopped even when another fails."""
        for forwarder in self._forwarders:
            forwarder.stop()
        self._forwarders.clear()
        if self.libvirt:  # the hosts' daemons at once, then the hosts themselves
            with ThreadPoolExecutor(max_workers=len(self.libvirt)) as pool:
                list(pool.map(_stop_quietly, self.libvirt.values()))
        for part in (self.hosts, self.vcsim):
            if part is not None:
                _stop_quietly(part)
        shutil.rmtree(self.scratch, ignore_errors=True)

    def info(self) -> dict[str, Any]:
        """The test bed as JSON-ready data: endpoints, credentials, keys, pids."""
        return {
            "vcenter": self.vcsim.info(),
            "hosts": self.hosts.info() if self.hosts else [],
            "libvirt": {name: lv.info() for name, lv in self.libvirt.items()},
            "local_dir": str(self.local_dir) if self.hosts else None,
            "scratch": str(self.scratch),
        }

    def blocks(self, prefix: str = "testbed") -> dict[str, Any]:
        """The v2k blocks for this test bed, by the name to save them under (not saved)."""
        from blocks import KvmCluster, KvmHost, MigrationSettings, TemporaryStorage, VCenter

        made: dict[str, Any] = {
            f"{prefix}-vcenter": VCenter(
                host=self.vcsim.host,
                port=self.vcsim.port,
                username=self.vcsim.user,
                password=self.vcsim.password,
                datacenter=self.vcsim.datacenter,
                ca_cert=Path(self.vcsim.ca_cert).read_text(),
            ),
            f"{prefix}-scratch": TemporaryStorage(worker_path=str(self.scratch), reserve_bytes=0),
            f"{prefix}-settings": MigrationSettings(),
        }
        if self.hosts and self.hosts.separate:
            made[f"{prefix}-local"] = TemporaryStorage(
                shared=False, host_path=str(self.local_dir), reserve_bytes=0
            )
        host_names = []
        for host in self.hosts.hosts if self.hosts else []:
            name = f"{prefix}-{host.name}"
            host_names.append(name)
            made[name] = KvmHost(
                address=host.address,
                port=host.port,
                user=host.user,
                private_key_path=str(host.key_path),
                known_hosts=str(host.known_hosts),
                libvirt_uri=ssh_uri(host) if self.with_libvirt else None,
                workdir=str(host.workdir),
                # This machine's /dev/kvm opens but cannot run guests (TESTBED.md).
                domain_type="qemu",
            )
        if host_names:
            made[f"{prefix}-cluster"] = KvmCluster(
                hosts=host_names,
                storage_pool=self.pool if self.with_libvirt else "default",
                network_map={
                    portgroup: f"network:{network}"
                    for portgroup, network in zip(PORTGROUPS, self.networks, strict=False)
                }
                if self.with_libvirt
                else {},
            )
        return made

    def save_blocks(self, prefix: str = "testbed") -> dict[str, str]:
        """Save the blocks (overwriting) and return {kind: block name}."""
        names = {}
        for name, block in self.blocks(prefix).items():
            block.save(name, overwrite=True)
            names[name.removeprefix(f"{prefix}-")] = name
        return names
