"""The test bed's vCenter (or ESXi host): govmomi's simulator with what v2k needs.

`build()` compiles the Go program in `testbed/vcsim/` against Debian's govmomi source
(GOPATH mode) into the cache; `VcSim` runs it on 127.0.0.1 with a throwaway CA, a
random password, and its datastores under a work directory, and stops it without
leaving anything behind:

    with VcSim(tmp_path) as sim:
        with sim.connect() as si:          # pyvmomi, TLS verified against sim.ca_cert
            ...
        sim.upload("vm1/vm1.vmdk", Path("disk.vmdk"))
        sim.fault(nfc_cut_after=1 << 20)   # the next export download breaks after 1 MiB

From a shell: `python -m testbed.vcsim build` prints the binary's path;
`python -m testbed.vcsim run [--esx] [DIR]` serves until interrupted and prints `info()`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from testbed.certs import CertPaths, make_certs
from testbed.paths import cache_dir

SOURCE_DIR = Path(__file__).resolve().parent / "vcsim"
GOPATH = "/usr/share/gocode"  # Debian's golang-github-vmware-govmomi-dev
BUILD_TIMEOUT = 900.0

# Model settings VcSim accepts (flag names of the Go program, "-" written as "_").
MODEL_KEYS = frozenset(
    {
        "dc",
        "cluster",
        "host",
        "standalone_host",
        "vm",
        "ds",
        "pg",
        "lease_timeout",
        "clone_rate_kbps",
        "clone_min_ms",
    }
)


class VcSimError(RuntimeError):
    """The simulator could not be built, started or stopped."""


def _sources() -> list[Path]:
    files = sorted(SOURCE_DIR.glob("*.go"))
    if not files:
        raise VcSimError(f"no Go sources in {SOURCE_DIR}")
    return files


def source_hash() -> str:
    """Hash of the Go sources: names the cached binary, so an edit rebuilds it."""
    h = hashlib.sha256()
    for f in _sources():
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _go() -> str:
    go = shutil.which("go") or "/usr/lib/go/bin/go"
    if not Path(go).exists():
        raise VcSimError("the Go toolchain is missing: apt-get install golang-go")
    return go


def build(force: bool = False) -> Path:
    """Build the simulator if needed and return the binary's path.

    The binary lives in `cache_dir()/vcsim-<source hash>/vcsim`, Go's build cache in
    `cache_dir()/gocache`; an existing binary is reused unless `force`.
    """
    out_dir = cache_dir() / f"vcsim-{source_hash()}"
    binary = out_dir / "vcsim"
    if binary.exists() and not force:
        return binary
    if not (Path(GOPATH) / "src/github.com/vmware/govmomi/simulator").is_dir():
        raise VcSimError(
            f"govmomi's source is missing under {GOPATH}: "
            "apt-get install golang-github-vmware-govmomi-dev"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(
        GO111MODULE="off",
        GOPATH=GOPATH,
        GOCACHE=str(cache_dir() / "gocache"),
        GOFLAGS="",
        CGO_ENABLED="0",
    )
    # Build to a private name and rename: concurrent builds never see half a binary.
    tmp = out_dir / f".vcsim.{os.getpid()}.tmp"
    try:
        proc = subprocess.run(
            [_go(), "build", "-o", str(tmp), "."],
            cwd=SOURCE_DIR,
            env=env,
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT,
        )
    except subprocess.TimeoutExpired as e:
        tmp.unlink(missing_ok=True)
        raise VcSimError(f"go build timed out after {BUILD_TIMEOUT:.0f}s") from e
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise VcSimError(
            f"go build of {SOURCE_DIR} failed (exit {proc.returncode}):\n"
            f"{proc.stderr.strip() or proc.stdout.strip()}"
        )
    os.replace(tmp, binary)
    return binary


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class VcSim:
    """One running simulator: vCenter (`DC0`) or, with `esx=True`, an ESXi host.

    `workdir` holds the certificates (`certs/`), the log (`vcsim.log`), the ready file
    and the datastores (`datastores/`, removed on stop). `model` sets the inventory the
    simulator creates at start, with the Go program's flags as keys (`dc`, `cluster`,
    `host` per cluster, `standalone_host`, `vm`, `ds`, `pg`, `lease_timeout` seconds);
    the defaults are one datacenter with one cluster of two hosts, two datastores
    (`LocalDS_0`, `LocalDS_1`), one distributed port group next to "VM Network",
    and no VMs. `clone_rate_kbps` and `clone_min_ms` slow every clone down (see
    `knob()`).

    `instance_uuid` is the vCenter's `about.instanceUuid` (default: a random one, kept
    across `restart()`): two simulators with equal ones stand for a DR pair.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        esx: bool = False,
        model: dict[str, int] | None = None,
        binary: Path | None = None,
        start_timeout: float = 30.0,
        instance_uuid: str | None = None,
    ) -> None:
        unknown = set(model or {}) - MODEL_KEYS
        if unknown:
            raise ValueError(f"unknown model settings: {sorted(unknown)}")
        self.workdir = Path(workdir)
        self.esx = esx
        self.model = dict(model or {})
        self.binary = binary
        self.start_timeout = start_timeout
        self.instance_uuid = instance_uuid or str(uuidlib.uuid4())
        self.host = "127.0.0.1"
        self.user = "root" if esx else "administrator@vsphere.local"
        self.password = ""
        self.datacenter = "ha-datacenter" if esx else "DC0"
        self.port = 0
        self.pid = 0
        self.url = ""
        self.ca_cert = self.workdir / "certs" / "ca.pem"
        self.returncode: int | None = None  # of the last stopped process
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    # -- life cycle ---------------------------------------------------------------

    @property
    def datastore_dir(self) -> Path:
        return self.workdir / "datastores"

    @property
    def log_file(self) -> Path:
        return self.workdir / "vcsim.log"

    def start(self) -> VcSim:
        """Start on a free port with a fresh CA and password."""
        return self._start(port=0, same_identity=False)

    def restart(self) -> VcSim:
        """Stop the simulator and start it again as the same server: same port, TLS
        certificate and password, as clients see a vCenter that restarted.

        Everything the simulator held in memory is gone: the inventory (apply it again,
        see `TestBed.restart_vcsim`), sessions, export leases, armed faults and counters.
        """
        if self._proc is None:
            raise VcSimError("not started")
        port = self.port
        self.stop()
        return self._start(port=port, same_identity=True)

    def _start(self, *, port: int, same_identity: bool) -> VcSim:
        if self._proc is not None:
            raise VcSimError("already started")
        binary = self.binary or build()
        self.workdir.mkdir(parents=True, exist_ok=True)
        certs_dir = self.workdir / "certs"
        if same_identity:
            # Clients keep trusting the CA and logging in with the password they have.
            certs = CertPaths(
                certs_dir / "ca.pem", certs_dir / "server.pem", certs_dir / "server-key.pem"
            )
        else:
            certs = make_certs(certs_dir)
            self.password = secrets.token_urlsafe(18)
        self.ca_cert = certs.ca_cert
        ready = self.workdir / "ready.json"
        ready.unlink(missing_ok=True)

        argv = [
            str(binary),
            "-listen",
            f"{self.host}:{port}",
            "-cert",
            str(certs.cert),
            "-key",
            str(certs.key),
            "-dir",
            str(self.datastore_dir),
            "-ready-file",
            str(ready),
            "-user",
            self.user,
            "-instance-uuid",
            self.instance_uuid,
        ]
        if self.esx:
            argv.append("-esx")
        for key, value in sorted(self.model.items()):
            argv += [f"-{key.replace('_', '-')}", str(int(value))]

        # The password goes through the environment, never argv (ps shows argv).
        env = dict(os.environ, VCSIM_PASSWORD=self.password)
        self._log = open(self.log_file, "ab")  # closed in stop()
        self._proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group: stop() kills all of it
        )
        deadline = time.monotonic() + self.start_timeout
        while True:
            if ready.exists():
                info = json.loads(ready.read_text())
                break
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self.stop()
                raise VcSimError(
                    f"vcsim exited with {code} before it was ready:\n{_tail(self.log_file)}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise VcSimError(
                    f"vcsim not ready after {self.start_timeout:.0f}s:\n{_tail(self.log_file)}"
                )
            time.sleep(0.02)
        self.port = int(info["port"])
        self.pid = int(info["pid"])
        self.url = str(info["url"])
        return self

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL it after 10 s, and remove the datastores."""
        proc, self._proc = self._proc, None
        if proc is not None:
            for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    pass
                try:
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
            self.returncode = proc.returncode
            # Anything else left in the group (there should be nothing).
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        if self._log is not None:
            self._log.close()
            self._log = None
        # The simulator removes its datastore directories on SIGTERM; after a SIGKILL
        # they would stay, so make sure.
        shutil.rmtree(self.datastore_dir, ignore_errors=True)
        (self.workdir / "ready.json").unlink(missing_ok=True)

    def __enter__(self) -> VcSim:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- clients --------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """Everything a client needs, JSON-ready."""
        return {
            "url": self.url,
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "password": self.password,
            "ca_cert": str(self.ca_cert),
            "datacenter": self.datacenter,
            "instance_uuid": self.instance_uuid,
            "esx": self.esx,
            "pid": self.pid,
            "workdir": str(self.workdir),
        }

    def ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts only the test bed's CA (hostname checked)."""
        return ssl.create_default_context(cafile=str(self.ca_cert))

    @contextlib.contextmanager
    def connect(self) -> Iterator[Any]:
        """A pyvmomi ServiceInstance, logged in, TLS verified against `ca_cert`."""
        from pyVim.connect import Disconnect, SmartConnect

        si = SmartConnect(
            host=self.host,
            port=self.port,
            user=self.user,
            pwd=self.password,
            sslContext=self.ssl_context(),
        )
        try:
            yield si
        finally:
            with contextlib.suppress(Exception):
                Disconnect(si)

    def base_url(self) -> str:
        return f"https://{self.host}:{self.port}"

    def fault(self, **params: Any) -> dict[str, Any]:
        """Arm (or with `clear=1` disarm) fault injection, see testbed/vcsim/faults.go:
        `nfc_cut_after=BYTES`, `nfc_status=CODE`, `nfc_delay_ms=MS`, each with `times=N`.
        Returns the faults still armed."""
        import httpx

        with httpx.Client(verify=self.ssl_context(), timeout=10) as client:
            r = client.post(f"{self.base_url()}/testbed/fault", params=params)
            r.raise_for_status()
            return r.json()

    def knob(self, **params: Any) -> dict[str, Any]:
        """Turn knobs that stay until changed (see testbed/vcsim/knobs.go):
        `clone_rate_kbps=KIB` (clones copy at KIB KiB/s; 0 at once), `clone_min_ms=MS`
        (every clone takes at least MS ms), `datastore=NAME, capacity_bytes=N` (the
        datastore reports capacity N, free space N minus its files; 0 its file system's
        again). Without arguments, returns the knobs as they are."""
        import httpx

        with httpx.Client(verify=self.ssl_context(), timeout=10) as client:
            if params:
                r = client.post(f"{self.base_url()}/testbed/knob", params=params)
            else:
                r = client.get(f"{self.base_url()}/testbed/knob")
            r.raise_for_status()
            return r.json()

    def stats(self) -> dict[str, int]:
        """Counters of export downloads since the last `reset_stats()` (see stats.go):
        `nfc_active` and `nfc_max_active` (bodies being sent at once, now and at most),
        `nfc_requests`, `nfc_range_requests`, `nfc_status_faults`, `nfc_bytes`,
        `nfc_completed` and `nfc_broken` (bodies sent whole, and cut or abandoned); and
        `export_leases`, the export leases still ready (not completed, aborted or timed
        out; not reset)."""
        return self._stats("GET", {"stats": "1"})

    def reset_stats(self) -> dict[str, int]:
        """Zero the download counters (`nfc_max_active` restarts from `nfc_active`)."""
        return self._stats("POST", {"stats": "reset"})

    def _stats(self, method: str, params: dict[str, str]) -> dict[str, int]:
        import httpx

        with httpx.Client(verify=self.ssl_context(), timeout=10) as client:
            r = client.request(method, f"{self.base_url()}/testbed/fault", params=params)
            r.raise_for_status()
            return r.json()

    def datastore_url(self, path: str, datastore: str = "LocalDS_0") -> str:
        """URL of a file in a datastore (`/folder` access: GET, HEAD, PUT)."""
        from urllib.parse import quote, urlencode

        query = urlencode({"dcPath": self.datacenter, "dsName": datastore})
        return f"{self.base_url()}/folder/{quote(path.lstrip('/'))}?{query}"

    def upload(self, path: str, source: Path | bytes, datastore: str = "LocalDS_0") -> None:
        """PUT a file into a datastore, e.g. `upload("vm1/vm1.vmdk", Path("disk.vmdk"))`."""
        import httpx

        with httpx.Client(
            verify=self.ssl_context(), auth=(self.user, self.password), timeout=60
        ) as client:
            if isinstance(source, bytes):
                r = client.put(self.datastore_url(path, datastore), content=source)
            else:
                with open(source, "rb") as f:
                    r = client.put(self.datastore_url(path, datastore), content=f)
            r.raise_for_status()

    def download(self, path: str, datastore: str = "LocalDS_0") -> bytes:
        """GET a file from a datastore (`/folder` access)."""
        import httpx

        with httpx.Client(
            verify=self.ssl_context(), auth=(self.user, self.password), timeout=60
        ) as client:
            r = client.get(self.datastore_url(path, datastore))
            r.raise_for_status()
            return r.content

    def datastore_path(self, datastore: str = "LocalDS_0") -> Path:
        """The directory on this machine that backs a datastore."""
        with self.connect() as si:
            from pyVmomi import vim

            content = si.RetrieveContent()
            view = content.viewManager.CreateContainerView(
                content.rootFolder, [vim.Datastore], True
            )
            try:
                for ds in view.view:
                    if ds.name == datastore:
                        return Path(ds.info.url)
            finally:
                view.Destroy()
        raise VcSimError(f"no datastore {datastore!r}")


def _main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m testbed.vcsim")
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the simulator and print the binary's path")
    b.add_argument("--force", action="store_true")
    r = sub.add_parser("run", help="serve until interrupted, print info() as JSON")
    r.add_argument("--esx", action="store_true")
    r.add_argument("workdir", nargs="?", type=Path)
    args = parser.parse_args(argv)

    if args.cmd == "build":
        print(build(force=args.force))
        return 0
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="v2k-vcsim-"))
    with VcSim(workdir, esx=args.esx) as sim:
        print(json.dumps(sim.info(), indent=2), flush=True)
        # Blocked only now, after the simulator started: it must not inherit the mask.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
