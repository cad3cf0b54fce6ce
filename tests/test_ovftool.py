"""Export on a KVM host with ovftool (the test bed's stand-in keeps its command line):
the locator for a VM whose folder and name hold spaces and quotes, --parallelThreads as
configured, and the vCenter password in no remote process's argv."""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path

import pytest

from blocks import KvmHost, VCenter
from flows.migrate import migrate_vm
from tasks import vcenter as vc
from tasks.models import MigrationRequest
from tasks.ovftool import locator

NAME = 'it\'s a "web" #1 100%'


@pytest.fixture()
def quoted_vm(bed):
    """A copy of `web server 01` (in Prod/Web) renamed to a name with quotes, # and %."""
    safe = f"v2k-clone-ovf{uuid.uuid4().hex[:6]}"
    with bed.vcsim.connect() as si:
        dc = vc.datacenter(si, bed.vcsim.datacenter)
        source = vc.find_vm(si, dc, "Prod/Web/web server 01")
        spec = vc.vim.vm.CloneSpec(location=vc.vim.vm.RelocateSpec(), powerOn=False)
        task = source.CloneVM_Task(folder=source.parent, name=safe, spec=spec)
        clone = vc.wait_for_task(task, 120)
        vc.wait_for_task(clone.Rename_Task(NAME), 60)
        moref = clone._moId
    yield moref
    with bed.vcsim.connect() as si:
        dc = vc.datacenter(si, bed.vcsim.datacenter)
        vc.wait_for_task(vc.find_vm(si, dc, moref).Rename_Task(safe), 60)
        vc.wait_for_task(vc.find_vm(si, dc, moref).Destroy_Task(), 60)


def test_locator_encodes_every_part(bed, bed_blocks, quoted_vm):
    with bed.vcsim.connect() as si:
        dc = vc.datacenter(si, bed.vcsim.datacenter)
        spec = vc.read_spec(si, vc.find_vm(si, dc, quoted_vm))
    url = locator(VCenter.load(bed_blocks["vcenter"]), spec)
    assert url.endswith("/DC0/vm/Prod/Web/it%27s%20a%20%22web%22%20%231%20100%25")
    assert url.startswith("vi://administrator%40vsphere.local@127.0.0.1:")
    assert bed.vcsim.password not in url


def test_ovftool_export_on_the_host(bed, bed_blocks, quoted_vm):
    calls = Path(KvmHost.load(bed_blocks["kvm2"]).workdir) / "ovftool-calls.log"
    calls.unlink(missing_ok=True)
    password = bed.vcsim.password
    seen: list[str] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for proc in Path("/proc").iterdir():
                try:
                    if proc.name.isdigit() and password in (proc / "cmdline").read_text():
                        seen.append(proc.name)
                except OSError:
                    continue
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    request = MigrationRequest(
        vcenter=bed_blocks["vcenter"],
        vm=quoted_vm,
        cluster=bed_blocks["cluster"],
        temporary_storage=bed_blocks["scratch"],
        settings=bed_blocks["settings-ovftool"],
        convert_host=bed_blocks["kvm1"],
    )
    try:
        # ovftool exports on kvm2; virt-v2v on kvm1 then refuses the synthetic disk.
        with pytest.raises(Exception, match="virt-v2v exited 1: inspection") as err:
            migrate_vm(request)
    finally:
        stop.set()
        sampler.join()
    assert not seen, "the vCenter password was in a process's argv"
    assert password not in str(err.value)
    call = json.loads(calls.read_text().splitlines()[-1])
    assert "--parallelThreads=1" in call["options"]  # min(threads_on_kvm_host=2, 1 disk)
    assert "--noSSLVerify" not in call["options"]
    assert call["source"].endswith("/Prod/Web/it%27s%20a%20%22web%22%20%231%20100%25")
    assert not list(Path(bed.scratch).iterdir())
