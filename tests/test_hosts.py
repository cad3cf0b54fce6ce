"""Choosing convert and import hosts from probes."""

import random

import pytest

from tasks.hosts import HostSelectionError, choose_hosts, remote
from tasks.models import HostProbe

OK = dict(reachable=True, virt_v2v="virt-v2v 2.2.0", nbdkit="nbdkit 1.32", qemu_img="qemu-img 7.2")


def probes():
    return [
        HostProbe(name="kvm1", **OK),
        HostProbe(name="kvm2", **{**OK, "nbdkit": None}),
        HostProbe(name="kvm3", reachable=False, error="NoValidConnectionsError: refused"),
        HostProbe(name="kvm4", **OK, virtio_win=True),
    ]


def test_random_choice_only_among_able_hosts():
    seen = {choose_hosts(probes(), windows=False, rng=random.Random(i)).convert for i in range(40)}
    assert seen == {"kvm1", "kvm4"}


def test_windows_needs_virtio_win():
    choice = choose_hosts(probes(), windows=True, rng=random.Random(1))
    assert choice.convert == "kvm4"


def test_named_host_must_be_able_and_reason_is_given():
    with pytest.raises(HostSelectionError, match="kvm2.*missing nbdkit"):
        choose_hosts(probes(), windows=False, convert="kvm2")
    with pytest.raises(HostSelectionError, match="kvm3.*unreachable"):
        choose_hosts(probes(), windows=False, import_="kvm3")
    with pytest.raises(HostSelectionError, match="not a host of the cluster"):
        choose_hosts(probes(), windows=False, convert="kvm9")
    choice = choose_hosts(probes(), windows=False, convert="kvm1", import_="kvm4")
    assert (choice.convert, choice.import_) == ("kvm1", "kvm4")
    assert "convert: kvm1 (named)" in choice.reasons


def test_no_able_host_lists_every_reason():
    bad = [p for p in probes() if p.name in ("kvm2", "kvm3")]
    with pytest.raises(HostSelectionError) as err:
        choose_hosts(bad, windows=False)
    assert "kvm2: missing nbdkit" in str(err.value) and "kvm3: unreachable" in str(err.value)


def test_remote_quotes_every_argument():
    assert remote(["ls", "a b", "$(x)"]) == "ls 'a b' '$(x)'"
    assert remote(["true"], env={"K": "v w"}) == "env 'K=v w' true"


def test_local_storage_keeps_every_step_on_one_host_with_ovftool_first():
    local = [*probes(), HostProbe(name="kvm5", **OK, ovftool="VMware ovftool 4.6.3")]
    for seed in range(20):
        choice = choose_hosts(local, windows=False, local_storage=True, rng=random.Random(seed))
        assert (choice.convert, choice.import_, choice.export) == ("kvm5", "kvm5", "kvm5")
    assert any("hosts with ovftool first" in r for r in choice.reasons)
    # A host named for export (or import) converts too: it holds the only copy.
    named = choose_hosts(local, windows=False, local_storage=True, import_="kvm5")
    assert (named.convert, named.export) == ("kvm5", "kvm5")
    assert "convert: kvm5 (named for import; temporary storage is local)" in named.reasons
    # Without ovftool on the convert host no other host exports: the rules refuse it.
    bare = choose_hosts(local, windows=False, local_storage=True, convert="kvm1")
    assert (bare.import_, bare.export) == ("kvm1", None)
    assert any("kvm1 has no ovftool" in r for r in bare.reasons)
    # Shared storage still lets another host export.
    shared = choose_hosts(local, windows=False, convert="kvm1")
    assert shared.export == "kvm5"
