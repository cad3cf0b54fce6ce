"""tasks.ssh: one SSH connection per host within a run's scope, a new one outside."""

from __future__ import annotations

import contextvars
from concurrent.futures import ThreadPoolExecutor

from blocks import KvmHost
from tasks import ssh


def test_a_scope_reuses_one_connection_per_host_and_closes_them(bed_blocks):
    kvm1, kvm2 = KvmHost.load(bed_blocks["kvm1"]), KvmHost.load(bed_blocks["kvm2"])
    with ssh.shared_connections():
        with ssh.connection(kvm1) as first:
            assert first.run("true", hide=True, in_stream=False).ok
        with ssh.connection(kvm1) as again, ssh.connection(kvm2) as other:
            assert again is first and again.is_connected
            assert other is not first
        # A task thread of the run (a copy of its context) gets the same one.
        with ThreadPoolExecutor(1) as pool:

            def in_thread():
                with ssh.connection(kvm1) as conn:
                    return conn

            assert pool.submit(contextvars.copy_context().run, in_thread).result() is first
    assert not first.is_connected and not other.is_connected


def test_a_lost_connection_is_opened_again(bed_blocks):
    host = KvmHost.load(bed_blocks["kvm1"])
    with ssh.shared_connections():
        with ssh.connection(host) as first:
            first.close()  # as when the host dropped it
        with ssh.connection(host) as second:
            assert second is not first
            assert second.run("true", hide=True, in_stream=False).ok


def test_outside_a_scope_each_use_has_its_own_connection(bed_blocks):
    host = KvmHost.load(bed_blocks["kvm1"])
    with ssh.connection(host) as first:
        assert first.run("true", hide=True, in_stream=False).ok
    assert not first.is_connected
    with ssh.connection(host) as second:
        assert second is not first
