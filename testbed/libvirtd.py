"""The test bed's libvirt: the system libvirtd (`qemu:///system`) with a pool and two networks.

`Libvirtd(workdir)` starts `/usr/sbin/virtlogd` and `/usr/sbin/libvirtd` unless they already
run and answer (then it neither owns nor stops them), waits until libvirtd answers (about
8 s on a first start: QEMU capabilities are probed), and creates with libvirt-python:

- a `dir` storage pool `v2k-pool` at `WORKDIR/pool` (defined, built, started);
- two isolated networks (no `<forward>`: nothing leaves the bridge) with DHCP and no DNS
  (so dnsmasq forwards no queries out): `v2k-net` on bridge `v2k-br0` 10.251.0.1/24, and
  `v2k-net2` on `v2k-br1` 10.251.1.1/24 for NIC-mapping tests (`ip_prefix` moves them).

`stop()` destroys and undefines those, and every domain whose name starts with the prefix
(`v2k-`), then stops the daemons it started. The names come from `prefix`: two test beds
with different prefixes and `ip_prefix`es can share one libvirtd.

Configuration this machine needs (Debian 12, root, no systemd):

- libvirtd is given its own, empty-ish configuration with `-f WORKDIR/libvirtd.conf`, so
  /etc/libvirt/libvirtd.conf is neither needed nor changed. The Debian defaults work as
  they are: no cgroup, D-Bus, firewalld or udev problem stops it (it only logs errors
  about D-Bus and DMI data).
- /etc/libvirt/qemu.conf is edited, idempotently (a marked block appended once), to run
  QEMU as root (`user = "root"`, `group = "root"`). With Debian's default
  (`libvirt-qemu`), QEMU cannot open disks of a pool below a 0700 directory such as
  pytest's `/tmp/pytest-of-root`: "Cannot access storage file ... (as uid:64055,
  gid:64055): Permission denied". Real hosts keep pools in /var/lib/libvirt/images and
  do not need this. Pass `qemu_as_root=False` to leave qemu.conf alone. A libvirtd
  that already runs only sees the change after a restart.
- Only `<domain type='qemu'>` (TCG) starts here; `<graphics type='none'>` is not valid
  XML for libvirt 9.0 (leave graphics out instead).
- Without D-Bus, libvirt writes iptables rules itself for each network (LIBVIRT_* chains:
  reject forwarding, accept DHCP on the bridge); destroying a network removes its rules,
  the empty chains stay. Debian's `default` network (192.168.122.0/24) is defined but
  not autostarted here and is never touched.

Usage:
    ```python
    with Libvirtd(tmp_path) as lv:
        conn = libvirt.open(lv.uri)
        conn.storagePoolLookupByName(lv.pool).listAllVolumes()
        ssh_uri(hosts.host("kvm1"))   # the same libvirtd, reached through an sshd
    ```
"""

from __future__ import annotations

import logging
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import libvirt

from testbed.kvmhosts import kill_group

if TYPE_CHECKING:
    from testbed.kvmhosts import HostInfo

log = logging.getLogger(__name__)

URI = "qemu:///system"
LIBVIRTD = "/usr/sbin/libvirtd"
VIRTLOGD = "/usr/sbin/virtlogd"
LIBVIRT_SOCK = Path("/run/libvirt/libvirt-sock")
VIRTLOGD_SOCK = Path("/run/libvirt/virtlogd-sock")
QEMU_CONF = Path("/etc/libvirt/qemu.conf")
QEMU_CONF_MARK = "# v2k test bed (testbed/libvirtd.py): QEMU runs as root"

#: (suffix of the network name, suffix of the bridge name, third octet of 10.251.X.0/24)
NETWORKS = (("net", "br0", 0), ("net2", "br1", 1))

UNDEFINE_FLAGS = (
    libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
    | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
    | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
    | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
)


class LibvirtdError(RuntimeError):
    """The test bed's libvirt could not be started or set up."""


def _unix_answers(path: Path) -> bool:
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        try:
            s.connect(str(path))
            return True
        except OSError:
            return False


def _libvirtd_answers(uri: str = URI) -> bool:
    if not _unix_answers(LIBVIRT_SOCK):
        return False
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError:
        return False
    try:
        conn.getVersion()  # needs the QEMU driver ready (capabilities probed: ~8 s cold)
        return True
    except libvirt.libvirtError:
        return False
    finally:
        conn.close()


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def ensure_qemu_conf(path: Path = QEMU_CONF) -> bool:
    """Make QEMU run as root (see module doc); return True when the file was changed.

    Leaves the file alone when it already sets `user` or `group` itself.
    """
    text = path.read_text() if path.exists() else ""
    if QEMU_CONF_MARK in text:
        return False
    if re.search(r"^\s*(user|group)\s*=", text, re.MULTILINE):
        log.warning("%s sets user/group itself: left as it is", path)
        return False
    block = (
        f'\n{QEMU_CONF_MARK}, to open pools below 0700 directories\nuser = "root"\ngroup = "root"\n'
    )
    with path.open("a") as f:
        f.write(block)
    return True


def ssh_uri(host: HostInfo, *, transport: str = "libssh2", path: str = "system") -> str:
    """A libvirt URI that reaches libvirtd through the sshd of a test bed host.

    `transport="libssh2"` (default) or `"libssh"`: libvirt's built-in SSH client, which takes the
    known_hosts file from the URI and with `known_hosts_verify=normal` refuses a host that
    is not listed (no callback to ask) or shows another key. Only the `libssh` and
    `libssh2` transports read `known_hosts`/`known_hosts_verify`; `qemu+ssh` runs the ssh
    binary, which ignores those parameters and checks `~/.ssh/known_hosts` instead.

    `transport="ssh"` gives that `qemu+ssh` URI with `keyfile` and `no_tty=1` only; host
    keys are then checked by the ssh binary against the user's own known_hosts.
    """
    host_part = f"{quote(host.user)}@{host.address}:{host.port}"
    # libvirt 9.0's libssh transport hangs on replies of more than a few KiB (the host
    # capabilities, for one); libssh2 does not.
    if transport in ("libssh", "libssh2"):
        params = {
            "keyfile": str(host.key_path),
            "known_hosts": str(host.known_hosts),
            "known_hosts_verify": "normal",
            "sshauth": "privkey",
        }
    elif transport == "ssh":
        params = {"keyfile": str(host.key_path), "no_tty": "1"}
    else:
        raise ValueError(f"unknown transport {transport!r}: libssh2, libssh or ssh")
    query = "&".join(f"{k}={quote(v, safe='/')}" for k, v in params.items())
    return f"qemu+{transport}://{host_part}/{path}?{query}"


class Libvirtd:
    """The system libvirtd with the test bed's storage pool and networks (see module doc)."""

    uri = URI

    def __init__(
        self,
        workdir: Path,
        *,
        prefix: str = "v2k-",
        ip_prefix: str = "10.251",
        qemu_as_root: bool = True,
        start_timeout: float = 90.0,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.prefix = prefix
        self.qemu_as_root = qemu_as_root
        self.start_timeout = start_timeout
        self.pool = f"{prefix}pool"
        self.pool_path = self.workdir / "pool"
        self.networks: list[str] = [f"{prefix}{n}" for n, _, _ in NETWORKS]
        self.bridges: dict[str, str] = {f"{prefix}{n}": f"{prefix}{b}" for n, b, _ in NETWORKS}
        self.subnets: dict[str, str] = {
            f"{prefix}{n}": f"{ip_prefix}.{x}.0/24" for n, _, x in NETWORKS
        }
        for bridge in self.bridges.values():
            if len(bridge) > 15:
                raise ValueError(f"prefix {prefix!r} too long: bridge name {bridge!r}")
        self.pids: dict[str, int | None] = {"virtlogd": None, "libvirtd": None}
        self.owned: dict[str, bool] = {"virtlogd": False, "libvirtd": False}
        self.qemu_conf_changed = False
        self.startup_seconds: float | None = None
        self._procs: dict[str, subprocess.Popen] = {}
        self._conn: libvirt.virConnect | None = None
        self._created: dict[str, list[str]] = {"pools": [], "networks": []}
        self._started = False

    # ---- public API -------------------------------------------------------------------

    def __enter__(self) -> Libvirtd:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def conn(self) -> libvirt.virConnect:
        """A connection to `uri` owned by this object (closed by `stop()`)."""
        if self._conn is None or not self._conn.isAlive():
            self._conn = libvirt.open(self.uri)
        return self._conn

    def info(self) -> dict[str, Any]:
        """JSON-ready description of the daemons and resources."""
        return {
            "uri": self.uri,
            "pool": self.pool,
            "pool_path": str(self.pool_path),
            "networks": {
                n: {"bridge": self.bridges[n], "subnet": self.subnets[n]} for n in self.networks
            },
            "pids": dict(self.pids),
            "owned": dict(self.owned),
            "qemu_conf_changed": self.qemu_conf_changed,
            "startup_seconds": self.startup_seconds,
        }

    def start(self) -> Libvirtd:
        if self._started:
            return self
        self._started = True
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
            if self.qemu_as_root:
                self.qemu_conf_changed = ensure_qemu_conf()
            self._start_daemons()
            self.remove_domains()
            self._make_pool()
            for name in self.networks:
                self._make_network(name)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Remove the test bed's domains, pool and networks; stop the daemons it started."""
        errors: list[str] = []
        if self._started and _libvirtd_answers(self.uri):
            try:
                self.remove_domains()
            except libvirt.libvirtError as e:
                errors.append(f"domains: {e}")
            for name in self._created["networks"]:
                try:
                    self._remove_network(name)
                except libvirt.libvirtError as e:
                    errors.append(f"network {name}: {e}")
            for name in self._created["pools"]:
                try:
                    self._remove_pool(name)
                except libvirt.libvirtError as e:
                    errors.append(f"pool {name}: {e}")
            if self.owned["libvirtd"]:
                self._warn_leftovers()
        self._created = {"pools": [], "networks": []}
        if self._conn is not None:
            try:
                self._conn.close()
            except libvirt.libvirtError:
                pass
            self._conn = None
        for name in ("libvirtd", "virtlogd"):
            proc = self._procs.pop(name, None)
            if proc is not None:
                kill_group(proc, timeout=15)
                self.pids[name] = None
        self._started = False
        if errors:
            raise LibvirtdError("cleanup failed: " + "; ".join(errors))

    def remove_domains(self) -> list[str]:
        """Destroy and undefine every domain whose name starts with the prefix."""
        removed = []
        for dom in self.conn.listAllDomains(0):
            name = dom.name()
            if not name.startswith(self.prefix):
                continue
            if dom.isActive():
                dom.destroy()
            if dom.isPersistent():
                try:
                    dom.undefineFlags(UNDEFINE_FLAGS)
                except libvirt.libvirtError:
                    dom.undefine()
            removed.append(name)
        return removed

    def _warn_leftovers(self) -> None:
        """Running domains and networks outlive libvirtd (QEMU, dnsmasq): say which."""
        try:
            doms = [
                d.name() for d in self.conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
            ]
            nets = self.conn.listNetworks()
        except libvirt.libvirtError:
            return
        if doms or nets:
            log.warning(
                "stopping libvirtd with domains %s and networks %s still running", doms, nets
            )

    # ---- daemons ----------------------------------------------------------------------

    def _start_daemons(self) -> None:
        t0 = time.monotonic()
        if not _unix_answers(VIRTLOGD_SOCK):
            self._spawn("virtlogd", [VIRTLOGD])
            self._wait(lambda: _unix_answers(VIRTLOGD_SOCK), "virtlogd", 15)
        if _libvirtd_answers(self.uri):
            log.info("libvirtd already runs: using it, not stopping it")
        else:
            conf = self.workdir / "libvirtd.conf"
            conf.write_text(
                "# v2k test bed: libvirtd's own configuration; /etc/libvirt/libvirtd.conf\n"
                "# is not read. Defaults: UNIX sockets only, no TCP/TLS listener.\n"
                'log_outputs = "3:stderr"\n'
            )
            self._spawn("libvirtd", [LIBVIRTD, "-f", str(conf)])
            self._wait(lambda: _libvirtd_answers(self.uri), "libvirtd", self.start_timeout)
        self.startup_seconds = round(time.monotonic() - t0, 2)

    def _spawn(self, name: str, cmd: list[str]) -> None:
        logf = self.workdir / f"{name}.log"
        with open(logf, "ab") as f:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=f, start_new_session=True
            )
        self._procs[name] = proc
        self.pids[name] = proc.pid
        self.owned[name] = True

    def _wait(self, ready, name: str, timeout: float) -> None:
        proc = self._procs[name]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            if proc.poll() is not None:
                # Another test bed may have started the daemon at the same moment.
                if ready():
                    del self._procs[name]
                    self.pids[name] = None
                    self.owned[name] = False
                    return
                raise LibvirtdError(
                    f"{name} exited with {proc.returncode}:\n{_tail(self.workdir / f'{name}.log')}"
                )
            time.sleep(0.1)
        raise LibvirtdError(
            f"{name} did not answer within {timeout} s:\n{_tail(self.workdir / f'{name}.log')}"
        )

    # ---- resources --------------------------------------------------------------------

    def _make_pool(self) -> None:
        if self.pool in self.conn.listStoragePools() + self.conn.listDefinedStoragePools():
            log.info("removing pool %s left over from an earlier run", self.pool)
            self._remove_pool(self.pool)
        # The directory is this test bed's own: files an earlier run left there (a domain
        # removed without its volumes) would come back as volumes of the new pool.
        if self.pool_path.exists() and any(self.pool_path.iterdir()):
            log.info("emptying %s, left over from an earlier run", self.pool_path)
            shutil.rmtree(self.pool_path)
        self.pool_path.mkdir(parents=True, exist_ok=True)
        xml = (
            f"<pool type='dir'><name>{self.pool}</name>"
            f"<target><path>{self.pool_path}</path></target></pool>"
        )
        pool = self.conn.storagePoolDefineXML(xml, 0)
        self._created["pools"].append(self.pool)
        pool.build(0)
        pool.create(0)

    def _remove_pool(self, name: str) -> None:
        pool = self.conn.storagePoolLookupByName(name)
        if pool.isActive():
            pool.destroy()
        pool.undefine()

    def _make_network(self, name: str) -> None:
        if name in self.conn.listNetworks() + self.conn.listDefinedNetworks():
            log.info("removing network %s left over from an earlier run", name)
            self._remove_network(name)
        net = self.subnets[name].rsplit(".", 1)[0]
        xml = f"""<network>
  <name>{name}</name>
  <bridge name='{self.bridges[name]}' stp='off' delay='0'/>
  <dns enable='no'/>
  <ip address='{net}.1' netmask='255.255.255.0'>
    <dhcp><range start='{net}.100' end='{net}.200'/></dhcp>
  </ip>
</network>"""
        network = self.conn.networkDefineXML(xml)
        self._created["networks"].append(name)
        network.create()

    def _remove_network(self, name: str) -> None:
        network = self.conn.networkLookupByName(name)
        if network.isActive():
            network.destroy()
        network.undefine()
