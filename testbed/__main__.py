"""Command line of the test bed.

python -m testbed build                  build the vCenter simulator (cached)
python -m testbed image                  build the real Debian guest image (cached)
python -m testbed up [--hosts N] [--libvirt] [--inventory FILE] [--real-guest] [--esx]
                                         start everything in the background, print JSON
python -m testbed down                   stop what `up` started
python -m testbed demo                   migrate the real Debian guest end to end
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from testbed.paths import run_dir

STATE = "state.json"


def _state_path() -> Path:
    return run_dir() / STATE


def cmd_build(_args) -> int:
    from testbed import vcsim

    print(vcsim.build())
    return 0


def cmd_image(_args) -> int:
    from testbed.images import debian_guest

    print(debian_guest())
    return 0


def _bed_from(args):
    from testbed.bed import TestBed

    return TestBed(
        run_dir() / "bed",
        hosts=args.hosts,
        libvirt=args.libvirt,
        inventory=Path(args.inventory) if args.inventory else _default_inventory(),
        real_guest=args.real_guest,
        esx=args.esx,
    )


def _default_inventory() -> Path:
    from testbed.inventory import DEFAULT_INVENTORY

    return Path(DEFAULT_INVENTORY)


def cmd_serve(args) -> int:
    """Hold a started test bed until SIGTERM; `up` runs this in the background."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    bed = _bed_from(args).start()
    try:
        state = {"ready": True, "supervisor_pid": os.getpid(), **bed.info()}
        tmp = _state_path().with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(_state_path())
        stop.wait()
    finally:
        bed.stop()
        _state_path().unlink(missing_ok=True)
    return 0


def cmd_up(args) -> int:
    if _state_path().exists():
        print(f"a test bed is already up ({_state_path()}); run `python -m testbed down`")
        return 1
    log = run_dir() / "testbed.log"
    argv = [sys.executable, "-m", "testbed", "_serve", "--hosts", str(args.hosts)]
    argv += ["--libvirt"] if args.libvirt else []
    argv += ["--inventory", args.inventory] if args.inventory else []
    argv += ["--real-guest"] if args.real_guest else []
    argv += ["--esx"] if args.esx else []
    with log.open("w") as out:
        proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    deadline = time.monotonic() + args.timeout
    while not _state_path().exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            print(f"the test bed did not come up; log {log}:\n{log.read_text()[-3000:]}")
            return 1
        time.sleep(0.3)
    print(_state_path().read_text())
    return 0


def cmd_down(args) -> int:
    path = _state_path()
    if not path.exists():
        print("no test bed is up")
        return 0
    pid = json.loads(path.read_text())["supervisor_pid"]
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        path.unlink(missing_ok=True)
        return 0
    deadline = time.monotonic() + args.timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.3)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)
        path.unlink(missing_ok=True)
        print(f"the test bed supervisor {pid} did not stop in time and was killed")
        return 1
    print("test bed stopped")
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def cmd_demo(args) -> int:
    from testbed.demo import run_demo

    return run_demo()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m testbed",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("build", help="build the vCenter simulator").set_defaults(func=cmd_build)
    sub.add_parser("image", help="build the Debian guest image").set_defaults(func=cmd_image)
    for name, func, hidden in (("up", cmd_up, False), ("_serve", cmd_serve, True)):
        p = sub.add_parser(name, help=None if hidden else "start the test bed in the background")
        p.add_argument("--hosts", type=int, default=2, help="number of KVM hosts (default 2)")
        p.add_argument(
            "--libvirt", action="store_true", help="start each host's libvirtd, pool and nets"
        )
        p.add_argument("--inventory", help="inventory YAML (default: testbed/inventory.yaml)")
        p.add_argument("--real-guest", action="store_true", help="use the real Debian guest")
        p.add_argument("--esx", action="store_true", help="a standalone ESXi host, not vCenter")
        p.add_argument("--timeout", type=float, default=900, help="seconds to wait for it")
        p.set_defaults(func=func)
    down = sub.add_parser("down", help="stop the test bed")
    down.add_argument("--timeout", type=float, default=60)
    down.set_defaults(func=cmd_down)
    demo = sub.add_parser("demo", help="migrate the real Debian guest end to end")
    demo.set_defaults(func=cmd_demo)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # Every HTTP request and SSH handshake at INFO would bury the progress lines.
    for chatty in ("httpx", "paramiko"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
