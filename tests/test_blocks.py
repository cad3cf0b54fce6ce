import http.client
import socket
import ssl
import threading
import time
import uuid
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from pydantic import ValidationError

import blocks.vcenter
from blocks import KvmCluster, KvmHost, KvmHostError, MigrationSettings, TemporaryStorage, VCenter
from blocks.vcenter import VCenterError, service_content
from testbed.certs import make_certs
from testbed.vcsim import VcSim

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


VERSIONS = b"""<?xml version="1.0" encoding="UTF-8"?>
<namespaces version="1.0"><namespace><name>urn:vim25</name><version>6.5</version>
<priorVersions><version>6.0</version></priorVersions></namespace></namespaces>"""
ANSWER_PROBE = {"on": False}  # whether the silent vCenter answers the version probe


@pytest.fixture(scope="module")
def silent_vcenter(tmp_path_factory: pytest.TempPathFactory):
    """A TLS server that answers the API version probe when its path says so, and
    otherwise reads the request and never answers; yields (port, CA file)."""
    certs = make_certs(tmp_path_factory.mktemp("silent-vcenter"))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs.cert, certs.key)
    listener = socket.create_server(("127.0.0.1", 0))
    held = []

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
                tls = context.wrap_socket(conn, server_side=True)
                request = tls.recv(65536)
            except OSError:
                if listener.fileno() == -1:
                    return
                continue
            if request.startswith(b"GET /sdk/vimServiceVersions.xml") and ANSWER_PROBE["on"]:
                head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(VERSIONS)
                tls.sendall(head + VERSIONS)
            held.append(tls)  # open and silent

    threading.Thread(target=serve, daemon=True).start()
    yield listener.getsockname()[1], certs.ca_cert
    listener.close()
    for tls in held:
        tls.close()


@pytest.mark.parametrize("stage", ["version probe", "login"])
def test_a_vcenter_that_never_answers_fails_within_the_timeout(
    silent_vcenter, monkeypatch: pytest.MonkeyPatch, stage: str
):
    port, ca = silent_vcenter
    monkeypatch.setitem(ANSWER_PROBE, "on", stage == "login")
    vcenter = VCenter(
        host="127.0.0.1", port=port, username="u", password=SECRET, ca_cert=str(ca), timeout=1
    )
    started = time.monotonic()
    with pytest.raises(VCenterError, match=rf"127\.0\.0\.1:{port} did not answer within 1 s"):
        with vcenter.connect():
            pass
    assert time.monotonic() - started < 10


def test_the_api_version_is_asked_once_per_vcenter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from pyVmomi.VmomiSupport import versionIdMap

    probes = []
    real = http.client.HTTPSConnection.request

    def counted(self, method, url, *args, **kwargs):
        if url.endswith("vimServiceVersions.xml"):
            probes.append(url)
        return real(self, method, url, *args, **kwargs)

    monkeypatch.setattr(http.client.HTTPSConnection, "request", counted)
    with VcSim(tmp_path / "vcsim") as sim:
        vcenter = VCenter(
            host=sim.host,
            port=sim.port,
            username=sim.user,
            password=sim.password,
            ca_cert=str(sim.ca_cert),
        )
        for _ in range(2):
            with vcenter.connect() as si:
                assert service_content(si).about.apiVersion
        version = blocks.vcenter._api_versions[(sim.host, sim.port)]
        # Without the probe, the TLS check comes in pyvmomi's log-in: still named as such.
        other_ca = make_certs(tmp_path / "other").ca_cert
        untrusting = vcenter.model_copy(update={"ca_cert": str(other_ca)})
        with pytest.raises(VCenterError, match="TLS verification of .* failed"):
            with untrusting.connect():
                pass
    assert len(probes) == 1
    # The simulator offers 6.5 and older: the newest of those pyvmomi knows.
    assert versionIdMap[version] == "6.5"
