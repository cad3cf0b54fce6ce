"""KVM hosts for the test bed: one OpenSSH server per host, each in namespaces of its own.

Each host `kvmN` gets a network namespace `v2k-kvmN` joined to the root namespace by a veth
pair (root side `v2k-kvmN` 10.250.N.1/24, namespace side `eth0` 10.250.N.2/24) and an sshd
on 10.250.N.2:22 that runs as root with the test bed's client key only. Where namespaces
cannot be made (or `use_netns=False`), every sshd listens on 127.0.0.1 on a port of its own.

Separate hosts: when `unshare --mount --uts` works (root), each host also gets its own
mount and UTS namespace, held by one process (`sleep infinity`, `HostInfo.ns_pid`) started
inside the network namespace; sshd and the host's libvirt daemons (testbed/libvirtd.py) are
started in it with `nsenter`. Inside it:

- `hostname` is the host's name (`kvmN`);
- `/etc/libvirt`, `/run/libvirt`, `/var/lib/libvirt`, `/var/cache/libvirt`,
  `/var/log/libvirt` (`PRIVATE_DIRS`) are bind mounts of the host's own directories
  below `WORKDIR/hosts/kvmN/root/`, so each host has its own libvirt state and sockets;
- `WORKDIR/local` (`KvmHosts.local_dir`, the same path on every host) is a bind mount of
  `WORKDIR/hosts/kvmN/local`: host-local storage. What one host writes there is seen
  neither by the other hosts nor by the worker (the root namespace sees an empty directory);
- the directories of the OTHER hosts (`WORKDIR/hosts/kvmJ`) are covered by an empty,
  read-only tmpfs: a host cannot read another host's pool or files by their real path.

Everything else (the rest of the file system, the bed's scratch directory that stands for
NFS) is shared. The mounts are private to the host's namespace: they vanish with its last
process, so `stop()` (which kills every process in the host's namespaces) leaves no mount
behind. From the root namespace the host's private files stay reachable at their real
paths (`HostInfo.private_path`), and through `/proc/HOLDER/root/...`
(`HostInfo.through_ns`), a short path, which is how tests reach each host's libvirtd socket
(a UNIX socket path has at most 108 bytes; pytest's tmp paths can be longer).

Usage:
    ```python
    with KvmHosts(tmp_path, count=2) as hosts:
        for h in hosts.hosts:
            print(h.name, h.address, h.port, h.key_path, h.known_hosts)
        hosts.host("kvm1").private_path("/run/libvirt/libvirt-sock")  # real path of kvm1's
    ```
"""

from __future__ import annotations

import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any

log = logging.getLogger(__name__)

SSHD = "/usr/sbin/sshd"

#: Directories each host has of its own (bind mounts in its mount namespace): libvirt's
#: configuration, sockets, state, caches and logs.
PRIVATE_DIRS = (
    "/etc/libvirt",
    "/run/libvirt",
    "/var/lib/libvirt",
    "/var/cache/libvirt",
    "/var/log/libvirt",
)

# Run in the new namespaces by `unshare`: set the host name, make the bind mounts
# (`bind SRC DST`) and cover the other hosts' directories (`hide DST`), say so, then hold
# the namespaces open until killed.
_HOLDER_SCRIPT = """set -e
hostname "$1"; shift
while [ $# -gt 0 ]; do
  case "$1" in
    bind) mkdir -p "$3"; mount --bind "$2" "$3"; shift 3 ;;
    hide) mount -t tmpfs -o ro,size=4k,mode=0755 v2k-other-host "$2"; shift 2 ;;
  esac
done
echo ready
exec sleep infinity
"""
NETNS_PREFIX = "v2k-"
SUBNET = "10.250"

#: Environment every SSH session on a test bed host gets (sshd `SetEnv`): libguestfs here
#: has no usable KVM, so virt-v2v must use the direct backend with TCG.
DEFAULT_HOST_ENV = {
    "LIBGUESTFS_BACKEND": "direct",
    "LIBGUESTFS_BACKEND_SETTINGS": "force_tcg",
}


class KvmHostsError(RuntimeError):
    """A test bed KVM host could not be made, started or stopped."""


@dataclass
class HostInfo:
    """How to reach one test bed KVM host."""

    name: str
    address: str
    port: int
    user: str
    key_path: Path
    known_hosts: Path
    workdir: Path
    netns: str | None
    pid: int | None
    host_key: Path
    log_path: Path
    #: Pid of the process that holds the host's mount and UTS namespaces (None: the
    #: host shares the machine's file system, see `KvmHosts.separate`).
    ns_pid: int | None = None
    #: Real path (in the root namespace) of the host's own tree: `/run/libvirt` on the
    #: host is `root/run/libvirt` here.
    root: Path | None = None
    #: Host-local storage: `local_dir` on the host is `local_backing` in the root namespace.
    local_dir: Path | None = None
    local_backing: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (paths as strings)."""
        data = asdict(self)
        return {k: str(v) if isinstance(v, Path) else v for k, v in data.items()}

    def nsenter(self, argv: list[str]) -> list[str]:
        """`argv` run inside this host's namespaces (mount, UTS, network)."""
        if self.ns_pid is None:
            return ["ip", "netns", "exec", self.netns, *argv] if self.netns else list(argv)
        return ["nsenter", "-t", str(self.ns_pid), "-m", "-u", "-n", "--", *argv]

    def private_path(self, path: str | Path) -> Path:
        """The real path, from the root namespace, of `path` as this host sees it.

        Paths below `PRIVATE_DIRS` and `local_dir` map to the host's own directories;
        any other path is shared and comes back unchanged.
        """
        path = PurePosixPath(path)
        if self.root is None:
            return Path(path)
        if self.local_dir and path.is_relative_to(self.local_dir):
            return self.local_backing / path.relative_to(self.local_dir)
        for private in PRIVATE_DIRS:
            if path.is_relative_to(private):
                return self.root / path.relative_to("/")
        return Path(path)

    def through_ns(self, path: str | Path) -> Path:
        """`path` as this host sees it, reached from the root namespace through the
        holder's `/proc/PID/root`: a short path, for UNIX sockets (108 bytes at most)."""
        if self.ns_pid is None:
            return Path(path)
        return Path(f"/proc/{self.ns_pid}/root") / PurePosixPath(path).relative_to("/")

    @property
    def bin_dir(self) -> Path:
        """Directory first on this host's PATH (programs installed on this host only)."""
        return self.workdir.parent / "bin"

    @property
    def known_hosts_name(self) -> str:
        """The host's name as known_hosts spells it: `addr`, or `[addr]:port` off port 22."""
        return self.address if self.port == 22 else f"[{self.address}]:{self.port}"


def _run(cmd: list[str], *, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise KvmHostsError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def _keygen(path: Path, comment: str) -> None:
    for p in (path, path.with_name(path.name + ".pub")):
        p.unlink(missing_ok=True)
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])
    path.chmod(0o600)


def _public_key(path: Path) -> str:
    """`TYPE BASE64` of a key pair's public half, without the comment."""
    fields = path.with_name(path.name + ".pub").read_text().split()
    return f"{fields[0]} {fields[1]}"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _netns_exists(name: str) -> bool:
    return Path("/run/netns", name).exists()


def _link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _namespaces_work() -> bool:
    """True when a mount and UTS namespace can be made here (root, no seccomp block)."""
    try:
        probe = ["unshare", "--mount", "--uts", "--propagation", "private", "true"]
        return _run(probe, check=False, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _uts_ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/uts")
    except OSError:
        return None


def pids_in_uts_ns(ns: str) -> list[int]:
    """Every process whose UTS namespace is `ns` (as `readlink /proc/PID/ns/uts`).

    A host's processes are found by its UTS namespace, not its mount namespace: libvirt
    gives each QEMU a mount namespace of its own (for /dev), but not a UTS one.
    """
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _uts_ns(int(entry.name)) == ns:
            found.append(int(entry.name))
    return found


class KvmHosts:
    """N OpenSSH servers standing in for KVM hosts `kvm1`..`kvmN`.

    `start()` (or entering the context) makes the keys, namespaces and sshd processes and
    waits until each sshd accepts TCP connections; `stop()` (or leaving the context) kills
    the sshd process groups and every process left in the hosts' namespaces, and deletes
    the veths and namespaces. Files under `workdir` stay for inspection.
    """

    def __init__(
        self,
        workdir: Path,
        count: int = 2,
        *,
        use_netns: bool | None = None,
        env: dict[str, str] | None = None,
        start_timeout: float = 15.0,
        netns_prefix: str = NETNS_PREFIX,
        subnet: str = SUBNET,
    ) -> None:
        if not 1 <= count <= 250:
            raise ValueError("count must be between 1 and 250")
        self.workdir = Path(workdir).resolve()
        self.count = count
        self.use_netns = use_netns
        self.env = dict(DEFAULT_HOST_ENV if env is None else env)
        self.start_timeout = start_timeout
        # Another prefix and subnet let two test beds run side by side on one machine.
        self.netns_prefix = netns_prefix
        self.subnet = subnet
        self.key_path = self.workdir / "client_ed25519"
        self.known_hosts = self.workdir / "known_hosts"
        #: Host-local storage: the same path on every host, backed per host (module doc).
        self.local_dir = self.workdir / "local"
        self.hosts: list[HostInfo] = []
        self._procs: dict[str, subprocess.Popen] = {}
        self._holders: dict[str, subprocess.Popen] = {}
        self._holder_ns: dict[str, str] = {}
        self._netns_made: list[str] = []
        #: True when each host has its own mount and UTS namespaces (module doc); then
        #: `hostname` over SSH is the host's name.
        self.separate = False
        self._started = False

    # ---- public API -------------------------------------------------------------------

    def __enter__(self) -> KvmHosts:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def host(self, name: str) -> HostInfo:
        """The host called `name` (`kvm1`...)."""
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(name)

    @property
    def own_hostnames(self) -> bool:
        """True when `hostname` on each host is its name (its own UTS namespace)."""
        return self.separate

    def info(self) -> list[dict[str, Any]]:
        """Every host as a JSON-ready dict."""
        return [h.to_dict() for h in self.hosts]

    def start(self) -> KvmHosts:
        if self._started:
            return self
        self._started = True
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Kill every sshd and every process in the hosts' namespaces, delete every veth
        and namespace this object made (the hosts' mounts go with their namespaces)."""
        for name, proc in list(self._procs.items()):
            self._kill(proc)
            del self._procs[name]
        for h in self.hosts:
            h.pid = None
        for name, holder in list(self._holders.items()):
            self._end_namespace(name, holder)
        for ns in list(self._netns_made):
            self._delete_netns(ns)
            self._netns_made.remove(ns)
        self._started = False

    def write_known_hosts(self, path: Path | None = None) -> Path:
        """Write a known_hosts file with every host's current key (default: `self.known_hosts`)."""
        path = Path(path or self.known_hosts)
        lines = [f"{h.known_hosts_name} {_public_key(h.host_key)}" for h in self.hosts]
        path.write_text("\n".join(lines) + "\n")
        return path

    def rotate_host_key(self, name: str) -> str:
        """Give host `name` a new host key and restart its sshd; known_hosts is NOT updated.

        Afterwards a client that checks known_hosts must refuse the host (a changed key);
        `write_known_hosts()` makes it trusted again. Returns the new public key.
        """
        h = self.host(name)
        proc = self._procs.pop(name, None)
        if proc is not None:
            self._kill(proc)
        _keygen(h.host_key, f"v2k-testbed-{name}-host")
        self._spawn(h)
        self._wait_ready(h)
        return _public_key(h.host_key)

    # ---- internals --------------------------------------------------------------------

    def _start(self) -> None:
        t0 = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        if not Path(SSHD).exists():
            raise KvmHostsError(f"{SSHD} is missing: install openssh-server")
        _keygen(self.key_path, "v2k-testbed-client")
        self.separate = _namespaces_work()
        if not self.separate:
            log.warning("mount namespaces unavailable: the hosts share one file system")

        netns = self.use_netns
        if netns is None or netns:
            try:
                self._make_netns(1)
                netns = True
            except (KvmHostsError, OSError, subprocess.TimeoutExpired) as e:
                if self.use_netns:
                    raise
                log.warning("network namespaces unavailable (%s): sshd on 127.0.0.1", e)
                netns = False
        self.use_netns = netns

        for i in range(1, self.count + 1):
            name = f"kvm{i}"
            hdir = self.workdir / "hosts" / name
            (hdir / "work").mkdir(parents=True, exist_ok=True)
            host_key = hdir / "ssh_host_ed25519_key"
            _keygen(host_key, f"v2k-testbed-{name}-host")
            if netns:
                if i > 1:
                    self._make_netns(i)
                address, port, ns = f"{self.subnet}.{i}.2", 22, f"{self.netns_prefix}{name}"
            else:
                address, port, ns = "127.0.0.1", _free_port(), None
            self.hosts.append(
                HostInfo(
                    name=name,
                    address=address,
                    port=port,
                    user="root",
                    key_path=self.key_path,
                    known_hosts=self.known_hosts,
                    workdir=hdir / "work",
                    netns=ns,
                    pid=None,
                    host_key=host_key,
                    log_path=hdir / "sshd.log",
                    local_dir=self.local_dir,
                    local_backing=hdir / "local",
                )
            )
        self.write_known_hosts()
        if self.separate:
            self.local_dir.mkdir(exist_ok=True)
            for h in self.hosts:
                self._make_namespace(h)
        for h in self.hosts:
            self._spawn(h)
        for h in self.hosts:
            self._wait_ready(h)
        log.info("%d KVM hosts up in %.2f s", self.count, time.monotonic() - t0)

    def _make_netns(self, i: int) -> None:
        ns = f"{self.netns_prefix}kvm{i}"
        veth = ns  # the root side of the pair is named like the namespace
        if _netns_exists(ns) or _link_exists(veth):
            log.info("removing %s left over from an earlier run", ns)
            self._delete_netns(ns)
        _run(["ip", "netns", "add", ns])
        self._netns_made.append(ns)
        _run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns])
        _run(["ip", "addr", "add", f"{self.subnet}.{i}.1/24", "dev", veth])
        _run(["ip", "link", "set", veth, "up"])
        _run(["ip", "-n", ns, "addr", "add", f"{self.subnet}.{i}.2/24", "dev", "eth0"])
        _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])

    def _delete_netns(self, ns: str) -> None:
        if _netns_exists(ns):
            # Anything still running in the namespace would keep it alive: kill it first.
            pids = _run(["ip", "netns", "pids", ns], check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _run(["ip", "netns", "del", ns], check=False)
        if _link_exists(ns):
            _run(["ip", "link", "del", ns], check=False)

    def _make_namespace(self, h: HostInfo) -> None:
        """Start the process that holds the host's mount and UTS namespaces (module doc)."""
        hdir = h.workdir.parent
        h.root = hdir / "root"
        # Fresh every start: the host's libvirt state of an earlier run must not come back.
        for path in (h.root, h.local_backing):
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir(parents=True)
        args = [h.name]
        for private in PRIVATE_DIRS:
            source = h.private_path(private)
            source.mkdir(parents=True, exist_ok=True)
            args += ["bind", str(source), private]
        args += ["bind", str(h.local_backing), str(self.local_dir)]
        for other in range(1, self.count + 1):
            if f"kvm{other}" != h.name:
                other_dir = self.workdir / "hosts" / f"kvm{other}"
                other_dir.mkdir(parents=True, exist_ok=True)
                args += ["hide", str(other_dir)]
        cmd = ["unshare", "--mount", "--uts", "--propagation", "private"]
        cmd += ["sh", "-c", _HOLDER_SCRIPT, "sh", *args]
        if h.netns:
            cmd = ["ip", "netns", "exec", h.netns, *cmd]
        log_path = hdir / "namespace.log"
        with open(log_path, "ab") as logf:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=logf,
                start_new_session=True,
            )
        self._holders[h.name] = proc
        ready, _, _ = select.select([proc.stdout], [], [], self.start_timeout)
        line = proc.stdout.readline() if ready else b""
        proc.stdout.close()
        if line.strip() != b"ready":
            raise KvmHostsError(f"the namespaces of {h.name} could not be made:\n{_tail(log_path)}")
        h.ns_pid = proc.pid  # `ip netns exec`, `unshare` and `sh` all exec: this is sleep
        self._holder_ns[h.name] = _uts_ns(proc.pid)

    def _end_namespace(self, name: str, holder: subprocess.Popen) -> None:
        """Kill every process in the host's namespaces, then the holder itself."""
        ns = self._holder_ns.pop(name, None)
        # Only while the holder lives is `ns` surely still this host's: a freed
        # namespace's number can be given to a new one (then the netns cleanup remains).
        if ns and holder.poll() is None:
            for pid in pids_in_uts_ns(ns):
                if pid != holder.pid:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        kill_group(holder)
        del self._holders[name]
        for h in self.hosts:
            if h.name == name:
                h.ns_pid = None

    def _sshd_config(self, h: HostInfo) -> Path:
        lines = [
            f"# v2k test bed host {h.name}",
            f"ListenAddress {h.address}:{h.port}",
            f"HostKey {h.host_key}",
            "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            f"AuthorizedKeysFile {self.key_path}.pub",
            "StrictModes no",
            "UsePAM no",
            "PidFile none",
            "UseDNS no",
            "PrintMotd no",
            "PrintLastLog no",
            "X11Forwarding no",
            "MaxStartups 100",
            "MaxSessions 50",
            "LoginGraceTime 30",
            "LogLevel INFO",
            "Subsystem sftp internal-sftp",
        ]
        # Each host has a bin directory of its own first on PATH: tools installed on one
        # test bed host (the ovftool stand-in) are not on the others.
        bin_dir = h.workdir.parent / "bin"
        bin_dir.mkdir(parents=True, exist_ok=True)
        # A home of its own, as a separate machine has: bash started by sshd reads
        # ~/.bashrc, and this machine's root's may run anything (pyenv init here cost each
        # remote command 80 ms of CPU).
        home = h.workdir.parent / "home"
        home.mkdir(parents=True, exist_ok=True)
        env = {
            **self.env,
            "HOME": str(home),
            "V2K_TESTBED_HOST": h.name,
            "V2K_TESTBED_WORKDIR": str(h.workdir),
            "PATH": f"{bin_dir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        }
        lines.append("SetEnv " + " ".join(f"{k}={v}" for k, v in env.items()))
        path = h.host_key.parent / "sshd_config"
        path.write_text("\n".join(lines) + "\n")
        return path

    def _spawn(self, h: HostInfo) -> None:
        config = self._sshd_config(h)
        test = _run([SSHD, "-t", "-f", str(config)], check=False)
        if test.returncode != 0:
            raise KvmHostsError(f"sshd config of {h.name} is invalid: {test.stderr.strip()}")
        cmd = h.nsenter([SSHD, "-D", "-e", "-f", str(config)])
        with open(h.log_path, "ab") as logf:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=logf,
                start_new_session=True,  # own process group, killed as a group in stop()
            )
        self._procs[h.name] = proc
        h.pid = proc.pid  # `nsenter` (or `ip netns exec`) execs: this is sshd

    def _wait_ready(self, h: HostInfo) -> None:
        """Wait until the sshd of `h` answers with an SSH banner, from the root namespace."""
        proc = self._procs[h.name]
        deadline = time.monotonic() + self.start_timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise KvmHostsError(
                    f"sshd of {h.name} exited with {proc.returncode}:\n{_tail(h.log_path)}"
                )
            try:
                with socket.create_connection((h.address, h.port), timeout=1) as s:
                    s.settimeout(2)
                    if s.recv(64).startswith(b"SSH-"):
                        return
            except OSError as e:
                last = e
            time.sleep(0.05)
        raise KvmHostsError(
            f"sshd of {h.name} did not answer on {h.address}:{h.port} within "
            f"{self.start_timeout} s ({last}):\n{_tail(h.log_path)}"
        )

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        # sshd's per-connection processes call setsid(): they are not in the listener's
        # process group. Note them (with their start times) before the listener goes.
        children = _descendants(proc.pid)
        kill_group(proc)
        for pid, start in children:
            if _start_time(pid) == start:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces.
    return text[text.rindex(")") + 2 :].split()


def _start_time(pid: int) -> str | None:
    fields = _stat(pid)
    return fields[19] if fields else None  # field 22 of stat: starttime


def _descendants(root: int) -> list[tuple[int, str]]:
    """(pid, start time) of every process below `root`."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields:
                parents.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[tuple[int, str]] = []
    todo = list(parents.get(root, []))
    while todo:
        pid = todo.pop()
        start = _start_time(pid)
        if start is not None:
            found.append((pid, start))
        todo.extend(parents.get(pid, []))
    return found


def kill_group(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """End the process group led by `proc` (SIGTERM, then SIGKILL) and reap the leader.

    The leader is only reaped after the whole group got SIGKILL, so its pid (the group id)
    cannot be reused by an unrelated process in between.
    """
    if proc.returncode is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # WNOWAIT: see the exit without reaping, the group id stays reserved.
        res = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        if res is not None:
            break
        time.sleep(0.02)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the rest of the group (per-connection sshd)
    except ProcessLookupError:
        pass
    proc.wait(timeout=timeout)
