"""Orchestration benchmark: what v2k itself costs per VM, and a wave of 100 small VMs.

What runs, all on this machine:

- a test bed in slot 3 (`testbed.bed.TestBed`): the vCenter simulator with an inventory
  of its own (`--vms` + `--repeats` + 1 powered-off VMs, each with one 1 MiB synthetic
  disk and one NIC), two KVM hosts (sshd in namespaces of their own), each with its own
  libvirtd (pool and networks named `v2k3-...`; the domains are named after the VMs,
  `v2k3-orch-...`).
- on each KVM host, first on its PATH, the virt-v2v stand-in `bench/virt_v2v_standin.py`:
  real virt-v2v refuses disks without an OS, and this bench measures orchestration, not
  conversion. It keeps virt-v2v's command line, output files and progress events.
- a Prefect server (`prefect server start`) on PostgreSQL (`--database sqlite` for the
  default SQLite), in its own processes.
- the worker: this process runs the flows, as a Prefect worker's flow run process would.
  The flows are v2k's, unchanged: `migrate_vm` (management export through the NFC lease,
  virt-v2v over SSH, libvirt import; no boot check) and `migrate_wave`.

Figures:

- overhead per VM: `migrate_vm` on one VM, `--repeats` times after a warm-up run. Wall
  time of the call, minus the external time that v2k records in each stage
  (`StageReport.external_seconds`): the SSH probes of select_hosts (run at once: the
  longest), the disk download(s) of the export, every command on the convert host
  (virt-v2v, its output checks, SSH session included), the volume upload(s) and
  `qemu-img check` of the import. vCenter and libvirt API calls (preflight's reads, the
  lease, the descriptor, the domain definition) count as orchestration. The median run
  is the figure; target at most 3 s.
- wave: `migrate_wave` with `--vms` VMs (default 100) and `max_in_flight=10`, in this
  process (one worker). The KVM host caps (`per_kvm_host`) are set to 10, so only
  max_in_flight limits the wave. Per-VM work is the median wall time of `migrate_vm`
  alone (the overhead runs): the time one VM takes when nothing else runs, which is what
  10 workers-slots in parallel could at best divide by 10. Ideal = VMs x that / 10;
  the figure is the wave's wall time over the ideal; target at most 1.2.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

import bench
from bench.export import log, machine, machine_busy, self_cpu

TARGET_OVERHEAD = 3.0
TARGET_WAVE_RATIO = 1.2
SLOT = 3
PREFIX = f"v2k{SLOT}-orch"  # domain names start with the slot's libvirt prefix
DISK_SIZE = 1024 * 1024
ROOT = Path(__file__).resolve().parent.parent
STANDIN = ROOT / "bench" / "virt_v2v_standin.py"


def inventory(names: list[str]) -> dict[str, Any]:
    """A test bed inventory (testbed/inventory.yaml format) with one small VM per name."""
    vms = [
        {
            "name": name,
            "folder": "Bench",
            "guest_id": "debian12_64Guest",
            "power": "poweredOff",
            "memory_mb": 512,
            "instance_uuid": f"5003be03-0000-4000-8000-{i:012d}",
            # One seed for all: one synthetic VMDK is made and uploaded for each VM.
            "disks": [{"size": DISK_SIZE, "datastore": "LocalDS_0", "seed": 7}],
            # A MAC range of this bench only, apart from the default inventory's.
            "nics": [{"mac": f"00:50:56:3b:{i // 256:02x}:{i % 256:02x}", "network": "VM Network"}],
        }
        for i, name in enumerate(names, 1)
    ]
    dc = {
        "name": "DC0",
        "clusters": [{"name": "DC0_C0", "hosts": ["DC0_C0_H0", "DC0_C0_H1"]}],
        "datastores": [{"name": "LocalDS_0"}],
        "networks": {"standard": ["VM Network"]},
        "folders": ["Bench"],
        "vms": vms,
    }
    return {"version": 1, "datacenters": [dc]}


def install_standin(bed) -> None:
    """Put the virt-v2v stand-in first on every bench host's PATH (their own bin dirs)."""
    for host in bed.hosts.hosts:
        tool = host.bin_dir / "virt-v2v"
        tool.write_text(
            "#!/bin/sh\n# Stand-in for virt-v2v, orchestration bench only: see "
            f'{STANDIN}\nexec {sys.executable} -I -S {STANDIN} "$@"\n'
        )
        tool.chmod(0o755)


def remove_domains(bed, names: list[str]) -> None:
    """Undefine the bench's domains and delete their volumes (names are `v2k3-orch-*`), on
    every host (each has its own libvirtd)."""
    from tasks import kvm

    for lv in bed.libvirt.values():
        conn = kvm.open_connection(lv.uri)
        try:
            for name in names:
                if name.startswith(PREFIX) and kvm.domain_exists(conn, name):
                    kvm.remove_migrated_domain(conn, name)
        finally:
            conn.close()


@contextlib.contextmanager
def prefect_server(home: Path, database: str):
    """A Prefect server of its own (PostgreSQL or SQLite), this process pointed at it."""
    from deployments.serve import LocalPrefect

    postgres = None
    if database == "postgresql":
        from deployments.testing import LocalPostgres

        postgres = LocalPostgres().start()
    local = LocalPrefect(home, database_url=postgres.url if postgres else None)
    try:
        local.start(timeout=180)
        with local.settings():
            yield local, postgres.proc.pid if postgres else None
    finally:
        local.stop()
        if postgres:
            postgres.stop()


def pids(bed, local, pg_pid: int | None) -> dict[str, int]:
    """The roots of the process trees that do the work besides the worker: the Prefect
    server (with PostgreSQL's, started beside it), the simulator, each host's sshd (its
    sessions run the commands). The hosts' libvirtds are left out, as when one libvirtd was
    shared with other work, so the figures stay comparable."""
    found = {"prefect server": local.server.pid, "vcsim": bed.vcsim.pid}
    found |= {f"sshd {h.name}": h.pid for h in bed.hosts.hosts}
    return found | ({"postgresql": pg_pid} if pg_pid else {})


def run_worker(local, work: Path, params: dict[str, Any]) -> dict[str, Any]:
    """Run the flows in a worker process of their own, as a Prefect worker's flow run
    process: PREFECT_API_URL in its environment from the start (threads that do not
    inherit Prefect's settings context, such as fabric's output readers that report the
    virt-v2v progress, read it from there). Returns what the worker measured."""
    import subprocess

    (work / "worker-params.json").write_text(json.dumps(params))
    env = local.env() | {"PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    # Prefect's console lines of 100 VMs would bury the bench's own: warnings and errors
    # only on the console. Every log line still goes to the API, as in production.
    for handler in ("CONSOLE", "CONSOLE_FLOW_RUNS", "CONSOLE_TASK_RUNS"):
        env[f"PREFECT_LOGGING_HANDLERS_{handler}_LEVEL"] = "WARNING"
    log_path = work / "worker.log"
    with log_path.open("ab") as out:
        done = subprocess.run(
            [sys.executable, "-m", "bench.orchestration", "worker", str(work)],
            env=env,
            cwd=ROOT,
            stdout=out,
            stdin=subprocess.DEVNULL,
            timeout=3600,
        )
    answer = work / "worker-result.json"
    if done.returncode or not answer.exists():
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"the worker exited {done.returncode}:\n{tail}")
    return json.loads(answer.read_text())


class Calls:
    """Counts, in this process, Prefect API requests (by method and path, ids folded),
    block loads by type, SSH connections (fabric/paramiko) and libvirt connections."""

    def __init__(self) -> None:
        import re
        from collections import Counter

        import httpx
        import libvirt
        import paramiko
        from prefect.blocks.core import Block

        self.counts: Counter[str] = Counter()
        ids = re.compile(r"/[0-9a-f]{8}-[0-9a-f-]{27}|/name/[^/]+|/slug/[^/]+")

        def api(send):
            def wrapped(client, request, *args, **kwargs):
                if "/api/" in request.url.path:  # not the disk downloads
                    path = ids.sub("/{}", request.url.path.split("/api", 1)[-1])
                    self.counts[f"api {request.method} {path}"] += 1
                return send(client, request, *args, **kwargs)

            return wrapped

        def counted(key, fn):
            def wrapped(*args, **kwargs):
                name = key(*args) if callable(key) else key
                self.counts[name] += 1
                return fn(*args, **kwargs)

            return wrapped

        httpx.Client.send = api(httpx.Client.send)
        original = httpx.AsyncClient.send

        async def async_send(client, request, *args, **kwargs):
            if "/api/" in request.url.path:
                path = ids.sub("/{}", request.url.path.split("/api", 1)[-1])
                self.counts[f"api {request.method} {path}"] += 1
            return await original(client, request, *args, **kwargs)

        httpx.AsyncClient.send = async_send
        paramiko.SSHClient.connect = counted("ssh connection", paramiko.SSHClient.connect)
        libvirt.open = counted("libvirt connection", libvirt.open)
        load = Block.load.__func__

        def block_load(cls, *args, **kwargs):
            self.counts[f"block load {cls.__name__}"] += 1
            return load(cls, *args, **kwargs)

        Block.load = classmethod(block_load)

    def snapshot(self) -> dict[str, int]:
        return dict(self.counts)


def tree_cpu(roots: dict[str, int]) -> dict[str, float]:
    """CPU seconds used so far by each named process tree (live processes plus the
    children they reaped), from /proc."""
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(stat.parent.name)
        parents[pid] = int(fields[1])
        cpu[pid] = sum(int(f) for f in fields[11:15]) / tick  # utime stime cutime cstime
    totals = {}
    for name, root in roots.items():
        total = 0.0
        for pid in cpu:
            node = pid
            while node > 1 and node != root:
                node = parents.get(node, 1)
            if node == root:
                total += cpu[pid]
        totals[name] = total
    return totals


def stage_profile(api: str, since: str, until: str) -> dict[str, dict[str, float]]:
    """Median and total seconds of each kind of task and flow run that started between
    `since` and `until` (ISO times), read back from the Prefect API."""
    import httpx

    durations: dict[str, list[float]] = {}
    for kind in ("task_runs", "flow_runs"):
        offset = 0
        while True:
            body = {
                kind: {"start_time": {"after_": since, "before_": until}},
                "limit": 200,
                "offset": offset,
            }
            page = httpx.post(f"{api}/{kind}/filter", json=body, timeout=60).json()
            for run in page:
                if run.get("start_time") and run.get("end_time"):
                    # Task runs are named NAME-xyz; flow runs by the flow their name shows.
                    name = run["name"].rsplit("-", 1)[0]
                    if kind == "flow_runs":
                        flow = run["name"].split("-", 1)[0]
                        name = f"flow {flow}-vm" if flow in ("migrate", "export") else "flow wave"
                    durations.setdefault(name, []).append(run["total_run_time"])
            if len(page) < 200:
                break
            offset += 200
    return {
        name: {"runs": len(d), "median": statistics.median(d), "total": sum(d)}
        for name, d in sorted(durations.items())
    }


def worker_main(work: Path) -> int:
    """The worker process: warm-up, the solo runs, then the wave; JSON into `work`."""
    from testbed.testing import request_for

    params = json.loads((work / "worker-params.json").read_text())
    blocks = params["blocks"]
    roots = params["pids"] | {"worker": os.getpid()}
    api = os.environ["PREFECT_API_URL"]
    calls = Calls()
    warmup = run_solo(request_for(blocks, params["warmup"]))
    solos = []
    calls0 = calls.snapshot()
    cpu0, since = tree_cpu(roots), _now()
    for name in params["solos"]:
        solos.append(run_solo(request_for(blocks, name)))
        log(f"{name}: wall {solos[-1].wall:.2f} s, external {solos[-1].external:.2f} s")
    cpu1, until = tree_cpu(roots), _now()
    result: dict[str, Any] = {
        "warmup": asdict(warmup),
        "solos": [asdict(s) for s in solos],
        "solo_cpu": {k: (cpu1[k] - cpu0[k]) / len(solos) for k in roots},
        "solo_profile": stage_profile(api, since, until),
        "solo_calls": {
            k: (v - calls0.get(k, 0)) / len(solos) for k, v in sorted(calls.snapshot().items())
        },
        "wave": None,
    }
    if params["wave"]:
        log(f"wave of {len(params['wave'])} VMs, {params['in_flight']} in flight")
        wave = run_wave(blocks, params["wave"], params["in_flight"])
        cpu2 = tree_cpu(roots)
        log(f"wave: {wave.wall:.1f} s, {wave.failed} failed")
        result["wave"] = asdict(wave)
        result["wave_cpu"] = {k: (cpu2[k] - cpu1[k]) / wave.vms for k in roots}
        result["wave_profile"] = stage_profile(api, until, _now())
    (work / "worker-result.json").write_text(json.dumps(result))
    return 0


@dataclass
class Solo:
    """One migrate_vm run on its own."""

    vm: str
    wall: float
    external: float
    stages: list[dict[str, Any]]

    @property
    def overhead(self) -> float:
        return self.wall - self.external


@dataclass
class Wave:
    vms: int
    max_in_flight: int
    wall: float
    completed: int
    failed: int
    per_vm: list[float]
    errors: list[str]
    busy_cores: float  # machine CPU busy during the wave, in cores
    worker_cpu: float  # CPU seconds of this process (the worker) during the wave


@dataclass
class Result:
    machine: dict[str, Any]
    database: str
    warmup: Solo
    solos: list[Solo]
    wave: Wave | None
    setup_seconds: float
    seconds: float
    load: tuple[float, float] = (0.0, 0.0)
    cpu: dict[str, dict[str, float]] = field(default_factory=dict)  # phase: tree: s per VM
    profile: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    calls: dict[str, float] = field(default_factory=dict)  # per solo run, in the worker

    def median(self, what: str) -> float:
        return statistics.median(getattr(s, what) for s in self.solos)

    @property
    def ideal(self) -> float:
        assert self.wave
        return self.wave.vms * self.median("wall") / self.wave.max_in_flight

    @property
    def ratio(self) -> float:
        assert self.wave
        return self.wave.wall / self.ideal

    @property
    def packing(self) -> float:
        """Wave wall time over the VMs' own in-wave durations packed perfectly into the
        slots: what the wave's scheduling costs, apart from the machine being shared."""
        assert self.wave
        return self.wave.wall / (sum(self.wave.per_vm) / self.wave.max_in_flight)

    @property
    def passed(self) -> bool:
        ok = self.median("overhead") <= TARGET_OVERHEAD
        return ok and (
            self.wave is None or (self.ratio <= TARGET_WAVE_RATIO and not self.wave.failed)
        )

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["summary"] = summary_lines(self)
        data["passed"] = self.passed
        return data


def _now() -> str:
    from datetime import UTC, datetime

    return datetime.now(UTC).isoformat()


def run_solo(request) -> Solo:
    from flows.migrate import migrate_vm

    started = time.monotonic()
    result = migrate_vm(request)
    wall = time.monotonic() - started
    return Solo(
        vm=request.vm,
        wall=wall,
        external=sum(s.external_seconds for s in result.stages),
        stages=[s.model_dump() for s in result.stages],
    )


def run_wave(blocks: dict[str, str], names: list[str], in_flight: int) -> Wave:
    from flows.wave import WaveFailed, migrate_wave

    busy0, cpu0, started = machine_busy(), self_cpu(), time.monotonic()
    try:
        summary = migrate_wave(
            vms=names,
            vcenter=blocks["vcenter"],
            cluster=blocks["cluster"],
            temporary_storage=blocks["scratch"],
            settings=blocks["settings"],
            max_in_flight=in_flight,
            per_kvm_host=in_flight,
        )
    except WaveFailed as exc:
        summary = exc.summary
    wall = time.monotonic() - started
    return Wave(
        vms=len(names),
        max_in_flight=in_flight,
        wall=wall,
        completed=summary.completed,
        failed=summary.failed,
        per_vm=[v.seconds for v in summary.vms],
        errors=sorted({v.error or "" for v in summary.vms if v.result == "failed"})[:5],
        busy_cores=(machine_busy() - busy0) / wall,
        worker_cpu=self_cpu() - cpu0,
    )


def run(
    vms: int = 100,
    repeats: int = 5,
    in_flight: int = 10,
    database: str = "postgresql",
    workdir: Path | None = None,
) -> Result:
    """Start the test bed and a Prefect server, run the solo migrations, then the wave."""
    from blocks import MigrationSettings
    from testbed.bed import TestBed

    started = time.monotonic()
    load_start = os.getloadavg()[0]
    own_dir = workdir is None
    work = Path(workdir or tempfile.mkdtemp(prefix="v2k-bench-orch-"))
    work.mkdir(parents=True, exist_ok=True)
    solo_names = [f"{PREFIX}-s{i}" for i in range(repeats + 1)]
    wave_names = [f"{PREFIX}-w{i:03d}" for i in range(vms)]
    inv = work / "inventory.yaml"
    inv.write_text(yaml.safe_dump(inventory(solo_names + wave_names), sort_keys=False))
    log(f"work directory {work}; {len(solo_names) + len(wave_names)} VMs; database {database}")
    try:
        info = machine(work)
        with TestBed(work / "bed", hosts=2, libvirt=True, inventory=inv, slot=SLOT) as bed:
            install_standin(bed)
            remove_domains(bed, solo_names + wave_names)  # left by an interrupted run
            log(f"test bed up in {time.monotonic() - started:.0f} s; starting Prefect")
            with prefect_server(work / "prefect", database) as (local, pg_pid):
                blocks = bed.save_blocks("orch")
                # The worker exports (no host has ovftool); say so rather than rely on it.
                MigrationSettings(force_ms_export=True).save(blocks["settings"], overwrite=True)
                setup = time.monotonic() - started
                log(f"set up in {setup:.0f} s; warm-up run, then {repeats} timed runs")
                try:
                    got = run_worker(
                        local,
                        work,
                        {
                            "blocks": blocks,
                            "warmup": solo_names[0],
                            "solos": solo_names[1:],
                            "wave": wave_names,
                            "in_flight": in_flight,
                            "pids": pids(bed, local, pg_pid),
                        },
                    )
                finally:
                    remove_domains(bed, solo_names + wave_names)
        return Result(
            machine=info,
            database=database,
            warmup=Solo(**got["warmup"]),
            solos=[Solo(**s) for s in got["solos"]],
            wave=Wave(**got["wave"]) if got["wave"] else None,
            setup_seconds=setup,
            seconds=time.monotonic() - started,
            load=(load_start, os.getloadavg()[0]),
            cpu={"solo": got["solo_cpu"], "wave": got.get("wave_cpu", {})},
            profile={"solo": got["solo_profile"], "wave": got.get("wave_profile", {})},
            calls=got["solo_calls"],
        )
    finally:
        if own_dir:
            shutil.rmtree(work, ignore_errors=True)


def summary_lines(r: Result) -> list[str]:
    ok = {True: "PASS", False: "FAIL"}
    overhead = r.median("overhead")
    lines = [
        f"orchestration overhead per VM (1 MiB disk): {overhead:.2f} s median of "
        f"{len(r.solos)} (wall {r.median('wall'):.2f} s - external {r.median('external'):.2f} s)"
        f" (target <= {TARGET_OVERHEAD:g} s) {ok[overhead <= TARGET_OVERHEAD]}"
    ]
    if r.wave:
        w = r.wave
        good = r.ratio <= TARGET_WAVE_RATIO and not w.failed
        lines.append(
            f"wave of {w.vms} VMs, max_in_flight={w.max_in_flight}, one worker: "
            f"{w.wall:.1f} s vs ideal {r.ideal:.1f} s ({w.vms} x {r.median('wall'):.2f} s / "
            f"{w.max_in_flight}) = {r.ratio:.2f} (target <= {TARGET_WAVE_RATIO:g}) {ok[good]}"
            + (f"; {w.failed} VM(s) FAILED" if w.failed else "")
        )
        lines.append(
            f"wave packing (information, no target): {w.wall:.1f} s vs the VMs' in-wave "
            f"durations / {w.max_in_flight} = {sum(w.per_vm) / w.max_in_flight:.1f} s "
            f"= {r.packing:.2f}"
        )
    return lines


def report(r: Result) -> str:
    m = r.machine
    lines = [
        "",
        f"machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, "
        f"kernel {m['kernel']}, {m['os']}; Python {m['python']}, prefect {m['prefect']}",
        f"Prefect server on {r.database}; bench took {r.seconds:.0f} s (setup "
        f"{r.setup_seconds:.0f} s); load average {r.load[0]:.2f} at the start, "
        f"{r.load[1]:.2f} at the end",
        f"warm-up run: wall {r.warmup.wall:.2f} s, external {r.warmup.external:.2f} s",
        "",
        "| run | wall s | external s | overhead s | per stage: wall / external s |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for i, s in enumerate(r.solos, 1):
        stages = ", ".join(
            f"{st['name']} {st['seconds']:.2f}/{st['external_seconds']:.2f}" for st in s.stages
        )
        lines.append(f"| {i} | {s.wall:.2f} | {s.external:.2f} | {s.overhead:.2f} | {stages} |")
    if r.wave:
        w = r.wave
        per_vm = sorted(w.per_vm)
        lines += [
            "",
            f"wave: {w.completed} completed, {w.failed} failed in {w.wall:.1f} s; per VM "
            f"(migrate-one task) median {statistics.median(per_vm):.1f} s, max {per_vm[-1]:.1f} s;"
            f" machine busy {w.busy_cores:.2f} of {m['cores']} cores, worker CPU "
            f"{w.worker_cpu:.0f} s ({w.worker_cpu / w.vms:.2f} s per VM)",
        ]
        lines += [f"  error: {e}" for e in w.errors]
    lines += ["", "CPU seconds per VM, by process tree (solo runs / wave):"]
    for tree, value in r.cpu.get("solo", {}).items():
        lines.append(f"  {tree}: {value:.2f} / {r.cpu.get('wave', {}).get(tree, 0.0):.2f}")
    solo, wave = r.profile.get("solo", {}), r.profile.get("wave", {})
    lines += ["", "| run | solo: runs, median s | wave: runs, median s |", "| --- | --- | --- |"]
    for name in sorted(set(solo) | set(wave)):
        a, b = solo.get(name), wave.get(name)
        cell = lambda x: f"{x['runs']}, {x['median']:.2f}" if x else "-"  # noqa: E731
        lines.append(f"| {name} | {cell(a)} | {cell(b)} |")
    api = sum(v for k, v in r.calls.items() if k.startswith("api "))
    blocks = sum(v for k, v in r.calls.items() if k.startswith("block load"))
    lines += [
        "",
        f"per solo run, in the worker: {api:.0f} Prefect API requests, {blocks:.0f} block "
        f"loads, {r.calls.get('ssh connection', 0):.0f} SSH connections (fabric), "
        f"{r.calls.get('libvirt connection', 0):.0f} libvirt connections",
    ]
    lines += [f"  {v:5.1f} {k}" for k, v in sorted(r.calls.items(), key=lambda kv: -kv[1])]
    lines += ["", *summary_lines(r)]
    return "\n".join(lines)


def add_arguments(parser) -> None:
    parser.add_argument("--vms", type=int, default=100, help="VMs in the wave (0: no wave)")
    parser.add_argument("--repeats", type=int, default=5, help="timed solo runs (median)")
    parser.add_argument("--max-in-flight", type=int, default=10, help="the wave's cap")
    parser.add_argument(
        "--database", choices=("postgresql", "sqlite"), default="postgresql",
        help="the Prefect server's database",
    )  # fmt: skip
    parser.add_argument("--workdir", type=Path, help="keep the work files here (default: temp)")
    parser.add_argument("--json", type=Path, help="write the figures as JSON to this file")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")


def run_from_args(args) -> int:
    result = run(args.vms, args.repeats, args.max_in_flight, args.database, args.workdir)
    return bench.finish(args, result, report(result))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "worker":
        sys.exit(worker_main(Path(sys.argv[2])))
    sys.exit(bench.main(sys.modules[__name__], "python -m bench orchestration", sys.argv[1:]))
