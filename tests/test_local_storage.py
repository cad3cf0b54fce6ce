"""Temporary storage local to the convert host (TemporaryStorage.shared=False), against the
test bed: the refusals (with their reason, before anything is made), ovftool exporting
into the host's own directory followed by virt-v2v there, the run directory removed over
SSH, and the converted disks copied into libvirt volumes on the host.

The directory is below the test bed's host-local path (`bed.local_dir`): the same path on
every host, a different directory behind it on each, invisible to the worker."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from blocks import KvmHost, TemporaryStorage
from flows.migrate import migrate_vm
from flows.plan import plan
from tasks import kvm
from tasks import vcenter as vc
from tasks.cleanup import remove_tree_on_host
from tasks.hosts import remote
from tasks.preflight import PreflightError
from testbed.testing import assert_nothing_left, request_for, snapshot

# A directory name that would break any command built by pasting strings together.
RUN = "0123456789ab"  # the run id the volume names of these import tests carry
HOSTILE = 'local it\'s "q"; $(touch pwned) `id` .. é'


@pytest.fixture()
def local_dir(bed) -> Path:
    """The hosts' local temporary directory, as the hosts see it (made on every host; the
    worker does not see it: v2k reaches it only over SSH)."""
    for host in bed.libvirt:
        (bed.local_backing(host) / HOSTILE).mkdir()
    yield bed.local_dir / HOSTILE
    for host in bed.libvirt:
        shutil.rmtree(bed.local_backing(host) / HOSTILE)


def _on(bed, host: str, path: Path) -> Path:
    """Where `path` below the hosts' local directory is for `host`, from the worker."""
    return bed.local_backing(host) / path.relative_to(bed.local_dir)


@pytest.fixture()
def local_storage(local_dir) -> str:
    name = f"local-{uuid.uuid4().hex[:8]}"
    TemporaryStorage(shared=False, host_path=str(local_dir), reserve_bytes=0).save(name)
    return name


def _ovftool_calls(bed_blocks) -> list[dict]:
    log = Path(KvmHost.load(bed_blocks["kvm2"]).workdir) / "ovftool-calls.log"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.fixture()
def unchanged(bed, bed_blocks, local_dir):
    before = snapshot(bed)  # every host's local directory included
    calls = len(_ovftool_calls(bed_blocks))
    yield lambda: len(_ovftool_calls(bed_blocks)) - calls
    assert_nothing_left(bed, before)
    for host in bed.libvirt:
        assert not (bed.local_backing(host) / "pwned").exists()


@pytest.mark.parametrize(
    ("hosts", "settings", "words"),
    [
        (
            {"convert_host": "kvm1", "export_host": "kvm2"},
            "settings-ovftool",
            r"export host bed-kvm2 is not the convert host.*could not read.*"
            r"Fix: name bed-kvm1 as export host too",
        ),
        (
            {"convert_host": "kvm2"},
            "settings",  # force_ms_export
            r"force_ms_export makes the worker export.*the worker cannot write there.*"
            r"Fix: turn force_ms_export off",
        ),
        (
            {"convert_host": "kvm1"},
            "settings-ovftool",
            r"so ovftool must export on bed-kvm1, and bed-kvm1 has no ovftool.*"
            r"Fix: install ovftool on bed-kvm1",
        ),
        (
            {"convert_host": "kvm2", "import_host": "kvm1"},
            "settings-ovftool",
            r"import host bed-kvm1 is not the convert host.*stay on bed-kvm2.*"
            r"Fix: name bed-kvm2 as import host too",
        ),
    ],
    ids=["export-host", "force-ms-export", "no-ovftool", "import-host"],
)
def test_local_storage_refusals(
    bed_blocks, local_storage, local_dir, unchanged, hosts, settings, words
):
    named = {role: bed_blocks[host] for role, host in hosts.items()}
    request = request_for(
        bed_blocks,
        "Prod/Web/web server 01",
        temporary_storage=local_storage,
        settings=bed_blocks[settings],
        **named,
    )
    with pytest.raises(PreflightError, match=words) as refused:
        migrate_vm(request)
    assert str(local_dir) in str(refused.value)
    assert unchanged() == 0  # no export was started
    # The dry run refuses it for the same reason (one rule function for both).
    result = plan(request)
    assert any(c.message in str(refused.value) for c in result.critical)


def test_plan_with_local_storage(bed_blocks, local_storage, local_dir):
    result = plan(
        request_for(
            bed_blocks,
            "Prod/Web/web server 01",
            temporary_storage=local_storage,
            settings=bed_blocks["settings-ovftool"],
        )
    )
    assert result.critical == []
    kvm2 = bed_blocks["kvm2"]  # the only host with ovftool
    assert (result.hosts.convert, result.hosts.import_, result.hosts.export) == (kvm2,) * 3
    run = f"{local_dir}/v2k-<run>"
    export = next(c for c in result.commands if "ovftool" in c)
    # Shown as the shell would take them: the hostile directory name quoted.
    assert export.startswith(f"on {kvm2}: ovftool") and shlex.quote(f"{run}/export") in export
    v2v = next(c for c in result.commands if "virt-v2v" in c)
    assert shlex.quote(f"{run}/export") in v2v and shlex.quote(f"{run}/out") in v2v
    assert any("qemu-img convert on the host" in c for c in result.commands)
    space = result.space[0]
    assert space.place == f"temporary storage {local_dir} on {kvm2} (local)"
    assert space.free is not None and space.free >= space.needed


def test_export_and_convert_on_the_host_then_cleanup_over_ssh(
    bed, bed_blocks, local_storage, local_dir, unchanged, caplog
):
    # No host named: kvm2 converts because it has ovftool, exports into its local
    # directory, and virt-v2v there refuses the synthetic disk after the export.
    request = request_for(
        bed_blocks,
        "Prod/Web/web server 01",
        temporary_storage=local_storage,
        settings=bed_blocks["settings-ovftool"],
    )
    with pytest.raises(Exception, match="virt-v2v exited 1: inspection") as err:
        migrate_vm(request)
    assert f"{local_dir}/v2k-" in str(err.value)  # virt-v2v's log, in the host's directory
    assert unchanged() == 1
    call = _ovftool_calls(bed_blocks)[-1]
    assert call["target"].startswith(f"{local_dir}/v2k-") and call["target"].endswith("/export")
    kvm2 = bed_blocks["kvm2"]
    assert f"convert: {kvm2} (random among {kvm2}) (temporary storage is local" in caplog.text
    run_dir = call["target"].removesuffix("/export")
    # Removed over SSH by cleanup_run, which asks every host (the crash hook does not know
    # which one converted); only kvm2 has it.
    assert f"removed {run_dir} on {kvm2}" in caplog.text
    assert f"removed {run_dir} on {bed_blocks['kvm1']}" not in caplog.text
    # `unchanged` then checks that the run directory is gone from the host's directory.


def _host_run(conn, argv: list[str]) -> None:
    result = conn.run(remote(argv), hide=True, warn=True, in_stream=False, timeout=120)
    assert result.exited == 0, result.stderr


def test_volume_placed_from_the_hosts_local_file(bed, bed_blocks, local_dir):
    with bed.vcsim.connect() as si:
        dc = vc.datacenter(si, bed.vcsim.datacenter)
        spec = vc.read_spec(si, vc.find_vm(si, dc, "Prod/Web/web server 01"))
    capacity = spec.disks[0].capacity_bytes
    source = f"{local_dir}/v2k-run/out/web server 01's disk;$(id)-sda"
    host = KvmHost.load(bed_blocks["kvm1"])
    pool_name = bed.pool
    conn = kvm.open_connection(host.get_libvirt_uri())
    target = f"{bed.prefix}local-place"
    try:
        with host.get_connection() as ssh:
            # Made on the host, as virt-v2v leaves it there: a qcow2 with a known pattern.
            _host_run(ssh, ["mkdir", "-p", "--", str(Path(source).parent)])
            _host_run(ssh, ["qemu-img", "create", "-q", "-f", "qcow2", source, str(capacity)])
            _host_run(ssh, ["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 2M", source])
            # Local to kvm1: not on kvm2, not at that path on the worker.
            assert _on(bed, "kvm1", Path(source)).is_file()
            assert not _on(bed, "kvm2", Path(source)).exists() and not Path(source).exists()

            # A missing file on the host creates nothing.
            with pytest.raises(kvm.KvmImportError, match="not readable on the import host"):
                kvm.import_disks_and_define(
                    conn,
                    ssh,
                    target=target,
                    spec=spec,
                    sources=[(Path(f"{source}-missing"), capacity)],
                    pools=[pool_name],
                    nics=[],
                    v2v_xml="<domain/>",
                    source_note={},
                    wanted_type="qemu",
                    on_host=True,
                    run_id=RUN,
                )
            pool = conn.storagePoolLookupByName(pool_name)
            pool.refresh()
            assert kvm.volume_name(target, 0, RUN) not in pool.listVolumes()

            seen: list[tuple[int, int]] = []
            dom, volumes, _ = kvm.import_disks_and_define(
                conn,
                ssh,
                target=target,
                spec=spec,
                sources=[(Path(source), capacity)],
                pools=[pool_name],
                nics=[],
                v2v_xml="<domain/>",
                source_note={"flow-run": "local-place", "run-id": RUN},
                on_progress=lambda done, total: seen.append((done, total)),
                wanted_type="qemu",
                on_host=True,
                run_id=RUN,
            )
        try:
            assert volumes == [(pool_name, kvm.volume_name(target, 0, RUN))]
            vol = pool.storageVolLookupByName(kvm.volume_name(target, 0, RUN))
            _kind, vol_capacity, allocation = vol.info()
            assert vol_capacity == capacity
            assert allocation < capacity // 4  # copied sparsely
            check = subprocess.run(
                ["qemu-img", "check", "-f", "qcow2", vol.path()], capture_output=True, text=True
            )
            assert check.returncode == 0, check.stdout + check.stderr
            read = subprocess.run(
                ["qemu-io", "-f", "qcow2", "-r", "-c", "read -P 0x5a 1M 2M", vol.path()],
                capture_output=True,
                text=True,
            )
            assert read.returncode == 0 and "Pattern verification failed" not in read.stdout
            assert seen and seen[-1] == (capacity, capacity)
            assert kvm.run_domains(conn, "local-place") == [target]
            assert dom.name() == target
        finally:
            kvm.remove_migrated_domain(conn, target)
        pool.refresh()
        assert kvm.volume_name(target, 0, RUN) not in pool.listVolumes()
        assert not kvm.domain_exists(conn, target)
    finally:
        kvm.remove_migrated_domain(conn, target)
        conn.close()


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("V2K_LOCAL_STORAGE_E2E") != "1",
    reason="a second real virt-v2v run (3-4 min): set V2K_LOCAL_STORAGE_E2E=1",
)
def test_real_guest_through_local_storage_boots(bed, bed_blocks, local_storage, local_dir):
    target = f"{bed.prefix}debian-local"
    conn = bed.libvirt_conn("kvm2")  # the only host with ovftool converts and imports
    request = request_for(
        bed_blocks,
        "debian-stopped",
        temporary_storage=local_storage,
        settings=bed_blocks["settings-ovftool"],
        target_name=target,
        verify_boot=True,
    )
    try:
        result = migrate_vm(request)
        kvm2 = bed_blocks["kvm2"]
        assert (result.export_host, result.convert_host, result.import_host) == (kvm2,) * 3
        assert result.booted is True and "debian" in (result.osinfo or "")
        # The manifest was read on the host: one disk with its sha256.
        assert len(result.checksums) == 1 and all(len(v) == 64 for v in result.checksums.values())
        pool = conn.storagePoolLookupByName(bed.pool)
        (volume,) = [v for v in pool.listVolumes() if v.startswith(f"{target}-disk0-")]
        vol = pool.storageVolLookupByName(volume)
        assert vol.info()[1] == 1 << 30
        check = subprocess.run(
            ["qemu-img", "check", "-f", "qcow2", vol.path()], capture_output=True, text=True
        )
        assert check.returncode == 0, check.stdout + check.stderr
        assert list(_on(bed, "kvm2", local_dir).iterdir()) == []  # run directory gone
    finally:
        kvm.remove_migrated_domain(conn, target)


@pytest.mark.parametrize(
    "path", ["/srv/v2k", "/srv/v2k/", "/srv/v2k/a/../..", "/srv/v2k-x/y", "/etc"]
)
def test_removal_on_the_host_refuses_anything_but_a_run_directory(path):
    # Refused from the names alone, before any command reaches the host (no connection).
    with pytest.raises(ValueError, match="refusing to remove"):
        remove_tree_on_host(None, path, "/srv/v2k")
