"""Export on a KVM host with ovftool: the vi:// locator, the command, the password by stdin."""

from __future__ import annotations

import re
import shlex
import time
from pathlib import Path
from urllib.parse import quote

from invoke.exceptions import Failure, WatcherError
from invoke.watchers import StreamWatcher

from blocks import VCenter
from tasks.convert import kill_group, wrapped_command
from tasks.errors import Refused, Transient, V2kError
from tasks.hosts import remote, run_quiet, timed_out
from tasks.models import ExportedDisk, ExportResult, VmSpec

_PERCENT = re.compile(r"(\d{1,3})%")
_LIST_OVF = 'ls -d -- "$1"/*/*.ovf'  # the target directory comes in as $1, never in the script


# What ovftool prints when vCenter refuses the login (its own words, and vCenter's).
_LOGIN_REFUSED = re.compile(
    r"incorrect login credentials|incorrect user name or password|cannot complete login",
    re.IGNORECASE,
)
_LOGIN_FIX = (
    "check the user name and password in the VCenter block; v2k gave ovftool the password "
    "once and did not run it again, so the account is not locked out by retries"
)


class OvftoolError(V2kError):
    """ovftool failed; the message carries its own error lines, never the password.

    Raised as one of its two kinds: `OvftoolRefused` or `OvftoolFailed`.
    """


class OvftoolRefused(OvftoolError, Refused):
    """vCenter refused ovftool's login: never retried (the account's lock-out)."""


class OvftoolFailed(OvftoolError, Transient):
    """ovftool failed, timed out or was killed; another try may pass."""


class _PasswordOnce(StreamWatcher):
    """Answers ovftool's first `Password:` prompt, and only that one.

    A second prompt means vCenter refused the password: the command is stopped there
    (`WatcherError`) instead of typing the same password again. Each stream (stdout,
    stderr) is scanned whole every time, so prompts are counted, not matched by position.
    """

    def __init__(self, password: str) -> None:
        self.password = password
        self.answered = 0

    def submit(self, stream: str):
        if stream.count("Password:") <= self.answered:
            return
        if self.answered:
            raise WatcherError("ovftool asked for the password again: the login was refused")
        self.answered = 1
        yield self.password + "\n"


def locator(vcenter: VCenter, spec: VmSpec) -> str:
    """`vi://USER@HOST:PORT/DC/vm/Folder/VM`, every part URL-encoded, with no password.

    Encoding each name on its own keeps spaces, quotes, `#`, `%`, `/` and non-ASCII in
    VM and folder names from breaking the locator (CloudStack's users hit exactly that).
    """
    path = "/".join(quote(name, safe="") for name in spec.inventory_names)
    return f"vi://{quote(vcenter.username, safe='')}@{vcenter.host}:{vcenter.port}/{path}"


def ovftool_argv(vcenter: VCenter, spec: VmSpec, target_dir: str, threads: int | None) -> list[str]:
    argv = ["ovftool", "--acceptAllEulas", "--X:logLevel=warning"]
    if not vcenter.verify_tls:
        argv.append("--noSSLVerify")
    if threads is not None:
        argv.append(f"--parallelThreads={threads}")
    return argv + [locator(vcenter, spec), target_dir]


class _ProgressSink:
    """fabric out_stream: turns `Disk progress: N%` into progress reports, keeps the text."""

    def __init__(self, on_percent) -> None:
        self.on_percent = on_percent
        self.text = ""

    def write(self, data: str) -> int:
        self.text += data
        for match in _PERCENT.finditer(data):
            self.on_percent(int(match.group(1)))
        return len(data)

    def flush(self) -> None:
        pass


def run_ovftool(
    conn,
    vcenter: VCenter,
    spec: VmSpec,
    *,
    target_dir: str,
    threads: int | None,
    timeout_seconds: float,
    env: dict[str, str],
    on_percent,
) -> str:
    """Run ovftool on the host behind `conn`; return the directory holding the .ovf.

    The password goes to ovftool's `Password:` prompt through stdin (a fabric watcher),
    so it is never in the remote argv, the environment, or a file.

    Raises:
        OvftoolError: ovftool failed or timed out (killed with its children).
    """
    argv = ovftool_argv(vcenter, spec, target_dir, threads)
    conn.run(remote(["mkdir", "-p", "--", target_dir]), hide=True, in_stream=False, timeout=60)
    pid_file = f"{target_dir}/.ovftool.pid"
    # An ovftool of an earlier try whose worker died may still write here: it goes first.
    kill_group(conn, pid_file, "ovftool")
    command = wrapped_command(
        argv, log_file=None, pid_file=pid_file, timeout_seconds=timeout_seconds, env=env
    )
    answer = _PasswordOnce(vcenter.password.get_secret_value())
    sink = _ProgressSink(on_percent)
    started = time.monotonic()
    try:
        result = conn.run(
            command,
            watchers=[answer],
            out_stream=sink,
            err_stream=sink,
            warn=True,
            pty=False,
            in_stream=False,
            timeout=timeout_seconds + 120,
        )
    except Failure as exc:
        kill_group(conn, pid_file, "ovftool")
        if isinstance(exc.reason, WatcherError):
            raise OvftoolRefused(
                f"vCenter {vcenter.host} refused ovftool's login of {vcenter.username!r} "
                "(ovftool asked for the password again).",
                _LOGIN_FIX,
            ) from None
        raise
    except BaseException:
        kill_group(conn, pid_file, "ovftool")
        raise
    secret = vcenter.password.get_secret_value()
    output = sink.text.replace(secret, "***")
    if timed_out(result.exited, time.monotonic() - started, timeout_seconds):
        raise OvftoolFailed(
            f"ovftool did not finish in {timeout_seconds:.0f} s (convert_timeout) and was killed"
        )
    if result.exited > 128:
        raise OvftoolFailed(
            f"ovftool was killed by signal {result.exited - 128} on the host before it finished"
        )
    if result.exited != 0:
        errors = [line for line in output.splitlines() if line.startswith("Error")]
        detail = f"ovftool exited {result.exited}: {'; '.join(errors) or output.strip()[-500:]}"
        if _LOGIN_REFUSED.search(output):
            raise OvftoolRefused(
                f"vCenter {vcenter.host} refused ovftool's login of {vcenter.username!r}: "
                f"{detail}.",
                _LOGIN_FIX,
            )
        raise OvftoolFailed(detail)
    found = run_quiet(
        conn, f"sh -c {shlex.quote(_LIST_OVF)} sh {shlex.quote(target_dir)}", 60
    ).stdout.splitlines()
    if len(found) != 1:
        raise OvftoolFailed(f"ovftool wrote {len(found)} descriptors under {target_dir}, not 1")
    return found[0].rsplit("/", 1)[0]


def exported_from_manifest(directory: Path, source_moref: str) -> ExportResult:
    """Describe what ovftool wrote (as the worker sees it), with its manifest's checksums."""
    manifests = "\n".join(m.read_text() for m in directory.glob("*.mf"))
    sizes = {path.name: path.stat().st_size for path in directory.iterdir() if path.is_file()}
    return _describe(str(directory), sizes, manifests, source_moref)


# Every file of the directory as `SIZE NAME\0` (names may hold anything but / and NUL),
# then the manifests; the directory comes in as $1, never in the script.
_LIST_EXPORT = (
    'cd -- "$1" && find . -maxdepth 1 -type f -printf "%s %f\\0" && '
    'printf \'\\0\' && for m in ./*.mf; do [ -e "$m" ] && cat -- "$m"; done; true'
)


def exported_on_host(conn, directory: str, source_moref: str) -> ExportResult:
    """Describe what ovftool wrote into a directory that only the host behind `conn` sees
    (temporary storage local to the host), with its manifest's checksums.

    Raises:
        OvftoolError: the directory cannot be listed on the host.
    """
    result = run_quiet(conn, f"sh -c {shlex.quote(_LIST_EXPORT)} sh {shlex.quote(directory)}", 60)
    if result.exited != 0:
        raise OvftoolFailed(f"cannot list {directory} on the export host: {result.stderr.strip()}")
    listing, _, manifests = result.stdout.partition("\0\0")
    sizes = {}
    for entry in listing.split("\0"):
        size, _, name = entry.partition(" ")
        if size.isdigit():
            sizes[name] = int(size)
    return _describe(directory, sizes, manifests, source_moref)


def _describe(
    directory: str, sizes: dict[str, int], manifests: str, source_moref: str
) -> ExportResult:
    """The ExportResult of an ovftool directory from its file sizes and manifest text."""
    ovf = next((name for name in sizes if name.endswith(".ovf")), None)
    if ovf is None:
        raise OvftoolFailed(f"ovftool wrote no .ovf descriptor into {directory}")
    sums: dict[str, str] = {}
    for line in manifests.splitlines():
        match = re.match(r"SHA256\((.+)\)=\s*([0-9a-f]+)", line)
        if match:
            sums[match.group(1)] = match.group(2)
    vmdks = sorted((name for name in sizes if name.endswith(".vmdk")), key=_disk_number)
    disks = [
        ExportedDisk(
            key=index, file_name=name, bytes=sizes[name], sha256=sums.get(name, ""), seconds=0.0
        )
        for index, name in enumerate(vmdks)
    ]
    return ExportResult(directory=directory, ovf=ovf, disks=disks, source_moref=source_moref)


def _disk_number(name: str) -> int:
    """ovftool names disks NAME-disk1.vmdk, NAME-disk2.vmdk, ...: order by that number."""
    numbers = re.findall(r"\d+", Path(name).stem)
    return int(numbers[-1]) if numbers else 0
