"""`v2k serve`: a local Prefect server, the v2k blocks, the deployments and a worker.

    v2k serve                      # server on 127.0.0.1:4200, deploy, one worker
    v2k serve --testbed            # ... and a test bed, its blocks saved as testbed-*
    python -m deployments.serve    # the same without the v2k command

`LocalPrefect` is the piece underneath, also used by the tests: it starts `prefect server
start` and `prefect worker start` as child processes in their own process groups and
stops them by pid, never by name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from tasks.errors import Transient

ROOT = Path(__file__).resolve().parent.parent
PREFECT_FILE = ROOT / "deployments" / "prefect.yaml"
POOL = "v2k"
DEPLOYMENTS = {
    "migrate-vm": "migrate-vm/migrate-vm",
    "wave": "migrate-wave/wave",
    "nightly-wave": "migrate-wave/nightly-wave",
    "inventory": "inventory/inventory",
}


class ServeError(Transient):
    """A part of the local Prefect could not be started."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _prefect_cli() -> list[str]:
    exe = Path(sys.executable).with_name("prefect")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "prefect"]


class LocalPrefect:
    """A Prefect server and its workers, started here and stopped by pid.

    Args:
        home: PREFECT_HOME of the server and workers (database, logs).
        host, port: Where the server listens; a free port when port is None.
        database_url: A PostgreSQL URL (`postgresql+asyncpg://...`); SQLite in home
            when None.
        extra_env: More environment for the server and workers (PREFECT_* settings).
    """

    def __init__(
        self,
        home: Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        database_url: str | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.home = Path(home)
        self.extra_env = dict(extra_env or {})
        self.host = host
        self.port = port or free_port(host)
        self.database_url = database_url
        self.server: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"

    def env(self) -> dict[str, str]:
        """Environment of the server, the workers and the CLI calls."""
        env = dict(os.environ)
        for key in [k for k in env if k.startswith("PREFECT_")]:
            del env[key]  # nothing of the caller's Prefect profile or test harness
        env.update(
            PREFECT_HOME=str(self.home),
            PREFECT_API_URL=self.api_url,
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_SERVER_API_HOST=self.host,
            PREFECT_SERVER_API_PORT=str(self.port),
            PREFECT_UI_API_URL=self.api_url,
            PREFECT_LOGGING_LEVEL=os.environ.get("PREFECT_LOGGING_LEVEL", "INFO"),
            PYTHONUNBUFFERED="1",
        )
        if self.database_url:
            env["PREFECT_API_DATABASE_CONNECTION_URL"] = self.database_url
        env.update(self.extra_env)
        return env

    @contextlib.contextmanager
    def settings(self) -> Iterator[None]:
        """Point this process's Prefect client at the server, inside the block."""
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: self.api_url}):
            yield

    def _spawn(self, argv: list[str], log_name: str) -> subprocess.Popen:
        self.home.mkdir(parents=True, exist_ok=True)
        with (self.home / log_name).open("ab") as log:
            return subprocess.Popen(
                argv,
                env=self.env(),
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def start(self, timeout: float = 120) -> LocalPrefect:
        """Start the server and wait until it answers its health check."""
        self.server = self._spawn(
            [*_prefect_cli(), "server", "start", "--host", self.host, "--port", str(self.port)],
            "server.log",
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.server.poll() is not None:
                raise ServeError(f"prefect server exited: {self.log_tail('server.log')}")
            try:
                if httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise ServeError(f"prefect server not healthy in {timeout:.0f} s: {self.log_tail()}")

    def log_tail(self, name: str = "server.log", size: int = 3000) -> str:
        path = self.home / name
        return path.read_text(errors="replace")[-size:] if path.exists() else ""

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """Run the prefect command line against this server, from the project root."""
        done = subprocess.run(
            [*_prefect_cli(), *args],
            env=self.env(),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode:
            raise ServeError(
                f"prefect {' '.join(args)} exited {done.returncode}:\n"
                f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            )
        return done

    def register_blocks(self) -> None:
        """Register the v2k block types, so the UI can make and edit them."""
        from blocks import KvmCluster, KvmHost, MigrationSettings, TemporaryStorage, VCenter

        with self.settings():
            for block in (VCenter, KvmHost, KvmCluster, TemporaryStorage, MigrationSettings):
                block.register_type_and_schema()

    def ensure_pool(self, name: str = POOL) -> None:
        """Create the process work pool when it is missing."""
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.actions import WorkPoolCreate
        from prefect.exceptions import ObjectAlreadyExists
        from prefect.workers.process import ProcessWorker

        with self.settings(), get_client(sync_client=True) as client:
            with contextlib.suppress(ObjectAlreadyExists):
                client.create_work_pool(
                    WorkPoolCreate(
                        name=name,
                        type="process",
                        base_job_template=ProcessWorker.get_default_base_job_template(),
                        description="v2k: flows run as processes on the workers",
                    )
                )

    def deploy(self) -> str:
        """`prefect deploy --all` with deployments/prefect.yaml, from the project root."""
        self.ensure_pool()
        done = self.cli("--no-prompt", "deploy", "--all", "--prefect-file", str(PREFECT_FILE))
        return done.stdout

    def start_worker(
        self, name: str | None = None, pool: str = POOL, limit: int | None = None
    ) -> subprocess.Popen:
        """Start a process worker polling the pool."""
        name = name or f"v2k-worker-{len(self.workers) + 1}"
        argv = [*_prefect_cli(), "worker", "start", "--pool", pool, "--type", "process"]
        argv += ["--name", name, "--install-policy", "never"]
        argv += ["--limit", str(limit)] if limit else []
        worker = self._spawn(argv, f"{name}.log")
        self.workers.append(worker)
        return worker

    def wait_for_workers(self, count: int = 1, pool: str = POOL, timeout: float = 60) -> None:
        """Wait until `count` workers of the pool have sent a heartbeat."""
        from prefect.client.orchestration import get_client

        deadline = time.monotonic() + timeout
        with self.settings(), get_client(sync_client=True) as client:
            while time.monotonic() < deadline:
                online = [
                    w for w in client.read_workers_for_work_pool(pool) if w.status == "ONLINE"
                ]
                if len(online) >= count:
                    return
                for worker in self.workers:
                    if worker.poll() is not None:
                        raise ServeError(f"a worker exited: {self.log_tail('v2k-worker-1.log')}")
                time.sleep(0.5)
        raise ServeError(f"{count} worker(s) not online in {timeout:.0f} s")

    def stop(self, timeout: float = 20) -> None:
        """Stop the workers (and their flow runs), then the server: SIGTERM to each process
        group we started, SIGKILL after the timeout."""
        procs = [*self.workers, *([self.server] if self.server else [])]
        for proc in procs:
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(10)
            # Children of the group (flow run processes, uvicorn) go with it.
            _signal_group(proc, signal.SIGKILL)
        self.workers = []
        self.server = None

    def __enter__(self) -> LocalPrefect:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)  # the group whose leader we started (start_new_session)


def default_home() -> Path:
    base = Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state"))
    return base / "v2k" / "prefect"


def serve(
    *,
    host: str = "127.0.0.1",
    port: int = 4200,
    home: Path | None = None,
    workers: int = 1,
    testbed: bool = False,
    slot: int | None = None,
    database_url: str | None = None,
    echo=print,
    stop_after: float | None = None,
) -> int:
    """Start everything, print where the UI is, and hold until Ctrl-C (or SIGTERM).

    Returns the exit code: 0 after a clean stop, 1 when a part died on its own.
    """
    stop = {"now": False}

    def on_signal(*_):
        stop["now"] = True

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    bed = None
    local = LocalPrefect(home or default_home(), host=host, port=port, database_url=database_url)
    try:
        echo(f"starting the Prefect server on {local.url} (home {local.home})")
        local.start()
        local.register_blocks()
        echo("registered the v2k block types")
        if testbed:
            from testbed.bed import TestBed

            echo("starting the test bed (vCenter simulator, KVM hosts, libvirtd)")
            bed = TestBed(local.home / "testbed", real_guest=True, slot=slot).start()
            with local.settings():
                names = bed.save_blocks("testbed")
            echo("saved blocks: " + ", ".join(sorted(names.values())))
        local.deploy()
        echo("deployed: " + ", ".join(DEPLOYMENTS.values()) + f" (work pool {POOL})")
        for _ in range(workers):
            local.start_worker()
        local.wait_for_workers(workers)
        echo(f"{workers} worker(s) polling the work pool {POOL}")
        echo("")
        echo(f"Prefect UI: {local.url}")
        echo(f"Prefect API: {local.api_url}")
        echo(f"Migrate a VM: {local.url}/deployments  (migrate-vm > Run > Custom run)")
        echo("Stop with Ctrl-C.")
        started = time.monotonic()
        while not stop["now"]:
            dead = [p for p in [local.server, *local.workers] if p and p.poll() is not None]
            if dead:
                echo(f"a part stopped on its own (pid {dead[0].pid}); see {local.home}/*.log")
                return 1
            if stop_after is not None and time.monotonic() - started > stop_after:
                break
            time.sleep(0.5)
        return 0
    finally:
        echo("stopping")
        local.stop()
        if bed is not None:
            bed.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4200)
    parser.add_argument("--home", type=Path, default=None)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--testbed", action="store_true")
    parser.add_argument("--slot", type=int, default=None)
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args()
    sys.exit(
        serve(
            host=args.host,
            port=args.port,
            home=args.home,
            workers=args.workers,
            testbed=args.testbed,
            slot=args.slot,
            database_url=args.database_url,
        )
    )
