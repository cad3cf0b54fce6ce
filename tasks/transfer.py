"""Streaming a disk from an NFC device URL to a file: constant memory, resumable, checked."""

from __future__ import annotations

import hashlib
import os
import queue
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

CHUNK = 1 << 20
"""Bytes handed from the network to the writer thread at a time (and read per hash step)."""

QUEUE_CHUNKS = 4
"""Chunks waiting for the writer at most: bounds the memory of one download."""

WRITEBACK = 32 << 20
"""Every this many bytes the writer asks the kernel to write back what came before."""

Progress = Callable[[int, int | None], None]
"""Called with (bytes on disk, total bytes or None) as the download goes."""


class TransferError(RuntimeError):
    """A download failed for good; the message says how far it got.

    `status` is the HTTP status the server refused the download with, None when the
    cause was something else (broken connections, a wrong size).
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status

    def __reduce__(self):
        # Keep `status` when Prefect pickles the error into a task's state.
        return type(self), (str(self), self.status)


@dataclass
class Downloaded:
    bytes: int
    sha256: str
    seconds: float
    resumed_from: int
    resumes: int


def _hash_existing(path: Path, digest) -> int:
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size


def _total_from(response: httpx.Response, offset: int) -> int | None:
    if response.status_code == 206:
        _, _, total = response.headers.get("content-range", "").rpartition("/")
        return int(total) if total.isdigit() else None
    length = response.headers.get("content-length")
    return int(length) + offset if length and length.isdigit() else None


class _Writer:
    """Hashes and writes the received chunks in a thread of its own.

    The network loop only reads: TLS, HTTP parsing, hashing and writing then use two
    cores instead of one. The queue holds at most `QUEUE_CHUNKS` chunks, so memory stays
    constant whatever the disk size. Every `WRITEBACK` bytes the kernel is asked to start
    writing the file back (and to drop what it already wrote from the page cache), so the
    final fsync has little left to do and a big export does not fill the page cache.
    """

    def __init__(self, out, digest, position: int, name: str) -> None:
        self._out = out
        self._digest = digest
        self._position = position
        self._advised = position
        self._queue: queue.Queue[list[bytes] | None] = queue.Queue(maxsize=QUEUE_CHUNKS)
        self._error: BaseException | None = None
        self.written = 0
        self._thread = threading.Thread(target=self._run, name=f"write-{name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (pieces := self._queue.get()) is not None:
            if self._error is not None:
                continue  # keep draining so the network loop never blocks on a dead writer
            try:
                data = b"".join(pieces)
                self._out.write(data)
                self._digest.update(data)
                self.written += len(data)
                self._position += len(data)
                if self._position - self._advised >= WRITEBACK:
                    self._writeback()
            except BaseException as exc:  # noqa: BLE001 - raised in the network loop
                self._error = exc

    def _writeback(self) -> None:
        if not hasattr(os, "posix_fadvise"):
            return
        self._out.flush()
        # Pages up to the last mark were written back since: dropped now; the pages
        # since the last mark are dirty: their write-back starts now, without waiting.
        start = max(0, self._advised - WRITEBACK)
        os.posix_fadvise(self._out.fileno(), start, self._position - start, os.POSIX_FADV_DONTNEED)
        self._advised = self._position

    def put(self, pieces: list[bytes]) -> None:
        """Queue pieces for the writer; raise its error if it failed."""
        if self._error is not None:
            raise self._error
        self._queue.put(pieces)

    def close(self, tail: list[bytes]) -> None:
        """Write `tail` too, wait until everything is written and hashed, stop the thread.

        Raises the writer's error, if any.
        """
        if tail and self._error is None:
            self._queue.put(tail)
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error


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
) -> Downloaded:
    """Download `url` into `dest`, resuming from the bytes already there.

    A file left by an earlier try is hashed first, then the rest is asked for with a
    Range request; a server that ignores Range makes the download start over. After a
    broken connection the download resumes the same way, up to `max_resumes` times.
    Bytes received before a break are kept: a resume asks only for what is missing.

    The network loop reads; a second thread hashes and writes (see `_Writer`), so a
    download uses two cores when it can, and at most `QUEUE_CHUNKS` MiB of memory.

    Args:
        url: The device URL, host already filled in.
        dest: Target file; its directory must exist.
        ssl_context: TLS verification as for httpx's `verify`.
        headers: Extra request headers (the vCenter session cookie).
        expected_size: Size the file must have at the end; None trusts the server.
        read_timeout: Seconds without a byte before the connection counts as broken.
        deadline_seconds: Hard limit for the whole download.
        max_resumes: Broken connections tolerated in a row without progress.
        on_progress: Called at most every `progress_interval` seconds and at the end.

    Raises:
        TransferError: the server refused, the size is wrong, or resumes ran out.
        TimeoutError: the deadline passed.
    """
    started = time.monotonic()
    deadline = started + deadline_seconds if deadline_seconds else None
    digest = hashlib.sha256()
    offset = _hash_existing(dest, digest) if dest.exists() else 0
    resumed_from = offset
    total = expected_size
    breaks = stalled = 0
    last_report = 0.0
    timeout = httpx.Timeout(connect=30, read=read_timeout, write=read_timeout, pool=30)

    with httpx.Client(verify=ssl_context, timeout=timeout, headers=headers or {}) as client:
        while True:
            if total is not None and offset == total:
                break
            if total is not None and offset > total:
                raise TransferError(
                    f"{dest.name}: {offset} bytes on disk, more than the {total} expected"
                )
            request_headers = {"Range": f"bytes={offset}-"} if offset else {}
            progressed = False
            try:
                with client.stream("GET", url, headers=request_headers) as response:
                    if response.status_code == 416 and offset:
                        # The file is already whole: the server has nothing past offset.
                        total = total or offset
                        break
                    if response.status_code not in (200, 206):
                        raise TransferError(
                            f"{dest.name}: server answered {response.status_code} "
                            f"{response.reason_phrase} for {_safe(url)}",
                            status=response.status_code,
                        )
                    if offset and response.status_code == 200:
                        # Range was ignored: start over rather than append a second copy.
                        digest, offset = hashlib.sha256(), 0
                    total = total or _total_from(response, offset)
                    mode = "ab" if offset else "wb"
                    with dest.open(mode) as out:
                        writer = _Writer(out, digest, offset, dest.name)
                        on_disk = offset
                        pieces: list[bytes] = []
                        pending = 0
                        try:
                            # The pieces as they come off the connection (a TLS record
                            # each), handed to the writer about CHUNK bytes at a time.
                            for piece in response.iter_raw():
                                pieces.append(piece)
                                pending += len(piece)
                                now = time.monotonic()
                                if deadline and now > deadline:
                                    raise TimeoutError(
                                        f"{dest.name}: deadline of {deadline_seconds:.0f} s "
                                        f"passed at {offset + pending} bytes"
                                    )
                                if pending < CHUNK:
                                    continue
                                writer.put(pieces)
                                offset += pending
                                pieces, pending, progressed = [], 0, True
                                if on_progress and now - last_report >= progress_interval:
                                    last_report = now
                                    on_progress(on_disk + writer.written, total)
                        finally:
                            # What came before a break is kept: a resume asks for the
                            # rest only.
                            if pieces:
                                offset += pending
                                progressed = True
                            writer.close(pieces)
                        out.flush()
                        os.fsync(out.fileno())
                if total is None:
                    total = offset
            except (httpx.TransportError, httpx.StreamError) as exc:
                error = str(exc) or type(exc).__name__
            else:
                if offset == total:
                    continue
                error = "the server closed the connection early"
            # A broken or short transfer: ask for the rest, unless it keeps failing.
            breaks += 1
            stalled = 0 if progressed else stalled + 1
            if stalled > max_resumes:
                raise TransferError(
                    f"{dest.name}: gave up after {max_resumes} broken connections "
                    f"without progress at {offset} of {total or '?'} bytes: {error}"
                )
            time.sleep(min(2**stalled * 0.1, 5))

    if expected_size is not None and offset != expected_size:
        raise TransferError(f"{dest.name}: got {offset} bytes, expected {expected_size}")
    if on_progress:
        on_progress(offset, total)
    return Downloaded(
        bytes=offset,
        sha256=digest.hexdigest(),
        seconds=time.monotonic() - started,
        resumed_from=resumed_from,
        resumes=breaks,
    )


def _safe(url: str) -> str:
    """The URL without a query string, which may carry a ticket."""
    return url.split("?", 1)[0]
