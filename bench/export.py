"""Export benchmark: v2k's export stage against raw clients of the same NFC lease URLs.

What runs, all on this machine, over TLS on loopback:

- the test bed's vCenter simulator (`testbed.vcsim.VcSim`) with three VMs made through
  the inventory code (`testbed.inventory.apply_inventory`): one disk, four disks, and a
  big disk for the memory figure. Disks are streamOptimized VMDKs of random
  (incompressible) data, so the bytes on the wire are about the virtual size. They are
  generated once and cached (`testbed.images.synthetic_vmdk` under the cache directory)
  and hard-linked into the simulator's datastore.
- a Prefect server (`prefect_test_harness`: a subprocess with a temporary database).
- the raw clients, each given the URLs of an export lease opened with
  `tasks.vcenter.export_lease` / `disk_urls` and writing into the same directory:
  `curl -g -sS -o FILE --cacert CA -H @cookie URL`, and a bare httpx stream loop with
  1 MiB chunks (no checksum, no progress, no fsync) in its own process. With several
  disks, one client per disk runs at once (separate processes).
- v2k: a worker process (a separate Python process, as a Prefect worker would run the
  flow) runs a parent flow that calls `tasks.export.run_export` the way `migrate_vm`
  does; the figure is the wall time of `run_export` (lease, mapped download tasks with
  sha256, progress artifacts and fsync, the descriptor, Prefect's own API calls).
- memory: a fresh worker process exports the big disk; its peak RSS (VmHWM) is the
  figure. Prefect's own baseline (after the imports, and after a no-op flow run) is
  measured in the same process first. The Prefect server is another process and does
  not count.

Each client runs `repeats` times, interleaved round by round (curl, httpx, v2k); the
figures are the best run of each (medians are printed too).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import bench

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

TARGET_RATIO = 0.90
TARGET_RSS_MIB = 150.0
RAW_CHUNK = 1 * MiB
DATASTORE = "LocalDS_0"
VCENTER_BLOCK = "bench-vcenter"
SETTINGS_BLOCK = "bench-settings"


@dataclass(frozen=True)
class Plan:
    """Sizes of one benchmark run."""

    name: str
    one_disk: int  # the single-disk VM
    many_disk: int  # each disk of the multi-disk VM
    many_count: int
    big_disk: int  # the memory figure
    repeats: int


FULL = Plan("full", one_disk=1 * GiB, many_disk=1 * GiB, many_count=4, big_disk=4 * GiB, repeats=5)
QUICK = Plan(
    "quick", one_disk=128 * MiB, many_disk=128 * MiB, many_count=4, big_disk=512 * MiB, repeats=2
)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def mib(n: float) -> float:
    return n / MiB


def human(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.0f} MiB"


# ---------------------------------------------------------------------------------------
# The machine
# ---------------------------------------------------------------------------------------


def machine(workdir: Path) -> dict[str, Any]:
    """CPU, cores, RAM, kernel, OS, file system and the versions that matter here."""
    import ssl

    import httpx
    import prefect

    def first(path: str, key: str) -> str:
        with contextlib.suppress(OSError):
            for line in Path(path).read_text().splitlines():
                if line.startswith(key):
                    return line.split(":", 1)[1].strip() if ":" in line else line
        return ""

    hypervisor = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Hypervisor vendor:"):
                hypervisor = line.split(":", 1)[1].strip()
    os_name = ""
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip('"')
    fs = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        fs = subprocess.run(
            ["findmnt", "-n", "-o", "FSTYPE", "-T", str(workdir)],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    curl = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        curl = subprocess.run(
            ["curl", "--version"], capture_output=True, text=True, timeout=10
        ).stdout.split("\n", 1)[0]
    mem_kib = first("/proc/meminfo", "MemTotal").split()[0] or "0"
    return {
        "cpu": first("/proc/cpuinfo", "model name") or platform.processor(),
        "cores": os.cpu_count(),
        "hypervisor": hypervisor or "none",
        "ram_gib": round(int(mem_kib) / (1024 * 1024), 1),
        "kernel": platform.release(),
        "os": os_name,
        "filesystem": fs,
        "python": platform.python_version(),
        "prefect": prefect.__version__,
        "httpx": httpx.__version__,
        "openssl": ssl.OPENSSL_VERSION,
        "curl": curl,
        "vcsim": "govmomi 0.24.2 simulator (Debian), test bed build",
    }


# ---------------------------------------------------------------------------------------
# Processes: CPU time and memory
# ---------------------------------------------------------------------------------------


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by a process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def proc_status_kib(key: str, pid: int | str = "self") -> int:
    """A `kB` field of /proc/PID/status (VmRSS, VmHWM), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def machine_busy() -> float:
    """CPU seconds the whole machine spent busy so far (all cores, /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def child_pids(word: str) -> list[int]:
    """Pids of this process's children whose command line holds `word`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if ppid == os.getpid() and word in (stat.parent / "cmdline").read_text():
                found.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


class Meter:
    """CPU seconds of the processes that take part in a run, and of everything else.

    `pids` are ours (simulator, Prefect server, worker); with this process and its waited
    children, whatever the machine spent beyond them is other people's work, which skews
    a run: `others` is reported with each run.
    """

    def __init__(self, sim_pid: int) -> None:
        self.sim_pid = sim_pid
        self.pids: set[int] = set()

    def snap(self) -> dict[str, float]:
        return {
            "busy": machine_busy(),
            "sim": proc_cpu(self.sim_pid),
            "ours": sum(proc_cpu(p) for p in self.pids) + self_cpu() + children_cpu(),
        }

    def since(self, snap: dict[str, float]) -> dict[str, float]:
        now = self.snap()
        d = {k: now[k] - snap[k] for k in now}
        d["others"] = max(0.0, d["busy"] - d["sim"] - d["ours"])
        return d


# ---------------------------------------------------------------------------------------
# The test bed: simulator, VMs, Prefect blocks
# ---------------------------------------------------------------------------------------


@dataclass
class Scenario:
    """One VM of the benchmark and what its export must give."""

    key: str
    vm_name: str
    moref: str
    spec: dict[str, Any]  # tasks.models.VmSpec as JSON
    sources: list[Path]  # the files the lease serves, in disk order
    sizes: list[int]  # their sizes: the bytes on the wire
    sha256: list[str] = field(default_factory=list)

    @property
    def wire_bytes(self) -> int:
        return sum(self.sizes)

    @property
    def virtual_bytes(self) -> int:
        return sum(d["capacity_bytes"] for d in self.spec["disks"])


class LinkUploader:
    """`apply_inventory` uploader that hard-links the cached VMDK into the datastore.

    The export serves the file as it is; a link saves copying gigabytes through the
    simulator's `/folder` PUT. Falls back to a copy across file systems.
    """

    def __init__(self, sim) -> None:
        self.sim = sim
        self.roots: dict[str, Path] = {}

    def __call__(self, local: Path, dc_path: str, ds_name: str, ds_path: str) -> None:
        if ds_name not in self.roots:
            self.roots[ds_name] = self.sim.datastore_path(ds_name)
        dest = self.roots[ds_name] / ds_path
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.unlink(missing_ok=True)
        try:
            os.link(local, dest)
        except OSError:
            shutil.copyfile(local, dest)


def inventory(plan: Plan):
    """Three VMs in the simulator's default DC0: 1 disk, `many_count` disks, one big disk."""
    from testbed.inventory import parse_inventory

    def disk(size: int, seed: int) -> dict[str, Any]:
        # fill = size: random data all through, which streamOptimized cannot compress.
        return {"size": size, "datastore": DATASTORE, "seed": seed, "fill": size}

    def vm(name: str, n: int, disks: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "name": name,
            "guest_id": "debian12_64Guest",
            "power": "poweredOff",
            "memory_mb": 512,
            "instance_uuid": f"5003be00-0000-4000-8000-{n:012d}",
            "disks": disks,
        }

    # Seeds are shared where sizes match, so the cache holds as few files as possible.
    vms = [
        vm("bench-1disk", 1, [disk(plan.one_disk, 1001)]),
        vm(
            f"bench-{plan.many_count}disks",
            2,
            [disk(plan.many_disk, 1001 + i) for i in range(plan.many_count)],
        ),
        vm("bench-big", 3, [disk(plan.big_disk, 2001)]),
    ]
    return parse_inventory(
        {
            "version": 1,
            "datacenters": [
                {
                    "name": "DC0",
                    "clusters": [{"name": "DC0_C0", "hosts": ["DC0_C0_H0", "DC0_C0_H1"]}],
                    "datastores": [{"name": DATASTORE}],
                    "vms": vms,
                }
            ],
        },
        source="bench inventory",
    )


def sha256_of(path: Path, cache: dict[tuple[int, int], str]) -> str:
    st = path.stat()
    key = (st.st_dev, st.st_ino)
    if key not in cache:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            while chunk := fh.read(4 * MiB):
                digest.update(chunk)
        cache[key] = digest.hexdigest()
    return cache[key]


def build_scenarios(sim, plan: Plan) -> dict[str, Scenario]:
    """Make the VMs (first run: generate the disks, cached) and read their specs."""
    from tasks import vcenter as vc
    from testbed.inventory import apply_inventory

    inv = inventory(plan)
    started = time.monotonic()
    log(
        "making the VMs; the first run generates the random VMDKs "
        "(about 20 s per GiB, cached for the next runs)"
    )
    with sim.connect() as si:
        applied = apply_inventory(
            si,
            inv,
            uploader=LinkUploader(sim),
            power_on=False,
            task_timeout=600,
        )
        log(f"VMs ready in {time.monotonic() - started:.0f} s")
        roots: dict[str, Path] = {}
        shas: dict[tuple[int, int], str] = {}
        out = {}
        for key, name in (
            ("one", "bench-1disk"),
            ("many", f"bench-{plan.many_count}disks"),
            ("big", "bench-big"),
        ):
            made = applied.vms[name]
            sources = []
            for ds_file in made.disk_files:
                ds, rel = ds_file[1:].split("] ", 1)
                if ds not in roots:
                    roots[ds] = sim.datastore_path(ds)
                sources.append(roots[ds] / rel)
            dc = vc.datacenter(si, sim.datacenter)
            spec = vc.read_spec(si, vc.find_vm(si, dc, made.moref))
            out[key] = Scenario(
                key=key,
                vm_name=name,
                moref=made.moref,
                spec=spec.model_dump(mode="json"),
                sources=sources,
                sizes=[p.stat().st_size for p in sources],
                sha256=[sha256_of(p, shas) for p in sources],
            )
    return out


def save_blocks(sim) -> None:
    from blocks import MigrationSettings, VCenter

    VCenter(
        host=sim.host,
        port=sim.port,
        username=sim.user,
        password=sim.password,
        datacenter=sim.datacenter,
        ca_cert=Path(sim.ca_cert).read_text(),
    ).save(VCENTER_BLOCK, overwrite=True)
    # threads_on_ms=0: one download per disk at once (CloudStack's default).
    MigrationSettings(threads_on_ms=0).save(SETTINGS_BLOCK, overwrite=True)


# ---------------------------------------------------------------------------------------
# Raw clients
# ---------------------------------------------------------------------------------------


@dataclass
class Run:
    """One timed transfer of every disk of a VM by one client."""

    client: str
    seconds: float
    bytes: int
    client_cpu: float  # CPU seconds of the client process(es)
    server_cpu: float  # CPU seconds of the simulator meanwhile
    others_cpu: float = 0.0  # CPU seconds of processes that are not part of the bench
    window: float = 0.0  # seconds over which others_cpu was counted (default: seconds)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.bytes / self.seconds


@contextlib.contextmanager
def lease_urls(sim, moref: str) -> Iterator[tuple[list[str], str]]:
    """Open an export lease on the VM; yield (device URLs, session cookie)."""
    from tasks import vcenter as vc

    with sim.connect() as si:
        vm = vc.find_vm(si, vc.datacenter(si, sim.datacenter), moref)
        with vc.export_lease(vm) as lease:
            urls = [u for _, u, _ in vc.disk_urls(lease, sim.host, sim.port)]
            yield urls, si._stub.cookie or ""


def _check_files(dests: list[Path], sizes: list[int], client: str) -> None:
    for dest, size in zip(dests, sizes, strict=True):
        got = dest.stat().st_size if dest.exists() else -1
        if got != size:
            raise RuntimeError(f"{client}: {dest.name} has {got} bytes, expected {size}")


def _fresh(directory: Path) -> Path:
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    return directory


def _settle(directory: Path) -> None:
    """Remove a run's files and write back what is dirty, so runs start alike."""
    shutil.rmtree(directory, ignore_errors=True)
    os.sync()


def run_curl(
    urls: list[str], out: Path, ca: Path, header_file: Path, sizes: list[int], meter: Meter
) -> Run:
    dests = [out / f"disk-{i}.vmdk" for i in range(len(urls))]
    argvs = [
        # The cookie header comes from a file: a process list never shows it.
        ["curl", "-g", "-sS", "-o", str(d), "--cacert", str(ca), "-H", f"@{header_file}", u]
        for u, d in zip(urls, dests, strict=True)
    ]
    cpu0, snap = children_cpu(), meter.snap()
    started = time.monotonic()
    procs = [subprocess.Popen(a, stdin=subprocess.DEVNULL) for a in argvs]
    try:
        codes = [p.wait(timeout=3600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    seconds = time.monotonic() - started
    used = meter.since(snap)
    if any(codes):
        raise RuntimeError(f"curl failed with exit codes {codes}")
    _check_files(dests, sizes, "curl")
    return Run("curl", seconds, sum(sizes), children_cpu() - cpu0, used["sim"], used["others"])


# The bare httpx loop, run in its own process: no checksum, no progress, no fsync.
RAW_HTTPX = r"""
import json, ssl, sys, time, resource
import httpx

url, dest, ca, header_file, chunk = sys.argv[1:6]
cookie = open(header_file).read().split(":", 1)[1].strip()
print("ready", flush=True)
sys.stdin.readline()
ru0 = resource.getrusage(resource.RUSAGE_SELF)
started = time.monotonic()
n = 0
ctx = ssl.create_default_context(cafile=ca)
with httpx.Client(verify=ctx, timeout=120, headers={"Cookie": cookie}) as client:
    with client.stream("GET", url) as r:
        r.raise_for_status()
        with open(dest, "wb") as f:
            for block in r.iter_raw(int(chunk)):
                f.write(block)
                n += len(block)
ended = time.monotonic()
ru = resource.getrusage(resource.RUSAGE_SELF)
cpu = ru.ru_utime + ru.ru_stime - ru0.ru_utime - ru0.ru_stime
faults = ru.ru_minflt - ru0.ru_minflt
print(json.dumps({"start": started, "end": ended, "bytes": n, "cpu": cpu, "faults": faults}),
      flush=True)
"""


def run_httpx(
    urls: list[str], out: Path, ca: Path, header_file: Path, sizes: list[int], meter: Meter
) -> Run:
    """One bare httpx process per URL, all started together once they have imported httpx.

    The time is from the first start to the last end, as measured in the processes
    (CLOCK_MONOTONIC is the same for all of them), so Python's start-up is not counted.
    """
    dests = [out / f"disk-{i}.vmdk" for i in range(len(urls))]
    procs = []
    try:
        for u, d in zip(urls, dests, strict=True):
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", RAW_HTTPX, u, str(d), str(ca), str(header_file)]
                    + [str(RAW_CHUNK)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
        for p in procs:
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError("the httpx client did not start")
        meter.pids.update(p.pid for p in procs)
        snap = meter.snap()
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        results = []
        for p in procs:
            line = p.stdout.readline()
            if p.wait(timeout=3600) != 0 or not line:
                raise RuntimeError(f"the httpx client failed (exit {p.returncode})")
            results.append(json.loads(line))
            meter.pids.discard(p.pid)  # its CPU moves to the waited children
        used = meter.since(snap)
    finally:
        meter.pids.difference_update(p.pid for p in procs)
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    _check_files(dests, sizes, "httpx")
    seconds = max(r["end"] for r in results) - min(r["start"] for r in results)
    return Run(
        "httpx",
        seconds,
        sum(r["bytes"] for r in results),
        sum(r["cpu"] for r in results),
        used["sim"],
        used["others"],
        extra={"page_faults": sum(r["faults"] for r in results)},
    )


# ---------------------------------------------------------------------------------------
# The v2k worker: a separate process that runs the export flow
# ---------------------------------------------------------------------------------------


class Worker:
    """A worker process talking JSON lines: commands on its stdin, answers on a pipe.

    Its stdout and stderr (Prefect's console logs) go to `log_path`.
    """

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        read_fd, write_fd = os.pipe()
        self._log = open(log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bench.export", "worker", str(write_fd)],
                stdin=subprocess.PIPE,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=env,
                pass_fds=(write_fd,),
                cwd=Path(__file__).resolve().parent.parent,
                text=True,
            )
        finally:
            os.close(write_fd)
        self._answers = os.fdopen(read_fd, "r")
        self.log_path = log_path
        self.ready = self._read()

    def _read(self) -> dict[str, Any]:
        line = self._answers.readline()
        if not line:
            code = self.proc.wait(timeout=30)
            raise RuntimeError(f"the worker exited with {code}; see {self.log_path}")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"the worker failed: {answer['error']}; see {self.log_path}")
        return answer

    def call(self, cmd: str, **params: Any) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps({"cmd": cmd, **params}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._answers.close()
        self._log.close()

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _worker_main(fd: int) -> int:
    """The worker process: import what a Prefect worker imports, then serve commands."""
    answers = os.fdopen(fd, "w", buffering=1)

    def answer(data: dict[str, Any]) -> None:
        data.update(
            rss_kib=proc_status_kib("VmRSS"),
            hwm_kib=proc_status_kib("VmHWM"),
            maxrss_kib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        )
        answers.write(json.dumps(data) + "\n")

    started = time.monotonic()
    from prefect import flow, task

    from blocks import MigrationSettings, VCenter
    from blocks.cache import loads_cached
    from tasks.export import run_export
    from tasks.models import VmSpec

    imported = time.monotonic() - started

    @task(name="bench-noop")
    def noop_task() -> int:
        return 1

    @flow(name="bench-noop")
    def noop_flow() -> int:
        MigrationSettings.load(SETTINGS_BLOCK)
        return noop_task()

    @flow(name="bench-export", flow_run_name="bench-{run_key}")
    @loads_cached()
    def export_flow(spec_json: dict, directory: str, run_key: str) -> dict[str, Any]:
        # As migrate_vm: the settings and the vCenter block are loaded before the export,
        # in the run's block cache, so the export's own loads are answered from it.
        spec = VmSpec.model_validate(spec_json)
        settings = MigrationSettings.load(SETTINGS_BLOCK)
        VCenter.load(VCENTER_BLOCK)
        cpu0, faults0 = self_cpu(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.monotonic()
        result = run_export(VCENTER_BLOCK, spec, Path(directory), settings, run_key)
        seconds = time.monotonic() - t0
        return {
            "seconds": seconds,
            "cpu": self_cpu() - cpu0,
            "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0,
            "disks": [d.model_dump(mode="json") for d in result.disks],
        }

    answer({"ready": True, "import_seconds": imported})
    for line in sys.stdin:
        try:
            cmd = json.loads(line)
            if cmd["cmd"] == "noop":
                t0 = time.monotonic()
                noop_flow()
                answer({"seconds": time.monotonic() - t0})
            elif cmd["cmd"] == "export":
                directory = _fresh(Path(cmd["directory"]))
                t0 = time.monotonic()
                got = export_flow(cmd["spec"], str(directory), cmd["run_key"])
                got["flow_seconds"] = time.monotonic() - t0
                got["files"] = sorted(p.name for p in directory.iterdir())
                _settle(directory)
                answer(got)
            else:
                answer({"error": f"unknown command {cmd['cmd']!r}"})
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which stops
            answer({"error": f"{type(exc).__name__}: {exc}"})
    return 0


def run_v2k(worker: Worker, scenario: Scenario, out: Path, run_key: str, meter: Meter) -> Run:
    snap, t0 = meter.snap(), time.monotonic()
    got = worker.call("export", spec=scenario.spec, directory=str(out), run_key=run_key)
    used, window = meter.since(snap), time.monotonic() - t0
    disks = got["disks"]
    for disk, size, sha in zip(disks, scenario.sizes, scenario.sha256, strict=True):
        if disk["bytes"] != size or disk["sha256"] != sha:
            raise RuntimeError(
                f"v2k: {disk['file_name']} has {disk['bytes']} bytes and sha256 "
                f"{disk['sha256'][:12]}, expected {size} and {sha[:12]}"
            )
    if "vm.ovf" not in got["files"]:
        raise RuntimeError("v2k: the export wrote no descriptor")
    return Run(
        "v2k",
        got["seconds"],
        sum(d["bytes"] for d in disks),
        got["cpu"],
        used["sim"],
        used["others"],
        window,
        extra={
            "flow_seconds": got["flow_seconds"],
            "per_disk": [d["bytes"] / d["seconds"] for d in disks],
            "disk_seconds": [d["seconds"] for d in disks],
            "hwm_kib": got["hwm_kib"],
            "page_faults": got["faults"],
        },
    )


# ---------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------


@dataclass
class Throughput:
    """All runs of one scenario, by client."""

    key: str
    label: str
    disks: int
    wire_bytes: int
    virtual_bytes: int
    runs: dict[str, list[Run]] = field(default_factory=dict)

    def best(self, client: str) -> Run:
        return max(self.runs[client], key=lambda r: r.rate)

    def median_rate(self, client: str) -> float:
        return statistics.median(r.rate for r in self.runs[client])

    def best_raw(self) -> Run:
        return max((self.best(c) for c in ("curl", "httpx")), key=lambda r: r.rate)

    @property
    def ratio(self) -> float:
        return self.best("v2k").rate / self.best_raw().rate

    def round_ratios(self) -> list[float]:
        """v2k's rate over the faster raw client's in each round: runs close in time share
        the machine's load, so these move less with other work than the best-of ratio."""
        return [
            v.rate / max(c.rate, h.rate)
            for v, c, h in zip(self.runs["v2k"], self.runs["curl"], self.runs["httpx"], strict=True)
        ]

    def transfer_rate(self) -> float:
        """v2k's best rate from the task results: the downloads alone, without the lease,
        the descriptor and Prefect's own start and end of the export task."""
        return max(r.bytes / max(r.extra["disk_seconds"]) for r in self.runs["v2k"])


@dataclass
class Memory:
    disk_bytes: int
    wire_bytes: int
    import_rss_kib: int
    noop_hwm_kib: int
    export_hwm_kib: int
    seconds: float  # run_export
    disk_seconds: float  # the download, from the task result

    @property
    def peak_mib(self) -> float:
        return self.export_hwm_kib / 1024


@dataclass
class Result:
    plan: Plan
    machine: dict[str, Any]
    throughput: list[Throughput]
    memory: Memory | None
    seconds: float
    setup_seconds: float
    load: tuple[float, float] = (0.0, 0.0)  # 1-minute load average at the start and the end

    def summary_lines(self) -> list[str]:
        lines = []
        small = " [smaller than the target's sizes: indicative only]"
        for t in self.throughput:
            v2k, raw = t.best("v2k"), t.best_raw()
            against = "best raw" if t.disks == 1 else f"{t.disks} raw clients at once, best"
            ok = t.ratio >= TARGET_RATIO
            lines.append(
                f"export {t.label}: v2k {mib(v2k.rate):.0f} MiB/s vs {against} ({raw.client}) "
                f"{mib(raw.rate):.0f} MiB/s = {t.ratio:.2f} (target >= {TARGET_RATIO:.2f}) "
                f"{'PASS' if ok else 'FAIL'}" + (small if t.wire_bytes < t.disks * GiB else "")
            )
            transfer = t.transfer_rate()
            outside = [r.seconds - max(r.extra["disk_seconds"]) for r in t.runs["v2k"]]
            rounds = t.round_ratios()
            lines.append(
                f"  (downloads alone, from the task results: {mib(transfer):.0f} MiB/s = "
                f"{transfer / raw.rate:.2f} of the raw client; run_export spent "
                f"{min(outside):.2f}-{max(outside):.2f} s outside the downloads; "
                f"round by round, v2k over the faster raw client of its round: "
                f"{min(rounds):.2f}-{max(rounds):.2f}, median {statistics.median(rounds):.2f})"
            )
        if self.memory:
            m = self.memory
            ok = m.peak_mib <= TARGET_RSS_MIB
            lines.append(
                f"export peak RSS ({human(m.disk_bytes)} disk, {human(m.wire_bytes)} on the "
                f"wire): worker {m.peak_mib:.0f} MiB (target <= {TARGET_RSS_MIB:.0f} MiB) "
                f"{'PASS' if ok else 'FAIL'}; Prefect baseline {m.import_rss_kib / 1024:.0f} MiB "
                f"after imports, {m.noop_hwm_kib / 1024:.0f} MiB after a no-op flow run"
                + (small if m.disk_bytes < 4 * GiB else "")
            )
        return lines

    @property
    def passed(self) -> bool:
        ok = all(t.ratio >= TARGET_RATIO for t in self.throughput)
        return ok and (self.memory is None or self.memory.peak_mib <= TARGET_RSS_MIB)

    def table(self) -> str:
        """The detailed table, as Markdown."""
        rows = [
            "| scenario | client | best MiB/s | median MiB/s | runs | client CPU s/GiB "
            "| simulator CPU s/GiB | other work | notes |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for t in self.throughput:
            for client in ("curl", "httpx", "v2k"):
                runs = t.runs[client]
                best = t.best(client)
                gib = best.bytes / GiB
                notes = ""
                if client == "v2k":
                    per_disk = ", ".join(f"{mib(r):.0f}" for r in best.extra["per_disk"])
                    notes = (
                        f"per disk (task results) {per_disk} MiB/s; "
                        f"run_export {best.seconds:.2f} s, longest disk "
                        f"{max(best.extra['disk_seconds']):.2f} s; "
                        f"parent flow {best.extra['flow_seconds']:.2f} s"
                    )
                else:
                    notes = f"{best.seconds:.2f} s"
                rows.append(
                    f"| {t.label} ({human(t.wire_bytes)} on the wire) | {client} "
                    f"| {mib(best.rate):.0f} | {mib(t.median_rate(client)):.0f} | {len(runs)} "
                    f"| {best.client_cpu / gib:.2f} | {best.server_cpu / gib:.2f} "
                    f"| {others_share(best):.0%} | {notes} |"
                )
        return "\n".join(rows)

    def to_json(self) -> dict[str, Any]:
        return {
            "plan": asdict(self.plan),
            "machine": self.machine,
            "seconds": self.seconds,
            "setup_seconds": self.setup_seconds,
            "load_average": list(self.load),
            "throughput": [
                {
                    "scenario": t.label,
                    "wire_bytes": t.wire_bytes,
                    "virtual_bytes": t.virtual_bytes,
                    "ratio": t.ratio,
                    "runs": {
                        c: [asdict(r) | {"rate": r.rate} for r in rs] for c, rs in t.runs.items()
                    },
                }
                for t in self.throughput
            ],
            "memory": asdict(self.memory) if self.memory else None,
            "summary": self.summary_lines(),
            "passed": self.passed,
        }


def worker_env(api_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PREFECT_API_URL=api_url,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PYTHONUNBUFFERED="1",
    )
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _others(run: Run) -> str:
    share = others_share(run)
    return f" (other work on the machine: {share:.0%} of the CPUs)" if share >= 0.05 else ""


def others_share(run: Run) -> float:
    """Share of the machine's CPUs that processes outside the bench used during a run."""
    return run.others_cpu / ((os.cpu_count() or 1) * (run.window or run.seconds))


def measure_throughput(
    sim, worker: Worker, meter: Meter, scenario: Scenario, label: str, repeats: int, work: Path
) -> Throughput:
    ca = Path(sim.ca_cert)
    t = Throughput(
        key=scenario.key,
        label=label,
        disks=len(scenario.sizes),
        wire_bytes=scenario.wire_bytes,
        virtual_bytes=scenario.virtual_bytes,
        runs={"curl": [], "httpx": [], "v2k": []},
    )
    out = work / "out"
    header = work / "cookie-header"
    for r in range(repeats):
        with lease_urls(sim, scenario.moref) as (urls, cookie):
            fd = os.open(header, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(f"Cookie: {cookie}\n")
            for client, fn in (("curl", run_curl), ("httpx", run_httpx)):
                run = fn(urls, _fresh(out), ca, header, scenario.sizes, meter)
                _settle(out)
                t.runs[client].append(run)
                log(f"{label} round {r + 1}: {client} {mib(run.rate):.0f} MiB/s{_others(run)}")
            header.unlink()
        run = run_v2k(worker, scenario, out, f"bench-{scenario.key}-{r}", meter)
        t.runs["v2k"].append(run)
        log(f"{label} round {r + 1}: v2k {mib(run.rate):.0f} MiB/s{_others(run)}")
    return t


def measure_memory(env: dict[str, str], scenario: Scenario, work: Path) -> Memory:
    """A fresh worker: baseline after imports, after a no-op flow, then the big export."""
    with Worker(env, work / "worker-memory.log") as worker:
        noop = worker.call("noop")
        got = worker.call(
            "export", spec=scenario.spec, directory=str(work / "out-big"), run_key="bench-big"
        )
        for disk, size, sha in zip(got["disks"], scenario.sizes, scenario.sha256, strict=True):
            if disk["bytes"] != size or disk["sha256"] != sha:
                raise RuntimeError("v2k: the big disk export does not match its source")
        return Memory(
            disk_bytes=scenario.virtual_bytes,
            wire_bytes=scenario.wire_bytes,
            import_rss_kib=worker.ready["rss_kib"],
            noop_hwm_kib=noop["hwm_kib"],
            # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so it would count
            # the forked image of this (big) process before the worker's exec.
            export_hwm_kib=got["hwm_kib"],
            seconds=got["seconds"],
            disk_seconds=got["disks"][0]["seconds"],
        )


def run(
    plan: Plan,
    workdir: Path | None = None,
    *,
    memory: bool = True,
    throughput: bool = True,
) -> Result:
    """Run the export benchmark and return its figures; everything started is stopped."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    from testbed.vcsim import VcSim

    started = time.monotonic()
    load_start = os.getloadavg()[0]
    if load_start > 0.5:
        log(f"load average {load_start:.2f}: other work on this machine skews the figures")
    own_dir = workdir is None
    work = Path(workdir or tempfile.mkdtemp(prefix="v2k-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    log(f"plan {plan.name}; work directory {work}")
    try:
        info = machine(work)
        with VcSim(work / "vcsim", model={"lease_timeout": 600}) as sim:
            scenarios = build_scenarios(sim, plan)
            log("starting the Prefect server (prefect_test_harness)")
            with prefect_test_harness(server_startup_timeout=120):
                save_blocks(sim)
                env = worker_env(PREFECT_API_URL.value())
                setup_seconds = time.monotonic() - started
                results = []
                if throughput:
                    # Ours: the simulator, the Prefect server (uvicorn) and the worker.
                    meter = Meter(sim.pid)
                    meter.pids.update(child_pids("uvicorn"))
                    with Worker(env, work / "worker-throughput.log") as worker:
                        meter.pids.add(worker.proc.pid)
                        worker.call("noop")  # the parent flow's own start-up, once
                        for key, label in (
                            ("one", "1 disk"),
                            ("many", f"{plan.many_count} disks"),
                        ):
                            results.append(
                                measure_throughput(
                                    sim, worker, meter, scenarios[key], label, plan.repeats, work
                                )
                            )
                mem = None
                if memory:
                    log(f"memory: exporting the {human(plan.big_disk)} disk in a fresh worker")
                    mem = measure_memory(env, scenarios["big"], work)
        return Result(
            plan,
            info,
            results,
            mem,
            time.monotonic() - started,
            setup_seconds,
            (load_start, os.getloadavg()[0]),
        )
    finally:
        if own_dir:
            shutil.rmtree(work, ignore_errors=True)


def report(result: Result) -> str:
    m = result.machine
    lines = [
        "",
        f"machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, "
        f"hypervisor {m['hypervisor']}, kernel {m['kernel']}, {m['os']}, {m['filesystem']}",
        f"versions: Python {m['python']}, prefect {m['prefect']}, httpx {m['httpx']}, "
        f"{m['openssl']}, {m['curl']}",
        f"plan {result.plan.name}: best of {result.plan.repeats} runs per client; "
        f"bench took {result.seconds:.0f} s (setup {result.setup_seconds:.0f} s); "
        f"load average {result.load[0]:.2f} at the start, {result.load[1]:.2f} at the end",
        "",
        result.table(),
        "",
    ]
    if result.memory:
        mm = result.memory
        lines.append(
            f"memory: worker RSS {mm.import_rss_kib / 1024:.0f} MiB after imports, peak "
            f"{mm.noop_hwm_kib / 1024:.0f} MiB after a no-op flow, peak "
            f"{mm.peak_mib:.0f} MiB after exporting {human(mm.wire_bytes)}: run_export "
            f"{mm.seconds:.1f} s ({mib(mm.wire_bytes / mm.seconds):.0f} MiB/s), the download "
            f"{mm.disk_seconds:.1f} s ({mib(mm.wire_bytes / mm.disk_seconds):.0f} MiB/s)"
        )
        lines.append("")
    lines += result.summary_lines()
    return "\n".join(lines)


def add_arguments(parser) -> None:
    parser.add_argument(
        "--quick", action="store_true", help="small disks (128 MiB, 4 x 128 MiB, 512 MiB)"
    )
    parser.add_argument("--repeats", type=int, help="runs per client (default 5, quick 2)")
    parser.add_argument("--disk-size", help="size of each throughput disk, e.g. 2GiB")
    parser.add_argument("--big-size", help="size of the memory disk, e.g. 8GiB")
    parser.add_argument("--only", choices=("throughput", "memory"), help="one figure only")
    parser.add_argument("--workdir", type=Path, help="keep the work files here (default: temp)")
    parser.add_argument("--json", type=Path, help="write every run as JSON to this file")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")


def run_from_args(args) -> int:
    from testbed.inventory import parse_size

    plan = QUICK if args.quick else FULL
    changes: dict[str, Any] = {}
    if args.repeats:
        changes["repeats"] = args.repeats
    if args.disk_size:
        changes["one_disk"] = changes["many_disk"] = parse_size(args.disk_size)
    if args.big_size:
        changes["big_disk"] = parse_size(args.big_size)
    if changes:
        plan = Plan(**(asdict(plan) | changes | {"name": plan.name + "+custom"}))
    result = run(
        plan,
        args.workdir,
        memory=args.only in (None, "memory"),
        throughput=args.only in (None, "throughput"),
    )
    return bench.finish(args, result, report(result))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "worker":
        sys.exit(_worker_main(int(sys.argv[2])))
    sys.exit(bench.main(sys.modules[__name__], "python -m bench export", sys.argv[1:]))
