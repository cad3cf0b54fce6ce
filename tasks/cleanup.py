"""Leaving nothing behind: an undo stack for what a run created, and temporary files."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path


class Rollback:
    """Undo actions pushed as a run creates things, run newest first when it fails."""

    def __init__(self) -> None:
        self._actions: list[tuple[str, Callable[[], object]]] = []

    def push(self, description: str, action: Callable[[], object]) -> None:
        self._actions.append((description, action))

    def run(self, logger) -> list[str]:
        """Run every action, newest first; one failing does not stop the others."""
        failed = []
        while self._actions:
            description, action = self._actions.pop()
            try:
                action()
                logger.info("rolled back: %s", description)
            except Exception as exc:  # noqa: BLE001 - report and go on with the rest
                logger.error("rollback of %s failed: %s", description, exc)
                failed.append(description)
        return failed


def remove_tree(path: Path, inside: Path) -> None:
    """Remove a run's temporary directory, refusing anything outside `inside`."""
    path, inside = path.resolve(), inside.resolve()
    if path == inside or inside not in path.parents:
        raise ValueError(f"refusing to remove {path}: not inside {inside}")
    shutil.rmtree(path, ignore_errors=True)
