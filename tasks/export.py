"""The export stage: an NFC lease held by the parent task, one mapped download task per disk.

The parent is a task (`export-vm`), not a subflow: prefect 3.9's flow engine joins a
heartbeat thread that sleeps in whole seconds when a flow run ends, which cost 0-1 s per
export (20-50 % of a 1 GiB disk, docs/benchmarks.md). The parent caps the parallel
downloads with a task runner of its own instead of a subflow's.
"""

from __future__ import annotations

import errno
import ssl
import time
from http.client import HTTPException
from pathlib import Path

from prefect import task, unmapped
from prefect.futures import as_completed, wait
from prefect.logging import get_run_logger
from prefect.runtime import task_run
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.transactions import CommitMode, transaction
from pydantic import SecretStr
from pyVmomi import vim

from blocks import MigrationSettings, VCenter
from blocks.vcenter import VCenterError
from tasks import vcenter as vc
from tasks.errors import Refused, Transient, is_transient
from tasks.models import ExportedDisk, ExportResult, VmSpec
from tasks.progress import Progress, artifact_key
from tasks.resume import resumable
from tasks.transfer import TransferError, download

OVF_NAME = "vm.ovf"


def disk_file_name(index: int) -> str:
    """File name of the n-th disk in the export directory: fixed, never from the VM name."""
    return f"disk-{index}.vmdk"


# Exports (by run key) that stopped, with why: their queued and running downloads stop too.
_aborted: dict[str, str] = {}

# The TLS context of each running export (by run key), made once by the parent from the
# VCenter block it loaded: its download tasks, in the same process, skip loading the block
# again (25-120 ms each before the first byte). A task elsewhere loads the block.
_tls: dict[str, ssl.SSLContext] = {}


class ExportAborted(Refused):
    """Another disk of the same export failed, so the lease is gone: this download is not
    tried again on its own (the export as a whole may be, with a new lease)."""


class LeaseLost(Transient):
    """The server no longer knows the lease (vCenter restarted, or the lease timed out or
    was aborted there): a retry of the download cannot help, a new lease can."""


class StorageFull(Refused):
    """The temporary storage has no space left; no retry helps until space is freed."""


def _storage_full(path: Path, exc: OSError) -> StorageFull:
    on_disk = path.stat().st_size if path.is_file() else 0
    return StorageFull(
        f"temporary storage is full: {exc.strerror} writing {path} ({on_disk} bytes written).",
        "free space there or point the TemporaryStorage block at a larger place",
    )


def _failure(state) -> BaseException | None:
    """The exception a failed state holds, None for a state that did not fail."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - classified, not handled
        return exc
    return None


def _same_lease_helps(task, task_run, state) -> bool:
    """`retry_condition_fn` of a download: `tasks.errors.retry_condition`, but for a lost
    lease, whose URLs answer 404 until the export task asks for a new lease."""
    exc = _failure(state)
    return exc is None or (is_transient(exc) and not isinstance(exc, LeaseLost))


def _no_space(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


@task(
    name="download-disk",
    task_run_name="download-disk-{index}",
    retry_condition_fn=_same_lease_helps,
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
    at_once: int = 1,
) -> ExportedDisk:
    """Stream one disk of the lease into the export directory, resuming a partial file.

    With a `resume_token`, a finished download's result is kept, and a retried run whose
    inputs are the same (see `tasks.resume`) does not download that disk again.
    `at_once` is how many disks of the export download at the same time.
    """

    def check_aborted() -> None:
        if run_key in _aborted:
            raise ExportAborted(f"disk {index}: {_aborted[run_key]}")

    check_aborted()
    started = time.monotonic()
    tls = _tls.get(run_key) or VCenter.load(vcenter_block).ssl_context()
    dest = Path(directory) / disk_file_name(index)
    progress: Progress | None = None

    def on_progress(done: int, total: int | None) -> None:
        nonlocal progress
        check_aborted()
        if progress is None:
            # Made at the first report, from the download's progress thread: creating the
            # artifact is an API call that would otherwise delay the first byte.
            progress = Progress(
                artifact_key(run_key, f"disk-{index}"),
                f"export disk {index} ({dest.name})",
                started=started,
            )
        progress.bytes(done, total)

    try:
        got = download(
            url,
            dest,
            ssl_context=tls,
            headers={"Cookie": cookie.get_secret_value()},
            expected_size=expected_size,
            read_timeout=settings.http_timeout,
            deadline_seconds=settings.export.timeout_seconds,
            on_progress=on_progress,
            hash_thread=at_once == 1,
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
    if got.discarded:
        get_run_logger().warning(
            "disk %d: the %d bytes on disk from an earlier try did not match the server's "
            "(or could not be checked): downloaded again from the start",
            index,
            got.discarded,
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


# Faults of the lease or of the vCenter session, which a new session and lease can cure.
_LEASE_FAULTS = (
    LeaseLost,
    VCenterError,
    HTTPException,
    OSError,
    vim.fault.NotAuthenticated,
    vim.fault.HostConnectFault,
)


def _new_lease_helps(task, task_run, state) -> bool:
    """`retry_condition_fn` of the export: a transient fault (`tasks.errors`) of the lease
    or of the vCenter session (vCenter restarted or unreachable for a while, the lease
    gone), which a new session and lease can cure; the downloads then resume from the
    bytes on disk. Narrower than `retry_condition`: each download has retried its own
    faults already, and a fault that is not the lease's (a server error on every try, a
    bug) would only fail again with a new lease."""
    exc = _failure(state)
    if exc is None or not is_transient(exc):
        return False
    if isinstance(exc, TransferError):
        return exc.status is None  # connections kept breaking, no server error
    return isinstance(exc, _LEASE_FAULTS)


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
    success and aborted on any failure. `resume_token`: see `download_disk`.

    Raises:
        StorageFull: the temporary storage filled up; not worth a retry.
    """
    try:
        return _export_with_lease(vcenter_block, spec, directory, settings, run_key, resume_token)
    except OSError as exc:
        if _no_space(exc):
            raise _storage_full(Path(exc.filename or directory), exc) from exc
        raise


def _export_with_lease(
    vcenter_block: str,
    spec: VmSpec,
    directory: Path,
    settings: MigrationSettings,
    run_key: str,
    resume_token: str | None,
) -> ExportResult:
    logger = get_run_logger()
    vcenter = VCenter.load(vcenter_block)
    directory.mkdir(parents=True, exist_ok=True)
    total = spec.total_disk_bytes or 1
    threads = settings.download_threads(len(spec.disks))
    with vcenter.connect() as si:
        vm = vc.vm_by_moref(si, spec.moref)
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
            # A task runner of our own caps how many run at once (threads_on_ms); the
            # tasks still belong to the caller's flow run, under this task.
            _tls[run_key] = vcenter.ssl_context()
            try:
                # Each finished disk's result is stored at once (EAGER), not when this
                # task ends: a worker that dies later must not take them with it.
                with (
                    transaction(commit_mode=CommitMode.EAGER),
                    ThreadPoolTaskRunner(max_workers=threads) as runner,
                ):
                    futures = runner.map(
                        capped,
                        {
                            "index": list(range(len(urls))),
                            "url": [u for _, u, _ in urls],
                            "expected_size": [size for _, _, size in urls],
                            "directory": unmapped(str(directory)),
                            "vcenter_block": unmapped(vcenter_block),
                            "cookie": unmapped(cookie),
                            "settings": unmapped(settings),
                            "run_key": unmapped(run_key),
                            "at_once": unmapped(threads),
                            # The VM's identity and state are part of what a finished
                            # disk is.
                            "resume_token": unmapped(
                                f"{resume_token}/{spec.data_version}" if resume_token else None
                            ),
                        },
                    )
                    try:
                        # The first failure (after its retries) ends the export: the others
                        # stop at their next progress report (queued ones before they
                        # start) instead of running against a dead lease.
                        disks_by_future = {id(f): f.result() for f in as_completed(futures)}
                    except BaseException as exc:
                        # A cancelled or killed run is stopped, not failed.
                        stopped = not isinstance(exc, Exception)
                        _aborted[run_key] = (
                            "the export was stopped"
                            if stopped
                            else "another disk of this export failed"
                        )
                        wait(futures)
                        _aborted.pop(run_key, None)
                        raise
            finally:
                _tls.pop(run_key, None)
            disks = [disks_by_future[id(f)] for f in futures]
            files = [
                (device_id, disk.file_name, disk.bytes)
                for (device_id, _, _), disk in zip(urls, disks, strict=True)
            ]
            descriptor = vc.create_descriptor(si, vm, spec.name, files)
    (directory / OVF_NAME).write_text(descriptor)
    return ExportResult(
        directory=str(directory), ovf=OVF_NAME, disks=disks, source_moref=spec.moref
    )


@task(
    name="export-vm",
    task_run_name="export-{spec.name}",
    retry_condition_fn=_new_lease_helps,
    **resumable("spec.data_version", "directory"),
)
def export_task(
    vcenter_block: str,
    spec: VmSpec,
    directory: str,
    settings: MigrationSettings,
    run_key: str,
    resume_token: str | None = None,
) -> ExportResult:
    """The export as a task: it holds the lease while its download tasks run.

    A retry (after a fault of the lease or the session) asks for a new lease; the disks
    finished before are not downloaded again, a partial one goes on (`resume_token`).
    """
    if task_run.run_count > 1:
        get_run_logger().warning(
            "export of %s: asking for a new export lease (try %d); the downloads resume "
            "from the %d bytes on disk",
            spec.name,
            task_run.run_count,
            _bytes_on_disk(Path(directory)) if Path(directory).is_dir() else 0,
        )
    return export_vm(vcenter_block, spec, Path(directory), settings, run_key, resume_token)


def run_export(
    vcenter_block: str,
    spec: VmSpec,
    directory: Path,
    settings: MigrationSettings,
    run_key: str,
    resume_token: str | None = None,
) -> ExportResult:
    """Export the VM's disks and descriptor, at most `threads_on_ms` downloads at once.

    Args:
        vcenter_block: Name of the VCenter block.
        spec: The powered-off VM (or clone) to export.
        directory: Export directory on the worker; created if missing.
        settings: threads_on_ms, http_timeout and the export stage's retries and timeout.
        run_key: Names this export's artifacts and its abort flag.
        resume_token: See `download_disk`; None downloads every disk.

    Returns:
        The directory, the descriptor's name and every disk with its size and sha256.

    Raises:
        TransferError: a disk could not be downloaded (after its retries); the lease is
            aborted and the other downloads stopped.
    """
    policy = settings.export
    retried = export_task.with_options(
        retries=policy.retries, retry_delay_seconds=policy.retry_delay_seconds
    )
    return retried(vcenter_block, spec, str(directory), settings, run_key, resume_token)
