"""Faults injected into a migration against the real test bed, one per test.

Each test breaks one thing while a run is under way, then checks what the run did and
that nothing is left behind (`testbed.testing.snapshot` before, `assert_nothing_left`
after): the vCenter inventory as before (no `v2k-clone-*`, the source VM unchanged, no
export lease still ready), no run directory in the temporary storage, no new domain or
volume in libvirt.

Faults: the vCenter simulator restarted mid-download; the temporary storage filling up
mid-download; libvirtd gone at import (the import stage, given a converted disk); virt-v2v
killed on the host; the run cancelled through the Prefect API mid-export (a real
`prefect server start` and worker, the `served` fixture).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import libvirt
import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterTimestamp,
)
from pyVmomi import vim, vmodl

from blocks import KvmHost, MigrationSettings, StagePolicy, TemporaryStorage
from flows.migrate import import_task, migrate_vm
from tasks import kvm
from tasks import vcenter as vc
from tasks.ownership import Ledger
from tasks.transfer import TAIL_CHECK
from testbed.testing import (
    STOP_AFTER_EXPORT,
    assert_nothing_left,
    request_for,
    snapshot,
    stand_in_conversion,
)

pytest_plugins = ["deployments.testing"]

MiB = 1 << 20
WEB = "Prod/Web/web server 01"  # stopped, one synthetic disk: 16 MiB, 4 MiB of data
SLOW_KBPS = 512  # the disk's file then takes about 8 s to download


# --- what a run may leave behind ----------------------------------------------------------


@pytest.fixture()
def clean_sim(bed):
    """No fault armed and the download counters at zero, before and after the test."""
    bed.vcsim.fault(clear=1)
    bed.vcsim.reset_stats()
    yield bed.vcsim
    if bed.vcsim.running:
        bed.vcsim.fault(clear=1)


@dataclass
class SeenLeases:
    morefs: list[str]

    def states(self, bed) -> list[str]:
        """State of each lease the run opened, as the simulator has it now ('gone' when the
        simulator no longer knows it, e.g. after a restart)."""
        found = []
        with bed.vcsim.connect() as si:
            for moref in self.morefs:
                try:
                    found.append(str(vim.HttpNfcLease(moref, si._stub).state))
                except vmodl.fault.ManagedObjectNotFound:
                    found.append("gone")
        return found


@pytest.fixture()
def leases(monkeypatch: pytest.MonkeyPatch) -> SeenLeases:
    """Records every export lease an in-process run opens (through vc.disk_urls)."""
    seen = SeenLeases([])
    real = vc.disk_urls

    def spy(lease, host, port):
        seen.morefs.append(lease._moId)
        return real(lease, host, port)

    monkeypatch.setattr(vc, "disk_urls", spy)
    return seen


def _settings(**overrides) -> str:
    """Save MigrationSettings for a fault test: worker export, short timeouts, quick
    retries; returns the block name."""
    values = dict(
        force_ms_export=True,
        http_timeout=10,
        export=StagePolicy(retries=2, retry_delay_seconds=1, timeout_seconds=300),
        convert=StagePolicy(retries=0, timeout_seconds=900),
        kvm_import=StagePolicy(retries=0, timeout_seconds=900),
    )
    values.update(overrides)
    name = f"faults-{uuid.uuid4().hex[:8]}"
    MigrationSettings(**values).save(name)
    return name


def _in_background(call: Callable[[], object]) -> tuple[ThreadPoolExecutor, Future]:
    pool = ThreadPoolExecutor(1)
    return pool, pool.submit(call)


def _wait_until(what: str, check: Callable[[], bool], running: Future, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while not check():
        if running.done():
            raise AssertionError(f"the run ended before {what}: {running.result()!r}")
        assert time.monotonic() < deadline, f"no {what} after {timeout:.0f} s"
        time.sleep(0.05)


def _logs_since(start: datetime) -> list[str]:
    with get_client(sync_client=True) as client:
        logs = client.read_logs(
            log_filter=LogFilter(timestamp=LogFilterTimestamp(after_=start)), limit=200
        )
    return [log.message for log in logs]


def _disk_file_size(bed, vm: str) -> int:
    """Size of the VM's (only) disk file in the datastore: what its download sends."""
    datastore, _, path = bed.applied.vms[vm].disk_files[0].partition("] ")
    return (bed.vcsim.datastore_path(datastore.lstrip("[")) / path).stat().st_size


def _final_state(running: Future, timeout: float = 300):
    state = running.result(timeout=timeout)
    assert state.is_final(), state
    return state


# --- vCenter restarted in the middle of a download --------------------------------------


def test_vcenter_restart_mid_download_resumes_with_a_new_lease(bed, bed_blocks, clean_sim, leases):
    before = snapshot(bed)
    # The simulator answers before the inventory is applied again (a real vCenter does
    # not): 5 s between export tries leave time for that on a busy machine.
    settings = _settings(
        export=StagePolicy(retries=2, retry_delay_seconds=5, timeout_seconds=300),
        convert_timeout=STOP_AFTER_EXPORT,
    )
    request = request_for(bed_blocks, WEB, settings=settings)
    size = _disk_file_size(bed, "web server 01")
    started = datetime.now(UTC)
    clean_sim.fault(nfc_rate_kbps=SLOW_KBPS, times=1)
    pool, running = _in_background(lambda: migrate_vm(request, return_state=True))
    with pool:
        _wait_until("1 MiB downloaded", lambda: clean_sim.stats()["nfc_bytes"] >= MiB, running)
        bed.restart_vcsim()  # the inventory is applied again: the VM is back, same moref
        state = _final_state(running)

    # The export went through: the run failed only at virt-v2v's 2 s.
    assert state.is_failed()
    assert "did not finish in 2 s (convert_timeout)" in str(state.message), state.message
    logs = _logs_since(started)
    resumed = [m for m in logs if "resumed from" in m]
    assert resumed, logs
    offset = int(resumed[0].split("resumed from ")[1].split()[0])
    assert MiB <= offset < size
    assert any("new export lease" in m for m in logs), logs
    # The restarted simulator sent only the rest of the disk, asked for with Range, and
    # the tail of what was on disk again, to check it against the server's bytes.
    stats = clean_sim.stats()
    assert stats["nfc_range_requests"] >= 1
    assert stats["nfc_bytes"] == size - offset + min(TAIL_CHECK, offset)
    # The first lease died with the old simulator; the second was completed.
    assert len(leases.morefs) == 2
    assert leases.states(bed) == ["gone", "done"]
    assert_nothing_left(bed, before)


# --- the temporary storage fills up during the export -----------------------------------


@contextlib.contextmanager
def _small_tmpfs(path: Path, size: int) -> Iterator[Path]:
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "v2k-faults", str(path)],
                   check=True)  # fmt: skip
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def _fill(directory: Path) -> Path:
    """Write a file until the file system is full."""
    filler = directory / "filler"
    with filler.open("wb") as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * MiB)
                f.flush()
    return filler


def test_temporary_storage_full_mid_download_fails_cleanly(
    bed, bed_blocks, clean_sim, leases, tmp_path
):
    # Preflight wants twice the disk (export and conversion): 40 MiB pass for 16 MiB.
    with _small_tmpfs(tmp_path / "small", 40 * MiB) as small:
        storage = f"small-{uuid.uuid4().hex[:8]}"
        TemporaryStorage(worker_path=str(small), reserve_bytes=0).save(storage)
        before = snapshot(bed, small)
        request = request_for(bed_blocks, WEB, temporary_storage=storage, settings=_settings())
        clean_sim.fault(nfc_rate_kbps=SLOW_KBPS, times=1)
        pool, running = _in_background(lambda: migrate_vm(request, return_state=True))
        with pool:
            _wait_until("1 MiB downloaded", lambda: clean_sim.stats()["nfc_bytes"] >= MiB, running)
            filler = _fill(small)
            state = _final_state(running)
        assert state.is_failed()
        message = str(state.message)
        assert "temporary storage" in message and "full" in message, message
        assert str(small) in message, message
        # Not retried: a full disk does not empty itself.
        assert clean_sim.stats()["nfc_requests"] == 1
        assert leases.states(bed) == ["error"]
        filler.unlink()
        assert_nothing_left(bed, before)


# --- virt-v2v killed on the convert host ------------------------------------------------


def _processes_with(text: str) -> dict[int, tuple[int, str]]:
    """{pid: (parent pid, command line)} of every process on this machine (the test bed's
    hosts share its process table) whose command line contains `text`."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            args = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if text in args:
                ppid = int((proc / "stat").read_text().rpartition(")")[2].split()[1])
                found[int(proc.name)] = (ppid, args)
    return found


def test_virt_v2v_killed_fails_cleanly_and_leaves_no_process(bed, bed_blocks, clean_sim):
    before = snapshot(bed)
    request = request_for(bed_blocks, WEB, settings=_settings())
    pool, running = _in_background(lambda: migrate_vm(request, return_state=True))

    def virt_v2v() -> int | None:
        # The virt-v2v that the remote `timeout` started (it forks helpers of its own).
        procs = _processes_with(str(bed.scratch))
        leaders = {pid for pid, (_, args) in procs.items() if args.startswith("timeout ")}
        main = [
            pid
            for pid, (ppid, args) in procs.items()
            if ppid in leaders and args.startswith("virt-v2v ")
        ]
        assert len(main) <= 1, procs
        return main[0] if main else None

    with pool:
        _wait_until("virt-v2v running", lambda: virt_v2v() is not None, running)
        time.sleep(3)  # into its work: qemu-nbd and the appliance started
        pid = virt_v2v()
        run_dir = _processes_with(str(bed.scratch))[pid][1].split(" -os ")[1].split()[0]
        run_dir = run_dir.rsplit("/", 1)[0]
        os.kill(pid, signal.SIGKILL)
        state = _final_state(running)

    assert state.is_failed()
    message = str(state.message)
    assert "virt-v2v" in message and "killed" in message, message
    assert "convert_timeout" not in message, message
    time.sleep(1)
    assert not _processes_with(run_dir), _processes_with(run_dir)
    assert_nothing_left(bed, before)


# --- the run cancelled through the Prefect API in the middle of the export -------------


def _vcsim_log_since(bed, offset: int) -> str:
    with bed.vcsim.log_file.open("rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def test_cancel_from_the_api_mid_export_removes_the_clone(bed, served, clean_sim):
    before = snapshot(bed)
    blocks = served.blocks
    request = {
        "vcenter": blocks["vcenter"],
        "vm": "debian-running",  # running: the clone is exported
        "cluster": blocks["cluster"],
        "temporary_storage": blocks["scratch"],
        "settings": blocks["settings"],
    }
    log_offset = bed.vcsim.log_file.stat().st_size
    worker_log = served.home / "prefect" / "v2k-worker-1.log"
    worker_offset = worker_log.stat().st_size
    # 64 KiB/s: the clone's 4 MiB of disk would take a minute.
    clean_sim.fault(nfc_rate_kbps=64, times=1)
    response = httpx.post(
        f"{served.api}/deployments/{served.deployment_id('migrate-vm/migrate-vm')}/create_flow_run",
        json={"parameters": {"request": request}},
        timeout=30,
    )
    response.raise_for_status()
    run_id = response.json()["id"]

    deadline = time.monotonic() + 180
    while clean_sim.stats()["nfc_bytes"] < 256 << 10:
        assert time.monotonic() < deadline, f"no download; worker log:\n{served.log_tail()}"
        time.sleep(0.2)
    assert snapshot(bed).clones, "the running VM was not cloned"
    # What the UI's Cancel button does: the run goes to Cancelling, the worker ends it.
    cancelled = httpx.post(
        f"{served.api}/flow_runs/{run_id}/set_state",
        json={"state": {"type": "CANCELLING", "name": "Cancelling"}, "force": True},
        timeout=30,
    )
    cancelled.raise_for_status()
    run = served.wait_for_run(run_id, timeout=180)

    assert run["state_type"] == "CANCELLED", run["state"]
    log = _vcsim_log_since(bed, log_offset)
    assert "export lease" in log and "aborted" in log, log
    assert_nothing_left(bed, before)
    # The worker ran the on_cancellation hook (cleanup_run again, outside the run) before
    # it marked the run Cancelled; it must not have failed.
    with worker_log.open("rb") as f:
        f.seek(worker_offset)
        worker = f.read().decode(errors="replace")
    assert "error was encountered while running hook" not in worker, worker[-3000:]


# --- the import stage: libvirtd down, an earlier try's leftover ----------------------------


RUN = "0123456789ab"  # the run id of the import stage run on its own here


def _import_only(settings, request, spec, converted, host: str, target: str):
    """The import task in a flow of its own, with the stage's retry policy; its state."""

    @flow
    def import_only():
        staged = import_task.with_options(
            retries=settings.kvm_import.retries,
            retry_delay_seconds=settings.kvm_import.retry_delay_seconds,
        )
        return staged(request, spec, converted, host, target, f"import-{target}", RUN)

    return import_only(return_state=True)


def _task_runs(state) -> list:
    with get_client(sync_client=True) as client:
        return client.read_task_runs(
            flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[state.state_details.flow_run_id])
            )
        )


def test_libvirtd_down_at_import_fails_cleanly_after_its_retries(bed, bed_blocks, clean_sim):
    """The import stage as migrate-vm runs it (its task, its retry policy), given a
    converted qcow2 made here: a real conversion would add 2-3 min of virt-v2v."""
    # kvm2's libvirtd keeps running for the other tests: the import host's block points at
    # a socket nobody listens on, which is what the worker sees when libvirtd is down there.
    # (The hosts have no nc, so an ssh URI with socket= would fail on nc instead; and
    # virt-ssh-helper ignores socket=.)
    down = f"libvirt-down-{uuid.uuid4().hex[:6]}"
    KvmHost.load(bed_blocks["kvm2"]).model_copy(
        update={"libvirt_uri": "qemu+unix:///system?socket=/run/v2k2-nothing/libvirt-sock"}
    ).save(down)
    settings = MigrationSettings.load(
        _settings(kvm_import=StagePolicy(retries=1, retry_delay_seconds=1, timeout_seconds=60))
    )
    request = request_for(bed_blocks, "debian-stopped", import_host=down)
    before = snapshot(bed)
    spec, converted = stand_in_conversion(bed, bed_blocks)
    try:
        state = _import_only(settings, request, spec, converted, down, "debian-down")
        assert state.is_failed()
        message = str(state.message)
        assert down in message and "libvirt" in message, message
        assert "/run/v2k2-nothing/libvirt-sock" in message, message
        assert "is libvirtd running there?" in message, message
        (run,) = _task_runs(state)
        assert run.state.is_failed()
        assert run.run_count == 2  # tried, then retried once as the policy says
    finally:
        shutil.rmtree(Path(converted.output_dir).parent)
    assert_nothing_left(bed, before)


def test_a_retried_import_removes_the_volume_its_failed_try_left(
    bed, bed_blocks, clean_sim, monkeypatch
):
    """A first try whose libvirt call fails after the volume is made (as when the
    connection breaks mid-upload and the delete cannot reach libvirtd either): the retry
    removes that volume, which its ledger lists with the run's mark, instead of failing on
    "already exists"; another run's volume for the same target stays."""
    settings = MigrationSettings.load(
        _settings(kvm_import=StagePolicy(retries=1, retry_delay_seconds=0, timeout_seconds=60))
    )
    real_upload = kvm.upload_volume
    tries = []

    def upload_then_break(conn, pool, name, *args, **kwargs):
        tries.append(name)
        vol = real_upload(conn, pool, name, *args, **kwargs)
        if len(tries) == 1:
            raise libvirt.libvirtError("injected: the connection broke after the upload")
        return vol

    monkeypatch.setattr(kvm, "upload_volume", upload_then_break)
    target = f"v2k-retried-{uuid.uuid4().hex[:6]}"
    conn = bed.libvirt_conn("kvm1")
    pool = conn.storagePoolLookupByName(bed.pool)
    others = kvm.volume_name(target, 0, "ba9876543210")  # another run's, same target
    pool.createXML(f"<volume><name>{others}</name><capacity>1048576</capacity></volume>", 0)
    before = snapshot(bed)
    spec, converted = stand_in_conversion(bed, bed_blocks)
    try:
        request = request_for(bed_blocks, "debian-stopped", import_host=bed_blocks["kvm1"])
        state = _import_only(settings, request, spec, converted, bed_blocks["kvm1"], target)
        assert state.is_completed(), state.message
        assert tries == [kvm.volume_name(target, 0, RUN)] * 2
        (run,) = _task_runs(state)
        assert run.run_count == 2
        assert kvm.domain_exists(conn, target)
        pool.refresh()
        mine = sorted(v for v in pool.listVolumes() if v.startswith(f"{target}-"))
        assert mine == sorted([kvm.volume_name(target, 0, RUN), others])
    finally:
        kvm.remove_migrated_domain(conn, target)
        for entry in Ledger(RUN).entries():
            Ledger(RUN).drop(entry)
        shutil.rmtree(Path(converted.output_dir).parent)
    assert_nothing_left(bed, before)
    kvm.remove_volume(conn, bed.pool, others)
