"""Inventory benchmark: `list_vms` (one paged retrieval) against attribute-by-attribute reads.

What runs, all on this machine, over TLS on loopback:

- the test bed's vCenter simulator (`testbed.vcsim.VcSim`) with `--vms` VMs (default
  1,000) made by the simulator's own model (`model={"vm": N}`): one cluster, each VM
  with a disk and a NIC on a distributed port group.
- v2k: `tasks.inventory.list_vms`, the code behind the `inventory` flow and
  `v2k inventory`: one container view, one `RetrievePropertiesEx` (paged), paths put
  together locally, the answer read straight from the SOAP XML. For comparison, the
  same function reading the answer through pyvmomi's objects (`parser="pyvmomi"`).
- naive: the same VmSummary built the way straightforward pyvmomi code does it, through
  managed object attributes (`vm.name`, `vm.runtime.powerState`, `vm.config.guestId`,
  `vm.config.hardware.numCPU`, walking `vm.parent` for the folder path, `vm.network`
  for distributed port group names...): every attribute is a round trip. It runs over
  a sample of `--sample` VMs (default 100, spread over the inventory) and is scaled
  linearly to all VMs, which the report says; `--sample 0` runs it over all of them.
  All three must give the same rows (for the sampled VMs), or the benchmark fails.

Each is run `--repeats` times (default 3), interleaved round by round so that load from
elsewhere on the machine hits all of them alike; the figures are the best runs. Round
trips are counted on the connection.

Targets (issue 5): at most 5 s for 1,000 VMs, and at least 20 times faster than the
attribute-by-attribute loop measured in the same run.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import bench

TARGET_SECONDS = 5.0
TARGET_SPEEDUP = 20.0


@dataclass
class Result:
    vms: int
    list_vms_runs: list[float]
    pyvmomi_runs: list[float]
    naive_vms: int
    naive_runs: list[float]
    rows_match: bool
    list_vms_calls: dict[str, int]
    naive_calls_per_vm: float
    startup_seconds: float

    @property
    def best(self) -> float:
        return min(self.list_vms_runs)

    @property
    def scaled(self) -> bool:
        return self.naive_vms < self.vms

    @property
    def naive_total(self) -> float:
        """The attribute loop's best time for all VMs (measured, or scaled from the sample)."""
        return min(self.naive_runs) * self.vms / self.naive_vms

    @property
    def speedup(self) -> float:
        return self.naive_total / self.best

    @property
    def time_ok(self) -> bool:
        return self.best <= TARGET_SECONDS * self.vms / 1000

    @property
    def speedup_ok(self) -> bool:
        return self.speedup >= TARGET_SPEEDUP and self.rows_match

    @property
    def passed(self) -> bool:
        return self.time_ok and self.speedup_ok

    def to_json(self) -> dict:
        return asdict(self) | {
            "best_seconds": self.best,
            "naive_total_seconds": self.naive_total,
            "scaled": self.scaled,
            "speedup": self.speedup,
            "passed": self.passed,
        }


def list_vms_naive(si, dc, vms: list) -> list:
    """VmSummary rows for `vms`, read attribute by attribute (one round trip each)."""
    from pyVmomi import vim

    from tasks.models import VmSummary

    dc_path = "/" + dc.name  # the simulator's datacenter sits in the root folder
    rows = []
    for vm in vms:
        parts = []
        node = vm.parent
        while not isinstance(node, vim.Datacenter):
            parts.append(node.name)
            node = node.parent
        folder = "/".join(reversed(parts[:-1]))  # parts[-1] is the "vm" folder
        devices = vm.config.hardware.device
        disks = [d for d in devices if isinstance(d, vim.vm.device.VirtualDisk)]
        nics = []
        for nic in (d for d in devices if isinstance(d, vim.vm.device.VirtualEthernetCard)):
            backing = nic.backing
            if hasattr(backing, "port"):
                portgroup = backing.port.portgroupKey
                for net in vm.network:
                    if isinstance(net, vim.dvs.DistributedVirtualPortgroup):
                        if net.key == backing.port.portgroupKey:
                            portgroup = net.name
            else:
                portgroup = backing.deviceName
            nics.append(f"{nic.macAddress.lower()}@{portgroup}")
        snapshot = vm.snapshot
        rows.append(
            VmSummary(
                name=vm.name,
                moref=vm._moId,
                path="/".join(p for p in (f"{dc_path}/vm", folder, vm.name) if p),
                folder=folder,
                power_state=str(vm.runtime.powerState),
                guest_id=vm.config.guestId,
                guest_full_name=vm.config.guestFullName,
                num_cpu=vm.config.hardware.numCPU,
                memory_mb=vm.config.hardware.memoryMB,
                disks=len(disks),
                disk_bytes=sum(d.capacityInBytes or d.capacityInKB * 1024 for d in disks),
                nics=nics,
                firmware=vm.config.firmware,
                instance_uuid=vm.config.instanceUuid,
                snapshot_count=_count(snapshot.rootSnapshotList) if snapshot else 0,
                tools_status=str(vm.summary.guest.toolsStatus),
            )
        )
    return rows


def _count(trees) -> int:
    return sum(1 + _count(t.childSnapshotList) for t in trees or [])


class _Calls:
    """Counts the vSphere calls (round trips) made on a connection, by method name.

    Both ways in: pyvmomi's own calls and the inventory's direct SOAP calls.
    """

    def __init__(self, stub) -> None:
        self.stub = stub
        self.calls: Counter[str] = Counter()

    def __enter__(self) -> _Calls:
        import tasks.inventory as inventory

        self._invoke, self._raw = self.stub.InvokeMethod, inventory._invoke_raw

        def invoke(mo, info, args, *rest):
            self.calls[info.wsdlName] += 1
            return self._invoke(mo, info, args, *rest)

        def raw(stub, mo, method, args):
            self.calls[method] += 1
            return self._raw(stub, mo, method, args)

        self.stub.InvokeMethod = invoke
        inventory._invoke_raw = raw
        return self

    def __exit__(self, *exc) -> None:
        import tasks.inventory as inventory

        self.stub.InvokeMethod = self._invoke
        inventory._invoke_raw = self._raw


def run(vms: int = 1000, repeats: int = 3, sample: int = 100, workdir: Path | None = None):
    """Start the simulator, then measure round by round: list_vms, list_vms with pyvmomi's
    reader, and the attribute loop over the sample (best of `repeats` each)."""
    from pyVmomi import vim

    from tasks import vcenter as vc
    from tasks.inventory import list_vms
    from testbed.vcsim import VcSim

    with tempfile.TemporaryDirectory(prefix="v2k-bench-inventory-") as tmp:
        started = time.monotonic()
        with VcSim(Path(workdir or tmp) / "vcsim", model={"vm": vms}) as sim:
            startup = time.monotonic() - started
            with sim.connect() as si:
                dc = vc.datacenter(si, None)
                view = si.content.viewManager.CreateContainerView(
                    dc.vmFolder, [vim.VirtualMachine], True
                )
                try:
                    all_vms = sorted(view.view, key=lambda v: int(v._moId.split("-")[1]))
                finally:
                    view.DestroyView()
                # A sample spread over the whole inventory, not just its first VMs.
                step = max(1, len(all_vms) // sample) if sample else 1
                picked = all_vms[::step][: sample or None]
                runs, pyvmomi_runs, naive_runs = [], [], []
                for _ in range(repeats):
                    with _Calls(si._stub) as calls:
                        t0 = time.perf_counter()
                        rows = list_vms(si, dc)
                        runs.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    reference = list_vms(si, dc, parser="pyvmomi")
                    pyvmomi_runs.append(time.perf_counter() - t0)
                    with _Calls(si._stub) as naive_calls:
                        t0 = time.perf_counter()
                        naive = list_vms_naive(si, dc, picked)
                        naive_runs.append(time.perf_counter() - t0)
    if len(rows) != vms:
        raise RuntimeError(f"list_vms found {len(rows)} VMs, expected {vms}")
    by_moref = {r.moref: r for r in rows}
    match = rows == reference and all(by_moref.get(n.moref) == n for n in naive)
    return Result(
        vms=vms,
        list_vms_runs=runs,
        pyvmomi_runs=pyvmomi_runs,
        naive_vms=len(picked),
        naive_runs=naive_runs,
        rows_match=match,
        list_vms_calls=dict(calls.calls),
        naive_calls_per_vm=sum(naive_calls.calls.values()) / len(picked),
        startup_seconds=startup,
    )


def report(r: Result) -> str:
    ok = {True: "PASS", False: "FAIL"}
    target = TARGET_SECONDS * r.vms / 1000
    best_naive = min(r.naive_runs)
    naive = (
        f"{best_naive:.2f} s for a sample of {r.naive_vms} VMs, scaled linearly to "
        f"{r.naive_total:.1f} s for {r.vms}"
        if r.scaled
        else f"{r.naive_total:.1f} s for all {r.vms} VMs"
    )
    calls = r.list_vms_calls
    retrievals = calls.get("RetrievePropertiesEx", 0) + calls.get("ContinueRetrievePropertiesEx", 0)

    def runs(values: list[float]) -> str:
        return ", ".join(f"{s:.2f}" for s in values)

    return "\n".join(
        [
            f"# inventory benchmark ({platform.node()}, Python {platform.python_version()}, "
            f"{os.cpu_count()} CPUs)",
            f"simulator with {r.vms} VMs started in {r.startup_seconds:.1f} s",
            f"list_vms: {runs(r.list_vms_runs)} s; {sum(calls.values())} round trips in all, "
            f"{retrievals} of them PropertyCollector retrieval(s)",
            f"list_vms reading the answer through pyvmomi objects: {runs(r.pyvmomi_runs)} s",
            f"attribute access: {runs(r.naive_runs)} s; best {naive}; "
            f"{r.naive_calls_per_vm:.0f} round trips per VM",
            f"same rows from all three: {'yes' if r.rows_match else 'NO'}",
            f"inventory {r.vms} VMs: {r.best:.1f} s (target <= {target:g} s) {ok[r.time_ok]}",
            f"speed-up vs attribute access: {r.speedup:.0f}x "
            f"(target >= {TARGET_SPEEDUP:g}x) {ok[r.speedup_ok]}",
        ]
    )


def add_arguments(parser) -> None:
    parser.add_argument("--vms", type=int, default=1000, help="VMs in the simulator")
    parser.add_argument("--repeats", type=int, default=3, help="list_vms runs (best counts)")
    parser.add_argument(
        "--sample",
        type=int,
        default=100,
        help="VMs read attribute by attribute, scaled to all (0: all of them)",
    )
    parser.add_argument("--workdir", type=Path, help="keep the simulator's files here")
    parser.add_argument("--json", type=Path, help="write the figures as JSON to this file")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")


def run_from_args(args) -> int:
    result = run(args.vms, args.repeats, args.sample, args.workdir)
    return bench.finish(args, result, report(result))


if __name__ == "__main__":
    sys.exit(bench.main(sys.modules[__name__], "python -m bench.inventory", sys.argv[1:]))
