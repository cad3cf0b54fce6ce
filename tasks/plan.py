"""The dry run: everything migrate-vm would check and decide, without moving a byte."""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

from pydantic import BaseModel, Field

from blocks import KvmCluster, MigrationSettings, TemporaryStorage
from tasks import kvm, vmpath
from tasks.convert import virt_v2v_argv
from tasks.hosts import HostSelectionError, choose_hosts, probe_hosts
from tasks.models import HostChoice, HostProbe, MigrationRequest, VmSpec
from tasks.preflight import (
    Concern,
    check,
    disk_pools,
    host_rules,
    storage_rules,
    temporary_need,
)
from tasks.progress import human_bytes


class NicPlan(BaseModel):
    label: str
    mac: str
    portgroup: str | None
    target: str | None = Field(description="`network:NAME` or `bridge:NAME`; None: unmapped.")


class SpacePlan(BaseModel):
    place: str
    needed: int
    free: int | None


class Plan(BaseModel):
    """What a migration would do and what stands in its way."""

    vm: str
    spec: VmSpec
    target_name: str
    concerns: list[Concern]
    hosts: HostChoice | None
    probes: list[HostProbe]
    nics: list[NicPlan]
    space: list[SpacePlan]
    commands: list[str]

    @property
    def critical(self) -> list[Concern]:
        return [c for c in self.concerns if c.severity == "critical"]


def make_plan(request: MigrationRequest) -> Plan:
    """Run every rule of migrate-vm's preflight and host selection, and describe the run.

    Raises:
        SourceError: the VM cannot be found (nothing else can be planned then).
    """
    checked = check(request)
    spec, target = checked.spec, checked.target_name
    concerns = list(checked.concerns)
    cluster = KvmCluster.load(request.cluster)
    hosts = cluster.load_hosts()
    storage = TemporaryStorage.load(request.temporary_storage)
    settings = MigrationSettings.load(request.settings) if request.settings else MigrationSettings()

    use_ovftool = not settings.force_ms_export
    probes = probe_hosts(hosts, scratch=None if storage.shared else storage.host_dir)
    choice = None
    try:
        choice = choose_hosts(
            probes,
            windows=spec.is_windows,
            convert=request.convert_host,
            import_=request.import_host,
            export=request.export_host,
            use_ovftool=use_ovftool,
            local_storage=not storage.shared,
        )
    except HostSelectionError as exc:
        concerns.append(
            Concern(
                rule="hosts",
                severity="critical",
                message=str(exc),
                fix="install what is missing on a host, or name another host",
            )
        )
    if choice is not None:
        concerns += host_rules(spec, next(p for p in probes if p.name == choice.import_))
        concerns += storage_rules(spec, storage, cluster, hosts, choice, use_ovftool=use_ovftool)

    nics = []
    for nic in spec.nics:
        try:
            kind, name = kvm.network_target(nic, cluster.network_map, cluster.default_network)
            mapped = f"{kind}:{name}"
        except KeyError:
            mapped = None
        nics.append(NicPlan(label=nic.label, mac=nic.mac, portgroup=nic.portgroup, target=mapped))

    space = [_temporary_space(spec, storage, choice)]
    if choice is not None:
        space.append(_pool_space(hosts[choice.import_], cluster.storage_pool, spec))

    return Plan(
        vm=spec.inventory_path,
        spec=spec,
        target_name=target,
        concerns=concerns,
        hosts=choice,
        probes=probes,
        nics=nics,
        space=space,
        commands=_commands(spec, target, storage, cluster, settings, choice),
    )


def _temporary_space(spec: VmSpec, storage, choice: HostChoice | None) -> SpacePlan:
    """Room in temporary storage: on the worker when shared, on the convert host when local."""
    needed = temporary_need(spec, storage)
    if storage.shared:
        free = (
            shutil.disk_usage(storage.worker_path).free
            if Path(storage.worker_path).is_dir()
            else None
        )
        return SpacePlan(place=f"temporary storage {storage.worker_path}", needed=needed, free=free)
    convert = choice.convert if choice else "<no host>"
    probe = next((p for p in choice.probes if p.name == convert), None) if choice else None
    return SpacePlan(
        place=f"temporary storage {storage.host_dir} on {convert} (local)",
        needed=needed,
        free=probe.scratch_free_bytes if probe else None,
    )


def _pool_space(host, pool: str, spec: VmSpec) -> SpacePlan:
    free = None
    try:
        conn = kvm.open_connection(host.get_libvirt_uri())
        try:
            free = kvm.pool_free_bytes(conn, pool)
        finally:
            conn.close()
    except Exception:  # noqa: BLE001 - shown as unknown; the rules report the cause
        pass
    return SpacePlan(
        place=f"pool {pool} on {host.address}", needed=spec.total_disk_bytes, free=free
    )


def _commands(spec, target, storage, cluster, settings, choice) -> list[str]:
    run = storage.run_dir("<run>")
    host_run = storage.path_on_host(run)
    steps = []
    if spec.power_state == "poweredOn":
        steps.append(f"CloneVM_Task {spec.moref} -> v2k-clone-<run> (powered off, thin)")
    if choice is not None and choice.export:
        threads = settings.ovftool_threads(len(spec.disks))
        argv = ["ovftool", "--acceptAllEulas"]
        argv += [f"--parallelThreads={threads}"] if threads is not None else []
        argv += [f"vi://USER@VCENTER/{'/'.join(spec.inventory_names)}", f"{host_run}/export"]
        steps.append(f"on {choice.export}: {shlex.join(argv)} (password typed on stdin)")
    else:
        threads = settings.download_threads(len(spec.disks))
        steps.append(
            f"ExportVm {spec.moref}: {len(spec.disks)} disk(s) over HTTPS to {run}/export, "
            f"{threads} at a time; OvfManager.CreateDescriptor -> vm.ovf"
        )
    argv = virt_v2v_argv(
        f"{host_run}/export", f"{host_run}/out", target, verbose=settings.virt_v2v_verbose
    )
    where = choice.convert if choice else "<no host>"
    env = "VIRTIO_WIN=<virtio-win> " if spec.is_windows else ""
    steps.append(f"on {where}: {env}{shlex.join(argv)}")
    pools = disk_pools(spec, cluster)
    into = choice.import_ if choice else "<no host>"
    # Local storage: the qcow2s are on the host only, so they are copied there.
    fill = "qemu-img convert on the host into it" if not storage.shared else "upload"
    for index, (disk, pool) in enumerate(zip(spec.disks, pools, strict=True)):
        steps.append(
            f"on {into}: create volume {pool}/{kvm.volume_name(target, index, '<run>')} "
            f"({human_bytes(disk.capacity_bytes)}), {fill}, qemu-img check"
        )
    steps.append(
        f"on {into}: define domain {target}: {spec.num_cpu} vCPU, {spec.memory_mb} MiB, "
        f"{spec.firmware}, {len(spec.nics)} NIC(s) with the source MACs"
    )
    return steps


def plan_markdown(plan: Plan) -> str:
    """The plan as a markdown report (the artifact, and `v2k plan`'s text)."""
    verdict = (
        f"**refused**: {len(plan.critical)} critical concern(s)"
        if plan.critical
        else "**ready to migrate**"
    )
    lines = [f"# Plan for {vmpath.markdown(plan.vm)} -> `{plan.target_name}`", "", verdict, ""]
    lines += ["| severity | rule | concern | fix |", "|---|---|---|---|"]
    lines += [f"| {c.severity} | {c.rule} | {c.message} | {c.fix} |" for c in plan.concerns]
    if not plan.concerns:
        lines.append("| - | - | none | - |")
    lines += ["", "## Hosts", ""]
    lines += [f"- {r}" for r in (plan.hosts.reasons if plan.hosts else ["none chosen"])]
    lines += [f"- {p.name}: {p.can_convert(plan.spec.is_windows) or 'able'}" for p in plan.probes]
    lines += ["", "## NICs", "", "| NIC | MAC | port group | lands on |", "|---|---|---|---|"]
    lines += [
        f"| {n.label} | {n.mac} | {n.portgroup} | {n.target or 'UNMAPPED'} |" for n in plan.nics
    ]
    lines += ["", "## Space", "", "| where | needed | free |", "|---|---|---|"]
    lines += [
        f"| {s.place} | {human_bytes(s.needed)} | "
        f"{human_bytes(s.free) if s.free is not None else 'unknown'} |"
        for s in plan.space
    ]
    lines += ["", "## Steps", ""] + [f"{i}. `{c}`" for i, c in enumerate(plan.commands, 1)]
    return "\n".join(lines) + "\n"
