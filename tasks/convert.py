"""virt-v2v on the convert host: the command, its progress, its hard timeout, its checks."""

from __future__ import annotations

import json
import shlex
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from invoke.exceptions import CommandTimedOut

from tasks import ssh
from tasks.errors import Refused, Transient, V2kError
from tasks.hosts import remote, run_quiet, timed_out

# virt-v2v's own steps in the order it prints them, so a step can be shown as a percent.
STEPS = [
    "Setting up the source",
    "Opening the source",
    "Inspecting the source",
    "Checking for sufficient free disk space",
    "Converting",
    "Mapping filesystem data",
    "Closing the overlay",
    "Assigning disks to buses",
    "Checking if the guest needs BIOS or UEFI",
    "Setting up the destination",
    "Copying disk",
    "Creating output metadata",
    "Finishing off",
]


class ConvertError(V2kError):
    """virt-v2v failed, timed out, or produced something other than what the source had.

    Raised as one of its two kinds: `ConvertRefused` or `ConvertFailed`.
    """


class ConvertRefused(ConvertError, Refused):
    """virt-v2v refused the guest (its own error), or used up `convert_timeout`: the same
    input fails the same way again, so the stage is not retried."""


class ConvertFailed(ConvertError, Transient):
    """virt-v2v was killed, or failed without saying why: another try may pass."""


def step_percent(message: str) -> int | None:
    """Rough overall percent for a virt-v2v step message, None when it is not a step."""
    for index, step in enumerate(STEPS):
        if message.startswith(step):
            return round(100 * index / len(STEPS))
    return None


def virt_v2v_argv(
    ova_dir: str, out_dir: str, name: str, *, verbose: bool, bridges: dict[str, str] | None = None
) -> list[str]:
    """CloudStack's virt-v2v contract, with machine-readable progress on fd 3."""
    argv = ["virt-v2v", "--root", "first", "-i", "ova", ova_dir, "-o", "local", "-os", out_dir]
    argv += ["-of", "qcow2", "-on", name, "--machine-readable=fd:3"]
    for source, target in (bridges or {}).items():
        argv += ["-b", f"{source}:{target}"]
    if verbose:
        argv += ["-v", "-x"]
    return argv


def wrapped_command(
    argv: list[str],
    *,
    log_file: str | None,
    pid_file: str,
    timeout_seconds: float,
    env: dict[str, str],
) -> str:
    """The remote command line: a hard timeout that kills the whole process group.

    `timeout` makes itself a process group leader and signals the group, so nbdkit and
    qemu children die with virt-v2v. Its pid is written to `pid_file`, so the worker can
    kill the group too when the run is cancelled. When the command ends in any other way
    (killed on the host, crashed), what is left of the group is killed as well: a child
    that outlived it would keep running and hold the SSH channel open, so the stage would
    hang. The exit status is the command's (`timeout`'s: 124 when it timed out, 128+N
    when a signal N killed it). With a log file, fd 3 (virt-v2v's progress events) goes
    to the SSH channel and everything else to the log file.
    """
    inner = remote(["timeout", "--kill-after=30", f"{int(timeout_seconds)}s", *argv], env=env)
    redirect = f" 3>&1 >{shlex.quote(log_file)} 2>&1" if log_file else ""
    # A background job's stdin is /dev/null unless redirected explicitly: hand it the
    # shell's own (ovftool reads its password prompt's answer from it).
    script = (
        f"exec 4<&0; {inner}{redirect} <&4 4<&- & pid=$!; echo $pid > {shlex.quote(pid_file)}; "
        'wait $pid; rc=$?; kill -KILL -"$pid" 2>/dev/null; exit $rc'
    )
    return f"sh -c {shlex.quote(script)}"


@dataclass
class EventStream:
    """A file-like sink for fabric's out_stream that turns JSON lines into events."""

    on_event: Callable[[dict], None]
    events: list[dict] = field(default_factory=list)
    _buffer: str = ""

    def write(self, data: str) -> int:
        self._buffer += data
        while "\n" in self._buffer:
            line, self._buffer = self._buffer.split("\n", 1)
            line = line.strip()
            if not line:
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                event = {"type": "message", "message": line}
            self.events.append(event)
            self.on_event(event)
        return len(data)

    def flush(self) -> None:
        pass


@dataclass
class Converted:
    seconds: float
    events: list[dict]
    warnings: list[str]
    command_seconds: float = 0.0  # every command on the host, SSH session included


def run_virt_v2v(
    conn,
    argv: list[str],
    *,
    out_dir: str,
    timeout_seconds: float,
    env: dict[str, str],
    on_event: Callable[[dict], None],
) -> Converted:
    """Run virt-v2v on the host behind `conn` and stream its events.

    Raises:
        ConvertError: virt-v2v exited non-zero or timed out; the message carries its own
            error lines and the tail of its log.
    """
    log_file = f"{out_dir}/virt-v2v.log"
    pid_file = f"{out_dir}/virt-v2v.pid"
    # A virt-v2v of an earlier try whose worker died may still run: it goes first.
    kill_group(conn, pid_file)
    conn.run(remote(["mkdir", "-p", "--", out_dir]), hide=True, in_stream=False, timeout=60)
    command = wrapped_command(
        argv, log_file=log_file, pid_file=pid_file, timeout_seconds=timeout_seconds, env=env
    )
    sink = EventStream(on_event)
    started = time.monotonic()
    try:
        result = conn.run(
            command,
            out_stream=sink,
            err_stream=sink,
            warn=True,
            in_stream=False,
            # The remote `timeout` is the real limit; this one only catches a hung channel.
            timeout=timeout_seconds + 120,
        )
    except CommandTimedOut:
        kill_group(conn, pid_file)
        raise ConvertFailed(
            f"virt-v2v did not finish in {timeout_seconds:.0f} s and was killed"
            + _log_tail(conn, log_file)
        ) from None
    except BaseException:
        kill_group(conn, pid_file)
        raise
    errors = [e.get("message", "") for e in sink.events if e.get("type") == "error"]
    warnings = [e.get("message", "") for e in sink.events if e.get("type") == "warning"]
    elapsed = time.monotonic() - started
    if timed_out(result.exited, elapsed, timeout_seconds):
        raise ConvertRefused(
            f"virt-v2v did not finish in {timeout_seconds:.0f} s (convert_timeout) and was "
            "killed with its children" + _log_tail(conn, log_file)
        )
    if result.exited > 128:
        signame = _signal_name(result.exited - 128)
        raise ConvertFailed(
            f"virt-v2v was killed by {signame} on the host after {elapsed:.0f} s, before it "
            "finished; its children were killed too" + _log_tail(conn, log_file)
        )
    if result.exited != 0:
        detail = "; ".join(errors) if errors else "no error event"
        # With its own error lines virt-v2v said what it refused; without, it is unknown.
        error = ConvertRefused if errors else ConvertFailed
        raise error(f"virt-v2v exited {result.exited}: {detail}" + _log_tail(conn, log_file))
    return Converted(seconds=time.monotonic() - started, events=sink.events, warnings=warnings)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def kill_group(conn, pid_file: str, program: str = "virt-v2v") -> None:
    """Kill the remote process group whose leader's pid is in pid_file, if it still runs.

    Only while that leader is still `program` (it is `timeout PROGRAM ...`): a pid file
    left by a dead worker may name a pid that is by now another process's.
    """
    pid = shlex.quote(pid_file)
    # No `--` before the group: dash's kill takes it for a pid and kills nothing.
    script = (
        f'p=$(cat {pid} 2>/dev/null) && [ -n "$p" ] && '
        f"grep -qaF -- {shlex.quote(program)} /proc/$p/cmdline 2>/dev/null && "
        '{ kill -TERM -"$p" 2>/dev/null; sleep 2; kill -KILL -"$p" 2>/dev/null; }; true'
    )
    try:
        run_quiet(conn, f"sh -c {shlex.quote(script)}", 30)
    except Exception:  # noqa: BLE001 - best effort: the remote timeout kills it anyway
        pass


def _log_tail(conn, log_file: str, lines: int = 15) -> str:
    try:
        tail = run_quiet(conn, ["tail", "-n", str(lines), "--", log_file], 30).stdout.strip()
    except Exception:  # noqa: BLE001 - the log is a courtesy
        return ""
    return f"\nlast lines of {log_file}:\n{tail}" if tail else ""


def check_outputs(
    conn, out_dir: str, name: str, capacities: list[int]
) -> list[tuple[str, int, int]]:
    """Check virt-v2v's output on the host: one qcow2 per source disk, in order, right sizes.

    virt-v2v can exit 0 and still leave out a disk it did not understand, so this is
    what decides success. Returns (path, virtual size, actual size) per disk.

    Raises:
        ConvertError: a disk is missing or its virtual size differs from the source's.
    """
    found = []
    for index, capacity in enumerate(capacities):
        path = f"{out_dir}/{name}-sd{chr(ord('a') + index)}"
        result = run_quiet(conn, ["qemu-img", "info", "--output=json", "--", path], 120)
        if result.exited != 0:
            raise ConvertFailed(
                f"virt-v2v produced no disk {index + 1} of {len(capacities)} ({path}); "
                "it exited 0 but dropped that disk"
            )
        info = json.loads(result.stdout)
        if info.get("format") != "qcow2" or info["virtual-size"] != capacity:
            raise ConvertFailed(
                f"disk {index + 1} ({path}) is {info.get('format')} of {info['virtual-size']} "
                f"bytes; expected qcow2 of {capacity} bytes like the source"
            )
        found.append((path, info["virtual-size"], info.get("actual-size", 0)))
    extra = run_quiet(conn, ["ls", "--", out_dir], 60).stdout.split()
    unexpected = [f for f in extra if f.startswith(f"{name}-sd")][len(capacities) :]
    if unexpected:
        raise ConvertFailed(f"virt-v2v produced more disks than the source has: {unexpected}")
    return found


def convert_vm(
    host_name: str,
    host,
    *,
    ova_dir: str,
    out_dir: str,
    target: str,
    capacities: list[int],
    windows: bool,
    verbose: bool,
    timeout_seconds: float,
    progress,
    logger,
) -> tuple[Converted, list[tuple[str, int, int]], str]:
    """Convert an exported OVF directory on a KVM host and check what came out.

    Paths are as the host sees them. Returns virt-v2v's run, the checked disks (path,
    virtual size, actual size) and the libvirt XML it wrote.
    """
    env = dict(host.env)
    if windows:
        env.setdefault("VIRTIO_WIN", host.virtio_win)
    argv = virt_v2v_argv(ova_dir, out_dir, target, verbose=verbose)
    logger.info("convert on %s: %s", host_name, shlex.join(argv))
    percent = 0

    def on_event(event: dict) -> None:
        nonlocal percent
        message = str(event.get("message", "")).strip()
        kind = event.get("type")
        if kind == "warning":
            logger.warning("virt-v2v: %s", message)
        elif kind == "error":
            logger.error("virt-v2v: %s", message)
        elif message:
            percent = step_percent(message) or percent
            progress.step(percent, message)

    started = time.monotonic()
    with ssh.connection(host) as conn:
        done = run_virt_v2v(
            conn, argv, out_dir=out_dir, timeout_seconds=timeout_seconds, env=env, on_event=on_event
        )
        disks = check_outputs(conn, out_dir, target, capacities)
        xml = conn.run(
            remote(["cat", "--", f"{out_dir}/{target}.xml"]), hide=True, in_stream=False, timeout=60
        ).stdout
    done.command_seconds = time.monotonic() - started
    progress.step(100, f"converted {len(disks)} disk(s) in {done.seconds:.0f} s")
    return done, disks, xml
