"""Where the test bed keeps what outlives one run (builds, guest images) and what does not."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Cache outside the repository, kept between runs (vcsim binary, guest images).

    Set `V2K_CACHE` to move it; default `~/.cache/v2k`.
    """
    path = Path(os.environ.get("V2K_CACHE") or Path.home() / ".cache" / "v2k")
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_dir() -> Path:
    """State of the test bed started with `python -m testbed up` (pids, keys, certificates).

    Set `V2K_TESTBED_DIR` to move it; default `/tmp/v2k-testbed`.
    """
    path = Path(os.environ.get("V2K_TESTBED_DIR") or "/tmp/v2k-testbed")
    path.mkdir(parents=True, exist_ok=True)
    return path
