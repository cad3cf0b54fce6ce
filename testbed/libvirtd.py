"""The libvirt of one test bed KVM host: its own virtlogd and libvirtd, pool and networks.

Each test bed host (testbed/kvmhosts.py) has its own mount, UTS and network namespaces,
with `/etc/libvirt`, `/run/libvirt`, `/var/lib/libvirt`, `/var/cache/libvirt` and
`/var/log/libvirt` of its own. `Libvirtd(host)` starts `/usr/sbin/virtlogd` and
`/usr/sbin/libvirtd` in those namespaces (`nsenter`), so that host's sshd reaches exactly
that daemon (`ssh_uri(host)`, `qemu+libssh2://root@10.250.1.2/system`) and no other. From
the root namespace the daemon answers at `uri`,
`qemu:///system?socket=/proc/HOLDER/root/run/libvirt/libvirt-sock`: the host's socket seen
through its namespace holder's root (`HostInfo.through_ns`). The real path of the host's
directory (`HOSTDIR/root/run/libvirt/libvirt-sock`) works too, but may pass the 108 bytes
a UNIX socket path can have (pytest's tmp paths). Nothing of the machine's own libvirt
(a system libvirtd, /etc/libvirt) is used or changed. It creates, with libvirt-python:

- a `dir` storage pool `v2k-pool` at `HOSTDIR/pool` (a directory of its own per host; the
  other hosts cannot see it, see kvmhosts.py);
- two isolated networks (no `<forward>`: nothing leaves the bridge) with DHCP and no DNS
  (so dnsmasq forwards no queries out): `v2k-net` on bridge `v2k-br0` 10.251.0.1/24, and
  `v2k-net2` on `v2k-br1` 10.251.1.1/24 for NIC-mapping tests (`ip_prefix` moves them).
  The bridges live in the host's network namespace: every host has the same names.

`prefix` (`v2k-`, `v2k1-` in slot 1) names the pool, networks and bridges as before.
`stop()` destroys every domain and network (their QEMU and dnsmasq processes end with
them) and stops both daemons; `KvmHosts.stop()` then kills whatever is left in the host's
namespaces.

Start-up: a libvirtd's first start probes QEMU's capabilities (about 8 s here). The probe
result (`/var/cache/libvirt/qemu/capabilities/*.xml`) is kept in the test bed cache
(`cache_dir()/libvirt-qemu-capabilities`, `capabilities_cache`) and copied into each host
before its daemon starts: libvirt checks the files itself (QEMU's and libvirtd's ctime,
kernel, microcode) and probes again when they are stale. TestBed starts the hosts' daemons
in parallel.

Configuration this machine needs (Debian 12, root, no systemd), in each host's own
`/etc/libvirt` (the top-level files of the machine's /etc/libvirt, copied):

- libvirtd.conf is the test bed's own (UNIX sockets only, log to stderr).
- qemu.conf gets, in the host's copy only, `user = "root"`, `group = "root"`: with
  Debian's default (`libvirt-qemu`), QEMU cannot open disks of a pool below a 0700
  directory such as pytest's `/tmp/pytest-of-root`: "Cannot access storage file ... (as
  uid:64055, gid:64055): Permission denied". Real hosts keep pools in
  /var/lib/libvirt/images and do not need this. `qemu_as_root=False` leaves it out.
- Only `<domain type='qemu'>` (TCG) starts here; `<graphics type='none'>` is not valid
  XML for libvirt 9.0 (leave graphics out instead).
- Without D-Bus, libvirt writes iptables rules itself for each network, here in the
  host's network namespace (gone with it).

Usage:
    ```python
    with KvmHosts(tmp_path) as hosts, Libvirtd(hosts.host("kvm1")) as lv:
        conn = libvirt.open(lv.uri)   # kvm1's daemon, from the root namespace
        conn.storagePoolLookupByName(lv.pool).listAllVolumes()
        ssh_uri(hosts.host("kvm1"))   # the same daemon, reached through kvm1's sshd
    ```
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import subprocess
import threading
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
#: The machine's libvirt configuration: its top-level files are copied into each host.
SYSTEM_ETC = Path("/etc/libvirt")
#: Where libvirtd keeps the result of its QEMU probe (in the host's namespaces).
CAPABILITIES = Path("/var/cache/libvirt/qemu/capabilities")
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


def _libvirtd_answers(uri: str) -> bool:
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


def _copy_xml(source: Path, target: Path) -> None:
    """Copy the *.xml files of `source` into `target` where they differ (atomic rename)."""
    if not source.is_dir():
        return
    target.mkdir(parents=True, exist_ok=True)
    for path in source.glob("*.xml"):
        dest = target / path.name
        data = path.read_bytes()
        if not dest.exists() or dest.read_bytes() != data:
            # The hosts' daemons start in threads of one process: a name per thread.
            tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{threading.get_ident()}")
            tmp.write_bytes(data)
            tmp.replace(dest)


def ensure_qemu_conf(path: Path) -> bool:
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
    """The libvirt daemons of one test bed host, with its pool and networks (module doc)."""

    def __init__(
        self,
        host: HostInfo,
        *,
        prefix: str = "v2k-",
        ip_prefix: str = "10.251",
        qemu_as_root: bool = True,
        start_timeout: float = 90.0,
        capabilities_cache: Path | None = None,
    ) -> None:
        if host.ns_pid is None or host.root is None:
            raise LibvirtdError(
                f"host {host.name} has no namespaces of its own (KvmHosts.separate is False): "
                "its libvirtd would be the machine's; run the test bed as root with unshare"
            )
        self.host = host
        self.workdir = host.workdir.parent / "libvirt"
        self.prefix = prefix
        self.qemu_as_root = qemu_as_root
        self.start_timeout = start_timeout
        self.capabilities_cache = capabilities_cache
        self.pool = f"{prefix}pool"
        self.pool_path = host.workdir.parent / "pool"
        self.socket = host.through_ns(LIBVIRT_SOCK)
        self.uri = f"{URI}?socket={quote(str(self.socket), safe='/')}"
        self.networks: list[str] = [f"{prefix}{n}" for n, _, _ in NETWORKS]
        self.bridges: dict[str, str] = {f"{prefix}{n}": f"{prefix}{b}" for n, b, _ in NETWORKS}
        self.subnets: dict[str, str] = {
            f"{prefix}{n}": f"{ip_prefix}.{x}.0/24" for n, _, x in NETWORKS
        }
        for bridge in self.bridges.values():
            if len(bridge) > 15:
                raise ValueError(f"prefix {prefix!r} too long: bridge name {bridge!r}")
        self.pids: dict[str, int | None] = {"virtlogd": None, "libvirtd": None}
        self.startup_seconds: float | None = None
        self._procs: dict[str, subprocess.Popen] = {}
        self._conn: libvirt.virConnect | None = None
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
            "host": self.host.name,
            "uri": self.uri,
            "ssh_uri": ssh_uri(self.host),
            "pool": self.pool,
            "pool_path": str(self.pool_path),
            "networks": {
                n: {"bridge": self.bridges[n], "subnet": self.subnets[n]} for n in self.networks
            },
            "pids": dict(self.pids),
            "startup_seconds": self.startup_seconds,
        }

    def start(self) -> Libvirtd:
        if self._started:
            return self
        self._started = True
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._prepare_host_dirs()
            self._start_daemons()
            self._make_pool()
            for name in self.networks:
                self._make_network(name)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Destroy the host's domains and networks, stop its daemons."""
        errors: list[str] = []
        if self._started and self.pids["libvirtd"] and self._answers():
            try:
                self.remove_domains(prefix="")
            except libvirt.libvirtError as e:
                errors.append(f"domains: {e}")
            for name in self.conn.listNetworks():
                try:
                    self._remove_network(name)
                except libvirt.libvirtError as e:
                    errors.append(f"network {name}: {e}")
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
            raise LibvirtdError(f"cleanup of {self.host.name} failed: " + "; ".join(errors))

    def remove_domains(self, prefix: str | None = None) -> list[str]:
        """Destroy and undefine every domain whose name starts with `prefix` (default:
        the test bed's prefix; "" for all)."""
        prefix = self.prefix if prefix is None else prefix
        removed = []
        for dom in self.conn.listAllDomains(0):
            name = dom.name()
            if not name.startswith(prefix):
                continue
            persistent = dom.isPersistent()  # a transient domain is gone once destroyed
            if dom.isActive():
                dom.destroy()
            if persistent:
                try:
                    dom.undefineFlags(UNDEFINE_FLAGS)
                except libvirt.libvirtError:
                    dom.undefine()
            removed.append(name)
        return removed

    # ---- daemons ----------------------------------------------------------------------

    def _prepare_host_dirs(self) -> None:
        """The host's own /etc/libvirt, empty state, and the cached QEMU capabilities."""
        for private in ("/run/libvirt", "/var/lib/libvirt", "/var/log/libvirt", "/etc/libvirt"):
            # Emptied, not removed: the host's bind mount holds on to the directory itself.
            for child in self.host.private_path(private).iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        etc = self.host.private_path("/etc/libvirt")
        for conf in SYSTEM_ETC.glob("*.conf"):
            if conf.is_file() and conf.name != "libvirtd.conf":
                shutil.copy2(conf, etc / conf.name)
        (etc / "libvirtd.conf").write_text(
            f"# v2k test bed: libvirtd of host {self.host.name} (testbed/libvirtd.py).\n"
            "# Defaults: UNIX sockets only, no TCP/TLS listener.\n"
            'log_outputs = "3:stderr"\n'
        )
        if self.qemu_as_root:
            ensure_qemu_conf(etc / "qemu.conf")
        self.pool_path.mkdir(parents=True, exist_ok=True)
        if self.capabilities_cache is not None:
            _copy_xml(self.capabilities_cache, self._host_capabilities())

    def _answers(self) -> bool:
        return _unix_answers(self.socket) and _libvirtd_answers(self.uri)

    def _host_capabilities(self) -> Path:
        return self.host.private_path(CAPABILITIES)

    def _start_daemons(self) -> None:
        t0 = time.monotonic()
        logd_sock = self.host.through_ns(VIRTLOGD_SOCK)
        self._spawn("virtlogd", [VIRTLOGD, "-p", "/run/libvirt/virtlogd.pid"])
        self._wait(lambda: _unix_answers(logd_sock), "virtlogd", 15)
        self._spawn("libvirtd", [LIBVIRTD, "-p", "/run/libvirt/libvirtd.pid"])
        self._wait(self._answers, "libvirtd", self.start_timeout)
        self.startup_seconds = round(time.monotonic() - t0, 2)
        if self.capabilities_cache is not None:
            _copy_xml(self._host_capabilities(), self.capabilities_cache)

    def _spawn(self, name: str, cmd: list[str]) -> None:
        logf = self.workdir / f"{name}.log"
        with open(logf, "ab") as f:
            proc = subprocess.Popen(
                self.host.nsenter(cmd),
                stdin=subprocess.DEVNULL,
                stdout=f,
                stderr=f,
                start_new_session=True,
            )
        self._procs[name] = proc
        self.pids[name] = proc.pid  # nsenter execs: this is the daemon

    def _wait(self, ready, name: str, timeout: float) -> None:
        proc = self._procs[name]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            if proc.poll() is not None:
                raise LibvirtdError(
                    f"{name} of {self.host.name} exited with {proc.returncode}:\n"
                    f"{_tail(self.workdir / f'{name}.log')}"
                )
            time.sleep(0.05)
        raise LibvirtdError(
            f"{name} of {self.host.name} did not answer within {timeout} s:\n"
            f"{_tail(self.workdir / f'{name}.log')}"
        )

    # ---- resources --------------------------------------------------------------------

    def _make_pool(self) -> None:
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
        pool.build(0)
        pool.create(0)

    def _make_network(self, name: str) -> None:
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
        network.create()

    def _remove_network(self, name: str) -> None:
        network = self.conn.networkLookupByName(name)
        if network.isActive():
            network.destroy()
        network.undefine()
