"""Errors that say whether a retry helps (tasks.errors): a refusal fails its stage at the
first try although the stage has retries, a transient fault is still retried.

Each refusal is a real run of the stage against the test bed, with retries configured:
a wrong vCenter password (preflight of migrate-vm), a wrong password typed into ovftool
on the host, downloads answered 401/403 by the simulator, a KvmHost block with a key the
host does not accept or a host key that is not the host's, a missing and an inactive
storage pool. Attempts are counted where they happen: the task run's `run_count` in the
Prefect API, and the requests the simulator served or the ovftool calls on the host.
"""

from __future__ import annotations

import importlib
import inspect
import pickle
import shutil
import subprocess
import uuid
from pathlib import Path

import paramiko
import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from pyVmomi import vim

from blocks import KvmCluster, KvmHost, MigrationSettings, StagePolicy, VCenter
from blocks.vcenter import VCenterRefused, VCenterUnreachable
from flows.migrate import import_task, migrate_vm, ovftool_export_task
from tasks import errors, kvm, ssh
from tasks import vcenter as vc
from tasks.errors import Refused, Transient, V2kError, is_transient
from tasks.export import run_export
from tasks.models import ExportResult, VmSpec
from tasks.transfer import TransferError, TransferFailed, TransferRefused, transfer_error
from testbed.testing import request_for, stand_in_conversion

WEB = "Prod/Web/web server 01"  # stopped, one synthetic disk of 16 MiB
_KEYS = [paramiko.RSAKey.generate(1024) for _ in range(2)]

# Every module that defines v2k's own errors.
MODULES = [
    "blocks.kvm",
    "blocks.vcenter",
    "deployments.runs",
    "deployments.serve",
    "tasks.convert",
    "tasks.export",
    "tasks.hosts",
    "tasks.kvm",
    "tasks.ovftool",
    "tasks.preflight",
    "tasks.transfer",
    "tasks.vcenter",
]


# --- the model ----------------------------------------------------------------------------


def _own_errors() -> list[type[BaseException]]:
    found = []
    for name in MODULES:
        module = importlib.import_module(name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            public = not cls.__name__.startswith("_")
            if issubclass(cls, Exception) and cls.__module__ == name and public:
                found.append(cls)
    return found


def test_every_error_of_v2k_is_refused_or_transient_or_split_into_both():
    errors_found = _own_errors()
    assert len(errors_found) >= 20, errors_found
    for cls in errors_found:
        if issubclass(cls, (Refused, Transient)):
            continue
        # A base kept for callers that catch it: both of its kinds exist below it.
        assert issubclass(cls, V2kError), cls
        kinds = {k for k in errors_found if issubclass(k, cls) and k is not cls}
        assert any(issubclass(k, Refused) for k in kinds), cls
        assert any(issubclass(k, Transient) for k in kinds), cls


def test_no_error_is_both_kinds():
    for cls in _own_errors():
        assert not (issubclass(cls, Refused) and issubclass(cls, Transient)), cls


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (VCenterRefused("login refused", "check the password"), False),
        (VCenterUnreachable("no answer"), True),
        (transfer_error("refused", 401), False),
        (transfer_error("refused", 403), False),
        (transfer_error("server error", 500), True),
        (transfer_error("server error", 503), True),
        (transfer_error("connections kept breaking"), True),
        (kvm.KvmImportRefused("no pool", "define it"), False),
        (kvm.KvmImportFailed("connection dropped"), True),
        (TimeoutError("timed out"), True),
        (ConnectionResetError("reset by peer"), True),
        (TimeoutError("read timed out"), True),
        (vim.fault.HostConnectFault(msg="The read operation timed out"), True),
        (vim.fault.InvalidLogin(), False),
        (vim.fault.NoPermission(), False),
        (vim.fault.NotAuthenticated(), True),  # a NoPermission, but a new session cures it
        (paramiko.AuthenticationException("Authentication failed."), False),
        (paramiko.BadHostKeyException("kvm1", _KEYS[0], _KEYS[1]), False),
    ],
)
def test_what_a_retry_can_help(error: BaseException, transient: bool):
    assert is_transient(error) is transient


def test_the_kind_and_the_fields_survive_pickling():
    """Prefect pickles a task's error into its state; the retry condition reads it back."""
    refused = pickle.loads(pickle.dumps(transfer_error("disk-0.vmdk: server answered 403", 403)))
    assert type(refused) is TransferRefused and refused.status == 403
    assert "Fix:" in str(refused) and not is_transient(refused)
    failed = pickle.loads(pickle.dumps(TransferFailed("broken", 502)))
    assert isinstance(failed, TransferError) and failed.status == 502 and is_transient(failed)


def test_the_fix_is_in_the_message():
    error = errors.Refused("the pool is missing.", "define it")
    assert str(error) == "the pool is missing. Fix: define it"
    assert error.message == "the pool is missing." and error.fix == "define it"


# --- helpers for runs against the test bed ------------------------------------------------


def _task_runs(flow_run_id) -> list:
    with get_client(sync_client=True) as client:
        return client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )


def _run_of(state, name_prefix: str):
    runs = [
        r for r in _task_runs(state.state_details.flow_run_id) if r.name.startswith(name_prefix)
    ]
    assert len(runs) == 1, [r.name for r in runs]
    return runs[0]


def _retrying(**stages) -> MigrationSettings:
    """Settings whose stages retry twice at once: a refusal must still be tried once."""
    policy = StagePolicy(retries=2, retry_delay_seconds=0, timeout_seconds=300)
    values = dict(
        force_ms_export=True,
        http_timeout=10,
        preflight=policy,
        select_hosts=policy,
        export=policy,
        kvm_import=policy,
    )
    values.update(stages)
    return MigrationSettings(**values)


def _save(block, kind: str) -> str:
    name = f"errors-{kind}-{uuid.uuid4().hex[:8]}"
    block.save(name)
    return name


@pytest.fixture()
def wrong_password(bed, bed_blocks) -> str:
    """A VCenter block like the bed's, with a password vCenter refuses."""
    good = VCenter.load(bed_blocks["vcenter"])
    return _save(good.model_copy(update={"password": "not-the-password"}), "vcenter")


@pytest.fixture()
def clean_sim(bed):
    bed.vcsim.fault(clear=1)
    bed.vcsim.reset_stats()
    yield bed.vcsim
    bed.vcsim.fault(clear=1)


@pytest.fixture()
def stranger_key(tmp_path: Path) -> Path:
    """An SSH key that no test bed host accepts."""
    key = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return key


def _import(bed, bed_blocks, *, host: str, cluster: str | None = None):
    """The import stage (its task, two retries) of a stand-in conversion; its final state."""
    request = request_for(
        bed_blocks, "debian-stopped", import_host=host, cluster=cluster or bed_blocks["cluster"]
    )
    spec, converted = stand_in_conversion(bed, bed_blocks)
    target = f"v2k-errors-{uuid.uuid4().hex[:6]}"

    @flow(name="errors-import")
    def import_only():
        staged = import_task.with_options(retries=2, retry_delay_seconds=0)
        run_id = uuid.uuid4().hex[:12]
        return staged(request, spec, converted, host, target, f"import-{target}", run_id)

    try:
        return import_only(return_state=True)
    finally:
        shutil.rmtree(Path(converted.output_dir).parent)
        assert not any(kvm.domain_exists(bed.libvirt_conn(h), target) for h in bed.libvirt)


# --- refusals: one try --------------------------------------------------------------------


def test_a_wrong_vcenter_password_fails_preflight_at_the_first_try(bed, bed_blocks, wrong_password):
    settings = _save(_retrying(), "settings")
    request = request_for(bed_blocks, WEB, vcenter=wrong_password, settings=settings)
    state = migrate_vm(request, return_state=True)
    assert state.is_failed()
    preflight = _run_of(state, "preflight")
    assert preflight.state.is_failed()
    assert preflight.run_count == 1  # not 3: each try would count towards a lock-out
    message = str(state.message)
    assert "refused the login" in message and "Fix: check the user name and password" in message
    assert "not-the-password" not in message


def test_a_wrong_password_typed_into_ovftool_is_not_typed_again(
    bed, bed_blocks, wrong_password, tmp_path
):
    host = bed_blocks["kvm2"]  # the host with ovftool
    calls = Path(KvmHost.load(host).workdir) / "ovftool-calls.log"
    before = calls.read_text().count("\n") if calls.exists() else 0
    request = request_for(bed_blocks, WEB, vcenter=wrong_password)
    with bed.vcsim.connect() as si:
        spec = vc.read_spec(si, vc.find_vm(si, vc.datacenter(si, None), WEB))
    directory = Path(bed.scratch) / f"v2k-{uuid.uuid4().hex[:12]}" / "export"

    @flow(name="errors-ovftool")
    def ovftool_only():
        staged = ovftool_export_task.with_options(retries=2, retry_delay_seconds=0)
        return staged(request, spec, host, str(directory), _retrying(), "errors-ovftool")

    try:
        state = ovftool_only(return_state=True)
    finally:
        shutil.rmtree(directory.parent, ignore_errors=True)
    assert state.is_failed()
    assert _run_of(state, "export-ovftool").run_count == 1
    after = calls.read_text().count("\n")
    assert after - before == 1  # ovftool ran once, so vCenter saw one failed login
    message = str(state.message)
    assert "refused ovftool's login" in message and "Incorrect login credentials" in message
    assert "Fix: check the user name and password" in message
    assert "not-the-password" not in message


def _export_flow(vcenter_block: str, spec: VmSpec, directory: Path, config: MigrationSettings):
    @flow(name="errors-export")
    def export_only() -> ExportResult:
        return run_export(vcenter_block, spec, directory, config, f"err-{uuid.uuid4().hex[:8]}")

    return export_only(return_state=True)


@pytest.fixture()
def web_spec(bed) -> VmSpec:
    with bed.vcsim.connect() as si:
        return vc.read_spec(si, vc.find_vm(si, vc.datacenter(si, None), WEB))


@pytest.mark.parametrize("status", [401, 403])
def test_a_download_refused_with_401_or_403_is_asked_for_once(
    bed, bed_blocks, clean_sim, web_spec, tmp_path, status
):
    clean_sim.fault(nfc_status=status, times=10)
    state = _export_flow(bed_blocks["vcenter"], web_spec, tmp_path / "export", _retrying())
    assert state.is_failed()
    assert clean_sim.stats()["nfc_requests"] == 1  # the server saw one request
    assert _run_of(state, "download-disk-0").run_count == 1
    assert _run_of(state, "export-").run_count == 1  # no new lease either
    message = str(state.message)
    assert f"server answered {status}" in message and "Fix:" in message


def test_a_download_that_fails_with_503_is_retried(bed, bed_blocks, clean_sim, web_spec, tmp_path):
    clean_sim.fault(nfc_status=503, times=1)
    state = _export_flow(bed_blocks["vcenter"], web_spec, tmp_path / "export", _retrying())
    assert state.is_completed(), state.message
    assert clean_sim.stats()["nfc_requests"] == 2
    assert _run_of(state, "download-disk-0").run_count == 2


def test_a_key_the_host_refuses_fails_the_import_at_the_first_try(bed, bed_blocks, stranger_key):
    """The block's own libvirt URI (qemu+libssh2 with its key) is what the import opens."""
    good = KvmHost.load(bed_blocks["kvm1"])
    host = _save(
        good.model_copy(update={"private_key_path": str(stranger_key), "libvirt_uri": None}),
        "kvm-stranger",
    )
    state = _import(bed, bed_blocks, host=host)
    assert state.is_failed()
    assert _run_of(state, "import").run_count == 1
    message = str(state.message)
    assert "refused the login" in message and "Fix: check the KvmHost block's key" in message


def test_a_key_the_host_refuses_fails_the_ovftool_export_at_the_first_try(
    bed, bed_blocks, stranger_key
):
    good = KvmHost.load(bed_blocks["kvm2"])
    host = _save(good.model_copy(update={"private_key_path": str(stranger_key)}), "kvm-stranger")
    request = request_for(bed_blocks, WEB)
    with bed.vcsim.connect() as si:
        spec = vc.read_spec(si, vc.find_vm(si, vc.datacenter(si, None), WEB))
    directory = Path(bed.scratch) / f"v2k-{uuid.uuid4().hex[:12]}" / "export"

    @flow(name="errors-ssh")
    def ovftool_only():
        staged = ovftool_export_task.with_options(retries=2, retry_delay_seconds=0)
        return staged(request, spec, host, str(directory), _retrying(), "errors-ssh")

    state = ovftool_only(return_state=True)
    assert state.is_failed()
    assert _run_of(state, "export-ovftool").run_count == 1
    message = str(state.message)
    assert "refused the SSH login" in message and "Fix: check the KvmHost block's private key" in (
        message
    )
    assert not directory.parent.exists()


def test_an_unknown_or_changed_host_key_is_refused_with_the_fix(bed, bed_blocks, tmp_path):
    good = KvmHost.load(bed_blocks["kvm1"])
    other = bed.hosts.hosts[1]
    wrong_key = Path(other.host_key).with_suffix(".pub").read_text().split()[:2]
    name = bed.hosts.hosts[0].known_hosts_name
    forged = good.model_copy(update={"known_hosts": f"{name} {' '.join(wrong_key)}\n"})
    with pytest.raises(errors.Refused, match="not the one in known_hosts.*Fix: if the host was"):
        with ssh.connection(forged) as conn:
            conn.run("true", hide=True, in_stream=False, timeout=30)
    unknown = tmp_path / "known_hosts"
    unknown.write_text(f"{name} {' '.join(wrong_key)}\n".replace(name, "somewhere-else", 1))
    stranger = good.model_copy(update={"known_hosts": str(unknown)})
    with pytest.raises(errors.Refused, match="not in known_hosts.*Fix: add the host's key"):
        with ssh.connection(stranger) as conn:
            conn.run("true", hide=True, in_stream=False, timeout=30)
    # libvirt's own SSH transport checks the same files: refused as well.
    changed = tmp_path / "changed_known_hosts"
    changed.write_text(f"{name} {' '.join(wrong_key)}\n")
    for known_hosts in (unknown, changed):
        uri = good.model_copy(update={"libvirt_uri": None, "known_hosts": str(known_hosts)})
        with pytest.raises(kvm.KvmImportRefused, match="refused the login"):
            kvm.open_connection(uri.get_libvirt_uri())


def test_a_missing_pool_fails_the_import_at_the_first_try(bed, bed_blocks):
    cluster = KvmCluster.load(bed_blocks["cluster"])
    missing = _save(cluster.model_copy(update={"storage_pool": "no-such-pool"}), "cluster")
    state = _import(bed, bed_blocks, host=bed_blocks["kvm1"], cluster=missing)
    assert state.is_failed()
    assert _run_of(state, "import").run_count == 1
    message = str(state.message)
    assert "storage pool 'no-such-pool' does not exist" in message
    assert "Fix: define the pool" in message


def test_an_inactive_pool_fails_the_import_at_the_first_try(bed, bed_blocks, tmp_path):
    name = f"v2k-errors-{uuid.uuid4().hex[:6]}"
    conn = bed.libvirt_conn("kvm1")  # the import host of `_import`
    pool = conn.storagePoolDefineXML(
        f"<pool type='dir'><name>{name}</name><target><path>{tmp_path}</path></target></pool>"
    )
    try:
        cluster = KvmCluster.load(bed_blocks["cluster"])
        stopped = _save(cluster.model_copy(update={"storage_pool": name}), "cluster")
        state = _import(bed, bed_blocks, host=bed_blocks["kvm1"], cluster=stopped)
    finally:
        pool.undefine()
    assert state.is_failed()
    assert _run_of(state, "import").run_count == 1
    message = str(state.message)
    assert f"storage pool {name!r} is not active" in message
    assert f"Fix: start it (virsh pool-start {name}" in message


def test_ovftool_that_asks_for_the_password_again_is_stopped(tmp_path: Path, web_spec: VmSpec):
    """Whether ovftool itself asks a second time after a refused login or not, v2k types
    the password once: a second prompt stops the command (here a real process on this
    machine that keeps prompting, as a tool that retries the login would)."""
    from invoke import Context

    from tasks.ovftool import OvftoolRefused, run_ovftool

    answers = tmp_path / "answers"
    tool = tmp_path / "bin" / "ovftool"
    tool.parent.mkdir()
    tool.write_text(
        "#!/bin/sh\n"
        f"while :; do printf 'Password: '; read -r pw || exit 1; echo typed >> {answers}; done\n"
    )
    tool.chmod(0o755)
    vcenter = VCenter(host="vcenter.invalid", username="someone", password="secret")
    target = tmp_path / "export"
    with pytest.raises(OvftoolRefused, match="asked for the password again.*Fix: check"):
        run_ovftool(
            Context(),
            vcenter,
            web_spec,
            target_dir=str(target),
            threads=None,
            timeout_seconds=60,
            env={"PATH": f"{tool.parent}:/usr/bin:/bin"},
            on_percent=lambda _: None,
        )
    assert answers.read_text() == "typed\n"
    pid = (target / ".ovftool.pid").read_text().strip()
    assert not Path(f"/proc/{pid}").exists()  # stopped with its process group
