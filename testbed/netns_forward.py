"""Let the KVM hosts reach vCenter at the same loopback address the worker uses.

A test bed host lives in its own network namespace, where 127.0.0.1 is its own loopback.
A real KVM host reaches vCenter by the same name as the worker; here a forwarder gives it
that: a listening socket made inside the host's namespace on 127.0.0.1:PORT, whose
connections are relayed to 127.0.0.1:PORT of the root namespace. A socket stays in the
namespace it was created in, so one thread can switch namespace just to create it.
All traffic stays on loopback.
"""

from __future__ import annotations

import ctypes
import os
import socket
import threading
from contextlib import contextmanager
from pathlib import Path

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextmanager
def _in_netns(name: str):
    """Run the body in network namespace `name` (this thread only), then come back."""
    with open("/proc/thread-self/ns/net") as home, open(Path("/run/netns") / name) as target:
        _setns(target.fileno())
        try:
            yield
        finally:
            _setns(home.fileno())


class LoopbackForwarder:
    """Relay 127.0.0.1:port inside a namespace to 127.0.0.1:port of the root namespace."""

    def __init__(self, netns: str, port: int) -> None:
        self.netns = netns
        self.port = port
        self._listener: socket.socket | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> LoopbackForwarder:
        made: list[socket.socket] = []

        def bind() -> None:
            with _in_netns(self.netns):
                # lo must be up inside the namespace (the test bed brings it up).
                sock = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
            made.append(sock)

        # A fresh thread, so the caller's thread never changes namespace.
        binder = threading.Thread(target=bind)
        binder.start()
        binder.join()
        if not made:
            raise OSError(f"could not listen on 127.0.0.1:{self.port} in {self.netns}")
        self._listener = made[0]
        self._listener.settimeout(0.5)
        self._thread = threading.Thread(target=self._serve, name=f"fwd-{self.netns}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        if self._listener:
            self._listener.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                inside, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                outside = socket.create_connection(("127.0.0.1", self.port), timeout=10)
            except OSError:
                inside.close()
                continue
            for a, b in ((inside, outside), (outside, inside)):
                threading.Thread(target=_pump, args=(a, b), daemon=True).start()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    src.settimeout(None)
    try:
        while data := src.recv(1 << 16):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        src.close()
