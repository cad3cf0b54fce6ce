"""Streaming a disk from an NFC device URL to a file: constant memory, resumable, checked.

The disk body is read with the standard library's `http.client`, not httpx (which the rest
of v2k uses for HTTP), because it is measurably cheaper: `HTTPResponse.readinto` fills a
preallocated 1 MiB buffer in one call where httpx parses every 16 KiB TLS record in Python
and allocates every chunk; the whole download, sha256 and writes included, needs 1.5 CPU
s/GiB against 2.1-2.3 with httpx (docs/benchmarks.md), and CPU is what bounds a
multi-disk export.
"""

from __future__ import annotations

import contextlib
import contextvars
import fcntl
import hashlib
import http.client
import logging
import mmap
import os
import queue
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from tasks.errors import Refused, Transient, V2kError
from tasks.tls import read_ahead

CHUNK = 8 << 20
"""Bytes read from the network per call, handed to the writer's threads in one buffer.

8 MiB rather than 1: fewer, larger O_DIRECT writes and hand-overs cost about 0.1 CPU
s/GiB less with four disks at once (docs/benchmarks.md)."""

QUEUE_CHUNKS = 2
"""Buffers of one download: bounds its memory (`QUEUE_CHUNKS * CHUNK`, 16 MiB)."""

WRITEBACK = 32 << 20
"""Every this many bytes the writer asks the kernel to write back what came before."""

TAIL_CHECK = 64 << 10
"""Bytes at the end of a partial file that are asked for again and compared before resuming."""

DIRECT_IO = True
"""Write with O_DIRECT on the local file systems of `DIRECT_FS` (see `_Writer`)."""

DIRECT_FS = frozenset({"ext4", "ext3", "ext2", "xfs", "btrfs", "f2fs"})
"""Local block file systems: on NFS every O_DIRECT write would wait for the server."""

ALIGN = 4096
"""File offsets and lengths O_DIRECT writes keep to."""

CONNECT_TIMEOUT = 30.0
"""Seconds allowed for the TCP connection and the TLS handshake (at most `read_timeout`)."""

Progress = Callable[[int, int | None], None]
"""Called with (bytes on disk, total bytes or None) as the download goes."""

log = logging.getLogger(__name__)


REFUSED_STATUSES = frozenset({401, 403})
"""HTTP statuses that say the credentials (the session cookie or ticket) are not good
enough: asking again with the same ones cannot help."""


class TransferError(V2kError):
    """A download failed for good; the message says how far it got.

    `status` is the HTTP status the server refused the download with, None when the
    cause was something else (broken connections, a wrong size). Raised as one of its two
    kinds: `TransferRefused` or `TransferFailed`; `transfer_error` picks.
    """

    def __init__(self, message: str, status: int | None = None, fix: str | None = None) -> None:
        super().__init__(message, fix)
        self.status = status


class TransferRefused(TransferError, Refused):
    """The server refused the credentials (401, 403) or failed the TLS check."""


class TransferFailed(TransferError, Transient):
    """Connections kept breaking, the server failed (5xx), or the size was wrong."""


def transfer_error(message: str, status: int | None = None) -> TransferError:
    """The error for a failed download, of the kind its HTTP status says."""
    if status in REFUSED_STATUSES:
        return TransferRefused(
            message,
            status,
            "check that the vCenter user may export this VM (VirtualMachine.Provisioning."
            "Allow VM download / Allow disk access) and that its session is not ended by "
            "another client",
        )
    return TransferFailed(message, status)


class DeadlineExceeded(Transient, TimeoutError):
    """The whole download took longer than its deadline."""


@dataclass
class Downloaded:
    bytes: int
    sha256: str
    seconds: float
    resumed_from: int
    resumes: int
    discarded: int = 0
    """Bytes of a partial file that did not match the server's and were downloaded again."""


class _Broken(Exception):
    """The connection broke or ended early: the download resumes with Range."""


class _Mismatch(Exception):
    """The bytes on disk are not the server's: the download starts again from 0."""


def _hash_existing(path: Path, digest) -> tuple[int, bytes]:
    """Feed the file into `digest`; return its size and its last `TAIL_CHECK` bytes."""
    size = 0
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with path.open("rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
            size += n
        tail = b""
        if size:
            f.seek(max(0, size - TAIL_CHECK))
            tail = f.read()
    return size, tail


def _total_from(response: http.client.HTTPResponse, start: int) -> int | None:
    """Size of the whole resource from a 206's Content-Range or a Content-Length."""
    if response.status == 206:
        _, _, total = (response.getheader("content-range") or "").rpartition("/")
        return int(total) if total.isdigit() else None
    length = response.getheader("content-length")
    return int(length) + start if length and length.isdigit() else None


def _range_start(response: http.client.HTTPResponse) -> int | None:
    """First byte of a 206 answer, from `Content-Range: bytes START-END/TOTAL`."""
    unit, _, spec = (response.getheader("content-range") or "").partition(" ")
    first = spec.partition("-")[0]
    return int(first) if unit == "bytes" and first.isdigit() else None


def _fs_type(path: Path) -> str:
    """Type of the file system holding `path` (the longest mount point above it)."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return ""
    target = str(path.resolve())
    best, found = "", ""
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) < 5 or not right:
            continue
        # Mount points escape spaces and the like as octal (\040).
        mount = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, found = mount, right.split()[0]
    return found


def _set_direct(fd: int, on: bool) -> bool:
    """Turn O_DIRECT on or off for `fd`; False where the file system does not do it."""
    direct = getattr(os, "O_DIRECT", 0)
    if not direct:
        return False
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | direct if on else flags & ~direct)
    except OSError:
        return False
    return True


class _Writer:
    """Hashes and writes the received buffers in threads of their own.

    The network loop only reads. With `hash_thread`, one thread hashes each buffer while
    another writes it, so TLS, sha256 and the device's write (with O_DIRECT, the thread
    waits for the device itself) overlap instead of adding up: what one download alone
    wants, with a core to spare. Without, one thread writes, then hashes: when several
    downloads run at once the cores are busy anyway, and the third thread per disk only
    adds hand-overs (docs/benchmarks.md). The buffers (`QUEUE_CHUNKS` of `CHUNK` bytes)
    are allocated once and go round between the threads, so memory stays constant
    whatever the disk size and no page is faulted in per chunk; a buffer is free again
    once every thread is done with it.

    With `direct` (a local file system, see `DIRECT_FS`) the file is written with
    O_DIRECT: the device reads the buffer itself, without the copy into the page cache,
    its write-back and the reclaim of those pages later, about 0.15 CPU s/GiB less in all
    (docs/benchmarks.md); a write that is not `ALIGN`ed (the disk's last piece) turns it
    off for the rest of the file. Otherwise, every `WRITEBACK` bytes the kernel is asked
    to start writing the file back (and to drop what it already wrote from the page
    cache), so the final fsync has little left to do and a big export does not fill the
    page cache.
    """

    def __init__(
        self,
        out,
        digest,
        position: int,
        name: str,
        direct: bool = False,
        hash_thread: bool = True,
    ) -> None:
        self._fd = out.fileno()
        self._digest = digest
        self.position = position
        """Bytes written to the file (the hash is at most `QUEUE_CHUNKS` buffers behind)."""
        self._advised = position
        self._direct = direct and position % ALIGN == 0 and _set_direct(self._fd, True)
        self._free: queue.SimpleQueue[mmap.mmap] = queue.SimpleQueue()
        for _ in range(QUEUE_CHUNKS):
            # Anonymous maps are page-aligned, as O_DIRECT wants.
            self._free.put(mmap.mmap(-1, CHUNK))
        self._pending: dict[int, int] = {}
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._queues: list[queue.SimpleQueue[tuple[mmap.mmap, int] | None]] = []
        self._threads: list[threading.Thread] = []
        jobs_of = [(self._write, "write"), (self._digest.update, "hash")]
        if not hash_thread:
            jobs_of = [(self._write_and_hash, "write")]
        for job, role in jobs_of:
            jobs: queue.SimpleQueue[tuple[mmap.mmap, int] | None] = queue.SimpleQueue()
            thread = threading.Thread(
                target=self._run, args=(jobs, job), name=f"{role}-{name}", daemon=True
            )
            self._queues.append(jobs)
            self._threads.append(thread)
            thread.start()

    def _run(self, jobs: queue.SimpleQueue, job: Callable[[memoryview], object]) -> None:
        while (item := jobs.get()) is not None:
            buf, n = item
            if self._error is None:
                try:
                    job(memoryview(buf)[:n])
                except BaseException as exc:  # noqa: BLE001 - raised in the network loop
                    self._error = exc
            # Back to the network loop even after an error, so it never waits on a dead writer.
            self._done(buf)

    def _write_and_hash(self, data: memoryview) -> None:
        self._write(data)
        self._digest.update(data)

    def _done(self, buf: mmap.mmap) -> None:
        with self._lock:
            left = self._pending.pop(id(buf)) - 1
            if left:
                self._pending[id(buf)] = left
        if not left:
            self._free.put(buf)

    def _write(self, data: memoryview) -> None:
        n = len(data)
        if self._direct and (self.position % ALIGN or n % ALIGN):
            # The last piece of the disk, or one cut short by a break: the rest of the
            # file goes through the page cache.
            _set_direct(self._fd, False)
            self._direct = False
        # Releases the GIL for the whole buffer (as the hash thread's update does).
        done = 0
        while done < n:
            done += os.write(self._fd, data[done:])
            if done < n and self._direct:
                # A short write leaves the rest unaligned: on through the page cache.
                _set_direct(self._fd, False)
                self._direct = False
        self.position += n
        if not self._direct and self.position - self._advised >= WRITEBACK:
            self._writeback()

    def _writeback(self) -> None:
        if not hasattr(os, "posix_fadvise"):
            return
        # Pages up to the last mark were written back since: dropped now; the pages
        # since the last mark are dirty: their write-back starts now, without waiting.
        start = max(0, self._advised - WRITEBACK)
        os.posix_fadvise(self._fd, start, self.position - start, os.POSIX_FADV_DONTNEED)
        self._advised = self.position

    def buffer(self) -> mmap.mmap:
        """A free buffer to read into (waits while all are queued); raises the writer's error."""
        buf = self._free.get()
        if self._error is not None:
            self._free.put(buf)
            raise self._error
        return buf

    def put(self, buf: mmap.mmap, n: int) -> None:
        """Queue the first `n` bytes of `buf`; the buffer comes back once written and hashed."""
        with self._lock:
            self._pending[id(buf)] = len(self._queues)
        for jobs in self._queues:
            jobs.put((buf, n))

    def give_back(self, buf: mmap.mmap) -> None:
        """Return a buffer that was not filled."""
        self._free.put(buf)

    def close(self) -> None:
        """Wait until everything queued is written and hashed, stop the thread.

        Raises the writer's error, if any.
        """
        for jobs in self._queues:
            jobs.put(None)
        for thread in self._threads:
            thread.join()
        if self._error is not None:
            raise self._error


class _Watch:
    """A thread beside the network loop: progress reports, aborts and the deadline.

    Every `interval` seconds it calls `on_progress`, which may talk to the Prefect API
    (progress artifacts): off the network loop, a slow answer costs no throughput. When
    the callback raises (an abort) or the deadline passes, it shuts the connection's
    socket down, so a read blocked on a slow server returns at once instead of when its
    1 MiB buffer is full; `check` then raises the reason in the network loop.
    """

    def __init__(
        self,
        on_progress: Progress | None,
        interval: float,
        done: Callable[[], int],
        deadline: float | None,
        deadline_seconds: float | None,
        name: str,
    ) -> None:
        self.total: int | None = None
        self.sock: socket.socket | None = None
        self._on_progress = on_progress
        self._interval = interval
        self._done = done
        self._deadline = deadline
        self._deadline_seconds = deadline_seconds
        self._name = name
        self._stop = threading.Event()
        self._error: BaseException | None = None
        # In a copy of the caller's context: the callback may need Prefect's run context
        # and settings (the API URL), which live in context variables.
        context = contextvars.copy_context()
        self._thread = threading.Thread(
            target=context.run, args=(self._run,), name=f"watch-{name}", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            if self._deadline and time.monotonic() > self._deadline:
                self._error = DeadlineExceeded(
                    f"{self._name}: deadline of {self._deadline_seconds:.0f} s passed "
                    f"at {self._done()} bytes"
                )
            elif self._on_progress:
                try:
                    self._on_progress(self._done(), self.total)
                except BaseException as exc:  # noqa: BLE001 - raised in the network loop
                    self._error = exc
            if self._error is not None:
                self._interrupt()
                return

    def _interrupt(self) -> None:
        sock = self.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def check(self) -> None:
        """Raise the callback's exception or the deadline, if either stopped the download."""
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _context(ssl_context: ssl.SSLContext | bool) -> ssl.SSLContext:
    if isinstance(ssl_context, ssl.SSLContext):
        context = ssl_context
    else:
        context = ssl.create_default_context()
        if not ssl_context:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
    read_ahead(context)
    return context


def download(
    url: str,
    dest: Path,
    *,
    ssl_context: ssl.SSLContext | bool = True,
    headers: dict[str, str] | None = None,
    expected_size: int | None = None,
    read_timeout: float = 120,
    deadline_seconds: float | None = None,
    max_resumes: int = 10,
    on_progress: Progress | None = None,
    progress_interval: float = 1.0,
    hash_thread: bool = True,
) -> Downloaded:
    """Download `url` into `dest`, resuming from the bytes already there.

    A file left by an earlier try is hashed first; then the download asks for the range
    from `TAIL_CHECK` bytes before its end and compares those bytes with the file's
    tail. If they match it goes on from the end of the file; if not (or the server
    ignores Range, or the file is longer than the disk) the file is downloaded again from
    0, with a warning. After a broken connection the download resumes with Range from the
    bytes it has written (no check: they came from this server a moment ago), up to
    `max_resumes` times in a row without progress. Bytes received before a break are kept,
    but for the buffer being filled when the connection fails with an error.

    The network loop reads; other threads hash and write (see `_Writer`, which uses
    O_DIRECT on local file systems), so a download uses two cores when it can, and
    `QUEUE_CHUNKS * CHUNK` bytes of buffers. The file is fsynced before the download returns.

    Args:
        url: The device URL, host already filled in.
        dest: Target file; its directory must exist.
        ssl_context: TLS verification: a context, True (system CAs) or False (none).
        headers: Extra request headers (the vCenter session cookie); never logged.
        expected_size: Size the file must have at the end; None trusts the server.
        read_timeout: Seconds without a byte before the connection counts as broken.
        deadline_seconds: Hard limit for the whole download.
        max_resumes: Broken connections tolerated in a row without progress.
        on_progress: Called every `progress_interval` seconds (from another thread) and
            at the end; an exception it raises stops the download.
        progress_interval: Seconds between progress reports, and between deadline checks.
        hash_thread: Hash in a thread of its own, beside the writing: for a download that
            runs alone; False when others run at the same time (see `_Writer`).

    Raises:
        TransferError: the server refused, TLS verification failed, the size is wrong,
            or resumes ran out.
        TimeoutError: the deadline passed.
    """
    started = time.monotonic()
    deadline = started + deadline_seconds if deadline_seconds else None
    digest = hashlib.sha256()
    offset, tail = _hash_existing(dest, digest) if dest.exists() else (0, b"")
    discarded = 0
    if 0 < offset <= TAIL_CHECK:
        # Too short to check against the server and cheaper to fetch again.
        discarded, digest, offset, tail = offset, hashlib.sha256(), 0, b""
    if expected_size is not None and offset > expected_size:
        log.warning(
            "%s: the %d bytes on disk are more than the disk's %d: downloading it again",
            dest.name,
            offset,
            expected_size,
        )
        discarded, digest, offset, tail = offset, hashlib.sha256(), 0, b""
    resumed_from = offset
    total = expected_size
    breaks = stalled = 0
    parts = urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    context = _context(ssl_context)
    direct = DIRECT_IO and _fs_type(dest.parent) in DIRECT_FS
    request_headers = {"User-Agent": "v2k", **(headers or {})}
    writer: _Writer | None = None
    watch = _Watch(
        on_progress,
        progress_interval,
        lambda: writer.position if writer else offset,
        deadline,
        deadline_seconds,
        dest.name,
    )

    def fail(reason: str, status: int | None = None) -> TransferError:
        return transfer_error(f"{dest.name}: {reason}", status)

    try:
        while True:
            watch.check()
            if total is not None and offset > total:
                raise fail(f"{offset} bytes on disk, more than the {total} expected")
            # Only the file found at the start is checked (a tail to compare).
            start = offset - len(tail) if tail else offset
            if total is not None and start == total:
                break
            watch.total = total
            progressed = False
            connection = http.client.HTTPSConnection(
                parts.hostname,
                parts.port or 443,
                timeout=min(CONNECT_TIMEOUT, read_timeout),
                context=context,
            )
            try:
                try:
                    connection.connect()
                    connection.sock.settimeout(read_timeout)
                    watch.sock = connection.sock
                    connection.request(
                        "GET",
                        target,
                        headers=request_headers | ({"Range": f"bytes={start}-"} if start else {}),
                    )
                    response = connection.getresponse()
                except ssl.SSLCertVerificationError as exc:
                    raise TransferRefused(
                        f"{dest.name}: TLS verification of {parts.hostname} failed: {exc}",
                        fix="give the CA of vCenter and its ESXi hosts in the VCenter "
                        "block's ca_cert",
                    ) from None
                except (OSError, http.client.HTTPException) as exc:
                    watch.check()
                    raise _Broken(str(exc) or type(exc).__name__) from exc
                if response.status == 416 and start:
                    if tail:
                        raise _Mismatch("the server has fewer bytes than the file")
                    # The file is already whole: the server has nothing past offset.
                    total = total or offset
                    break
                if response.status not in (200, 206):
                    raise fail(
                        f"server answered {response.status} {response.reason} for {_safe(url)}",
                        response.status,
                    )
                if start and response.status == 200:
                    if tail:
                        raise _Mismatch("the server ignored the Range request")
                    # Range was ignored: start over rather than append a second copy.
                    digest, offset, start = hashlib.sha256(), 0, 0
                elif start and _range_start(response) != start:
                    raise fail(
                        f"server answered the range from {_range_start(response)}, "
                        f"asked for {start}"
                    )
                total = total or _total_from(response, start)
                if tail:
                    if total is not None and total - start < len(tail):
                        raise _Mismatch("the server has fewer bytes than the file")
                    if _read_exactly(response, len(tail)) != tail:
                        raise _Mismatch(f"its last {len(tail)} bytes differ from the server's")
                    tail = b""
                    if offset == total:
                        break  # the file on disk was whole
                watch.total = total
                with dest.open("ab" if offset else "wb", buffering=0) as out:
                    writer = _Writer(out, digest, offset, dest.name, direct, hash_thread)
                    try:
                        _stream(_body_reader(response, connection.sock), writer, watch)
                    finally:
                        # Whatever was handed over is on disk now (or the writer failed).
                        writer.close()
                        progressed = writer.position > offset
                        offset = writer.position
                    os.fsync(out.fileno())
                if total is None:
                    total = offset
                if offset == total:
                    continue
                raise _Broken("the server closed the connection early")
            except _Mismatch as exc:
                log.warning(
                    "%s: the %d bytes on disk are not the server's (%s): downloading it again",
                    dest.name,
                    offset,
                    exc,
                )
                discarded, resumed_from = offset, 0
                digest, offset, tail = hashlib.sha256(), 0, b""
                continue
            except _Broken as exc:
                error = str(exc)
            finally:
                connection.close()
            # A broken or short transfer: ask for the rest, unless it keeps failing.
            breaks += 1
            stalled = 0 if progressed else stalled + 1
            if stalled > max_resumes:
                raise fail(
                    f"gave up after {max_resumes} broken connections without progress "
                    f"at {offset} of {total or '?'} bytes: {error}"
                )
            time.sleep(min(2**stalled * 0.1, 5))
    finally:
        watch.stop()

    if expected_size is not None and offset != expected_size:
        raise fail(f"got {offset} bytes, expected {expected_size}")
    if on_progress:
        on_progress(offset, total)
    return Downloaded(
        bytes=offset,
        sha256=digest.hexdigest(),
        seconds=time.monotonic() - started,
        resumed_from=resumed_from,
        resumes=breaks,
        discarded=discarded,
    )


def _read_exactly(response: http.client.HTTPResponse, n: int) -> bytes:
    """The next `n` bytes of the body; a break or an early end is `_Broken`."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    try:
        while got < n and (m := response.readinto(view[got:])):
            got += m
    except (OSError, http.client.HTTPException) as exc:
        raise _Broken(str(exc) or type(exc).__name__) from exc
    if got < n:
        raise _Broken("the server closed the connection early")
    return bytes(buf)


def _body_reader(
    response: http.client.HTTPResponse, sock: ssl.SSLSocket
) -> Callable[[memoryview], int]:
    """A function that fills a buffer with the next bytes of the body; 0 at its end.

    A body of known length (what NFC device URLs send) is read from the TLS socket
    itself once the bytes that `http.client` buffered with the headers are taken:
    `response.readinto` goes through two more layers of Python per 16 KiB TLS record.
    That is about 0.03 CPU s/GiB, 1-2 % of four disks at once, which are bound by CPU
    (docs/benchmarks.md). A chunked body, or one that ends when the connection closes,
    goes through `response.readinto`, which knows those framings.
    """
    buffered = getattr(response.fp, "peek", None)
    if response.chunked or response.length is None or buffered is None:
        return response.readinto
    left = response.length
    first = True

    def read(view: memoryview) -> int:
        nonlocal left, first
        want = min(len(view), left)
        got = 0
        if first and want:
            # The first bytes of the body, read into http.client's buffer with the headers.
            head = buffered()[:want]
            got = len(head)
            view[:got] = head
            response.fp.read(got)
            first = False
        while got < want and (n := sock.recv_into(view[got:], want - got)):
            got += n
        left -= got
        return got

    return read


def _stream(read: Callable[[memoryview], int], writer: _Writer, watch: _Watch) -> None:
    """Read the body into the writer's buffers until its end.

    Raises `_Broken` when the connection fails (the buffers handed over before are kept),
    or what `watch` stopped the download for.
    """
    while True:
        buf = writer.buffer()
        try:
            # One call fills the whole buffer but at the end of the body.
            n = read(memoryview(buf))
        except (OSError, http.client.HTTPException) as exc:
            writer.give_back(buf)
            watch.check()
            raise _Broken(str(exc) or type(exc).__name__) from exc
        if n:
            writer.put(buf, n)
        else:
            writer.give_back(buf)
        watch.check()
        if not n:
            return


def _safe(url: str) -> str:
    """The URL without a query string, which may carry a ticket."""
    return url.split("?", 1)[0]
