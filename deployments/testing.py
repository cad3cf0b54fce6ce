"""Pytest plugin: `v2k serve` running for the session, for the tests that go through the
Prefect API, the UI or `--via-deployment` (`pytest_plugins = ["deployments.testing"]`).

One real `prefect server start` with the v2k deployments and a process worker, started
the way a user starts it (about 20 s), on a free port, with its PREFECT_HOME in a
temporary directory; the blocks of the session's test bed (the `bed` fixture) are saved
into it. At the end `v2k serve` gets SIGTERM and must stop everything and exit 0.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from deployments.serve import ROOT, free_port

FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@dataclass
class Served:
    proc: subprocess.Popen
    url: str
    home: Path
    blocks: dict[str, str]

    @property
    def api(self) -> str:
        return f"{self.url}/api"

    @property
    def output(self) -> str:
        return (self.home / "serve.out").read_text(errors="replace")

    def env(self) -> dict[str, str]:
        """Environment for a process that talks to this server (`v2k ... --via-deployment`)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        return env | {"PREFECT_API_URL": self.api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}

    def log_tail(self, name: str = "v2k-worker-1.log", size: int = 3000) -> str:
        path = self.home / "prefect" / name
        return path.read_text(errors="replace")[-size:] if path.exists() else ""

    def settings(self):
        """Point this process's Prefect client at the server, inside the block."""
        from prefect.settings import PREFECT_API_URL, temporary_settings

        return temporary_settings(updates={PREFECT_API_URL: self.api})

    def deployment_id(self, name: str) -> str:
        response = httpx.get(f"{self.api}/deployments/name/{name}", timeout=10)
        response.raise_for_status()
        return response.json()["id"]

    def wait_for_run(self, flow_run_id: str, timeout: float = 300) -> dict:
        """Poll the flow run until it is in a final state; its JSON."""
        return wait_for_run(self.api, flow_run_id, timeout, self.log_tail)


def wait_for_run(
    api: str, flow_run_id: str, timeout: float = 300, log_tail: Callable[[], str] = str
) -> dict:
    """Poll a flow run through the REST API at `api` until it is in a final state; its
    JSON. On timeout the error carries `log_tail()` (a worker's log)."""
    deadline = time.monotonic() + timeout
    while True:
        run = httpx.get(f"{api}/flow_runs/{flow_run_id}", timeout=10).json()
        if run["state_type"] in FINAL:
            return run
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"flow run {flow_run_id} still {run['state_type']} after {timeout:.0f} s; "
                f"worker log:\n{log_tail()}"
            )
        time.sleep(1)


@pytest.fixture(scope="session")
def served(bed, tmp_path_factory):
    """`v2k serve` on a free port, with the bed's blocks saved as bed-*."""
    home = tmp_path_factory.mktemp("v2k-serve")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "flows.cli", "serve", "--port", str(port)]
    argv += ["--home", str(home / "prefect")]
    with (home / "serve.out").open("w") as out:
        proc = subprocess.Popen(
            argv, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    served = Served(proc, f"http://127.0.0.1:{port}", home, {})
    try:
        deadline = time.monotonic() + 180
        while "Stop with Ctrl-C" not in served.output:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"v2k serve did not come up:\n{served.output}")
            time.sleep(0.5)
        with served.settings():
            from blocks import MigrationSettings

            served.blocks.update(bed.save_blocks("bed"))
            # As in conftest's bed_blocks: the worker exports (per-disk progress).
            MigrationSettings(force_ms_export=True).save(served.blocks["settings"], overwrite=True)
        yield served
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the group of the `v2k serve` we started
            try:
                code = proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
                pytest.fail(f"v2k serve did not stop within 60 s:\n{served.output}")
            assert code == 0, served.output


class LocalPostgres:
    """Debian's PostgreSQL server in a temporary directory, as the `postgres` user, on a
    free port of 127.0.0.1; stopped by pid. For the Prefect server of a scale-out test."""

    BIN = Path("/usr/lib/postgresql")

    def __init__(self) -> None:
        import tempfile

        versions = sorted(self.BIN.glob("*/bin/postgres"))
        if not versions:
            raise FileNotFoundError("PostgreSQL is not installed (apt-get install postgresql)")
        self.bin = versions[-1].parent
        # Not under pytest's 0700 directories: the postgres user must reach it.
        self.data = Path(tempfile.mkdtemp(prefix="v2k-pg-"))
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"

    def start(self, timeout: float = 60) -> LocalPostgres:
        import pwd
        import shutil

        user = pwd.getpwnam("postgres")
        os.chown(self.data, user.pw_uid, user.pw_gid)
        as_postgres = dict(user="postgres", group="postgres", cwd=self.data)
        subprocess.run(
            [self.bin / "initdb", "-D", self.data / "db", "-A", "trust", "-U", "postgres",
             "--no-sync", "-E", "UTF8"],
            check=True, capture_output=True, **as_postgres,
        )  # fmt: skip
        self.proc = subprocess.Popen(
            [self.bin / "postgres", "-D", self.data / "db", "-p", str(self.port),
             "-k", self.data, "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
             "-c", "max_connections=200"],
            stdout=(self.data / "log").open("w"), stderr=subprocess.STDOUT,
            start_new_session=True, **as_postgres,
        )  # fmt: skip
        ready = shutil.which("pg_isready") or str(self.bin / "pg_isready")
        deadline = time.monotonic() + timeout
        while subprocess.run(
            [ready, "-h", "127.0.0.1", "-p", str(self.port)], capture_output=True
        ).returncode:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((self.data / "log").read_text())
            time.sleep(0.3)
        return self

    def stop(self) -> None:
        import shutil

        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # fast shutdown
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.data, ignore_errors=True)
