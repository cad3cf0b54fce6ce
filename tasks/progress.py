"""Progress of long work in Prefect logs, a Prefect progress artifact and a callback."""

from __future__ import annotations

import re
import time
from collections.abc import Callable

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import FlowRunContext, TaskRunContext
from prefect.logging import get_run_logger


def artifact_key(*parts: str) -> str:
    """An artifact key from free text: Prefect takes lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")[:100]


def _in_run() -> bool:
    return TaskRunContext.get() is not None or FlowRunContext.get() is not None


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class Progress:
    """Report progress of one piece of work in logs and in a progress artifact.

    Outside a Prefect run it only calls `echo` (the command line's progress bar).
    """

    def __init__(
        self,
        key: str,
        description: str,
        *,
        log_every_percent: float = 10,
        min_interval: float = 2.0,
        echo: Callable[[str, float], None] | None = None,
        started: float | None = None,
    ) -> None:
        self.description = description
        self.log_every = log_every_percent
        self.min_interval = min_interval
        self.echo = echo
        self._last_logged = -log_every_percent
        self._last_update = 0.0
        self._artifact_id = None
        # The rate counts from `started` (time.monotonic()) when the work began earlier.
        self._started = time.monotonic() if started is None else started
        if _in_run():
            self.logger = get_run_logger()
            self._artifact_id = create_progress_artifact(
                progress=0.0, key=artifact_key(key), description=description
            )
        else:
            self.logger = None

    def bytes(self, done: int, total: int | None) -> None:
        """Report bytes done out of total, with percent and rate."""
        elapsed = max(time.monotonic() - self._started, 1e-6)
        rate = done / elapsed
        percent = 100.0 * done / total if total else 0.0
        text = f"{self.description}: {human_bytes(done)}"
        if total:
            text += f" of {human_bytes(total)} ({percent:.0f}%)"
        text += f" at {human_bytes(rate)}/s"
        self._report(percent, text, final=bool(total and done >= total))

    def step(self, percent: float, text: str) -> None:
        """Report a named step with its rough overall percent."""
        self._report(percent, f"{self.description}: {text}", final=percent >= 100, always_log=True)

    def _report(self, percent: float, text: str, final: bool, always_log: bool = False) -> None:
        now = time.monotonic()
        if self.echo:
            self.echo(text, percent)
        if self.logger and (always_log or final or percent - self._last_logged >= self.log_every):
            self._last_logged = percent
            self.logger.info(text)
        if self._artifact_id and (final or now - self._last_update >= self.min_interval):
            self._last_update = now
            update_progress_artifact(self._artifact_id, progress=min(100.0, percent))
