"""Leaving nothing behind: temporary files of a run, never anything outside them."""

from __future__ import annotations

import posixpath
import shlex
import shutil
from pathlib import Path, PurePosixPath

from tasks.hosts import run_quiet

# The path comes in as $1, never in the script; "removed" tells that there was something.
_REMOVE = '[ -e "$1" ] || [ -L "$1" ] || exit 0; rm -rf -- "$1" && echo removed'


def remove_tree(path: Path, inside: Path) -> None:
    """Remove a run's temporary directory, refusing anything outside `inside`.

    A directory already gone is fine; one that cannot be removed raises (OSError), so
    cleanup can say what is left.
    """
    path, inside = path.resolve(), inside.resolve()
    if path == inside or inside not in path.parents:
        raise ValueError(f"refusing to remove {path}: not inside {inside}")
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass


def remove_tree_on_host(conn, path: str, inside: str, timeout: float = 600) -> bool:
    """Remove a run's temporary directory on a KVM host (over `conn`), only inside `inside`.

    The check is on the normalised path names (the host's file system is not visible
    here); `rm -rf` does not follow a symbolic link, so a link inside cannot lead out.

    Returns:
        True when there was something to remove.

    Raises:
        ValueError: `path` is not strictly inside `inside`.
        RuntimeError: the removal failed on the host.
    """
    target = PurePosixPath(posixpath.normpath(path))
    base = PurePosixPath(posixpath.normpath(inside))
    if not base.is_absolute() or target == base or base not in target.parents:
        raise ValueError(f"refusing to remove {path} on the host: not inside {inside}")
    result = run_quiet(conn, f"sh -c {shlex.quote(_REMOVE)} sh {shlex.quote(str(target))}", timeout)
    if result.exited != 0:
        raise RuntimeError(f"rm -rf {target} failed: {result.stderr.strip()[-300:]}")
    return "removed" in result.stdout
