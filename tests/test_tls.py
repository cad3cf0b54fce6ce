"""tasks.tls.read_ahead against a TLS server on loopback: fewer read calls, the same bytes."""

from __future__ import annotations

import random
import socket
import ssl
import threading
from pathlib import Path

import pytest

from tasks.tls import read_ahead
from testbed.certs import make_certs

BODY = random.Random(3).randbytes(4 << 20)
RECORD = 16 << 10  # the most plaintext one TLS record carries


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """A TLS server that sends BODY to whoever connects, then closes; yields (port, CA)."""
    certs = make_certs(tmp_path_factory.mktemp("tls-certs"))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs.cert, certs.key)
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            try:
                with context.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(BODY)
            except OSError:  # a client that refused the certificate; ssl.SSLError is one
                conn.close()

    threading.Thread(target=serve, daemon=True).start()
    yield listener.getsockname()[1], certs.ca_cert
    listener.close()


def _read_calls() -> int:
    """read(2)-like system calls of this process so far; OpenSSL reads its socket so."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("syscr:"):
            return int(line.split()[1])
    raise AssertionError("no syscr in /proc/self/io")


def _receive(port: int, context: ssl.SSLContext) -> tuple[bytes, int]:
    """BODY as received through `context`, and the read calls it took."""
    connection = socket.create_connection(("127.0.0.1", port))
    with context.wrap_socket(connection, server_hostname="127.0.0.1") as tls:
        tls.do_handshake()
        buf = bytearray(len(BODY))
        view = memoryview(buf)
        got = 0
        before = _read_calls()
        while got < len(buf) and (n := tls.recv_into(view[got:])):
            got += n
        return bytes(buf[:got]), _read_calls() - before


def test_read_ahead_takes_many_records_per_read_call(server):
    port, ca = server
    plain = ssl.create_default_context(cafile=str(ca))
    ahead = ssl.create_default_context(cafile=str(ca))
    assert read_ahead(ahead) is True

    body, without = _receive(port, plain)
    assert body == BODY
    # Without read-ahead: a call for each record's header and one for its body.
    assert without >= 2 * (len(BODY) // RECORD)

    body, with_read_ahead = _receive(port, ahead)
    assert body == BODY
    assert with_read_ahead < 0.75 * without


def test_read_ahead_keeps_the_context_as_it_was(server, tmp_path: Path):
    port, ca = server
    context = ssl.create_default_context(cafile=str(ca))
    options, mode = context.options, context.verify_mode
    assert read_ahead(context) and read_ahead(context)  # twice is harmless
    assert (context.options, context.verify_mode) == (options, mode)
    # Verification still applies: a context trusting another CA refuses the server.
    other = make_certs(tmp_path).ca_cert
    untrusting = ssl.create_default_context(cafile=str(other))
    assert read_ahead(untrusting)
    with pytest.raises(ssl.SSLCertVerificationError):
        _receive(port, untrusting)
