"""Fixtures shared by the test modules: one Prefect test server for the session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect server and database for the whole session (about 13 s once)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def bed(tmp_path_factory):
    """The whole test bed for the session: vcsim with the default inventory (the real
    Debian guest on `debian-stopped`), two KVM hosts, each with its own libvirtd
    (`bed.libvirt_conn("kvm1")`, docs/testbed.md).

    It lives in slot 1 (V2K_TEST_BED_SLOT), so the test bed tests that start their own
    parts in slot 0 can run while it is up.
    """
    from testbed.bed import TestBed

    workdir = tmp_path_factory.mktemp("bed")
    with TestBed(
        workdir,
        hosts=2,
        libvirt=True,
        real_guest=True,
        slot=int(os.environ.get("V2K_TEST_BED_SLOT", "1")),
        ovftool_hosts=("kvm2",),
    ) as bed:
        yield bed


@pytest.fixture(scope="session")
def bed_blocks(bed, prefect_harness):
    """The test bed's blocks saved in the Prefect test server: {kind: block name}.

    `settings` forces the management export (the worker exports); `settings-ovftool`
    lets the host with ovftool (kvm2) export.
    """
    from blocks import MigrationSettings

    names = bed.save_blocks("bed")
    MigrationSettings(force_ms_export=True).save(names["settings"], overwrite=True)
    MigrationSettings(threads_on_kvm_host=2).save("bed-settings-ovftool", overwrite=True)
    names["settings-ovftool"] = "bed-settings-ovftool"
    return names
