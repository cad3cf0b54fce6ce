"""Helpers for tests that run v2k's flows in the test bed."""

from __future__ import annotations

from tasks.models import MigrationRequest


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
