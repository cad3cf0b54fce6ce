"""Secrets, TLS, host keys, hostile names, bad parameters and the hard convert timeout,
against the test bed."""

from __future__ import annotations

import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client

from blocks import KvmHost, MigrationSettings, VCenter
from blocks.vcenter import VCenterError
from flows.migrate import migrate_vm
from tasks import vcenter as vc
from tasks.hosts import HostSelectionError, choose_hosts, probe_host
from tasks.models import MigrationRequest
from tasks.preflight import BlockNotFound
from testbed.testing import request_for

HOSTILE = "web 'x';$(touch /tmp/v2k-pwned)`touch /tmp/v2k-pwned2`../ü\nend"
MARKERS = [Path("/tmp/v2k-pwned"), Path("/tmp/v2k-pwned2")]


def test_unknown_block_names_are_listed(bed_blocks):
    request = request_for(bed_blocks, "x", vcenter="no-such-vc", cluster="no-such-cluster")
    with pytest.raises(BlockNotFound) as err:
        migrate_vm(request)
    assert "no VCenter block named 'no-such-vc'" in str(err.value)
    assert "no KvmCluster block named 'no-such-cluster'" in str(err.value)


def test_untrusted_certificate_fails_with_the_setting_named(bed):
    vcenter = VCenter(
        host=bed.vcsim.host,
        port=bed.vcsim.port,
        username=bed.vcsim.user,
        password=bed.vcsim.password,
    )
    with pytest.raises(VCenterError, match="TLS verification .* ca_cert.*verify_tls=False"):
        with vcenter.connect():
            pass
    insecure = vcenter.model_copy(update={"verify_tls": False})
    with insecure.connect() as si:
        assert si.content.about.apiType == "VirtualCenter"


def test_changed_host_key_is_refused(bed, bed_blocks):
    host = KvmHost.load(bed_blocks["kvm1"])
    other = bed.hosts.hosts[1]
    wrong_key = Path(other.host_key).with_suffix(".pub").read_text().split()[:2]
    name = bed.hosts.hosts[0].known_hosts_name
    forged = host.model_copy(update={"known_hosts": f"{name} {' '.join(wrong_key)}\n"})
    probe = probe_host("kvm1", forged)
    assert not probe.reachable and "is not the one in known_hosts" in probe.error
    with pytest.raises(HostSelectionError, match="kvm1.*unreachable.*not the one in known_hosts"):
        choose_hosts([probe], windows=False, convert="kvm1")


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="threads_on_ms"):
        MigrationSettings(threads_on_ms=-5)
    with pytest.raises(ValueError, match="convert_timeout"):
        MigrationSettings(convert_timeout=0)


@pytest.fixture()
def hostile_vm(bed):
    """A VM whose name holds quotes, ;, $(), backticks, ../, non-ASCII and a newline,
    made under a safe name and renamed (the simulator would use the name as a path)."""
    safe = f"v2k-clone-hostile{uuid.uuid4().hex[:6]}"
    with bed.vcsim.connect() as si:
        dc = vc.datacenter(si, bed.vcsim.datacenter)
        source = vc.find_vm(si, dc, "Prod/Web/web server 01")
        spec = vc.vim.vm.CloneSpec(location=vc.vim.vm.RelocateSpec(), powerOn=False)
        clone = vc.wait_for_task(
            source.CloneVM_Task(folder=source.parent, name=safe, spec=spec), 120
        )
        vc.wait_for_task(clone.Rename_Task(HOSTILE), 60)
        moref = clone._moId
    yield moref
    with bed.vcsim.connect() as si:
        dc = vc.datacenter(si, bed.vcsim.datacenter)
        vm = vc.find_vm(si, dc, moref)
        vc.wait_for_task(vm.Rename_Task(safe), 60)
        vc.wait_for_task(vc.find_vm(si, dc, moref).Destroy_Task(), 60)


def _cmdlines() -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                found.append(
                    (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                )
            except OSError:
                continue
    return found


def test_hostile_name_and_secrets_never_leak(bed, bed_blocks, hostile_vm):
    secrets = [bed.vcsim.password]
    key = Path(bed.hosts.key_path).read_text().strip().splitlines()[1]
    secrets.append(key)
    seen: list[str] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            seen.extend(c for c in _cmdlines() if any(s in c for s in secrets))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        # The whole path runs; virt-v2v then refuses the synthetic disk in inspection.
        with pytest.raises(Exception, match="virt-v2v exited 1: inspection") as err:
            migrate_vm(request_for(bed_blocks, hostile_vm))
    finally:
        stop.set()
        sampler.join()
    assert not seen, "a secret was in a process's argv"
    assert not any(m.exists() for m in MARKERS)
    assert not list(Path(bed.scratch).iterdir())
    assert all(s not in str(err.value) for s in secrets)
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs()
        logs = client.read_logs()
        artifacts = client.read_artifacts()
    text = " ".join(
        [str(r.parameters) for r in runs]
        + [log.message for log in logs]
        + [str(a.data) for a in artifacts]
    )
    for secret in secrets:
        assert secret not in text


def test_convert_timeout_kills_the_remote_process_tree(bed, bed_blocks):
    name = f"fast-timeout-{uuid.uuid4().hex[:6]}"
    MigrationSettings(convert_timeout=8 / 3600).save(name)
    with pytest.raises(Exception, match="did not finish in 8 s"):
        migrate_vm(request_for(bed_blocks, "Prod/Web/web server 01", settings=name))
    time.sleep(1)
    left = [c for c in _cmdlines() if str(bed.scratch) in c]
    assert not left, left
    assert not list(Path(bed.scratch).iterdir())
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(bed.scratch) not in out


def test_inline_vcenter_password_stays_out_of_the_api(bed, bed_blocks):
    from prefect.blocks.system import Secret

    from blocks.vcenter import InlineVCenter

    secret = f"vc-password-{uuid.uuid4().hex[:6]}"
    Secret(value=bed.vcsim.password).save(secret)
    inline = InlineVCenter(
        host=bed.vcsim.host,
        port=bed.vcsim.port,
        username=bed.vcsim.user,
        password_secret=secret,
        ca_cert=Path(bed.vcsim.ca_cert).read_text(),
    )
    request = MigrationRequest(
        vcenter_inline=inline,
        vm="win2019-running",
        cluster=bed_blocks["cluster"],
        temporary_storage=bed_blocks["scratch"],
    )
    with pytest.raises(Exception, match="Windows VM 'win2019-running' is running"):
        migrate_vm(request)
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs()
        logs = client.read_logs()
        blocks = client.read_block_documents()
    assert any(r.parameters.get("request", {}).get("vcenter_inline") for r in runs)
    text = " ".join([str(r.parameters) for r in runs] + [log.message for log in logs])
    assert bed.vcsim.password not in text
    assert not [b.name for b in blocks if (b.name or "").startswith("v2k-inline-")]


def test_request_needs_exactly_one_source(bed_blocks):
    with pytest.raises(ValueError, match="either vcenter"):
        MigrationRequest(vm="x", cluster="c", temporary_storage="t")
