"""flows.limits against the session's Prefect server: limit names, which limits exist,
and slots held only where a limit exists."""

from __future__ import annotations

import uuid

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

import flows.limits as limits
from flows.limits import ensure_limits, existing_limits, limit_name, slot


@pytest.fixture(autouse=True)
def _server(prefect_harness):
    yield


def _active_slots(name: str) -> int:
    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(name).active_slots


def test_limit_names_keep_to_what_prefect_takes():
    assert limit_name("esxi", "esx 1.example.com") == "v2k-esxi-esx-1.example.com"
    assert limit_name("kvm", "bed-kvm1") == "v2k-kvm-bed-kvm1"
    assert limit_name("kvm", "a/b%c&d<e>f") == "v2k-kvm-a-b-c-d-e-f"


def test_existing_limits_are_those_on_the_server():
    made, missing = f"v2k-kvm-made-{uuid.uuid4().hex[:8]}", f"v2k-kvm-gone-{uuid.uuid4().hex[:8]}"
    ensure_limits({made: None}, {made: 2})
    assert existing_limits({made, missing}) == {made}
    assert existing_limits(set()) == set()


def test_a_slot_of_an_existing_limit_is_held_and_given_back():
    name = f"v2k-kvm-held-{uuid.uuid4().hex[:8]}"
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=3))
    capped = existing_limits({name})
    with slot(name, capped):
        assert _active_slots(name) == 1
    assert _active_slots(name) == 0


def test_a_host_without_a_limit_asks_the_server_for_no_slot(monkeypatch: pytest.MonkeyPatch):
    asked: list[str] = []
    monkeypatch.setattr(limits, "concurrency", lambda name, **kw: asked.append(name))
    name = f"v2k-kvm-free-{uuid.uuid4().hex[:8]}"
    with slot(name, existing_limits({name})):
        pass
    assert asked == []
    # Without what exists, the server is asked (and a missing limit is no cap).
    slot(name)
    assert asked == [name]
