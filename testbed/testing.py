"""Helpers for tests that run v2k's flows in the test bed."""

from __future__ import annotations

from tasks.models import MigrationRequest

STOP_AFTER_EXPORT = 2 / 3600
"""A `convert_timeout` (hours) for runs that only need to get through the export: virt-v2v
gets 2 s (it needs about 30 s to refuse a synthetic disk), so the run fails right after
the export, with a message that says so."""


def request_for(blocks: dict[str, str], vm: str, **overrides) -> MigrationRequest:
    """A MigrationRequest for `vm` on the test bed's saved blocks (TestBed.save_blocks)."""
    values = dict(
        vcenter=blocks["vcenter"],
        vm=vm,
        cluster=blocks["cluster"],
        temporary_storage=blocks["scratch"],
        settings=blocks["settings"],
    )
    values.update(overrides)
    return MigrationRequest(**values)
