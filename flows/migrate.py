"""The `migrate-vm` flow: one VM from VMware to KVM, stage by stage (see DESIGN.md)."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run, task_run
from prefect.states import Completed

from blocks import (
    KvmCluster,
    KvmHost,
    MigrationSettings,
    TemporaryStorage,
    VCenter,
)
from blocks.cache import loads_cached
from flows.cleanup import (
    CleanupIncomplete,
    by_block_name,
    cleanup_hook,
    cleanup_imported,
    cleanup_run,
    inline_block_name,
    keep_for_resume,
    run_id_of,
)
from flows.limits import existing_limits, limit_name, slot
from tasks import events, kvm, resume, ssh, vmpath
from tasks import vcenter as vc
from tasks.cleanup import remove_tree
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
from tasks.ownership import Ledger, Owned, reserve, run_keys
from tasks.preflight import (
    Preflight,
    check,
    disk_pools,
    host_rules,
    load_blocks,
    refuse_critical,
    storage_rules,
)
from tasks.progress import Progress, artifact_key
from tasks.resume import resumable
from tasks.source import clone_name, prepare_clone
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
def preflight_task(request: MigrationRequest, run_id: str) -> Preflight:
    flow_run_id = str(flow_run.get_id() or "")
    # On a retry, domains this flow run defined are its own, not a name conflict; a first
    # try has none, and skips reading every domain's XML on every host.
    checked = check(request, flow_run_id=flow_run_id if flow_run.run_count > 1 else None)
    # Reserved before any rule passes: a second run for the target or the source VM is
    # refused here, naming the run that holds it.
    reserve_run(request, checked, run_id, flow_run_id, flow_run.get_name() or "")
    refuse_critical(checked.concerns)
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


def reserve_run(
    request: MigrationRequest, checked: Preflight, run_id: str, flow_run_id: str, name: str
) -> None:
    """Reserve the run's target and source VM (tasks/ownership.py); raise Reserved if taken."""
    vcenter_host = VCenter.load(request.vcenter).host
    ledger = Ledger(run_id)
    for key in run_keys(request.cluster, checked.target_name, checked.spec, vcenter_host):
        ledger.record(Owned(kind="reservation", name=key))
        reserve(key, flow_run_id, name)


@task(name="select-hosts", retry_condition_fn=retry_condition, **resumable("run_id"))
def select_hosts_task(
    request: MigrationRequest,
    spec: VmSpec,
    use_ovftool: bool = True,
    run_id: str = "",
    resume_token: str | None = None,
) -> HostChoice:
    """Probe the cluster's hosts and choose them. The choice is persisted with the run
    (keyed on its id): a resumed run uses the same hosts, since what they hold locally
    (exports, conversions) is keyed on them too."""
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
    **resumable("spec.data_version", "directory", "host_name"),
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
    **resumable("exported", "target", "out_dir", "host_name"),
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
    **resumable("converted", "target", "host_name"),
)
def import_task(
    request: MigrationRequest,
    spec: VmSpec,
    converted: ConvertResult,
    host_name: str,
    target: str,
    run_key: str,
    run_id: str,
    resume_token: str | None = None,
) -> ImportResult:
    logger = get_run_logger()
    flow_run_id = str(flow_run.get_id() or "")
    ledger = Ledger(run_id)
    if flow_run.run_count > 1 or task_run.run_count > 1:
        # An import that did not finish (its worker died, a libvirt call failed after a
        # volume was made) goes first: what the ledger lists, with this run's mark only.
        cleanup_imported(request, run_id, flow_run_id, logger)
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
        ledger.record(Owned(kind="domain", name=target, host=host_name))
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
                    "flow-run": flow_run_id,
                    "run-id": run_id,
                },
                on_progress=progress.bytes,
                wanted_type=host.domain_type,
                osinfo=converted.osinfo,
                # Local temporary storage: the disks are on this host only, copied there.
                on_host=not storage.shared,
                timings=timings,
                run_id=run_id,
                on_create=lambda pool, volume: ledger.record(
                    Owned(kind="volume", name=volume, host=host_name, place=pool)
                ),
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
    its disks goes on; a clone task or clone left by an earlier try (a timeout, a dead
    worker) is cancelled and removed first. See tasks/source.py.
    """
    logger = get_run_logger()
    logger.warning(
        "%s is running: exporting a powered-off clone, which is crash-consistent", spec.name
    )
    vcenter = VCenter.load(request.vcenter)
    settings = MigrationSettings.load(request.settings) if request.settings else MigrationSettings()
    timeout = settings.clone_timeout_seconds(spec.total_disk_bytes)
    Ledger(run_id).record(Owned(kind="clone", name=clone_name(run_id)))
    with vcenter.connect() as si:
        dc = vc.datacenter(si, vcenter.datacenter)
        vm = vc.find_vm(si, dc, spec.moref)
        clone = prepare_clone(
            si, dc, vm, run_id, vm_path=spec.inventory_path, timeout=timeout, log=logger.info
        )
        logger.info("cloned %s to %s (%s)", spec.name, clone.name, clone._moId)
        return vc.read_spec(si, clone)


def _reusable_export_dir(storage: TemporaryStorage, scope: str) -> Path:
    return Path(storage.worker_path) / "v2k-exports" / scope


def _reusable_export(
    request: MigrationRequest,
    storage: TemporaryStorage,
    settings: MigrationSettings,
    source: VmSpec,
) -> str | None:
    """The scope of a kept export this run may reuse and keep, or None.

    Keyed on the data's identity (`VmSpec.data_version`), so a VM written to since is
    exported again; kept exports older than `settings.keep_exports_hours` are removed.
    """
    if not request.reuse_exports:
        return None
    logger = get_run_logger()
    if not storage.shared:
        logger.warning("reuse_exports needs shared temporary storage: not reused")
        return None
    kept = Path(storage.worker_path) / "v2k-exports"
    for scope in resume.expired_exports(kept, settings.keep_exports_hours * 3600):
        remove_tree(kept / scope, Path(storage.worker_path))
        resume.forget(scope)
        logger.info(
            "removed the kept export %s: older than %s h", scope, settings.keep_exports_hours
        )
    scope = resume.export_scope(
        f"{source.vcenter_uuid}/{source.instance_uuid}", source.data_version
    )
    if scope is None:
        logger.warning("%s: its data's state cannot be told: not reused", source.name)
        return None
    for stale in resume.stale_exports(kept, scope):
        remove_tree(kept / stale, Path(storage.worker_path))
        resume.forget(stale)
        logger.info("removed the kept export %s: %s has changed since", stale, source.name)
    if not (kept / scope).exists():
        logger.info("no kept export of %s in its current state (%s): exporting", source.name, scope)
    resume.mark_kept(kept / scope)
    return scope


def _with_saved_source(request: MigrationRequest, run_id: str) -> MigrationRequest:
    """An inline source becomes a transient VCenter block for this run only, so the tasks
    refer to it by name like any other; cleanup_run deletes it."""
    if request.vcenter_inline is not None:
        request.vcenter_inline.to_block().save(inline_block_name(run_id), overwrite=True)
    return by_block_name(request, run_id)


def _summary(result: MigrationResult) -> str:
    rows = "\n".join(f"| {s.name} | {s.seconds:.1f} | {s.detail} |" for s in result.stages)
    sums = "\n".join(f"| {name} | `{digest}` |" for name, digest in result.checksums.items())
    boot = {True: "passed", None: "not run"}.get(
        result.booted, f"failed, domain kept: {result.verify_error}"
    )
    left = "; ".join(result.cleanup_left)
    return f"""# Migrated {vmpath.markdown(result.vm)}

| | |
|---|---|
| domain | `{result.domain_name}` ({result.domain_uuid}) |
| import host | {result.import_host} |
| convert host | {result.convert_host} |
| export | {result.export_host or "worker (management export)"} |
| guest OS (libosinfo) | {result.osinfo or "unknown"} |
| bytes exported | {result.bytes_exported} |
| boot check | {boot} |
| cleanup | {f"incomplete: {left}" if left else "done"} |

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
    on_cancellation=[cleanup_hook],
    on_crashed=[keep_for_resume, events.failed_hook],
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
    run_id = run_id_of(flow_run_id)
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
        left = cleanup_run(request, run_id, flow_run_id, delivered=False)
        if left and isinstance(exc, Exception):
            raise CleanupIncomplete(
                f"{exc} -- and the cleanup is incomplete: " + " | ".join(left),
                f"v2k cleanup {flow_run_id} once the hosts are back",
            ) from exc
        raise
    result.cleanup_left = cleanup_run(request, run_id, flow_run_id, delivered=True)
    create_markdown_artifact(
        _summary(result),
        key=artifact_key("migration", result.source_moref),
        description=result.vm,
    )
    get_run_logger().info(
        "migrated %s to %s on %s", result.vm, result.domain_name, result.import_host
    )
    return _final_state(result, flow_run_id)


def _final_state(result: MigrationResult, flow_run_id: str):
    """The result, or a Completed state that says what needs a look: a boot check that
    failed (the domain is kept), or litter the cleanup could not remove."""
    notes = []
    if result.booted is False:
        notes.append(f"boot check failed: {result.verify_error}")
    if result.cleanup_left:
        notes.append(
            f"may be left: {' | '.join(result.cleanup_left)}; run `v2k cleanup {flow_run_id}`"
        )
    if not notes:
        return result
    name = "Migrated, not verified" if result.booted is False else "Completed, cleanup incomplete"
    return Completed(data=result, name=name, message="; ".join(notes))


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
        lambda: _staged(preflight_task, settings, "preflight")(request, run_id),
        lambda r: f"{r.spec.inventory_path} -> {r.target_name}",
    )
    spec, target = checked.spec, checked.target_name
    events.bind(spec)
    choice = timed(
        "select_hosts",
        lambda: _staged(select_hosts_task, settings, "select_hosts")(
            request, spec, not settings.force_ms_export, run_id, token
        ),
        lambda r: "; ".join(r.reasons),
        lambda r: max((p.seconds for p in r.probes), default=0.0),  # the probes run at once
    )
    run_key = artifact_key(spec.moref, run_id)
    run_dir = Path(storage.run_dir(run_id))  # on the convert host when storage is local
    Ledger(run_id).record(
        Owned(kind="directory", name=str(run_dir), host=None if storage.shared else choice.convert)
    )
    source = spec
    if spec.power_state == "poweredOn":
        source = timed(
            "prepare_source",
            lambda: _staged(prepare_source_task, settings, "export")(request, spec, run_id, token),
            lambda r: f"clone {r.name} ({r.moref})",
        )
    export_dir, export_token = run_dir / "export", token
    reusable = _reusable_export(request, storage, settings, source)
    if reusable:
        export_dir = _reusable_export_dir(storage, reusable)
        export_token = resume.resume_token(reusable)
        get_run_logger().info("export in %s, reused by later runs until one succeeds", export_dir)
    elif source.data_version is None:
        # Nothing tells whether an earlier try's export still is the VM's data.
        get_run_logger().warning(
            "%s: the state of its disks cannot be read (no CBT changeId, no file times): "
            "the export is not resumed or reused",
            source.name,
        )
        export_token = None
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
                request, spec, converted, choice.import_, target, run_key, run_id, token
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
    booted, verify_error = None, None
    if request.verify_boot:
        started = time.monotonic()
        try:
            booted = timed(
                "verify",
                lambda: _staged(verify_task, settings, "verify")(
                    imported.host, imported.domain_name, settings.boot_timeout
                ),
                lambda r: "login prompt seen",
            )
            events.emit("verified", spec, host=imported.host, domain=imported.domain_name)
        except Exception as exc:
            if settings.remove_unverified:
                raise  # the run fails, and its cleanup removes the domain it defined
            # A failed check is no reason to throw hours of export and conversion away.
            booted, verify_error = False, str(exc)
            stages.append(
                StageReport(
                    name="verify",
                    seconds=time.monotonic() - started,
                    detail=f"failed, domain kept: {verify_error[:200]}",
                )
            )
            get_run_logger().error(
                "boot check of %s failed; the domain is kept (migrated, not verified): %s",
                imported.domain_name,
                verify_error,
            )
            events.emit(
                "not_verified",
                spec,
                host=imported.host,
                domain=imported.domain_name,
                error=verify_error,
            )
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
        verify_error=verify_error,
        warnings=checked.warnings + converted.warnings,
    )
