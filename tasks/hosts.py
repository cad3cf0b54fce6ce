"""KVM hosts over fabric: probe what each offers and choose where to convert and import."""

from __future__ import annotations

import contextvars
import random
import shlex
import time
from concurrent.futures import ThreadPoolExecutor

from blocks import KvmHost
from tasks import ssh
from tasks.errors import Refused
from tasks.models import HostChoice, HostProbe

# One round trip per host: each probe prints KEY=VALUE, and a missing tool prints nothing.
_PROBE = r"""
v() { "$@" 2>/dev/null | head -n 1; }
mkdir -p -- {workdir} || exit 3
echo "virt_v2v=$(v virt-v2v --version)"
echo "nbdkit=$(v nbdkit --version)"
echo "ovftool=$(v ovftool --version)"
echo "qemu_img=$(v qemu-img --version)"
if [ -e {virtio_win} ]; then echo virtio_win=1; fi
for f in /usr/share/OVMF/OVMF_CODE*.fd /usr/share/edk2/ovmf/OVMF_CODE*.fd; do
  [ -e "$f" ] || continue
  echo ovmf=1
  case "$f" in *secboot*|*.ms.fd) echo ovmf_secure_boot=1;; esac
done
echo "free_bytes=$(df -P -B1 -- {workdir} | awk 'NR==2 {print $4}')"
scratch={scratch}
if [ -n "$scratch" ] && [ -d "$scratch" ] && [ -w "$scratch" ]; then
  echo "scratch_free_bytes=$(df -P -B1 -- "$scratch" | awk 'NR==2 {print $4}')"
fi
"""


class HostSelectionError(Refused):
    """No host can do the work, or a named host cannot; the message lists why per host.
    Not retried: the hosts were just probed, each failure is in the message."""


def remote(argv: list[str], env: dict[str, str] | None = None) -> str:
    """A shell command line built only from quoted arguments (and quoted env assignments)."""
    prefix = ["env", *(f"{k}={v}" for k, v in (env or {}).items())] if env else []
    return shlex.join(prefix + argv)


def run_quiet(conn, command: str | list[str], timeout: float):
    """Run a short command on a host and return its result: output captured, not echoed,
    no stdin, a non-zero exit returned rather than raised. A list is an argv, quoted
    into a command line (`remote`)."""
    line = remote(command) if isinstance(command, list) else command
    return conn.run(line, hide=True, warn=True, in_stream=False, timeout=timeout)


def timed_out(exited: int, elapsed: float, timeout_seconds: float) -> bool:
    """Whether a command run under `timeout --kill-after` ended because its time was up.

    124: `timeout` stopped it with TERM. 137 (KILL) is also what a command killed on the
    host by someone else gives: only the time spent tells the two apart.
    """
    return exited == 124 or (exited == 137 and elapsed >= timeout_seconds)


def probe_host(
    name: str, host: KvmHost, timeout: float = 60, scratch: str | None = None
) -> HostProbe:
    """Probe one host: virt-v2v, nbdkit, ovftool, qemu-img, virtio-win, free space.

    Args:
        scratch: local temporary storage to look at on the host: its free space, or
            `scratch_free_bytes=None` when it is not a writable directory there.
    """
    script = (
        _PROBE.replace("{workdir}", shlex.quote(host.workdir))
        .replace("{virtio_win}", shlex.quote(host.virtio_win))
        .replace("{scratch}", shlex.quote(scratch or ""))
    )
    started = time.monotonic()
    try:
        with ssh.connection(host) as conn:
            result = run_quiet(conn, f"sh -c {shlex.quote(script)}", timeout)
    except Exception as exc:  # noqa: BLE001 - every failure to reach a host is reported the same
        return HostProbe(name=name, reachable=False, error=f"{type(exc).__name__}: {exc}")
    if result.exited != 0:
        return HostProbe(
            name=name,
            reachable=False,
            error=f"probe exited {result.exited}: {result.stderr.strip()[-300:]}",
        )
    found: dict[str, str] = {}
    for line in result.stdout.splitlines():
        key, _, value = line.partition("=")
        if value.strip():
            found[key.strip()] = value.strip()
    free = found.get("free_bytes", "")
    scratch_free = found.get("scratch_free_bytes", "")
    return HostProbe(
        seconds=time.monotonic() - started,
        name=name,
        reachable=True,
        virt_v2v=found.get("virt_v2v"),
        nbdkit=found.get("nbdkit"),
        ovftool=found.get("ovftool"),
        qemu_img=found.get("qemu_img"),
        virtio_win="virtio_win" in found,
        ovmf="ovmf" in found,
        ovmf_secure_boot="ovmf_secure_boot" in found,
        free_bytes=int(free) if free.isdigit() else None,
        scratch_path=scratch,
        scratch_free_bytes=int(scratch_free) if scratch_free.isdigit() else None,
    )


def probe_hosts(
    hosts: dict[str, KvmHost], timeout: float = 60, scratch: str | None = None
) -> list[HostProbe]:
    """Probe every enabled host at once; disabled hosts are listed as such, not contacted.

    Args:
        scratch: local temporary storage (TemporaryStorage.host_dir when not shared) whose
            free space each host reports.
    """
    enabled = {name: host for name, host in hosts.items() if host.enabled}
    probes = [
        HostProbe(name=name, reachable=False, error="disabled in its KvmHost block")
        for name, host in hosts.items()
        if not host.enabled
    ]
    if enabled:
        with ThreadPoolExecutor(max_workers=min(16, len(enabled))) as pool:
            # In the caller's context: the run's shared connections (tasks.ssh) are kept.
            futures = [
                pool.submit(contextvars.copy_context().run, probe_host, n, h, timeout, scratch)
                for n, h in enabled.items()
            ]
            probes += [f.result() for f in futures]
    return sorted(probes, key=lambda p: p.name)


def choose_hosts(
    probes: list[HostProbe],
    *,
    windows: bool,
    convert: str | None = None,
    import_: str | None = None,
    export: str | None = None,
    use_ovftool: bool = True,
    local_storage: bool = False,
    rng: random.Random | None = None,
) -> HostChoice:
    """Pick the convert and import hosts: the named ones if able, else at random among the able.

    With `local_storage` (temporary storage on the convert host only) one host does the
    export, the conversion and the import: a host named for any of them is the convert
    host, the unnamed roles go to it, and among unnamed choices hosts with ovftool come
    first. Named hosts that differ are kept as named; `preflight.local_storage_rules`
    refuses them with the reason.

    Raises:
        HostSelectionError: a named host is not in the cluster or cannot convert, or no
            host can; the message gives the reason of every host.
    """
    rng = rng or random.Random()
    by_name = {p.name: p for p in probes}
    why_not = {p.name: p.can_convert(windows) for p in probes}
    summary = "; ".join(f"{n}: {why or 'ok'}" for n, why in sorted(why_not.items()))
    able = sorted(n for n, why in why_not.items() if why is None)
    reasons: list[str] = []

    def pick(role: str, wanted: str | None, need_convert: bool) -> str:
        if wanted is not None:
            if wanted not in by_name:
                raise HostSelectionError(
                    f"{role} host {wanted!r} is not a host of the cluster "
                    f"(hosts: {', '.join(sorted(by_name))})"
                )
            probe = by_name[wanted]
            problem = (
                why_not[wanted]
                if need_convert
                else (None if probe.reachable else f"unreachable: {probe.error}")
            )
            if problem:
                raise HostSelectionError(f"{role} host {wanted!r} cannot be used: {problem}")
            reasons.append(f"{role}: {wanted} (named)")
            return wanted
        candidates = able if need_convert else sorted(n for n, p in by_name.items() if p.reachable)
        if not candidates:
            raise HostSelectionError(f"no host of the cluster can {role}: {summary}")
        chosen = rng.choice(candidates)
        reasons.append(f"{role}: {chosen} (random among {', '.join(candidates)})")
        return chosen

    named_for = None
    preferred = False
    if local_storage and convert is None:
        with_ovftool = [n for n in able if by_name[n].ovftool]
        if export or import_:
            # The named host must convert too: the only copy of the disks stays on it.
            named_for = "export" if export else "import"
            convert = export or import_
        elif use_ovftool and with_ovftool:
            able, preferred = with_ovftool, True  # it has to export with ovftool too
    convert_host = pick("convert", convert, need_convert=True)
    if named_for:
        reasons[-1] = f"convert: {convert_host} (named for {named_for}; temporary storage is local)"
    elif preferred:
        reasons[-1] += " (temporary storage is local: hosts with ovftool first)"
    if local_storage and import_ is None:
        import_host = convert_host
        reasons.append(f"import: {import_host} (the converted disks stay on it)")
    else:
        import_host = pick("import", import_, need_convert=False)
    export_host = _pick_export(
        by_name, export, use_ovftool, convert_host, reasons, local_storage=local_storage
    )
    return HostChoice(
        convert=convert_host,
        import_=import_host,
        export=export_host,
        probes=probes,
        reasons=reasons,
    )


def _pick_export(
    by_name: dict[str, HostProbe],
    wanted: str | None,
    use_ovftool: bool,
    convert_host: str,
    reasons: list[str],
    local_storage: bool = False,
) -> str | None:
    """The KVM host that exports with ovftool, or None for the worker's own export.

    With local storage only the convert host can write there, so no other host is chosen.
    """
    if wanted is not None:
        probe = by_name.get(wanted)
        if probe is None:
            raise HostSelectionError(f"export host {wanted!r} is not a host of the cluster")
        if not probe.reachable or not probe.ovftool:
            why = f"unreachable: {probe.error}" if not probe.reachable else "no ovftool"
            raise HostSelectionError(f"export host {wanted!r} cannot be used: {why}")
        reasons.append(f"export: {wanted} with ovftool (named)")
        return wanted
    able = sorted(n for n, p in by_name.items() if p.reachable and p.ovftool)
    if local_storage:
        able = [n for n in able if n == convert_host]
    if not use_ovftool or not able:
        why = "force_ms_export is set" if not use_ovftool else "no host has ovftool"
        if local_storage:
            why = "force_ms_export is set" if not use_ovftool else f"{convert_host} has no ovftool"
            reasons.append(f"export: none possible ({why}; the storage is local to {convert_host})")
        else:
            reasons.append(f"export: the worker, through the vSphere API ({why})")
        return None
    # The convert host reads the export fastest when it wrote it itself.
    chosen = convert_host if convert_host in able else able[0]
    reasons.append(f"export: {chosen} with ovftool (hosts with ovftool: {', '.join(able)})")
    return chosen
