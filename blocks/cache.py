"""Blocks loaded once per migration run instead of once per use.

A migrate-vm run needs the same few blocks (vCenter, cluster, its hosts, storage,
settings) in nearly every stage, and each `Block.load` is a round trip to the Prefect
API: 26 per VM before this cache, one per block with it. Inside `loads_cached()` (which
migrate-vm wraps around its stages), `load` of a v2k block returns the one already loaded
in that scope; outside, every load goes to the API as before.

The scope is a context variable: the tasks and subflows of a run share it (Prefect copies
the context into the threads it runs them in), two runs never do, so a block saved
between two runs is seen by the next one. A scope opened inside another one is the outer
one: migrate-wave opens a scope around its VMs, so the VMs of one wave (subflows in its
threads) load each block once for the whole wave, not once each; a block saved during a
wave is seen by the next wave.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

_loaded: ContextVar[dict[tuple[type, str], Any] | None] = ContextVar(
    "v2k_loaded_blocks", default=None
)


@contextmanager
def loads_cached() -> Iterator[None]:
    """Within this block, each v2k block is loaded from the API at most once by name.

    Inside another `loads_cached()`, this one shares the outer scope.
    """
    if _loaded.get() is not None:
        yield
        return
    token = _loaded.set({})
    try:
        yield
    finally:
        _loaded.reset(token)


class LoadedOnce:
    """Mixin for v2k's blocks: `load` reuses the block already loaded in `loads_cached()`."""

    @classmethod
    def load(cls, name: str, validate: bool = True, client: Any = None) -> Any:
        cache = _loaded.get()
        if cache is None or client is not None:
            return super().load(name, validate=validate, client=client)
        key = (cls, name)
        if key not in cache:
            block = super().load(name, validate=validate)
            if inspect.isawaitable(block):  # called from async code: nothing to cache
                return block
            cache[key] = block
        return cache[key]
