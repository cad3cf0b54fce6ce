"""OpenSSL's read-ahead for Python's `ssl` contexts: fewer system calls per byte received.

Python's `ssl` module has no switch for it, so this reaches the `SSL_CTX` behind a
context through `ctypes`, in the OpenSSL library `_ssl` itself is linked with. It only
acts where it can check that it has the right object (CPython, the context's own options
and verify mode read back through the pointer); anywhere else it changes nothing.
"""

from __future__ import annotations

import ctypes
import functools
import ssl
import sys

_SSL_CTRL_GET_READ_AHEAD = 40
_SSL_CTRL_SET_READ_AHEAD = 41
# OpenSSL's SSL_VERIFY_* flags for each of Python's verify modes.
_VERIFY_FLAGS = {ssl.CERT_NONE: 0, ssl.CERT_OPTIONAL: 1, ssl.CERT_REQUIRED: 3}


@functools.cache
def _libssl() -> ctypes.CDLL | None:
    """The OpenSSL library of Python's `ssl`, its functions typed; None if out of reach."""
    import _ssl

    path = getattr(_ssl, "__file__", None)
    if sys.implementation.name != "cpython" or not path:
        return None
    try:
        # dlsym on the extension's handle also finds the libssl it is linked with.
        lib = ctypes.CDLL(path)
        ctrl, options, verify = (
            lib.SSL_CTX_ctrl,
            lib.SSL_CTX_get_options,
            lib.SSL_CTX_get_verify_mode,
        )
    except (OSError, AttributeError):
        return None
    ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
    ctrl.restype = ctypes.c_long
    options.argtypes = verify.argtypes = [ctypes.c_void_p]
    options.restype, verify.restype = ctypes.c_uint64, ctypes.c_int
    return lib


def _ssl_ctx(lib: ctypes.CDLL, context: ssl.SSLContext) -> int | None:
    """The `SSL_CTX *` behind `context`, if what it points at reads back as the context."""
    # CPython's SSLContext object: the object header, then the SSL_CTX pointer.
    pointer = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
    if not pointer:
        return None
    same = (
        lib.SSL_CTX_get_options(pointer) == context.options
        and lib.SSL_CTX_get_verify_mode(pointer) == _VERIFY_FLAGS[context.verify_mode]
    )
    return pointer if same else None


def read_ahead(context: ssl.SSLContext) -> bool:
    """Let OpenSSL read TLS records ahead, many per system call; True if it is on.

    Without it every 16 KiB record of a disk costs two `read` calls (its header, then its
    body): 130,000 per GiB. With it, one call takes whatever the socket holds, up to
    OpenSSL's buffer: a lone disk's download, which the network loop bounds, is about
    3 % faster (docs/benchmarks.md). Sockets made from the context afterwards read ahead;
    Python's blocking and timeout reads take what OpenSSL buffered before they wait on
    the socket, so nothing else changes for them.
    """
    lib = _libssl()
    pointer = _ssl_ctx(lib, context) if lib is not None else None
    if pointer is None:
        return False
    lib.SSL_CTX_ctrl(pointer, _SSL_CTRL_SET_READ_AHEAD, 1, None)
    return lib.SSL_CTX_ctrl(pointer, _SSL_CTRL_GET_READ_AHEAD, 0, None) == 1
