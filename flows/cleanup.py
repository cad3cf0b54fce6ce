"""Cleanup after a migration run, driven by the run's ledger (tasks/ownership.py).

A run removes only what its ledger lists and what carries its mark; whatever it could not
verify as gone (a host it cannot reach, a removal that failed) stays in the ledger, is
named in the run's final state, and `v2k cleanup RUN` tries again later.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from prefect import get_run_logger
from prefect.client.schemas.objects import FlowRun
from prefect.exceptions import MissingContextError
from prefect.logging.loggers import flow_run_logger

from blocks import KvmHost, TemporaryStorage, VCenter
from tasks import kvm, resume
from tasks import vcenter as vc
from tasks.cleanup import remove_tree, remove_tree_on_host
from tasks.errors import Transient
from tasks.models import MigrationRequest
from tasks.ownership import Ledger, Owned, release
from tasks.source import clone_name, remove_clones

Logger = logging.Logger | logging.LoggerAdapter


class CleanupIncomplete(Transient):
    """Some of what a run made could not be removed or checked; `v2k cleanup` goes on."""


def run_id_of(flow_run_id: str) -> str:
    """The short id a run marks its objects with (clone, directory and volume names)."""
    return flow_run_id.replace("-", "")[:12]


def inline_block_name(run_id: str) -> str:
    return f"v2k-inline-{run_id}"


def by_block_name(request: MigrationRequest, run_id: str) -> MigrationRequest:
    """The request with an inline source replaced by the name of the run's transient block."""
    if request.vcenter_inline is None:
        return request
    return request.model_copy(update={"vcenter": inline_block_name(run_id), "vcenter_inline": None})


def _logger() -> Logger:
    """The run's logger in a flow or task, else v2k's own (`v2k cleanup`)."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("v2k.migrate")


def cleanup_run(
    request: MigrationRequest,
    run_id: str,
    flow_run_id: str,
    *,
    delivered: bool,
    logger: Logger | None = None,
) -> list[str]:
    """Remove what the run's ledger lists and release its reservations.

    Args:
        delivered: the migration succeeded: its domain and volumes now belong to the user
            and leave the ledger untouched; everything else (clone, files) is removed.

    Returns:
        What may be left, one line each with where and why; empty when all is gone (the
        ledger is then dropped). Safe to call again: removed entries leave the ledger.
    """
    logger = logger or _logger()
    ledger = Ledger(run_id)
    if delivered:
        for entry in ledger.entries():
            if entry.kind in ("domain", "volume"):
                ledger.drop(entry)
    left: list[str] = []
    steps: list[tuple[str, Callable[[], None]]] = [
        ("the clone", lambda: _remove_clones(request, run_id, ledger, logger)),
        ("temporary files", lambda: _remove_dirs(request, ledger, flow_run_id, logger)),
        ("domains and volumes", lambda: cleanup_imported(request, run_id, flow_run_id, logger)),
        # What the stages persisted refers to what was just removed: not to be reused.
        ("the resume token", lambda: resume.forget(run_id)),
        ("reservations", lambda: _release(ledger, flow_run_id)),
    ]
    if request.vcenter == inline_block_name(run_id):
        steps.append(("the inline vCenter block", lambda: VCenter.delete(request.vcenter)))
    for what, step in steps:
        try:
            step()
        except CleanupIncomplete as exc:
            left.append(str(exc))
        except Exception as exc:  # noqa: BLE001 - every step runs; each failure is reported
            left.append(f"{what}: {exc}")
    for line in left:
        logger.error("cleanup incomplete: %s", line)
    return left


def _release(ledger: Ledger, flow_run_id: str) -> None:
    for entry in ledger.of_kind("reservation"):
        release(entry.name, flow_run_id)
        ledger.drop(entry)


def _remove_clones(request: MigrationRequest, run_id: str, ledger: Ledger, logger) -> None:
    clones = ledger.of_kind("clone")
    if not clones:
        return
    vcenter = VCenter.load(request.vcenter)
    with vcenter.connect() as si:
        removal = remove_clones(si, vc.datacenter(si, vcenter.datacenter), run_id)
    for moref in removal.removed:
        logger.info("removed the clone %s (%s)", clone_name(run_id), moref)
    for moref in removal.left:
        # Not this run's: left alone, and nothing of this run's is left in vCenter.
        logger.warning(
            "left %s (%s): named like this run's clone but without its annotation",
            clone_name(run_id),
            moref,
        )
    for entry in clones:
        ledger.drop(entry)


def _remove_dirs(request: MigrationRequest, ledger: Ledger, flow_run_id: str, logger) -> None:
    """The run's directories: on the worker (shared storage) or on the host that has them."""
    storage = TemporaryStorage.load(request.temporary_storage)
    failed = []
    for entry in ledger.of_kind("directory"):
        try:
            if entry.host is None:
                remove_tree(Path(entry.name), Path(storage.worker_path))
            else:
                host = KvmHost.load(entry.host)
                with host.get_connection() as conn:
                    if remove_tree_on_host(conn, entry.name, storage.host_dir):
                        logger.info("removed %s on %s", entry.name, entry.host)
        except Exception as exc:  # noqa: BLE001 - every directory is tried; failures reported
            failed.append(f"{entry.describe()}: {exc}")
            continue
        ledger.drop(entry)
    if failed:
        raise CleanupIncomplete(
            "may be left: " + "; ".join(failed), f"v2k cleanup {flow_run_id} once fixed"
        )


def cleanup_imported(
    request: MigrationRequest, run_id: str, flow_run_id: str, logger: Logger
) -> None:
    """The domains and volumes in the ledger, host by host, each only with the run's mark.

    Raises:
        CleanupIncomplete: a host could not be reached or a removal failed; those entries
            stay in the ledger.
    """
    ledger = Ledger(run_id)
    by_host: dict[str, list[Owned]] = {}
    for entry in ledger.entries():
        if entry.kind in ("domain", "volume") and entry.host:
            by_host.setdefault(entry.host, []).append(entry)
    failed = []
    for host_name, entries in by_host.items():
        try:
            conn = kvm.open_connection(KvmHost.load(host_name).get_libvirt_uri())
        except Exception as exc:  # noqa: BLE001 - reported with what may be left there
            failed.append(f"{', '.join(e.describe() for e in entries)}: {exc}")
            continue
        try:
            # Domains first: removing one takes its marked volumes with it.
            for entry in sorted(entries, key=lambda e: e.kind != "domain"):
                try:
                    if entry.kind == "domain":
                        gone = kvm.remove_run_domain(conn, entry.name, flow_run_id, run_id)
                        if gone is not None:
                            logger.info("rolled back: domain %s on %s", entry.name, host_name)
                        gone = gone or []
                    else:
                        gone = kvm.remove_run_volumes(conn, run_id, [(entry.place, entry.name)])
                    for volume in gone:
                        logger.info("removed volume %s on %s", volume, host_name)
                except Exception as exc:  # noqa: BLE001 - the next entry is still tried
                    failed.append(f"{entry.describe()}: {exc}")
                    continue
                ledger.drop(entry)
        finally:
            conn.close()
    if failed:
        raise CleanupIncomplete(
            "may be left: " + "; ".join(failed), f"v2k cleanup {flow_run_id} once fixed"
        )


def cleanup_flow_run(flow_run: FlowRun, logger: Logger | None = None) -> list[str]:
    """Everything a failed run leaves, for a migrate-vm flow run read from the API: the
    cancellation hook, and `v2k cleanup` after a crash or an incomplete cleanup."""
    run_id = run_id_of(str(flow_run.id))
    request = by_block_name(MigrationRequest.model_validate(flow_run.parameters["request"]), run_id)
    return cleanup_run(request, run_id, str(flow_run.id), delivered=False, logger=logger)


def cleanup_hook(flow, flow_run, state) -> None:
    """on_cancellation: the same cleanup as a failure inside the flow."""
    cleanup_flow_run(flow_run, flow_run_logger(flow_run, flow))


def keep_for_resume(flow, flow_run, state) -> None:
    """on_crashed: the worker or its machine went away. What the run made (clone, partial
    export, conversion, reservations) is kept, so that a retry of this flow run goes on."""
    flow_run_logger(flow_run, flow).warning(
        "flow run %s crashed; its clone and temporary files are kept: retry the flow run "
        "(`v2k resume %s`) to go on from where it stopped, or remove them with "
        "`v2k cleanup %s`",
        flow_run.id,
        flow_run.id,
        flow_run.id,
    )
