"""blocks.cache: each block read from the API once per scope, scopes shared when nested."""

from __future__ import annotations

import contextvars
import uuid
from concurrent.futures import ThreadPoolExecutor

from blocks import MigrationSettings
from blocks.cache import loads_cached


def _saved(**values) -> str:
    name = f"cache-{uuid.uuid4().hex[:8]}"
    MigrationSettings(**values).save(name)
    return name


def test_a_block_is_read_once_per_scope_and_again_in_the_next(prefect_harness):
    name = _saved(http_timeout=30)
    with loads_cached():
        first = MigrationSettings.load(name)
        MigrationSettings(http_timeout=99).save(name, overwrite=True)
        assert MigrationSettings.load(name) is first  # not read again in this scope
        assert first.http_timeout == 30
    assert MigrationSettings.load(name).http_timeout == 99  # outside: read every time
    with loads_cached():
        assert MigrationSettings.load(name).http_timeout == 99  # a new scope reads it again


def test_a_nested_scope_and_the_threads_it_starts_share_the_outer_one(prefect_harness):
    name = _saved()
    with loads_cached():
        outer = MigrationSettings.load(name)
        with loads_cached():
            assert MigrationSettings.load(name) is outer
        # As Prefect starts task threads (and a wave its VMs' subflows): in a copy of the
        # context, each opening its own scope inside.

        def in_thread():
            with loads_cached():
                return MigrationSettings.load(name)

        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(contextvars.copy_context().run, in_thread) for _ in range(2)]
            assert all(f.result() is outer for f in futures)
