"""The export stage: an NFC lease held by the parent task, one mapped download task per disk."""

from __future__ import annotations

import errno
import time
from http.client import HTTPException
from pathlib import Path

from prefect import flow, task, unmapped
from prefect.futures import as_completed, wait
from prefect.logging import get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import SecretStr
from pyVmomi import vim

from blocks import MigrationSettings, VCenter
from blocks.vcenter import VCenterError
from tasks import vcenter as vc
from tasks.models import ExportedDisk, ExportResult, VmSpec
from tasks.progress import Progress, artifact_key
from tasks.resume import resumable
from tasks.retries import retry_unless
from tasks.transfer import TransferError, download

OVF_NAME = "vm.ovf"


def disk_file_name(index: int) -> str:
    """File name of the n-th disk in the export directory: fixed, never from the VM name."""
    return f"disk-{index}.vmdk"


# Exports (by run key) whose lease is gone: their queued and running downloads stop.
_aborted: set[str] = set()


class ExportAborted(RuntimeError):
    """Another disk of the same export failed, so the lease is gone; not worth a retry."""


class LeaseLost(RuntimeError):
    """The server no longer knows the lease (vCenter restarted, or the lease timed out or
    was aborted there): a retry of the download cannot help, a new lease can."""


class StorageFull(RuntimeError):
    """The temporary storage has no space left; no retry helps until space is freed."""


def _storage_full(path: Path, exc: OSError) -> StorageFull:
    on_disk = path.stat().st_size if path.is_file() else 0
    return StorageFull(
        f"temporary storage is full: {exc.strerror} writing {path} ({on_disk} bytes "
        "written); free space there or point the TemporaryStorage block at a larger place"
    )


def _no_space(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


@task(
    name="download-disk",
    task_run_name="download-disk-{index}",
    retry_condition_fn=retry_unless(ExportAborted, LeaseLost, StorageFull),
    # Not the URL: a retried run gets a new lease, with new URLs, for the same disk.
    **resumable("index", "directory", "expected_size"),
)
def download_disk(
    index: int,
    url: str,
    expected_size: int | None,
    directory: str,
    vcenter_block: str,
    cookie: SecretStr,
    settings: MigrationSettings,
    run_key: str,
    resume_token: str | None = None,
) -> ExportedDisk:
    """Stream one disk of the lease into the export directory, resuming a partial file.

    With a `resume_token`, a finished download's result is kept, and a retried run whose
    inputs are the same (see `tasks.resume`) does not download that disk again.
    """

    def check_aborted() -> None:
        if run_key in _aborted:
            raise ExportAborted(f"disk {index}: another disk of this export failed")

    check_aborted()
    vcenter = VCenter.load(vcenter_block)
    dest = Path(directory) / disk_file_name(index)
    progress = Progress(
        artifact_key(run_key, f"disk-{index}"), f"export disk {index} ({dest.name})"
    )

    def on_progress(done: int, total: int | None) -> None:
        check_aborted()
        progress.bytes(done, total)

    try:
        got = download(
            url,
            dest,
            ssl_context=vcenter.ssl_context(),
            headers={"Cookie": cookie.get_secret_value()},
            expected_size=expected_size,
            read_timeout=settings.http_timeout,
            deadline_seconds=settings.export.timeout_seconds,
            on_progress=on_progress,
        )
    except TransferError as exc:
        if exc.status == 404:
            # A device URL answers 404 once its lease is gone on the server.
            raise LeaseLost(f"disk {index}: the export lease is gone on the server: {exc}") from exc
        raise
    except OSError as exc:
        if _no_space(exc):
            raise _storage_full(dest, exc) from exc
        raise
    if got.resumed_from:
        get_run_logger().info(
            "disk %d resumed from %d bytes already on disk", index, got.resumed_from
        )
    return ExportedDisk(
        key=index,
        file_name=dest.name,
        bytes=got.bytes,
        sha256=got.sha256,
        seconds=got.seconds,
        resumed_from=got.resumed_from,
    )


def _bytes_on_disk(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("disk-*.vmdk"))


def _worth_a_new_lease(exc: BaseException) -> bool:
    """A fault of the lease or of the vCenter session, which a new lease can cure."""
    if isinstance(exc, TransferError):
        return exc.status is None  # connections kept breaking, nothing refused
    return isinstance(
        exc, LeaseLost | VCenterError | OSError | HTTPException | vim.fault.NotAuthenticated
    )


def export_vm(
    vcenter_block: str,
    spec: VmSpec,
    directory: Path,
    settings: MigrationSettings,
    run_key: str,
    resume_token: str | None = None,
) -> ExportResult:
    """Export a powered-off VM into `directory`: disks through the lease, then the descriptor.

    The lease stays open, and alive, until every download task is done; it is completed on
    success and aborted on any failure. A try that fails with the lease or the vCenter
    session (vCenter restarted or unreachable for a while, the lease gone) is tried again
    with a new session and a new lease, `settings.export.retries` times, and the downloads
    resume from the bytes already on disk. A full temporary storage is not retried.
    `resume_token`: see `download_disk`.
    """
    policy = settings.export
    attempt = 0
    while True:
        try:
            return _export_with_lease(
                vcenter_block, spec, directory, settings, run_key, resume_token
            )
        except Exception as exc:
            if isinstance(exc, OSError) and _no_space(exc):
                raise _storage_full(Path(exc.filename or directory), exc) from exc
            if attempt >= policy.retries or not _worth_a_new_lease(exc):
                raise
            attempt += 1
            get_run_logger().warning(
                "export of %s failed (%s: %s); asking for a new export lease in %.0f s "
                "(retry %d of %d), the downloads resume from the %d bytes on disk",
                spec.name,
                type(exc).__name__,
                exc,
                policy.retry_delay_seconds,
                attempt,
                policy.retries,
                _bytes_on_disk(directory),
            )
        time.sleep(policy.retry_delay_seconds)


def _export_with_lease(
    vcenter_block: str,
    spec: VmSpec,
    directory: Path,
    settings: MigrationSettings,
    run_key: str,
    resume_token: str | None,
) -> ExportResult:
    """One try of `export_vm`: one vCenter session, one lease."""
    logger = get_run_logger()
    vcenter = VCenter.load(vcenter_block)
    directory.mkdir(parents=True, exist_ok=True)
    total = spec.total_disk_bytes or 1
    threads = settings.download_threads(len(spec.disks))
    with vcenter.connect() as si:
        vm = vc.find_vm(si, vc.datacenter(si, vcenter.datacenter), spec.moref)
        with vc.export_lease(
            vm,
            progress=lambda: int(100 * _bytes_on_disk(directory) / total),
        ) as lease:
            urls = vc.disk_urls(lease, vcenter.host, vcenter.port)
            if len(urls) != len(spec.disks):
                raise vc.SourceError(
                    f"the export lease offers {len(urls)} disks, the VM has {len(spec.disks)}"
                )
            logger.info("exporting %d disk(s) of %s, %d at a time", len(urls), spec.name, threads)
            cookie = SecretStr(si._stub.cookie or "")
            capped = download_disk.with_options(
                retries=settings.export.retries,
                retry_delay_seconds=settings.export.retry_delay_seconds,
            )
            # The caller's task runner caps how many run at once (threads_on_ms).
            futures = capped.map(
                index=list(range(len(urls))),
                url=[u for _, u, _ in urls],
                expected_size=[size for _, _, size in urls],
                directory=unmapped(str(directory)),
                vcenter_block=unmapped(vcenter_block),
                cookie=unmapped(cookie),
                settings=unmapped(settings),
                run_key=unmapped(run_key),
                # The VM's identity and state are part of what a finished disk is.
                resume_token=unmapped(
                    f"{resume_token}/{spec.instance_uuid}/{spec.change_version}"
                    if resume_token
                    else None
                ),
            )
            try:
                # The first failure (after its retries) ends the export: the others stop
                # at their next progress report instead of running against a dead lease.
                disks_by_future = {id(f): f.result() for f in as_completed(futures)}
            except BaseException:
                _aborted.add(run_key)
                wait(futures)
                _aborted.discard(run_key)
                raise
            disks = [disks_by_future[id(f)] for f in futures]
            files = [
                (device_id, disk.file_name, disk.bytes)
                for (device_id, _, _), disk in zip(urls, disks, strict=True)
            ]
            descriptor = vc.create_descriptor(si, vm, files)
    (directory / OVF_NAME).write_text(descriptor)
    return ExportResult(
        directory=str(directory), ovf=OVF_NAME, disks=disks, source_moref=spec.moref
    )


@flow(name="export-vm", flow_run_name="export-{spec.name}")
def export_stage(
    vcenter_block: str,
    spec: VmSpec,
    directory: str,
    settings: MigrationSettings,
    run_key: str,
    resume_token: str | None = None,
) -> ExportResult:
    """The export as a subflow, so its task runner caps parallel downloads."""
    return export_vm(vcenter_block, spec, Path(directory), settings, run_key, resume_token)


def run_export(
    vcenter_block: str,
    spec: VmSpec,
    directory: Path,
    settings: MigrationSettings,
    run_key: str,
    resume_token: str | None = None,
) -> ExportResult:
    """Run the export subflow with at most `threads_on_ms` downloads at once.

    `resume_token`: see `download_disk`; None downloads every disk.
    """
    runner = ThreadPoolTaskRunner(max_workers=settings.download_threads(len(spec.disks)))
    return export_stage.with_options(task_runner=runner)(
        vcenter_block, spec, str(directory), settings, run_key, resume_token
    )
