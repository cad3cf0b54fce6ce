"""One SSH connection per KVM host for a whole migration run, instead of one per stage.

A migration logs in to its hosts to probe them, to convert and to import; each login is
a key exchange, an authentication and, on a real host, a PAM session. Inside
`shared_connections()` (which migrate-vm opens around its stages), `connection(host)`
hands out the run's fabric Connection to that host: opened at the first use, opened again
when it was lost, closed when the scope ends. Every command still gets a channel of its
own. Outside the scope, each `connection(host)` is a new connection, closed after use.

The scope is a context variable, like `blocks.cache`: the tasks of a run share it
(Prefect copies the context into their threads); two runs, and so two VMs of a wave,
never do.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from blocks import KvmHost

_open: ContextVar[dict[tuple[str, int, str], Any] | None] = ContextVar(
    "v2k_ssh_connections", default=None
)
_lock = threading.Lock()


@contextmanager
def shared_connections() -> Iterator[None]:
    """Within this block, `connection(host)` reuses one connection per host."""
    if _open.get() is not None:
        yield
        return
    opened: dict[tuple[str, int, str], Any] = {}
    token = _open.set(opened)
    try:
        yield
    finally:
        _open.reset(token)
        for conn in opened.values():
            with contextlib.suppress(Exception):  # a host gone meanwhile has nothing to close
                conn.close()


@contextmanager
def connection(host: KvmHost) -> Iterator[Any]:
    """A fabric Connection to `host` (an invoke Context for a local host); see the module."""
    opened = _open.get()
    if opened is None or host.local:
        with host.get_connection() as conn:
            yield conn
        return
    key = (host.address, host.port, host.user)
    with _lock:
        conn = opened.get(key)
    if conn is None or not conn.is_connected:
        # Opened outside the lock: the probes log in to every host at once.
        fresh = host.get_connection()
        fresh.open()
        with _lock:
            conn = opened.get(key)
            if conn is None or not conn.is_connected:
                conn = opened[key] = fresh
        if conn is not fresh:  # another thread of the run got there first
            fresh.close()
    yield conn
