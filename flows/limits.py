"""Per-host caps: Prefect global concurrency limits named after the host.

- `v2k-esxi-<ESXi host>`: VMs in flight per source ESXi host (held by migrate-wave
  around each VM's migration);
- `v2k-kvm-<KvmHost block>`: conversions and imports at once per KVM host (held by
  migrate-vm around its convert and import stages).

A host without a limit has no cap. migrate-vm asks which of its hosts have one before it
takes slots (`existing_limits`), rather than asking for a slot of a limit that may not
exist: on Prefect's default SQLite database, prefect 3.9.1's server takes a slot in a
transaction that reads before it writes, so a write from another request in between
makes SQLite refuse it (HTTP 503), and the client tries again 2 s later. Nearly every
uncapped migration waited those 2 s once (docs/benchmarks.md); a read costs nothing of
the kind.
"""

from __future__ import annotations

import re
from contextlib import AbstractContextManager, nullcontext
from typing import Literal

from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency

_BANNED = re.compile(r"[/%&<>\s]+")


def limit_name(kind: Literal["esxi", "kvm"], host: str) -> str:
    """Name of the global concurrency limit of one host: `v2k-esxi-H` or `v2k-kvm-H`."""
    return f"v2k-{kind}-{_BANNED.sub('-', host)}"


def existing_limits(names: set[str]) -> set[str]:
    """Those of `names` that are global concurrency limits on the Prefect server."""
    from prefect.exceptions import ObjectNotFound

    found = set()
    with get_client(sync_client=True) as client:
        for name in sorted(names):
            try:
                client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                continue
            found.add(name)
    return found


def slot(name: str, existing: set[str] | None = None) -> AbstractContextManager[None]:
    """Hold one slot of the limit `name` (waiting for one while it is full).

    With `existing` (from `existing_limits`), a limit not in it is not asked for: no cap.
    Without, the server is asked, and a missing limit is no cap either.
    """
    if existing is not None and name not in existing:
        return nullcontext()
    return concurrency(name, occupy=1, strict=False)


def ensure_limits(limits: dict[str, int | None], default: dict[str, int]) -> None:
    """Create the global concurrency limits that are missing; set those given a value."""
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists

    found = existing_limits({name for name, value in limits.items() if value is None})
    with get_client(sync_client=True) as client:
        for name, value in limits.items():
            if value is not None:
                client.upsert_global_concurrency_limit_by_name(name, value)
            elif name not in found:
                try:
                    client.create_global_concurrency_limit(
                        GlobalConcurrencyLimitCreate(name=name, limit=default[name])
                    )
                except ObjectAlreadyExists:  # another wave made it meanwhile
                    pass
