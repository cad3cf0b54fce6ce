"""What a run owns: its reservations, and the ledger of every object it created.

Two promises rest on this module (docs/reliability.md, "Ownership"):

- **Reservations.** Before it creates anything, a run reserves its target (destination
  cluster + domain name) and its source (vCenter instance UUID + VM instance UUID). A
  reservation is a Prefect variable made with `overwrite=False`: the server's unique name
  is the lock, so it holds across workers. A second run is refused naming the holder.
- **The ledger.** Every volume, domain, directory and clone a run creates is written to the
  run's ledger (another Prefect variable) before it is created, and its name carries the
  run's id (volume and clone names, the domain's metadata). Cleanup, retries and rollback
  remove only what the ledger lists and what carries the run's mark: never by name alone.
"""

from __future__ import annotations

import hashlib
import threading
from datetime import UTC, datetime
from typing import Literal
from uuid import UUID

from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.variables import Variable
from pydantic import BaseModel, Field

from tasks.errors import Refused
from tasks.models import VmSpec

# Holders in these states will not come back for what they reserved.
_FINISHED_STATES = {"COMPLETED", "FAILED", "CANCELLED"}


class Reservation(BaseModel):
    """Who holds a target or a source VM."""

    key: str = Field(description="What is reserved, e.g. `target:cluster/web01`.")
    flow_run_id: str
    run_name: str = ""
    since: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))


class Reserved(Refused):
    """Another run holds the target or the source VM."""


def _variable(prefix: str, text: str) -> str:
    # Variable names take lower-case letters, digits, '-' and '_': a digest of the key.
    return f"{prefix}-{hashlib.sha256(text.encode()).hexdigest()[:40]}"


def target_key(cluster: str, target: str) -> str:
    return f"target:{cluster}/{target}"


def source_key(vcenter_uuid: str, vm_uuid: str) -> str:
    return f"source:{vcenter_uuid}/{vm_uuid}"


def run_keys(cluster: str, target: str, spec: VmSpec, vcenter_host: str) -> list[str]:
    """What a run for `spec` reserves: its target, and its source VM (by instance UUIDs;
    a standalone ESXi host has no instance UUID of its own, so its address stands in)."""
    return [
        target_key(cluster, target),
        source_key(spec.vcenter_uuid or vcenter_host, spec.instance_uuid or spec.moref),
    ]


def held_by_others(key: str, flow_run_id: str | None) -> tuple[Reservation, str] | None:
    """The live holder of `key` and its state, unless it is `flow_run_id` or is gone."""
    held = holder(key)
    if held is None or held.flow_run_id == flow_run_id:
        return None
    state = holder_state(held.flow_run_id)
    if state is None or state in _FINISHED_STATES:
        return None
    return held, state


def holder_state(flow_run_id: str) -> str | None:
    """The state type of a flow run (`RUNNING`, `CRASHED`...); None when it does not exist."""
    from prefect.client.orchestration import get_client

    try:
        run_uuid = UUID(flow_run_id)
    except ValueError:
        return None
    with get_client(sync_client=True) as client:
        try:
            run = client.read_flow_run(run_uuid)
        except ObjectNotFound:
            return None
    return run.state.type.value if run.state else None


def reserve(key: str, flow_run_id: str, run_name: str = "") -> Reservation:
    """Reserve `key` for the flow run, or raise Reserved naming the run that holds it.

    The same flow run may reserve again (a retried run). A holder that ended without
    releasing (Completed, Failed, Cancelled) or no longer exists is replaced; a Crashed
    holder keeps its reservation, since its clone and files wait for `v2k resume`.
    """
    name = _variable("v2k-reserved", key)
    mine = Reservation(key=key, flow_run_id=flow_run_id, run_name=run_name)
    for _ in range(2):
        try:
            Variable.set(name, mine.model_dump(), overwrite=False)
            return mine
        except (ObjectAlreadyExists, ValueError):
            pass
        value = Variable.get(name, default=None)
        if value is None:
            continue  # released in between: try once more
        held = Reservation.model_validate(value)
        if held.flow_run_id == flow_run_id:
            return held
        state = holder_state(held.flow_run_id)
        if state is not None and state not in _FINISHED_STATES:
            raise Reserved(*refusal(held, state))
        Variable.unset(name)  # a holder that is gone: its reservation is stale
    raise Reserved(f"could not reserve {key}: another run took it at the same moment.", "retry")


def refusal(held: Reservation, state: str) -> tuple[str, str]:
    """Message and fix for a run refused because `held` holds what it needs."""
    what = "target" if held.key.startswith("target:") else "source VM"
    return (
        f"the {what} {held.key.partition(':')[2]} is reserved by flow run "
        f"{held.run_name or held.flow_run_id} ({held.flow_run_id}, {state.lower()}, "
        f"since {held.since}).",
        f"wait for that run to end, or end it (`v2k cleanup {held.flow_run_id}` after a "
        "crash); for another VM with the same target, give target_name",
    )


def release(key: str, flow_run_id: str) -> bool:
    """Give up `key` if the flow run holds it; True when it did."""
    name = _variable("v2k-reserved", key)
    value = Variable.get(name, default=None)
    if value is None or Reservation.model_validate(value).flow_run_id != flow_run_id:
        return False
    Variable.unset(name)
    return True


def holder(key: str) -> Reservation | None:
    value = Variable.get(_variable("v2k-reserved", key), default=None)
    return Reservation.model_validate(value) if value is not None else None


# ---- the ledger -----------------------------------------------------------------------

Kind = Literal["reservation", "clone", "directory", "volume", "domain"]


class Owned(BaseModel):
    """One object a run made (or is about to make): where it is and what it is called."""

    kind: Kind
    name: str = Field(description="Volume, domain, clone or directory name; reservation key.")
    host: str | None = Field(
        default=None, description="KvmHost block it lives on; None: the worker or vCenter."
    )
    place: str = Field(default="", description="Pool of a volume; path of a directory.")

    def describe(self) -> str:
        where = f" on {self.host}" if self.host else ""
        place = f"{self.place}/" if self.place and self.kind == "volume" else ""
        return f"{self.kind} {place}{self.name}{where}"


class Ledger:
    """The persisted list of what one run made, kept in a Prefect variable.

    Entries are written before the object is created, so a crash in between leaves an
    entry for something that may not exist: removal treats "already gone" as done.
    """

    _lock = threading.Lock()  # the stages of one run record from several threads

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.variable = f"v2k-ledger-{run_id.lower()}"

    def entries(self) -> list[Owned]:
        value = Variable.get(self.variable, default=None) or {"owned": []}
        return [Owned.model_validate(o) for o in value["owned"]]

    def _write(self, owned: list[Owned]) -> None:
        if owned:
            value = {"run_id": self.run_id, "owned": [o.model_dump() for o in owned]}
            Variable.set(self.variable, value, overwrite=True)
        else:
            Variable.unset(self.variable)

    def record(self, entry: Owned) -> Owned:
        with self._lock:
            owned = self.entries()
            if entry not in owned:
                self._write([*owned, entry])
        return entry

    def drop(self, entry: Owned) -> None:
        with self._lock:
            self._write([o for o in self.entries() if o != entry])

    def of_kind(self, kind: Kind) -> list[Owned]:
        return [o for o in self.entries() if o.kind == kind]
