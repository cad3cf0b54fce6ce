"""The `migrate-vm` flow: one VM from VMware to KVM, stage by stage (see DESIGN.md)."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import FlowRun
from prefect.exceptions import MissingContextError
from prefect.logging.loggers import flow_run_logger
from prefect.runtime import flow_run, task_run

from blocks import (
    KvmCluster,
    KvmHost,
    MigrationSettings,
    TemporaryStorage,
    VCenter,
)
from blocks.cache import loads_cached
from flows.limits import existing_limits, limit_name, slot
from tasks import events, kvm, resume, ssh
from tasks import vcenter as vc
from tasks.cleanup import remove_tree, remove_tree_on_host
from tasks.convert import convert_vm
from tasks.errors import Refused, retry_condition
from tasks.export import run_export
from tasks.guestos import choose_osinfo
from tasks.hosts import HostSelectionError, choose_hosts, probe_hosts
from tasks.models import (
    ConvertedDisk,
    ConvertResult,
    ExportResult,
    HostChoice,
    ImportResult,
    MigrationRequest,
    MigrationResult,
    StageReport,
    VmSpec,
)
from tasks.ovftool import exported_from_manifest, exported_on_host, run_ovftool
from tasks.preflight import (
    Preflight,
    disk_pools,
    host_rules,
    load_blocks,
    preflight,
    refuse_critical,
    storage_rules,
)
from tasks.progress import Progress, artifact_key
from tasks.resume import resumable
from tasks.source import clone_for_export, clone_name, remove_clones
from tasks.ssh import shared_connections


def _staged(fn, settings: MigrationSettings, stage: str):
    policy = settings.policy(stage)
    return fn.with_options(
        retries=policy.retries,
        retry_delay_seconds=policy.retry_delay_seconds,
        timeout_seconds=policy.timeout_seconds if _can_interrupt() else None,
    )


def _can_interrupt() -> bool:
    """Whether Prefect's task timeout can stop a stage here: only on the main thread.

    Prefect interrupts a synchronous task with a signal, which only the main thread gets.
    In a thread (the runs of a wave), its timeout would fail a stage only once the stage
    had finished, and log a warning per task, five per VM. There the stage is bounded by
    v2k's own limits: the download deadline (the export's timeout), convert_timeout
    (virt-v2v and ovftool are killed on the host), and the timeouts of every vCenter,
    SSH and libvirt call.
    """
    return threading.current_thread() is threading.main_thread()


@task(name="preflight", cache_policy=NO_CACHE, retry_condition_fn=retry_condition)
def preflight_task(request: MigrationRequest) -> Preflight:
    # On a retry, domains this flow run defined are its own, not a name conflict; a first
    # try has none, and skips reading every domain's XML on every host.
    retried = flow_run.run_count > 1
    checked = preflight(request, flow_run_id=str(flow_run.get_id()) if retried else None)
    logger = get_run_logger()
    for warning in checked.warnings:
        logger.warning(warning)
    logger.info(
        "%s: %d vCPU, %d MiB, %s, %d disk(s) of %d bytes, %d NIC(s) -> %s",
        checked.spec.inventory_path,
        checked.spec.num_cpu,
        checked.spec.memory_mb,
        checked.spec.firmware,
        len(checked.spec.disks),
        checked.spec.total_disk_bytes,
        len(checked.spec.nics),
        checked.target_name,
    )
    return checked


@task(name="select-hosts", cache_policy=NO_CACHE, retry_condition_fn=retry_condition)
def select_hosts_task(
    request: MigrationRequest, spec: VmSpec, use_ovftool: bool = True
) -> HostChoice:
    cluster = KvmCluster.load(request.cluster)
    if not cluster.enabled:
        raise HostSelectionError(f"cluster {request.cluster!r} is disabled")
    storage = TemporaryStorage.load(request.temporary_storage)
    hosts = cluster.load_hosts()
    probes = probe_hosts(hosts, scratch=_local_scratch(storage))
    choice = choose_hosts(
        probes,
        windows=spec.is_windows,
        convert=request.convert_host,
        import_=request.import_host,
        export=request.export_host,
        use_ovftool=use_ovftool,
        local_storage=not storage.shared,
    )
    for reason in choice.reasons:
        get_run_logger().info("host %s", reason)
    import_probe = next(p for p in probes if p.name == choice.import_)
    refuse_critical(
        host_rules(spec, import_probe)
        + storage_rules(spec, storage, cluster, hosts, choice, use_ovftool=use_ovftool)
    )
    return choice


def _local_scratch(storage: TemporaryStorage) -> str | None:
    """The directory the host probes look at: local temporary storage lives on the hosts."""
    return None if storage.shared else storage.host_dir


@task(
    name="export-ovftool",
    retry_condition_fn=retry_condition,
    **resumable("spec.instance_uuid", "spec.change_version", "directory"),
)
def ovftool_export_task(
    request: MigrationRequest,
    spec: VmSpec,
    host_name: str,
    directory: str,
    settings: MigrationSettings,
    run_key: str,
    resume_token: str | None = None,
) -> ExportResult:
    """Export on a KVM host with ovftool into the temporary storage (shared, or local to
    that host, which is then the convert host too)."""
    storage = TemporaryStorage.load(request.temporary_storage)
    host = KvmHost.load(host_name)
    progress = Progress(artifact_key(run_key, "export"), f"ovftool export on {host_name}")
    with ssh.connection(host) as conn:
        ovf_dir = run_ovftool(
            conn,
            VCenter.load(request.vcenter),
            spec,
            target_dir=storage.path_on_host(directory),
            threads=settings.ovftool_threads(len(spec.disks)),
            timeout_seconds=settings.convert_timeout_seconds,
            env=host.env,
            on_percent=lambda p: progress.step(p, f"{p}%"),
        )
        if not storage.shared:
            # Only the host sees what it wrote: describe it from there.
            return exported_on_host(conn, ovf_dir, source_moref=spec.moref)
    return exported_from_manifest(Path(directory) / Path(ovf_dir).name, source_moref=spec.moref)


@task(
    name="convert",
    retry_condition_fn=retry_condition,
    **resumable("exported", "target", "out_dir"),
)
def convert_task(
    request: MigrationRequest,
    spec: VmSpec,
    exported: ExportResult,
    host_name: str,
    target: str,
    out_dir: str,
    settings: MigrationSettings,
    run_key: str,
    resume_token: str | None = None,
) -> ConvertResult:
    storage = TemporaryStorage.load(request.temporary_storage)
    logger = get_run_logger()
    progress = Progress(artifact_key(run_key, "convert"), f"convert {spec.name} on {host_name}")
    host_out = storage.path_on_host(out_dir)
    done, disks, xml = convert_vm(
        host_name,
        KvmHost.load(host_name),
        ova_dir=storage.path_on_host(exported.directory),
        out_dir=host_out,
        target=target,
        capacities=[d.capacity_bytes for d in spec.disks],
        windows=spec.is_windows,
        verbose=settings.virt_v2v_verbose,
        timeout_seconds=settings.convert_timeout_seconds,
        progress=progress,
        logger=logger,
    )
    guest = choose_osinfo(kvm.parse_v2v_xml(xml)["osinfo"], spec.guest_id)
    if guest.osinfo_id:
        logger.info("guest OS %s (from %s)", guest.osinfo_id, guest.source)
    if guest.note:
        logger.warning("guest OS: %s", guest.note)
    return ConvertResult(
        output_dir=out_dir,
        disks=[
            ConvertedDisk(path=str(Path(out_dir) / Path(p).name), virtual_size=v, actual_size=a)
            for p, v, a in disks
        ],
        domain_xml=xml,
        osinfo=guest.osinfo_id,
        host=host_name,
        seconds=done.seconds,
        warnings=done.warnings + ([f"guest OS: {guest.note}"] if guest.note else []),
        command_seconds=done.command_seconds,
    )


@task(
    name="import",
    retry_condition_fn=retry_condition,
    **resumable("converted", "target"),
)
def import_task(
    request: MigrationRequest,
    spec: VmSpec,
    converted: ConvertResult,
    host_name: str,
    target: str,
    run_key: str,
    resume_token: str | None = None,
) -> ImportResult:
    logger = get_run_logger()
    if flow_run.run_count > 1:
        # A retried run: an import that did not finish (the worker died in it) goes first.
        _remove_run_domains(request, str(flow_run.get_id() or ""), logger)
    cluster = KvmCluster.load(request.cluster)
    storage = TemporaryStorage.load(request.temporary_storage)
    host = KvmHost.load(host_name)
    nics = [
        (nic, *kvm.network_target(nic, cluster.network_map, cluster.default_network))
        for nic in spec.nics
    ]
    pools = disk_pools(spec, cluster)
    progress = Progress(artifact_key(run_key, "import"), f"import {target} on {host_name}")
    timings: dict[str, float] = {}
    try:
        conn = kvm.open_connection(host.get_libvirt_uri())
    except kvm.KvmImportError as exc:
        # The URI alone does not say which host block to look at; same kind of error.
        hint = "" if isinstance(exc, Refused) else " (is libvirtd running there?)"
        raise type(exc)(f"import host {host_name}: {exc}{hint}") from None
    try:
        if flow_run.run_count > 1 or task_run.run_count > 1:
            # An earlier try may have made a volume and failed before it could delete it.
            for leftover in kvm.remove_leftover_volumes(conn, target, pools):
                logger.warning("removed %s, left by an earlier try of this import", leftover)
        with ssh.connection(host) as host_conn:
            dom, volumes, dom_type = kvm.import_disks_and_define(
                conn,
                host_conn,
                target=target,
                spec=spec,
                sources=[(Path(d.path), d.virtual_size) for d in converted.disks],
                pools=pools,
                nics=nics,
                v2v_xml=converted.domain_xml,
                source_note={
                    "vm": spec.inventory_path,
                    "moref": spec.moref,
                    "instance-uuid": spec.instance_uuid or "",
                    "flow-run": str(flow_run.get_id() or ""),
                },
                on_progress=progress.bytes,
                wanted_type=host.domain_type,
                osinfo=converted.osinfo,
                # Local temporary storage: the disks are on this host only, copied there.
                on_host=not storage.shared,
                timings=timings,
            )
        result = ImportResult(
            domain_name=dom.name(),
            domain_uuid=dom.UUIDString(),
            host=host_name,
            pool=cluster.storage_pool,
            volumes=[f"{p}/{v}" for p, v in volumes],
            osinfo=converted.osinfo,
            domain_type=dom_type,
            upload_seconds=timings["upload"],
            check_seconds=timings["check"],
        )
    finally:
        conn.close()
    logger.info(
        "defined %s (%s, %s) with %d volume(s), osinfo %s",
        result.domain_name,
        result.domain_uuid,
        dom_type,
        len(volumes),
        result.osinfo,
    )
    return result


@task(name="verify-boot", cache_policy=NO_CACHE, retry_condition_fn=retry_condition)
def verify_task(host_name: str, domain: str, timeout: float) -> bool:
    logger = get_run_logger()
    conn = kvm.open_connection(KvmHost.load(host_name).get_libvirt_uri())
    try:
        kvm.boot_check(
            conn, domain, timeout, on_line=lambda line: logger.debug("console: %s", line)
        )
    finally:
        conn.close()
    logger.info("%s booted to its login prompt", domain)
    return True


@task(
    name="prepare-source",
    retry_condition_fn=retry_condition,
    **resumable("spec.instance_uuid", "run_id"),
)
def prepare_source_task(
    request: MigrationRequest, spec: VmSpec, run_id: str, resume_token: str | None = None
) -> VmSpec:
    """Clone a running VM, powered off, and hand back the clone's spec for the export.

    A retried run gets the clone it made before (persisted result), and the download of
    its disks goes on; a clone left half-made by a dead worker is removed first.
    """
    logger = get_run_logger()
    logger.warning(
        "%s is running: exporting a powered-off clone, which is crash-consistent", spec.name
    )
    vcenter = VCenter.load(request.vcenter)
    name = clone_name(run_id)
    with vcenter.connect() as si:
        dc = vc.datacenter(si, vcenter.datacenter)
        vm = vc.find_vm(si, dc, spec.moref)
        for moref in remove_clones(si, dc, name):
            logger.info("removed %s (%s), left unfinished by an earlier try", name, moref)
        try:
            clone = clone_for_export(si, vm, name, timeout=3600)
        except BaseException:
            remove_clones(si, dc, name)
            raise
        logger.info("cloned %s to %s (%s)", spec.name, name, clone._moId)
        return vc.read_spec(si, clone)


def cleanup_run(
    request: MigrationRequest,
    run_id: str,
    flow_run_id: str,
    failed: bool,
    clone: bool = True,
    logger: logging.Logger | logging.LoggerAdapter | None = None,
) -> None:
    """Remove what a run left: its clone and temporary files, and after a failure the
    domains (with their volumes) that it defined. Safe to call more than once.

    The flow calls it when it ends, its cancellation hook too (with the run's `logger`:
    the runner runs hooks outside the run, where get_run_logger fails), and `v2k cleanup`
    after a crash. `clone=False` (a run that ended well without cloning) skips the
    vCenter session that looks for a clone.
    """
    logger = logger or _logger()
    steps = [
        ("temporary files", lambda: _remove_run_dir(request, run_id, logger)),
        # What the stages persisted refers to what was just removed: not to be reused.
        ("the resume token", lambda: resume.forget(run_id)),
    ]
    if clone:
        steps.insert(0, ("the clone", lambda: _remove_clone(request, run_id, logger)))
    if failed:
        steps.append(("domains", lambda: _remove_run_domains(request, flow_run_id, logger)))
    if request.vcenter == _inline_block_name(run_id):
        steps.append(("the inline vCenter block", lambda: VCenter.delete(request.vcenter)))
    for what, step in steps:
        try:
            step()
        except Exception as exc:  # noqa: BLE001 - every step runs; each failure is reported
            logger.error("cleanup of %s failed: %s", what, exc)


def _remove_clone(request: MigrationRequest, run_id: str, logger) -> None:
    vcenter = VCenter.load(request.vcenter)
    with vcenter.connect() as si:
        removed = remove_clones(si, vc.datacenter(si, vcenter.datacenter), clone_name(run_id))
    for moref in removed:
        logger.info("removed the clone %s (%s)", clone_name(run_id), moref)


def _remove_run_dir(request: MigrationRequest, run_id: str, logger) -> None:
    storage = TemporaryStorage.load(request.temporary_storage)
    if storage.shared:
        remove_tree(Path(storage.run_dir(run_id)), Path(storage.worker_path))
    else:
        _remove_run_dir_on_hosts(request, storage, run_id, logger)


def _remove_run_dir_on_hosts(
    request: MigrationRequest, storage: TemporaryStorage, run_id: str, logger
) -> None:
    """Local temporary storage: remove the run's directory over SSH on every enabled host.

    Cleanup also runs from the crash and cancellation hooks, which do not know the host
    that was chosen, and the directory's name is the run's own, so every host is asked.

    Raises:
        RuntimeError: a host could not be reached or the removal failed (each is named;
            the other hosts are still cleaned).
    """
    path = storage.run_dir(run_id)
    failed = []
    for name, host in KvmCluster.load(request.cluster).load_hosts().items():
        if not host.enabled:
            continue
        try:
            with host.get_connection() as conn:
                if remove_tree_on_host(conn, path, storage.host_dir):
                    logger.info("removed %s on %s", path, name)
        except Exception as exc:  # noqa: BLE001 - every host is tried; failures are reported
            failed.append(f"{name}: {exc}")
    if failed:
        raise RuntimeError(f"{path} may be left on: " + "; ".join(failed))


def _remove_run_domains(request: MigrationRequest, flow_run_id: str, logger) -> None:
    seen: set[str] = set()
    for name, host in KvmCluster.load(request.cluster).load_hosts().items():
        try:
            uri = host.get_libvirt_uri()
            if uri in seen:
                continue
            seen.add(uri)
            conn = kvm.open_connection(uri)
        except Exception as exc:  # noqa: BLE001 - an unreachable host had no domain of ours
            logger.info("cleanup: host %s not reachable: %s", name, exc)
            continue
        try:
            for domain in kvm.run_domains(conn, flow_run_id):
                kvm.remove_domain_and_volumes(conn, domain)
                logger.info("rolled back: domain %s and its volumes on %s", domain, name)
        finally:
            conn.close()


def _reusable_export_dir(storage: TemporaryStorage, scope: str) -> Path:
    return Path(storage.worker_path) / "v2k-exports" / scope


def _inline_block_name(run_id: str) -> str:
    return f"v2k-inline-{run_id}"


def _by_block_name(request: MigrationRequest, run_id: str) -> MigrationRequest:
    """The request with an inline source replaced by the name of the run's transient block."""
    if request.vcenter_inline is None:
        return request
    return request.model_copy(
        update={"vcenter": _inline_block_name(run_id), "vcenter_inline": None}
    )


def _with_saved_source(request: MigrationRequest, run_id: str) -> MigrationRequest:
    """An inline source becomes a transient VCenter block for this run only, so the tasks
    refer to it by name like any other; cleanup_run deletes it."""
    if request.vcenter_inline is not None:
        request.vcenter_inline.to_block().save(_inline_block_name(run_id), overwrite=True)
    return _by_block_name(request, run_id)


def _logger() -> logging.Logger | logging.LoggerAdapter:
    """The run's logger in a flow or task, else v2k's own (`v2k cleanup`)."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("v2k.migrate")


def cleanup_flow_run(flow_run: FlowRun, logger: logging.Logger | None = None) -> None:
    """Everything `cleanup_run` removes after a failure, for a migrate-vm flow run read
    from the API: the cancellation hook, and `v2k cleanup` after a crash."""
    run_id = _run_id(str(flow_run.id))
    request = _by_block_name(
        MigrationRequest.model_validate(flow_run.parameters["request"]), run_id
    )
    cleanup_run(request, run_id, str(flow_run.id), failed=True, logger=logger)


def _cleanup_hook(flow, flow_run, state) -> None:
    """on_cancellation: the same cleanup as a failure inside the flow."""
    cleanup_flow_run(flow_run, flow_run_logger(flow_run, flow))


def _keep_for_resume(flow, flow_run, state) -> None:
    """on_crashed: the worker or its machine went away. What the run made (clone, partial
    export, conversion) is kept, so that a retry of this flow run goes on from there."""
    flow_run_logger(flow_run, flow).warning(
        "flow run %s crashed; its clone and temporary files are kept: retry the flow run "
        "(`v2k resume %s`) to go on from where it stopped, or remove them with "
        "`v2k cleanup %s`",
        flow_run.id,
        flow_run.id,
        flow_run.id,
    )


def _run_id(flow_run_id: str) -> str:
    return flow_run_id.replace("-", "")[:12]


def _summary(result: MigrationResult) -> str:
    rows = "\n".join(f"| {s.name} | {s.seconds:.1f} | {s.detail} |" for s in result.stages)
    sums = "\n".join(f"| {name} | `{digest}` |" for name, digest in result.checksums.items())
    return f"""# Migrated {result.vm}

| | |
|---|---|
| domain | `{result.domain_name}` ({result.domain_uuid}) |
| import host | {result.import_host} |
| convert host | {result.convert_host} |
| export | {result.export_host or "worker (management export)"} |
| guest OS (libosinfo) | {result.osinfo or "unknown"} |
| bytes exported | {result.bytes_exported} |
| boot check | {"passed" if result.booted else "not run" if result.booted is None else "failed"} |

| stage | seconds | detail |
|---|---|---|
{rows}

| exported file | sha256 |
|---|---|
{sums}
"""


@flow(
    name="migrate-vm",
    flow_run_name="migrate-{request.vm}",
    on_cancellation=[_cleanup_hook],
    on_crashed=[_keep_for_resume, events.failed_hook],
    on_failure=[events.failed_hook],
)
def migrate_vm(request: MigrationRequest) -> MigrationResult:
    """Migrate one VM: preflight, hosts, export, virt-v2v, libvirt import, boot check.

    Nothing is left behind on failure or cancellation: the clone and temporary files are
    removed, and a domain defined by this run is undefined with its volumes. The source VM
    is only read. After a crash (the worker died) everything is kept instead, and a retry
    of the flow run resumes: finished stages and disks are not done again (`tasks.resume`).
    """
    flow_run_id = str(flow_run.get_id() or uuid.uuid4())
    run_id = _run_id(flow_run_id)
    request = _with_saved_source(request, run_id)
    try:
        result = _run_stages(request, run_id)
    except BaseException as exc:
        if isinstance(exc, Exception):
            get_run_logger().error("migration of %s failed; cleaning up", request.vm)
        else:  # cancelled, or the worker is being stopped
            get_run_logger().warning(
                "migration of %s was stopped (%s); cleaning up", request.vm, type(exc).__name__
            )
        cleanup_run(request, run_id, flow_run_id, failed=True)
        raise
    cloned = any(stage.name == "prepare_source" for stage in result.stages)
    cleanup_run(request, run_id, flow_run_id, failed=False, clone=cloned)
    create_markdown_artifact(
        _summary(result),
        key=artifact_key("migration", result.source_moref),
        description=result.vm,
    )
    get_run_logger().info(
        "migrated %s to %s on %s", result.vm, result.domain_name, result.import_host
    )
    return result


def _transfer_seconds(exported: ExportResult) -> float:
    """Seconds the export spent downloading: the longest disk, as the disks download at
    once (with `threads_on_ms` below the disk count, a lower bound). An ovftool export
    records no time per disk: 0, not measured."""
    return max((d.seconds for d in exported.disks), default=0.0)


@loads_cached()  # each block once per run, not once per stage (blocks/cache.py)
@shared_connections()  # one SSH login per host per run, not per stage (tasks/ssh.py)
def _run_stages(request: MigrationRequest, run_id: str) -> MigrationResult:
    """The stages in order, each timed; what they create is removed by cleanup_run."""
    load_blocks(request)
    settings = MigrationSettings.load(request.settings) if request.settings else MigrationSettings()
    storage = TemporaryStorage.load(request.temporary_storage)
    token = resume.resume_token(run_id)
    stages: list[StageReport] = []

    def timed(name: str, call, detail=lambda _r: "", external=lambda _r: 0.0):
        started = time.monotonic()
        result = call()
        stages.append(
            StageReport(
                name=name,
                seconds=time.monotonic() - started,
                detail=detail(result),
                external_seconds=external(result),
            )
        )
        return result

    checked = timed(
        "preflight",
        lambda: _staged(preflight_task, settings, "preflight")(request),
        lambda r: f"{r.spec.inventory_path} -> {r.target_name}",
    )
    spec, target = checked.spec, checked.target_name
    events.bind(spec)
    choice = timed(
        "select_hosts",
        lambda: _staged(select_hosts_task, settings, "select_hosts")(
            request, spec, not settings.force_ms_export
        ),
        lambda r: "; ".join(r.reasons),
        lambda r: max((p.seconds for p in r.probes), default=0.0),  # the probes run at once
    )
    run_key = artifact_key(spec.moref, run_id)
    run_dir = Path(storage.run_dir(run_id))  # on the convert host when storage is local
    source = spec
    if spec.power_state == "poweredOn":
        source = timed(
            "prepare_source",
            lambda: _staged(prepare_source_task, settings, "export")(request, spec, run_id, token),
            lambda r: f"clone {r.name} ({r.moref})",
        )
    export_dir, export_token = run_dir / "export", token
    reusable = None
    if request.reuse_exports and not storage.shared:
        get_run_logger().warning("reuse_exports needs shared temporary storage: not reused")
    elif request.reuse_exports:
        reusable = resume.export_scope(source.instance_uuid, source.change_version)
    if reusable:
        export_dir = _reusable_export_dir(storage, reusable)
        export_token = resume.resume_token(reusable)
        get_run_logger().info("export in %s, reused by later runs until one succeeds", export_dir)
    if choice.export:
        export_call = lambda: _staged(ovftool_export_task, settings, "export")(  # noqa: E731
            request, source, choice.export, str(export_dir), settings, run_key, export_token
        )
    else:
        export_call = lambda: run_export(  # noqa: E731
            request.vcenter, source, export_dir, settings, run_key, export_token
        )
    exported = timed(
        "export",
        export_call,
        lambda r: f"{sum(d.bytes for d in r.disks)} bytes in {len(r.disks)} disk(s)",
        _transfer_seconds,
    )
    events.emit(
        "exported",
        spec,
        bytes=sum(d.bytes for d in exported.disks),
        disks=len(exported.disks),
        seconds=stages[-1].seconds,
    )
    # Caps per KVM host across all runs and workers (limits created by waves or by hand).
    capped = existing_limits({limit_name("kvm", h) for h in (choice.convert, choice.import_)})
    with slot(limit_name("kvm", choice.convert), capped):
        converted = timed(
            "convert",
            lambda: _staged(convert_task, settings, "convert")(
                request,
                spec,
                exported,
                choice.convert,
                target,
                str(run_dir / "out"),
                settings,
                run_key,
                token,
            ),
            lambda r: f"on {r.host}, osinfo {r.osinfo}",
            lambda r: r.command_seconds,
        )
    events.emit(
        "converted", spec, host=converted.host, osinfo=converted.osinfo, seconds=converted.seconds
    )
    with slot(limit_name("kvm", choice.import_), capped):
        imported = timed(
            "import",
            lambda: _staged(import_task, settings, "import")(
                request, spec, converted, choice.import_, target, run_key, token
            ),
            lambda r: f"{r.domain_name} on {r.host} ({r.domain_type})",
            lambda r: r.upload_seconds + r.check_seconds,
        )
    if reusable:
        # Migrated: nobody needs this state of the VM exported any more.
        remove_tree(export_dir, Path(storage.worker_path))
        resume.forget(reusable)
    events.emit(
        "imported",
        spec,
        host=imported.host,
        domain=imported.domain_name,
        domain_uuid=imported.domain_uuid,
    )
    booted = None
    if request.verify_boot:
        booted = timed(
            "verify",
            lambda: _staged(verify_task, settings, "verify")(
                imported.host, imported.domain_name, settings.boot_timeout
            ),
            lambda r: "login prompt seen",
        )
        events.emit("verified", spec, host=imported.host, domain=imported.domain_name)
    events.emit("completed", spec, domain=imported.domain_name, host=imported.host)
    return MigrationResult(
        vm=spec.inventory_path,
        source_moref=spec.moref,
        domain_name=imported.domain_name,
        domain_uuid=imported.domain_uuid,
        import_host=imported.host,
        convert_host=converted.host,
        export_host=choice.export,
        stages=stages,
        bytes_exported=sum(d.bytes for d in exported.disks),
        checksums={d.file_name: d.sha256 for d in exported.disks},
        osinfo=imported.osinfo,
        booted=booted,
        warnings=checked.warnings + converted.warnings,
    )
