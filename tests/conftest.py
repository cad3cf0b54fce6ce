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
