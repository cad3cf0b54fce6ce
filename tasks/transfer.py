"""Streaming a disk from an NFC device URL to a file: constant memory, resumable, checked."""

from __future__ import annotations

import hashlib
import os
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

CHUNK = 1 << 20

Progress = Callable[[int, int | None], None]
"""Called with (bytes on disk, total bytes or None) as the download goes."""


class TransferError(RuntimeError):
    """A download failed for good; the message says how far it got."""


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
                            f"{response.reason_phrase} for {_safe(url)}"
                        )
                    if offset and response.status_code == 200:
                        # Range was ignored: start over rather than append a second copy.
                        digest, offset = hashlib.sha256(), 0
                    total = total or _total_from(response, offset)
                    mode = "ab" if offset else "wb"
                    with dest.open(mode) as out:
                        for chunk in response.iter_raw(CHUNK):
                            out.write(chunk)
                            digest.update(chunk)
                            offset += len(chunk)
                            progressed = True
                            now = time.monotonic()
                            if deadline and now > deadline:
                                raise TimeoutError(
                                    f"{dest.name}: deadline of {deadline_seconds:.0f} s passed "
                                    f"at {offset} bytes"
                                )
                            if on_progress and now - last_report >= progress_interval:
                                last_report = now
                                on_progress(offset, total)
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
