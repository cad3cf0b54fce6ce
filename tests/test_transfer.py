"""tasks.transfer.download against the test bed's vCenter: exact bytes, resume with Range
after a cut connection and from a partial file (checked against the server's bytes first),
and clear errors when it cannot finish.

The server's download counters (VcSim.stats) show what went over the wire."""

from __future__ import annotations

import hashlib
import http.client
import http.server
import logging
import random
import ssl
import threading
from pathlib import Path

import pytest
from pyVmomi import vim

import tasks.transfer as transfer
from tasks.transfer import TAIL_CHECK, Downloaded, TransferError, download
from testbed.certs import make_certs
from testbed.images import sha256_file
from testbed.inventory import apply_inventory, parse_inventory
from testbed.vcsim import VcSim

MiB = 1 << 20
VM = "xfer-vm"

INVENTORY = {
    "version": 1,
    "datacenters": [
        {
            "name": "DC0",
            "clusters": [{"name": "DC0_C0", "hosts": ["DC0_C0_H0", "DC0_C0_H1"]}],
            "datastores": [{"name": "LocalDS_0"}],
            "vms": [
                {
                    "name": VM,
                    "guest_id": "debian12_64Guest",
                    "instance_uuid": "5003a1b2-7777-4c5e-8a00-000000000001",
                    # 8 MiB of random bytes: the streamOptimized VMDK is a bit larger.
                    "disks": [{"size": "8MiB", "fill": "8MiB", "datastore": "LocalDS_0"}],
                }
            ],
        }
    ],
}


class Disk:
    """The VM's disk file as the datastore holds it."""

    def __init__(self, moref: str, path: Path) -> None:
        self.moref = moref
        self.path = path
        self.data = path.read_bytes()
        self.size = len(self.data)
        self.sha256 = sha256_file(path)


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory):
    with VcSim(tmp_path_factory.mktemp("vcsim-transfer")) as s:
        yield s


@pytest.fixture(scope="module")
def si(sim: VcSim):
    with sim.connect() as si:
        yield si


@pytest.fixture(scope="module")
def disk(sim: VcSim, si, tmp_path_factory: pytest.TempPathFactory) -> Disk:
    work = tmp_path_factory.mktemp("transfer-images")
    applied = apply_inventory(
        si, parse_inventory(INVENTORY), verify=str(sim.ca_cert), work_dir=work
    ).vms[VM]
    (file_name,) = applied.disk_files
    datastore, _, rel = file_name.partition("] ")
    assert datastore == "[LocalDS_0"
    found = Disk(applied.moref, sim.datastore_path("LocalDS_0") / rel)
    assert found.size > 8 * MiB
    return found


@pytest.fixture
def url(sim: VcSim, si, disk: Disk):
    """The device URL of a fresh export lease on the VM; no faults armed, stats zeroed."""
    lease = vim.VirtualMachine(disk.moref, si._stub).ExportVm()
    assert lease.state == "ready"
    (device,) = lease.info.deviceUrl
    assert device.fileSize == disk.size
    sim.fault(clear=1)
    sim.reset_stats()
    yield device.url.replace("*", f"{sim.host}:{sim.port}", 1)
    sim.fault(clear=1)
    if lease.state == "ready":
        lease.HttpNfcLeaseComplete()


def fetch(sim: VcSim, url: str, dest: Path, **kwargs) -> Downloaded:
    return download(url, dest, ssl_context=sim.ssl_context(), read_timeout=10, **kwargs)


# hash_thread=False: how a disk downloads beside others (the export's at_once > 1).
@pytest.mark.parametrize("hash_thread", [True, False], ids=["hash-thread", "one-writer"])
def test_download_gets_the_exact_bytes(
    sim: VcSim, disk: Disk, url: str, tmp_path: Path, hash_thread: bool
):
    reports: list[tuple[int, int | None]] = []
    dest = tmp_path / "disk-0.vmdk"
    got = fetch(
        sim,
        url,
        dest,
        expected_size=disk.size,
        on_progress=lambda done, total: reports.append((done, total)),
        hash_thread=hash_thread,
    )
    assert got.bytes == disk.size
    assert got.sha256 == disk.sha256 == sha256_file(dest)
    assert got.resumed_from == 0 and got.resumes == 0
    assert reports[-1] == (disk.size, disk.size)
    stats = sim.stats()
    assert stats["nfc_requests"] == 1 and stats["nfc_range_requests"] == 0
    assert stats["nfc_bytes"] == disk.size
    assert stats["nfc_completed"] == 1 and stats["nfc_active"] == 0


def test_download_without_expected_size_trusts_the_server(
    sim: VcSim, disk: Disk, url: str, tmp_path: Path
):
    got = fetch(sim, url, tmp_path / "disk-0.vmdk")
    assert (got.bytes, got.sha256) == (disk.size, disk.sha256)


@pytest.mark.parametrize("hash_thread", [True, False], ids=["hash-thread", "one-writer"])
def test_a_cut_connection_resumes_with_range_from_the_bytes_on_disk(
    sim: VcSim, disk: Disk, url: str, tmp_path: Path, hash_thread: bool
):
    sim.fault(nfc_cut_after=3 * MiB, times=2)
    dest = tmp_path / "disk-0.vmdk"
    got = fetch(sim, url, dest, expected_size=disk.size, hash_thread=hash_thread)
    assert got.resumes == 2
    assert got.resumed_from == 0
    assert got.bytes == disk.size
    assert got.sha256 == disk.sha256 == sha256_file(dest)
    stats = sim.stats()
    # Two cut requests and the rest: each resume asked only for the missing bytes.
    assert stats["nfc_requests"] == 3 and stats["nfc_range_requests"] == 2
    assert stats["nfc_broken"] == 2 and stats["nfc_completed"] == 1
    assert stats["nfc_bytes"] == disk.size


def test_a_partial_file_from_an_earlier_try_is_continued(
    sim: VcSim, disk: Disk, url: str, tmp_path: Path
):
    dest = tmp_path / "disk-0.vmdk"
    partial = MiB + 12345
    dest.write_bytes(disk.data[:partial])
    got = fetch(sim, url, dest, expected_size=disk.size)
    assert got.resumed_from == partial
    assert got.resumes == 0 and got.discarded == 0
    assert got.bytes == disk.size
    # The hash covers the bytes that were already there too.
    assert got.sha256 == disk.sha256 == sha256_file(dest)
    stats = sim.stats()
    assert stats["nfc_requests"] == 1 and stats["nfc_range_requests"] == 1
    # The file's last TAIL_CHECK bytes came again, to be compared, then the rest.
    assert stats["nfc_bytes"] == disk.size - partial + TAIL_CHECK


def test_a_partial_file_whose_tail_differs_is_downloaded_again(
    sim: VcSim, disk: Disk, url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    dest = tmp_path / "disk-0.vmdk"
    partial = 3 * MiB
    stale = bytearray(disk.data[:partial])
    stale[-100] ^= 0xFF  # one byte in the checked tail
    dest.write_bytes(stale)
    with caplog.at_level(logging.WARNING, logger="tasks.transfer"):
        got = fetch(sim, url, dest, expected_size=disk.size)
    assert (got.bytes, got.resumed_from, got.discarded) == (disk.size, 0, partial)
    assert got.sha256 == disk.sha256 == sha256_file(dest)
    assert f"the {partial} bytes on disk are not the server's" in caplog.text
    assert "differ from the server's" in caplog.text
    stats = sim.stats()
    # The range to compare (dropped after its first TAIL_CHECK bytes; the server counts
    # what it had pushed into the socket by then), then the whole disk from 0.
    assert stats["nfc_requests"] == 2 and stats["nfc_range_requests"] == 1
    assert stats["nfc_completed"] == 1
    assert stats["nfc_bytes"] >= TAIL_CHECK + disk.size


def test_a_partial_file_longer_than_the_disk_is_downloaded_again(
    sim: VcSim, disk: Disk, url: str, tmp_path: Path
):
    dest = tmp_path / "disk-0.vmdk"
    dest.write_bytes(disk.data + b"stale")
    got = fetch(sim, url, dest, expected_size=disk.size)
    assert (got.resumed_from, got.discarded) == (0, disk.size + 5)
    assert got.sha256 == disk.sha256 == sha256_file(dest)
    assert sim.stats()["nfc_range_requests"] == 0


def test_a_partial_file_too_short_to_check_is_downloaded_again(
    sim: VcSim, disk: Disk, url: str, tmp_path: Path
):
    dest = tmp_path / "disk-0.vmdk"
    dest.write_bytes(disk.data[:1000])
    got = fetch(sim, url, dest, expected_size=disk.size)
    assert (got.resumed_from, got.discarded) == (0, 1000)
    assert got.sha256 == disk.sha256 == sha256_file(dest)
    stats = sim.stats()
    assert stats["nfc_requests"] == 1 and stats["nfc_range_requests"] == 0


def test_a_whole_file_on_disk_is_checked_and_not_downloaded_again(
    sim: VcSim, disk: Disk, url: str, tmp_path: Path
):
    dest = tmp_path / "disk-0.vmdk"
    dest.write_bytes(disk.data)
    got = fetch(sim, url, dest, expected_size=disk.size)
    assert (got.bytes, got.sha256, got.resumed_from) == (disk.size, disk.sha256, disk.size)
    stats = sim.stats()
    # Only the tail, to compare.
    assert stats["nfc_requests"] == 1 and stats["nfc_range_requests"] == 1
    assert stats["nfc_bytes"] == TAIL_CHECK


def test_a_whole_file_is_checked_without_an_expected_size(
    sim: VcSim, disk: Disk, url: str, tmp_path: Path
):
    dest = tmp_path / "disk-0.vmdk"
    dest.write_bytes(disk.data)
    got = fetch(sim, url, dest)
    assert (got.bytes, got.sha256, got.resumed_from) == (disk.size, disk.sha256, disk.size)
    assert sim.stats()["nfc_bytes"] == TAIL_CHECK


def test_a_cut_during_the_tail_check_checks_again(sim: VcSim, disk: Disk, url: str, tmp_path: Path):
    dest = tmp_path / "disk-0.vmdk"
    partial = 2 * MiB
    dest.write_bytes(disk.data[:partial])
    sim.fault(nfc_cut_after=TAIL_CHECK // 2, times=1)
    got = fetch(sim, url, dest, expected_size=disk.size)
    assert (got.resumed_from, got.resumes, got.discarded) == (partial, 1, 0)
    assert got.sha256 == disk.sha256 == sha256_file(dest)
    stats = sim.stats()
    assert stats["nfc_requests"] == 2 and stats["nfc_range_requests"] == 2


def test_a_server_that_keeps_breaking_the_connection_gives_transfer_error(
    sim: VcSim, disk: Disk, url: str, tmp_path: Path
):
    # Every request breaks before the first body byte: no progress at all.
    sim.fault(nfc_cut_after=0, times=100)
    dest = tmp_path / "disk-0.vmdk"
    with pytest.raises(TransferError) as err:
        fetch(sim, url, dest, expected_size=disk.size, max_resumes=2)
    message = str(err.value)
    assert message.startswith("disk-0.vmdk: gave up after 2 broken connections")
    assert f"at 0 of {disk.size} bytes" in message
    # One try and two resumes.
    assert sim.stats()["nfc_requests"] == 3


def test_progress_between_breaks_keeps_the_download_going(
    sim: VcSim, disk: Disk, url: str, tmp_path: Path
):
    # More breaks than max_resumes, but each one after progress: the download finishes.
    sim.fault(nfc_cut_after=2 * MiB, times=4)
    got = fetch(sim, url, tmp_path / "disk-0.vmdk", expected_size=disk.size, max_resumes=1)
    assert got.resumes == 4
    assert got.sha256 == disk.sha256


def test_a_server_error_gives_transfer_error_naming_the_status(
    sim: VcSim, disk: Disk, url: str, tmp_path: Path
):
    sim.fault(nfc_status=503, times=1)
    dest = tmp_path / "disk-0.vmdk"
    with pytest.raises(TransferError, match=r"server answered 503 Service Unavailable"):
        fetch(sim, url, dest, expected_size=disk.size)
    assert not dest.exists()
    assert sim.stats()["nfc_status_faults"] == 1


def test_a_404_url_gives_transfer_error_naming_the_status(sim: VcSim, tmp_path: Path):
    gone = f"{sim.base_url()}/nfc/52000000-0000-0000-0000-000000000000/disk-0.vmdk?ticket=x"
    dest = tmp_path / "disk-0.vmdk"
    with pytest.raises(TransferError) as err:
        fetch(sim, gone, dest)
    message = str(err.value)
    assert "server answered 404 Not Found" in message
    assert "/nfc/52000000-0000-0000-0000-000000000000/disk-0.vmdk" in message
    assert "ticket" not in message  # the query string may carry a secret
    assert not dest.exists()


def test_an_untrusted_certificate_fails_at_once_without_retries(
    sim: VcSim, disk: Disk, url: str, tmp_path: Path
):
    dest = tmp_path / "disk-0.vmdk"
    with pytest.raises(TransferError, match="TLS verification of .* failed"):
        # The system CAs do not include the test bed's.
        download(url, dest, ssl_context=ssl.create_default_context(), read_timeout=10)
    assert sim.stats()["nfc_requests"] == 0
    assert not dest.exists()


def test_the_cookie_header_is_sent_and_never_in_an_error(
    sim: VcSim, disk: Disk, url: str, tmp_path: Path
):
    sim.fault(nfc_status=503, times=1)
    secret = 'vmware_soap_session="52c0ffee-secret"'
    with pytest.raises(TransferError) as err:
        fetch(sim, url, tmp_path / "disk-0.vmdk", headers={"Cookie": secret})
    assert "secret" not in str(err.value) and "ticket" not in str(err.value)
    got = fetch(sim, url, tmp_path / "disk-0.vmdk", headers={"Cookie": secret})
    assert got.sha256 == disk.sha256


def test_an_error_raised_by_the_progress_callback_stops_the_download(
    sim: VcSim, disk: Disk, url: str, tmp_path: Path
):
    class Abort(Exception):
        pass

    def on_progress(done: int, total: int | None) -> None:
        raise Abort(f"stop at {done}")

    sim.fault(nfc_rate_kbps=4 * 1024, times=1)  # about 2 s
    with pytest.raises(Abort):
        fetch(
            sim,
            url,
            tmp_path / "disk-0.vmdk",
            expected_size=disk.size,
            on_progress=on_progress,
            progress_interval=0.2,
        )
    assert sim.stats()["nfc_bytes"] < disk.size


def test_a_smaller_expected_size_gives_transfer_error(
    sim: VcSim, disk: Disk, url: str, tmp_path: Path
):
    dest = tmp_path / "disk-0.vmdk"
    with pytest.raises(TransferError, match=rf"more than the {disk.size - 1000} expected"):
        fetch(sim, url, dest, expected_size=disk.size - 1000)


def test_a_larger_expected_size_gives_transfer_error(
    sim: VcSim, disk: Disk, url: str, tmp_path: Path
):
    dest = tmp_path / "disk-0.vmdk"
    with pytest.raises(TransferError, match=rf"got {disk.size} bytes, expected {disk.size + 1000}"):
        fetch(sim, url, dest, expected_size=disk.size + 1000)


def test_the_deadline_stops_a_slow_download(sim: VcSim, disk: Disk, url: str, tmp_path: Path):
    sim.fault(nfc_rate_kbps=1024, times=1)  # 8 MiB at 1 MiB/s: 8 s
    with pytest.raises(TimeoutError, match="deadline of 1 s passed"):
        fetch(sim, url, tmp_path / "disk-0.vmdk", deadline_seconds=1)


def test_the_deadline_stops_a_download_stuck_in_a_slow_read(
    sim: VcSim, disk: Disk, url: str, tmp_path: Path
):
    import time

    # 8 KiB/s: one 1 MiB read would take two minutes; the watch thread ends it.
    sim.fault(nfc_rate_kbps=8, times=1)
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="deadline of 1 s passed"):
        fetch(sim, url, tmp_path / "disk-0.vmdk", deadline_seconds=1, progress_interval=0.2)
    assert time.monotonic() - started < 5


def test_an_abort_stops_a_download_stuck_in_a_slow_read(
    sim: VcSim, disk: Disk, url: str, tmp_path: Path
):
    import time

    class Abort(Exception):
        pass

    def on_progress(done: int, total: int | None) -> None:
        raise Abort

    sim.fault(nfc_rate_kbps=8, times=1)
    started = time.monotonic()
    with pytest.raises(Abort):
        fetch(sim, url, tmp_path / "disk-0.vmdk", on_progress=on_progress, progress_interval=0.2)
    assert time.monotonic() - started < 5


def test_the_rate_fault_throttles_and_counts_the_download_as_active(
    sim: VcSim, disk: Disk, url: str, tmp_path: Path
):
    import time

    sim.fault(nfc_rate_kbps=16 * 1024, times=1)  # about half a second
    seen: list[int] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.append(sim.stats()["nfc_active"])
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        got = fetch(sim, url, tmp_path / "disk-0.vmdk", expected_size=disk.size)
    finally:
        done.set()
        watcher.join()
    assert got.sha256 == disk.sha256
    assert got.seconds >= disk.size / (16 * MiB) * 0.9
    assert 1 in seen
    stats = sim.stats()
    assert stats["nfc_active"] == 0 and stats["nfc_max_active"] == 1


def test_the_file_system_type_comes_from_the_longest_mount_point(tmp_path: Path):
    assert transfer._fs_type(Path("/proc/self")) == "proc"
    assert transfer._fs_type(tmp_path) == transfer._fs_type(tmp_path / "missing" / "x")


@pytest.mark.parametrize("direct", [True, False], ids=["o-direct", "page-cache"])
def test_o_direct_on_a_local_file_system_and_the_page_cache_give_the_same_bytes(
    sim: VcSim,
    disk: Disk,
    url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    direct: bool,
):
    if direct and transfer._fs_type(tmp_path) not in transfer.DIRECT_FS:
        pytest.skip(f"{tmp_path} is on {transfer._fs_type(tmp_path)}: no O_DIRECT there")
    monkeypatch.setattr(transfer, "DIRECT_IO", direct)
    calls: list[bool] = []
    real = transfer._set_direct
    monkeypatch.setattr(transfer, "_set_direct", lambda fd, on: calls.append(on) or real(fd, on))
    # A cut at an unaligned byte: the resume goes on through the page cache.
    sim.fault(nfc_cut_after=3 * MiB + 100, times=1)
    dest = tmp_path / "disk-0.vmdk"
    got = fetch(sim, url, dest, expected_size=disk.size)
    assert got.resumes == 1
    assert got.sha256 == disk.sha256 == sha256_file(dest)
    # O_DIRECT on for the first request; off at the cut's unaligned piece, never on again.
    assert calls == ([True, False] if direct else [])


# ---------------------------------------------------------------------------------------
# Body framings other than the simulator's: a small HTTPS server of Python's own
# ---------------------------------------------------------------------------------------

BODY = random.Random(7).randbytes(2 * transfer.CHUNK + 12345)


class _Framings(http.server.BaseHTTPRequestHandler):
    """GET /length: Content-Length, headers and the body's start in one TLS write;
    /chunked: chunked transfer coding; /close: no length, the body ends with the connection."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if self.path == "/length":
            # Headers and body in one write: the first TLS record holds both, so
            # http.client buffers the body's first bytes while it reads the headers.
            head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BODY)
            self.wfile.write(head + BODY)
            return
        self.send_response(200)
        if self.path == "/chunked":
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for at in range(0, len(BODY), 1_000_003):
                piece = BODY[at : at + 1_000_003]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(BODY)
            self.close_connection = True

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def framings(tmp_path_factory: pytest.TempPathFactory):
    certs = make_certs(tmp_path_factory.mktemp("framing-certs"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Framings)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs.cert, certs.key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield (
        f"https://127.0.0.1:{server.server_address[1]}",
        ssl.create_default_context(cafile=str(certs.ca_cert)),
    )
    server.shutdown()
    server.server_close()


# A known length is read from the TLS socket itself; the others through http.client.
@pytest.mark.parametrize(
    ("path", "through_http_client"), [("/length", False), ("/chunked", True), ("/close", True)]
)
def test_every_body_framing_gives_the_exact_bytes(
    framings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: str, through_http_client: bool
):
    base, context = framings
    calls = []
    real = http.client.HTTPResponse.readinto
    monkeypatch.setattr(
        http.client.HTTPResponse, "readinto", lambda self, b: calls.append(1) or real(self, b)
    )
    dest = tmp_path / "disk.vmdk"
    got = download(base + path, dest, ssl_context=context, read_timeout=10)
    assert dest.read_bytes() == BODY
    assert (got.bytes, got.sha256) == (len(BODY), hashlib.sha256(BODY).hexdigest())
    assert got.resumes == 0
    assert bool(calls) is through_http_client


def test_download_reads_ahead_through_its_context(
    framings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    base, context = framings
    seen = []
    monkeypatch.setattr(transfer, "read_ahead", lambda c: seen.append(c) or True)
    download(base + "/length", tmp_path / "disk.vmdk", ssl_context=context, read_timeout=10)
    assert seen == [context]
