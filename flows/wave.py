"""The `migrate-wave` flow: many VMs, one migrate-vm subflow each, at most N at a time.

Caps that hold across every wave and worker are Prefect global concurrency limits
(`flows/limits.py`): VMs in flight per source ESXi host (Forklift's default of 20) and
conversions and imports at once per KVM host.

The wave creates the limits it needs when they are missing (and sets them when
`per_esxi_host` / `per_kvm_host` are given); change them in the UI under Concurrency.

A wave file (YAML) lists the VMs, with optional per-VM overrides, and may set the
wave's parameters (the flow's own parameters win):

    vcenter: prod-vc
    cluster: kvm-prod
    temporary_storage: scratch
    settings: default
    max_in_flight: 4
    vms:
      - web-01
      - vm: /DC1/vm/Prod/db-01
        target_name: db01
        convert_host: kvm1
        import_host: kvm2
        verify_boot: true
"""

from __future__ import annotations

import re
import time
from contextlib import nullcontext
from fnmatch import fnmatch
from pathlib import Path
from typing import Literal

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.logging import get_logger
from prefect.runtime import flow_run
from prefect.states import Failed
from pydantic import BaseModel, ConfigDict, Field, field_validator

from blocks import KvmCluster, VCenter
from blocks.cache import loads_cached
from flows.limits import ensure_limits, limit_name, slot
from flows.migrate import migrate_vm
from tasks import vcenter as vc
from tasks.errors import retry_condition
from tasks.models import MigrationRequest, libvirt_name

MIGRATE_DEPLOYMENT = "migrate-vm/migrate-vm"
DEFAULT_MAX_IN_FLIGHT = 4
DEFAULT_PER_ESXI_HOST = 20
DEFAULT_PER_KVM_HOST = 2

log = get_logger("v2k.wave")


class WaveVm(BaseModel):
    """One VM of a wave, with what differs from the wave's common parameters."""

    model_config = ConfigDict(extra="forbid")

    vm: str = Field(description="Name, inventory path, moref or instance UUID.")
    target_name: str | None = None
    export_host: str | None = None
    convert_host: str | None = None
    import_host: str | None = None
    verify_boot: bool | None = None

    @field_validator("target_name")
    @classmethod
    def _valid_target(cls, value: str | None) -> str | None:
        # Checked when the wave file is read, not halfway through the wave.
        if value is not None and value != libvirt_name(value):
            raise ValueError(
                f"{value!r} is not a valid domain name (for example {libvirt_name(value)!r})"
            )
        return value


class WaveFile(BaseModel):
    """A wave file: common parameters and the VMs."""

    model_config = ConfigDict(extra="forbid")

    vcenter: str | None = None
    cluster: str | None = None
    temporary_storage: str | None = None
    settings: str | None = None
    name_glob: str | None = None
    max_in_flight: int | None = Field(default=None, ge=1)
    verify_boot: bool | None = None
    vms: list[WaveVm] = Field(default_factory=list)

    @field_validator("vms", mode="before")
    @classmethod
    def _names_as_items(cls, value):
        return [{"vm": v} if isinstance(v, str) else v for v in value or []]

    @classmethod
    def load(cls, path: str | Path) -> WaveFile:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as exc:
            raise ValueError(f"cannot read wave file {path}: {exc}") from None
        return cls.model_validate(data)


class ResolvedVm(BaseModel):
    """A wave entry found in vCenter: which VM it is and on which ESXi host it runs."""

    item: WaveVm
    name: str | None = None
    moref: str | None = None
    esxi_host: str | None = None
    error: str | None = None


class VmOutcome(BaseModel):
    """How one VM of the wave went: a line of the summary table."""

    vm: str
    result: Literal["completed", "failed"]
    seconds: float
    bytes_exported: int | None = None
    esxi_host: str | None = None
    convert_host: str | None = None
    import_host: str | None = None
    domain_name: str | None = None
    flow_run_id: str | None = None
    error: str | None = None


class WaveSummary(BaseModel):
    """What a wave did, VM by VM."""

    total: int
    completed: int
    failed: int
    seconds: float
    max_in_flight: int
    vms: list[VmOutcome]

    @property
    def failed_vms(self) -> list[str]:
        return [v.vm for v in self.vms if v.result == "failed"]


class WaveFailed(Exception):
    """Some VMs of a wave failed; the others went on. `summary` has every VM's outcome."""

    def __init__(self, summary: WaveSummary) -> None:
        names = ", ".join(summary.failed_vms[:10])
        more = "" if summary.failed <= 10 else f" and {summary.failed - 10} more"
        super().__init__(
            f"{summary.failed} of {summary.total} VM(s) failed: {names}{more}"
            f" ({summary.completed} migrated)"
        )
        self.summary = summary

    def __reduce__(self):
        return (type(self), (self.summary,))


def _error_text(exc: BaseException | None, fallback: str) -> str:
    """The error in one line for the summary table (the VM's own run has all of it)."""
    text = f"{type(exc).__name__}: {exc}" if exc is not None else fallback
    text = " ".join(text.split())
    return text if len(text) <= 300 else text[:297] + "..."


def find_vms(vcenter: str, items: list[WaveVm], name_glob: str | None) -> list[ResolvedVm]:
    """Find each VM (and the VMs whose name matches the glob) and its ESXi host, in one
    vCenter session. A VM that cannot be found gets an error instead; duplicates go."""
    block = VCenter.load(vcenter)
    with block.connect() as si:
        dc = vc.datacenter(si, block.datacenter)
        host_names = {
            obj._moId: props["name"]
            for obj, props in vc.retrieve(si, dc.hostFolder, vc.vim.HostSystem, ["name"])
        }
        vms = {
            obj._moId: (props.get("name"), props.get("runtime.host"))
            for obj, props in vc.retrieve(
                si, dc.vmFolder, vc.vim.VirtualMachine, ["name", "runtime.host"]
            )
        }
        wanted = list(items)
        if name_glob:
            names = [name for name, _ in vms.values()]
            for moref, (name, _) in sorted(vms.items(), key=lambda kv: str(kv[1][0])):
                if name and fnmatch(name, name_glob):
                    # By name where it is unique: run names and logs read better.
                    wanted.append(WaveVm(vm=name if names.count(name) == 1 else moref))
        resolved: list[ResolvedVm] = []
        seen: set[str] = set()
        for item in wanted:
            try:
                moref = vc.find_vm(si, dc, item.vm)._moId
            except vc.SourceError as exc:
                resolved.append(ResolvedVm(item=item, error=_error_text(exc, "")))
                continue
            if moref in seen:
                log.warning("%s is listed twice in the wave: migrated once", item.vm)
                continue
            seen.add(moref)
            name, host = vms.get(moref, (None, None))
            resolved.append(
                ResolvedVm(
                    item=item,
                    name=name,
                    moref=moref,
                    esxi_host=host_names.get(host._moId) if host is not None else None,
                )
            )
    return resolved


@task(
    name="resolve-vms",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=retry_condition,
)
def resolve_vms(vcenter: str, items: list[WaveVm], name_glob: str | None) -> list[ResolvedVm]:
    """`find_vms` as a task, its warnings in the run's log."""
    return find_vms(vcenter, items, name_glob)


_SUMMARY_FIELDS = {
    "domain_name": re.compile(r"^\| domain \| `([^`]+)`", re.M),
    "import_host": re.compile(r"^\| import host \| (\S+) \|", re.M),
    "convert_host": re.compile(r"^\| convert host \| (\S+) \|", re.M),
    "bytes_exported": re.compile(r"^\| bytes exported \| (\d+) \|", re.M),
}


def _from_summary_artifact(flow_run_id: str) -> dict:
    """Domain, hosts and bytes of a migrate-vm run on another worker, read from its
    summary artifact (its return value is not persisted); {} when not found."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    try:
        with get_client(sync_client=True) as client:
            artifacts = client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])
                )
            )
    except Exception:  # noqa: BLE001 - the table then lacks these columns, nothing worse
        return {}
    text = next((str(a.data) for a in artifacts if (a.key or "").startswith("migration-")), "")
    found = {k: m.group(1) for k, rx in _SUMMARY_FIELDS.items() if (m := rx.search(text))}
    if "bytes_exported" in found:
        found["bytes_exported"] = int(found["bytes_exported"])
    return found


def _run_on_a_worker(request: MigrationRequest, deployment: str, key: str):
    """Start the migrate-vm deployment for the VM (any worker of the pool takes it) and
    wait for it; its final state and flow run id."""
    from prefect.deployments import run_deployment

    run = run_deployment(
        deployment,
        parameters={"request": request.model_dump(mode="json", exclude_none=True)},
        idempotency_key=key,
        poll_interval=3,
        as_subflow=True,
    )
    return run.state, str(run.id)


@task(name="migrate-one", task_run_name="vm-{label}", cache_policy=NO_CACHE)
def migrate_one(
    request: MigrationRequest,
    label: str,
    esxi_host: str | None,
    deployment: str | None = None,
    key: str | None = None,
) -> VmOutcome:
    """Run migrate-vm for one VM, holding a slot of its ESXi host's limit: as a subflow
    here, or as a run of `deployment` that any worker may take (scale-out).

    Never raises: a failed migration is an outcome, so the wave goes on.
    """
    started = time.monotonic()
    logger = get_run_logger()
    with slot(limit_name("esxi", esxi_host)) if esxi_host else nullcontext():
        logger.info("%s: starting migrate-vm (ESXi host %s)", label, esxi_host or "unknown")
        if deployment:
            state, run_id = _run_on_a_worker(request, deployment, key or "")
        else:
            state = migrate_vm(request, return_state=True)
            run_id = str(state.state_details.flow_run_id or "") or None
    seconds = time.monotonic() - started
    if state.is_completed():
        if deployment:
            details = _from_summary_artifact(run_id)
        else:
            result = state.result()
            details = dict(
                bytes_exported=result.bytes_exported,
                convert_host=result.convert_host,
                import_host=result.import_host,
                domain_name=result.domain_name,
            )
        return VmOutcome(
            vm=label,
            result="completed",
            seconds=seconds,
            esxi_host=esxi_host,
            flow_run_id=run_id,
            **details,
        )
    try:
        exc = state.result(raise_on_failure=False)
    except Exception as read_error:  # noqa: BLE001 - the state message is enough then
        exc = read_error
    error = _error_text(exc if isinstance(exc, BaseException) else None, state.message or "")
    logger.error("%s failed: %s", label, error)
    return VmOutcome(
        vm=label,
        result="failed",
        seconds=seconds,
        esxi_host=esxi_host,
        flow_run_id=run_id,
        error=error or state.name,
    )


def _interleave(resolved: list[ResolvedVm]) -> list[ResolvedVm]:
    """Round-robin over ESXi hosts, so the first VMs in flight do not all wait for one."""
    by_host: dict[str | None, list[ResolvedVm]] = {}
    for r in resolved:
        by_host.setdefault(r.esxi_host, []).append(r)
    queues = list(by_host.values())
    ordered = []
    while any(queues):
        for q in queues:
            if q:
                ordered.append(q.pop(0))
    return ordered


def _table(summary: WaveSummary) -> list[dict]:
    return [
        {
            "VM": v.vm,
            "result": v.result,
            "seconds": round(v.seconds, 1),
            "bytes": v.bytes_exported if v.bytes_exported is not None else "",
            "ESXi host": v.esxi_host or "",
            "convert host": v.convert_host or "",
            "import host": v.import_host or "",
            "domain": v.domain_name or "",
            "flow run": v.flow_run_id or "",
            "error": v.error or "",
        }
        for v in summary.vms
    ]


@flow(name="migrate-wave")
def migrate_wave(
    vms: list[str] | None = None,
    wave_file: str | None = None,
    name_glob: str | None = None,
    vcenter: str | None = None,
    cluster: str | None = None,
    temporary_storage: str | None = None,
    settings: str | None = None,
    max_in_flight: int | None = None,
    verify_boot: bool | None = None,
    per_esxi_host: int | None = None,
    per_kvm_host: int | None = None,
    via_deployment: bool = False,
) -> WaveSummary:
    """Migrate many VMs, at most `max_in_flight` at once; one VM's failure stops no other.

    Args:
        vms: VMs by name, inventory path, moref or instance UUID.
        wave_file: A YAML wave file on the worker (VMs with per-VM overrides, and
            defaults for the parameters below).
        name_glob: Also every VM of the datacenter whose name matches this glob.
        vcenter, cluster, temporary_storage, settings: Block names, as for migrate-vm.
        max_in_flight: VMs migrating at once in this wave (default 4).
        verify_boot: Boot each migrated domain (a wave file entry may say otherwise).
        per_esxi_host: Set the global limit of VMs in flight per ESXi host (default: leave
            it as it is, or create it with 20).
        per_kvm_host: Set the global limit of conversions/imports per KVM host (default:
            leave it, or create it with 2).
        via_deployment: Run each VM as a run of the migrate-vm deployment, so that every
            worker of the pool takes its share (scale-out), instead of as a subflow in
            this process. Each VM's run has the idempotency key
            `wave-<wave run id>-<attempt>-<moref>`: a wave run that is restarted does not
            start a VM twice.

    Returns the summary. When some VMs failed, the run ends Failed with the count in its
    message (a direct call raises `WaveFailed`, which carries the summary).
    """
    logger = get_run_logger()
    started = time.monotonic()
    plan = WaveFile.load(wave_file) if wave_file else WaveFile()
    vcenter = vcenter or plan.vcenter
    cluster = cluster or plan.cluster
    temporary_storage = temporary_storage or plan.temporary_storage
    settings = settings or plan.settings
    name_glob = name_glob or plan.name_glob
    in_flight = max_in_flight or plan.max_in_flight or DEFAULT_MAX_IN_FLIGHT
    boot = verify_boot if verify_boot is not None else bool(plan.verify_boot)
    missing = [
        n
        for n, v in (
            ("vcenter", vcenter),
            ("cluster", cluster),
            ("temporary_storage", temporary_storage),
        )
        if not v
    ]
    if missing:
        raise ValueError(f"set {', '.join(missing)} (as parameters or in the wave file)")
    items = [WaveVm(vm=v) for v in vms or []] + plan.vms
    if not items and not name_glob:
        raise ValueError("no VM in the wave: give vms, a wave_file or a name_glob")

    resolved = resolve_vms(vcenter, items, name_glob)
    if not resolved:
        raise ValueError(f"no VM matches {name_glob!r}")
    esxi_hosts = sorted({r.esxi_host for r in resolved if r.esxi_host})
    kvm_hosts = KvmCluster.load(cluster).hosts
    ensure_limits(
        {limit_name("esxi", h): per_esxi_host for h in esxi_hosts}
        | {limit_name("kvm", h): per_kvm_host for h in kvm_hosts},
        {limit_name("esxi", h): DEFAULT_PER_ESXI_HOST for h in esxi_hosts}
        | {limit_name("kvm", h): DEFAULT_PER_KVM_HOST for h in kvm_hosts},
    )
    total = len(resolved)
    logger.info(
        "wave of %d VM(s), %d at a time, from ESXi host(s) %s to cluster %s",
        total,
        in_flight,
        ", ".join(esxi_hosts) or "?",
        cluster,
    )
    progress_id = create_progress_artifact(
        0.0, key="wave-progress", description=f"0 of {total} VM(s) done"
    )
    outcomes: list[tuple[int, VmOutcome]] = []

    def record(outcome: VmOutcome, index: int) -> None:
        outcomes.append((index, outcome))
        failed = sum(o.result == "failed" for _, o in outcomes)
        text = f"{len(outcomes)} of {total} VM(s) done, {failed} failed"
        update_progress_artifact(progress_id, 100.0 * len(outcomes) / total, description=text)
        logger.info("%s: %s; %s", outcome.vm, outcome.result, text)

    deployment = MIGRATE_DEPLOYMENT if via_deployment else None
    wave_run = flow_run.get_id() or "local"
    attempt = flow_run.get_run_count() or 1
    position = {id(r): i for i, r in enumerate(resolved)}
    pending = []
    for r in _interleave(resolved):
        label = r.name or r.item.vm
        if r.error:
            record(
                VmOutcome(vm=label, result="failed", seconds=0.0, error=r.error), position[id(r)]
            )
            continue
        request = MigrationRequest(
            vcenter=vcenter,
            vm=r.item.vm,
            cluster=cluster,
            temporary_storage=temporary_storage,
            settings=settings,
            target_name=r.item.target_name,
            export_host=r.item.export_host,
            convert_host=r.item.convert_host,
            import_host=r.item.import_host,
            verify_boot=r.item.verify_boot if r.item.verify_boot is not None else boot,
        )
        key = f"wave-{wave_run}-{attempt}-{r.moref}"
        pending.append((position[id(r)], request, label, r.esxi_host, key))

    running = {}
    # The VMs' runs (subflows in this process) share one block cache: each block is read
    # from the API once for the wave, not once per VM (blocks/cache.py).
    with loads_cached():
        finished = None
        while pending or running or finished:
            while pending and len(running) < in_flight:
                index, request, label, esxi_host, key = pending.pop(0)
                future = migrate_one.submit(request, label, esxi_host, deployment, key)
                running[future] = index
            # A finished VM is recorded once its slot is refilled: the progress artifact
            # is an API call that would otherwise keep the slot empty meanwhile.
            if finished:
                record(*finished)
                finished = None
            if running:
                done = next(as_completed(list(running)))
                finished = (done.result(), running.pop(done))

    outcomes = [o for _, o in sorted(outcomes, key=lambda pair: pair[0])]
    failed = sum(o.result == "failed" for o in outcomes)
    summary = WaveSummary(
        total=total,
        completed=total - failed,
        failed=failed,
        seconds=time.monotonic() - started,
        max_in_flight=in_flight,
        vms=outcomes,
    )
    create_table_artifact(
        _table(summary),
        key="wave-summary",
        description=f"{summary.completed} of {total} VM(s) migrated, {failed} failed "
        f"in {summary.seconds:.0f} s",
    )
    if failed:
        error = WaveFailed(summary)
        logger.error("%s", error)
        return Failed(message=str(error), data=error)
    logger.info("wave done: %d VM(s) migrated in %.0f s", total, summary.seconds)
    return summary
