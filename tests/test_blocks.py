import uuid

import pytest
from prefect.client.orchestration import get_client
from pydantic import ValidationError

from blocks import KvmCluster, KvmHost, KvmHostError, MigrationSettings, TemporaryStorage, VCenter

SECRET = "s3cr3t-" + uuid.uuid4().hex


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_vcenter_save_load_and_secret_masked_in_api(prefect_harness):
    name = _name("vc")
    VCenter(host="vc.example", username="admin", password=SECRET).save(name)

    loaded = VCenter.load(name)
    assert loaded.password.get_secret_value() == SECRET
    assert loaded.verify_tls is True

    with get_client(sync_client=True) as client:
        document = client.read_block_document_by_name(
            name, block_type_slug="v2k-vcenter", include_secrets=False
        )
    assert SECRET not in repr(document.data)
    assert document.data["password"] != SECRET


def test_kvm_host_secret_masked_and_cluster_resolves_names(prefect_harness):
    host_name = _name("kvm")
    KvmHost(address="10.0.0.9", password=SECRET).save(host_name)
    cluster_name = _name("cluster")
    KvmCluster(hosts=[host_name], network_map={"VM Network": "network:default"}).save(cluster_name)

    with get_client(sync_client=True) as client:
        document = client.read_block_document_by_name(
            cluster_name, block_type_slug="v2k-kvm-cluster", include_secrets=False
        )
        host_doc = client.read_block_document_by_name(
            host_name, block_type_slug="v2k-kvm-host", include_secrets=False
        )
    assert document.data["hosts"] == [host_name]
    assert SECRET not in repr(host_doc.data)

    hosts = KvmCluster.load(cluster_name).load_hosts()
    assert hosts[host_name].password.get_secret_value() == SECRET


def test_cluster_naming_missing_host_block(prefect_harness):
    cluster = KvmCluster(hosts=["no-such-host-" + uuid.uuid4().hex[:6]])
    with pytest.raises(KvmHostError, match="does not exist"):
        cluster.load_hosts()


def test_settings_and_storage_roundtrip(prefect_harness):
    name = _name("settings")
    MigrationSettings(threads_on_ms=2, convert_timeout=6, virt_v2v_verbose=True).save(name)
    loaded = MigrationSettings.load(name)
    assert (loaded.threads_on_ms, loaded.convert_timeout_seconds) == (2, 6 * 3600)
    assert loaded.policy("import").timeout_seconds > 0

    storage = _name("tmp")
    TemporaryStorage(worker_path="/mnt/v2k", host_path="/srv/v2k").save(storage)
    assert TemporaryStorage.load(storage).path_on_host("/mnt/v2k/run1/a.vmdk") == (
        "/srv/v2k/run1/a.vmdk"
    )


def test_local_storage_paths(prefect_harness):
    local = TemporaryStorage(shared=False, host_path="/var/lib/v2k")
    assert local.host_dir == "/var/lib/v2k" and local.worker_path is None
    assert local.run_dir("abc") == "/var/lib/v2k/v2k-abc"
    # The flow holds host paths already: nothing to translate.
    assert local.path_on_host("/var/lib/v2k/v2k-abc/out") == "/var/lib/v2k/v2k-abc/out"
    # A block saved before host_path existed for local storage keeps its meaning.
    legacy = _name("tmp")
    TemporaryStorage(worker_path="/srv/scratch", shared=False).save(legacy)
    assert TemporaryStorage.load(legacy).run_dir("abc") == "/srv/scratch/v2k-abc"
    shared = TemporaryStorage(worker_path="/mnt/v2k", host_path="/srv/v2k")
    assert shared.run_dir("abc") == "/mnt/v2k/v2k-abc"
    assert shared.path_on_host(shared.run_dir("abc")) == "/srv/v2k/v2k-abc"


@pytest.mark.parametrize(
    ("block", "kwargs", "message"),
    [
        (VCenter, {"host": " ", "username": "u", "password": "p"}, "host is empty"),
        (VCenter, {"host": "vc", "port": 70000, "username": "u", "password": "p"}, "port"),
        (KvmHost, {"address": "h"}, "exactly one of"),
        (KvmHost, {"address": "h", "password": "p", "private_key_path": "/k"}, "exactly one of"),
        (KvmHost, {"address": "", "password": "p"}, "address is empty"),
        (KvmCluster, {"hosts": []}, "at least one"),
        (KvmCluster, {"hosts": ["a"], "network_map": {"pg": "br0"}}, "network:NAME"),
        (MigrationSettings, {"threads_on_ms": -2}, "threads_on_ms"),
        (MigrationSettings, {"convert_timeout": 0}, "convert_timeout"),
        (TemporaryStorage, {"worker_path": "relative/dir"}, "absolute"),
        (TemporaryStorage, {"host_path": "/srv/v2k"}, "shared storage needs worker_path"),
        (TemporaryStorage, {"shared": False}, "needs host_path"),
    ],
)
def test_bad_values_are_refused_clearly(block, kwargs, message):
    with pytest.raises(ValidationError, match=message):
        block(**kwargs)


@pytest.mark.parametrize(
    ("threads", "disks", "expected"),
    [(-1, 4, 1), (1, 4, 1), (0, 4, 4), (2, 4, 2), (8, 3, 3), (0, 1, 1)],
)
def test_download_threads_follow_cloudstack(threads, disks, expected):
    assert MigrationSettings(threads_on_ms=threads).download_threads(disks) == expected


def test_block_register_module(prefect_harness):
    import subprocess
    import sys

    from prefect.settings import PREFECT_API_URL

    env = {"PREFECT_API_URL": PREFECT_API_URL.value(), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-m", "prefect", "block", "register", "-m", "blocks"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr + out.stdout
    with get_client(sync_client=True) as client:
        slugs = {bt.slug for bt in client.read_block_types()}
    assert {"v2k-vcenter", "v2k-kvm-host", "v2k-kvm-cluster"} <= slugs
