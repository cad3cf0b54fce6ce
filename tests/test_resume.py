"""Resume after a dead worker (tasks/resume.py, flows/migrate.py).

The real thing: a `prefect server start` and a process worker; the worker, and the flow
run it started, are killed with SIGKILL in the middle of a disk download; `v2k resume`
schedules the same flow run again and a new worker takes it. The finished disk is not
downloaded again (its task is Cached, the simulator serves no byte of it), the partial
disk goes on from the bytes on disk with a Range request. The run then stops, failing,
right after the export (virt-v2v gets 2 s), and the failure cleans up as always.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prefect import flow, task

from deployments.serve import LocalPrefect
from deployments.testing import wait_for_run
from flows.migrate import migrate_vm
from tasks import resume
from tasks import vcenter as vc
from tasks.resume import resumable
from testbed.testing import STOP_AFTER_EXPORT, request_for, write_disk

VM = "multi-disk-efi"
WEB = "Prod/Web/web server 01"  # stopped, one synthetic disk


# ---- the cache keys, in process -----------------------------------------------------

calls: list[str] = []


@task(**resumable("value"))
def _remember(value: str, resume_token: str | None = None) -> str:
    calls.append(value)
    return value.upper()


@flow
def _twice(value: str, token: str | None) -> list[str]:
    return [_remember(value, token), _remember(value, token)]


def test_a_finished_task_is_not_run_again_while_its_token_lives(prefect_harness):
    calls.clear()
    token = resume.resume_token("test-scope")
    assert resume.resume_token("test-scope") == token  # one token per scope
    assert _twice("disk", token) == ["DISK", "DISK"]
    assert _twice("disk", token) == ["DISK", "DISK"]
    assert calls == ["disk"]  # once: later calls with the same inputs are cached

    _twice("other", token)
    assert calls == ["disk", "other"]  # other inputs, another key

    resume.forget("test-scope")  # what cleanup_run does with the files
    _twice("disk", resume.resume_token("test-scope"))
    assert calls == ["disk", "other", "disk"]

    calls.clear()
    _twice("disk", None)
    assert calls == ["disk", "disk"]  # no token: nothing is cached


def test_export_scope_needs_the_datas_identity(tmp_path):
    assert resume.export_scope("vc/vm", None) is None  # the disks' state is unknown
    one = resume.export_scope("vc/vm", "ab12")
    assert one == resume.export_scope("vc/vm", "ab12") != resume.export_scope("vc/vm", "cd")
    assert one != resume.export_scope("vc2/vm", "ab12")  # the same UUID in another vCenter
    (tmp_path / one).mkdir()
    (tmp_path / resume.export_scope("vc2/vm", "ab12")).mkdir()
    assert resume.stale_exports(tmp_path, resume.export_scope("vc/vm", "cd")) == [one]
    # Kept exports expire from when they were started.
    resume.mark_kept(tmp_path / "export-old")
    (tmp_path / "export-old" / resume.KEPT_SINCE).write_text("1000\n")
    resume.mark_kept(tmp_path / "export-new")
    assert resume.expired_exports(tmp_path, 3600) == ["export-old"]


# ---- reuse_exports: a new run takes over a finished export -----------------------


def test_reuse_exports_takes_over_a_finished_export_of_the_same_state(bed, bed_blocks):
    from blocks import MigrationSettings

    # Each run stops right after its export (virt-v2v gets 2 s), failing as it should.
    MigrationSettings(force_ms_export=True, convert_timeout=STOP_AFTER_EXPORT).save(
        "reuse-settings", overwrite=True
    )
    request = request_for(bed_blocks, WEB, settings="reuse-settings", reuse_exports=True)
    scratch = Path(bed.scratch)
    exports = scratch / "v2k-exports"

    def run_and_count() -> int:
        bed.vcsim.reset_stats()
        with pytest.raises(Exception, match="convert_timeout"):
            migrate_vm(request)
        assert [p.name for p in scratch.iterdir()] == ["v2k-exports"]  # run dir removed
        return bed.vcsim.stats()["nfc_requests"]

    try:
        assert run_and_count() == 1
        (kept,) = exports.iterdir()  # the failed run kept its finished export
        size = (kept / "disk-0.vmdk").stat().st_size
        assert size > 0

        assert run_and_count() == 0  # the same VM in the same state: taken over
        assert (kept / "disk-0.vmdk").stat().st_size == size

        with bed.vcsim.connect() as si:
            vm = vc.find_vm(si, vc.datacenter(si, None), WEB)
            vc.wait_for_task(vm.ReconfigVM_Task(vc.vim.vm.ConfigSpec(annotation="edited")), 60)
        assert run_and_count() == 1  # another change version: exported afresh
        (fresh,) = exports.iterdir()  # and the export of the old state removed
        assert fresh != kept

        # The guest writes to its disk, the configuration stays: exported afresh again.
        with bed.vcsim.connect() as si:
            vm = vc.find_vm(si, vc.datacenter(si, None), WEB)
            write_disk(bed.vcsim, vm, 8192, os.urandom(4096))
        assert run_and_count() == 1
        (newest,) = exports.iterdir()
        assert newest != fresh
    finally:
        for scope in exports.iterdir() if exports.exists() else []:
            resume.forget(scope.name)
        shutil.rmtree(exports, ignore_errors=True)


# ---- a worker killed in the middle of a download ------------------------------------


@pytest.fixture(scope="module")
def server(bed, tmp_path_factory):
    """A Prefect server with the v2k deployments and the bed's blocks; workers are
    started by the test."""
    server = LocalPrefect(tmp_path_factory.mktemp("resume-prefect"))
    try:
        server.start()
        server.register_blocks()
        server.deploy()
        with server.settings():
            from blocks import MigrationSettings

            names = bed.save_blocks("bed")
            # One disk at a time, exported by the worker (the NFC download is resumable).
            MigrationSettings(
                force_ms_export=True, threads_on_ms=1, convert_timeout=STOP_AFTER_EXPORT
            ).save("resume-settings", overwrite=True)
        names["settings"] = "resume-settings"
        server.blocks = names
        yield server
    finally:
        server.stop()


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a worker and everything under it, as when its machine dies."""
    victims = [proc.pid, *_descendants(proc.pid)]
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(10)


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(f"no {what} within {timeout:.0f} s")


def _logs(api: str, flow_run_id: str) -> list[str]:
    """Messages of the flow run and of its subflow runs, oldest first."""
    children = httpx.post(
        f"{api}/flow_runs/filter",
        json={"flow_runs": {"parent_flow_run_id": {"any_": [flow_run_id]}}},
        timeout=10,
    ).json()
    ids = [flow_run_id, *(c["id"] for c in children)]
    logs = httpx.post(
        f"{api}/logs/filter",
        json={"logs": {"flow_run_id": {"any_": ids}}, "sort": "TIMESTAMP_ASC", "limit": 200},
        timeout=10,
    ).json()
    return [entry["message"] for entry in logs]


def test_a_killed_worker_resumes_the_same_run_without_downloading_again(server, bed):
    from deployments.runs import start

    storage = Path(bed.scratch)
    request = {
        "vcenter": server.blocks["vcenter"],
        "vm": VM,
        "cluster": server.blocks["cluster"],
        "temporary_storage": server.blocks["scratch"],
        "settings": server.blocks["settings"],
    }
    worker = server.start_worker("resume-worker-1")
    server.wait_for_workers(1)
    bed.vcsim.fault(nfc_rate_kbps=4096, times=3)  # slow enough to be caught mid-disk
    with server.settings():
        run_id = start("migrate-vm/migrate-vm", {"request": request})["id"]
    export = storage / f"v2k-{run_id.replace('-', '')[:12]}" / "export"

    # Disk 0 is whole and disk 1 (16 MiB of random data, 4 s at this rate) partly there:
    # the machine of the worker dies. Its first buffer (transfer.CHUNK) is on disk then.
    partial = export / "disk-1.vmdk"
    _wait_for(lambda: partial.exists() and partial.stat().st_size > 0, 180, "disk 1")
    _kill_tree(worker)
    kept = partial.stat().st_size
    whole = (export / "disk-0.vmdk").stat().st_size
    time.sleep(1)
    assert partial.stat().st_size == kept, "something still writes after the kill"
    assert not (export / "disk-2.vmdk").exists()

    state = httpx.get(f"{server.api_url}/flow_runs/{run_id}", timeout=10).json()
    assert state["state_type"] == "RUNNING"  # nobody is left to say otherwise
    refused = subprocess.run(
        [sys.executable, "-m", "flows.cli", "resume", run_id],
        env=server.env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    said = refused.stdout + refused.stderr
    assert refused.returncode == 2 and "--force" in said, said

    bed.vcsim.fault(clear=1)
    bed.vcsim.reset_stats()
    resumed = subprocess.run(
        [sys.executable, "-m", "flows.cli", "resume", run_id, "--force"],
        env=server.env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    server.start_worker("resume-worker-2")
    run = wait_for_run(server.api_url, run_id, 600, lambda: server.log_tail("resume-worker-2.log"))

    # The run stops, failing, right after the export (virt-v2v gets 2 s).
    assert run["state_type"] == "FAILED", run["state"]
    assert run["run_count"] >= 2
    stats = bed.vcsim.stats()
    # Only disk 1 (the rest of it) and disk 2 were fetched: disk 0 was not.
    assert stats["nfc_requests"] == 2, stats
    assert stats["nfc_range_requests"] == 1, stats
    messages = "\n".join(_logs(server.api_url, run_id))
    assert f"disk 1 resumed from {kept} bytes already on disk" in messages, messages[-3000:]
    assert "Cached" in messages
    assert whole > 0

    # And the failure cleaned up as always: nothing of the run is left.
    assert not export.parent.exists()
    with server.settings():
        assert resume.Variable.get(f"v2k-resume-{run_id.replace('-', '')[:12]}") is None
