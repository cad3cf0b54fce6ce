"""Leaving nothing behind: temporary files of a run, never anything outside them."""

from __future__ import annotations

import shutil
from pathlib import Path


def remove_tree(path: Path, inside: Path) -> None:
    """Remove a run's temporary directory, refusing anything outside `inside`."""
    path, inside = path.resolve(), inside.resolve()
    if path == inside or inside not in path.parents:
        raise ValueError(f"refusing to remove {path}: not inside {inside}")
    shutil.rmtree(path, ignore_errors=True)
