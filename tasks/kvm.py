"""The destination side with libvirt-python: volumes, the domain definition, the boot check."""

from __future__ import annotations

import re
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import libvirt

from tasks.errors import Refused, Transient, V2kError, libvirt_refused
from tasks.models import NicSpec, VmSpec

OSINFO_NS = "http://libosinfo.org/xmlns/libvirt/domain/1.0"
V2K_NS = "https://github.com/v2k/xmlns/migration/1"
ET.register_namespace("libosinfo", OSINFO_NS)
ET.register_namespace("v2k", V2K_NS)

_STREAM_CHUNK = 4 << 20


class KvmImportError(V2kError):
    """The import into libvirt failed; the message says at which step.

    Raised as one of its two kinds: `KvmImportRefused` or `KvmImportFailed`.
    """


class KvmImportRefused(KvmImportError, Refused):
    """The destination cannot take the VM as set up (a missing or inactive pool, a taken
    volume name, a refused login): the user must act first."""


class KvmImportFailed(KvmImportError, Transient):
    """A step failed in a way that may pass (a dropped libvirt connection, a failed copy)."""


def _silence_libvirt() -> None:
    # libvirt prints every error to stderr as well as raising it; raising is enough.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


_silence_libvirt()


_event_loop = threading.Lock()
_event_loop_running = False


def _start_event_loop() -> None:
    """libvirt's keep-alive needs an event loop; one daemon thread serves every connection."""
    global _event_loop_running
    with _event_loop:
        if _event_loop_running:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _event_loop_running = True


def open_connection(uri: str, keepalive: tuple[int, int] = (5, 6)) -> libvirt.virConnect:
    """Open a libvirt connection, with an error that names the URI (never a password).

    A host that stops answering keep-alives for interval x count seconds closes the
    connection, so a call to a dead host fails instead of hanging.
    """
    _start_event_loop()
    try:
        conn = libvirt.open(uri)
        if not uri.startswith("test:"):
            conn.setKeepAlive(*keepalive)
        return conn
    except libvirt.libvirtError as exc:
        if libvirt_refused(exc):
            raise KvmImportRefused(
                f"libvirt at {uri} refused the login: {exc.get_error_message()}.",
                "check the KvmHost block's key and known_hosts (or its libvirt_uri)",
            ) from None
        raise KvmImportFailed(
            f"cannot connect to libvirt at {uri}: {exc.get_error_message()}"
        ) from None


def domain_type(conn: libvirt.virConnect, wanted: str = "auto") -> str:
    """`kvm` or `qemu`: as the host block says, or for `auto` what libvirt offers for x86_64."""
    if wanted != "auto":
        return wanted
    caps = ET.fromstring(conn.getCapabilities())
    types = {d.get("type") for d in caps.iterfind("./guest[arch/@name='x86_64']/arch/domain")}
    return "kvm" if "kvm" in types else "qemu"


def domain_exists(conn: libvirt.virConnect, name: str) -> bool:
    try:
        conn.lookupByName(name)
    except libvirt.libvirtError:
        return False
    return True


def macs_in_use(conn: libvirt.virConnect) -> dict[str, str]:
    """MAC address -> name of the domain that has it, over every domain of the host."""
    used: dict[str, str] = {}
    for dom in conn.listAllDomains():
        for mac in ET.fromstring(dom.XMLDesc()).iterfind("./devices/interface/mac"):
            used[mac.get("address", "").lower()] = dom.name()
    return used


def pool_free_bytes(conn: libvirt.virConnect, pool_name: str) -> int:
    pool = lookup_pool(conn, pool_name)
    pool.refresh()
    return pool.info()[3]


def pool_type(conn: libvirt.virConnect, pool_name: str) -> str | None:
    """The libvirt type of a pool (`dir`, `logical`, ...); None when there is no such pool."""
    try:
        pool = conn.storagePoolLookupByName(pool_name)
    except libvirt.libvirtError:
        return None
    return ET.fromstring(pool.XMLDesc(0)).get("type")


def lookup_pool(conn: libvirt.virConnect, pool_name: str) -> libvirt.virStoragePool:
    try:
        pool = conn.storagePoolLookupByName(pool_name)
    except libvirt.libvirtError:
        names = ", ".join(sorted(conn.listStoragePools() + conn.listDefinedStoragePools()))
        raise KvmImportRefused(
            f"storage pool {pool_name!r} does not exist on the import host (pools: {names}).",
            "define the pool on every host of the cluster, or name an existing one in the "
            "KvmCluster block's storage_pool or storage_map",
        ) from None
    if not pool.isActive():
        raise KvmImportRefused(
            f"storage pool {pool_name!r} is not active on the import host.",
            f"start it (virsh pool-start {pool_name}; pool-autostart keeps it started)",
        )
    return pool


def volume_exists(pool: libvirt.virStoragePool, name: str) -> bool:
    try:
        pool.storageVolLookupByName(name)
    except libvirt.libvirtError:
        return False
    return True


def volume_name(target: str, index: int, run_id: str) -> str:
    """The pool volume that disk `index` of the migrated VM `target` becomes.

    The run's id in the name is the volume's ownership mark (a volume holds no metadata):
    two runs never share a volume name, and a run removes only names that carry its id.
    """
    return f"{target}-disk{index}-{run_id}.qcow2"


def carries_mark(volume: str, run_id: str) -> bool:
    """Whether a volume name is one that run `run_id` gives (see `volume_name`)."""
    return bool(run_id) and volume.endswith(f"-{run_id}.qcow2")


def _volumes_of(dom: libvirt.virDomain) -> list[tuple[str, str]]:
    """(pool, volume) of each of the domain's disks that is a pool volume."""
    root = ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    return [
        (source.get("pool"), source.get("volume"))
        for source in root.iterfind("devices/disk[@type='volume']/source")
    ]


def remove_run_volumes(
    conn: libvirt.virConnect, run_id: str, volumes: list[tuple[str, str]]
) -> list[str]:
    """Remove (pool, volume) pairs that carry run `run_id`'s mark; return the removed ones.

    For a retried import and for cleanup: the pairs come from the run's ledger, and a
    name without the run's mark is refused, whatever the ledger says.
    """
    foreign = [f"{p}/{v}" for p, v in volumes if not carries_mark(v, run_id)]
    if foreign:
        raise ValueError(f"refusing to remove {', '.join(foreign)}: not made by run {run_id}")
    return [f"{p}/{v}" for p, v in volumes if remove_volume(conn, p, v)]


def upload_volume(
    conn: libvirt.virConnect,
    pool: libvirt.virStoragePool,
    name: str,
    source: Path,
    virtual_size: int,
    on_progress: Callable[[int, int], None] | None = None,
) -> libvirt.virStorageVol:
    """Create a qcow2 volume and stream the converted file into it."""
    vol_xml = (
        f"<volume><name>{_escape(name)}</name><capacity>{virtual_size}</capacity>"
        "<allocation>0</allocation><target><format type='qcow2'/></target></volume>"
    )
    size = source.stat().st_size  # before anything is created: a missing file creates nothing
    vol = pool.createXML(vol_xml, 0)
    stream = conn.newStream(0)
    sent = 0
    try:
        vol.upload(stream, 0, size, 0)
        with source.open("rb") as f:
            while chunk := f.read(_STREAM_CHUNK):
                stream.send(chunk)
                sent += len(chunk)
                if on_progress:
                    on_progress(sent, size)
        stream.finish()
    except BaseException:
        try:
            stream.abort()
        finally:
            vol.delete(0)
        raise
    pool.refresh()
    return vol


# Pool types whose volumes are plain files in the pool's directory on the host: what a
# copy on the host (qemu-img convert, for local temporary storage) can write into.
FILE_POOL_TYPES = ("dir", "fs", "netfs")
_QEMU_IMG_PERCENT = re.compile(r"\((\d+(?:\.\d+)?)/100%\)")


class _PercentSink:
    """fabric out_stream for `qemu-img convert -p`: `(12.50/100%)` becomes bytes done."""

    def __init__(self, total: int, on_progress: Callable[[int, int], None] | None) -> None:
        self.total = total
        self.on_progress = on_progress

    def write(self, data: str) -> int:
        for match in _QEMU_IMG_PERCENT.finditer(data):
            if self.on_progress:
                self.on_progress(int(self.total * float(match.group(1)) / 100), self.total)
        return len(data)

    def flush(self) -> None:
        pass


def place_volume(
    pool: libvirt.virStoragePool,
    host_conn,
    name: str,
    source: str,
    virtual_size: int,
    on_progress: Callable[[int, int], None] | None = None,
    timeout_seconds: float = 3 * 3600,
) -> libvirt.virStorageVol:
    """Create a qcow2 volume with libvirt and fill it on the host from a file there.

    For temporary storage local to the host, which the worker cannot read: libvirt
    creates (and so tracks) the volume, then `qemu-img convert` on the host copies the
    converted disk into the volume's file, sparsely, under a hard remote timeout.

    Args:
        source: the qcow2 file as the host sees it.

    Raises:
        KvmImportError: the pool is not a directory pool, the source is missing on the
            host, or the copy failed (the volume is deleted again).
    """
    from tasks.hosts import remote, run_quiet, timed_out

    kind = ET.fromstring(pool.XMLDesc(0)).get("type")
    if kind not in FILE_POOL_TYPES:
        raise KvmImportRefused(
            f"pool {pool.name()!r} is of type {kind!r}: a disk in the host's local temporary "
            f"storage can only be copied into a {', '.join(FILE_POOL_TYPES)} pool.",
            "map the disks to a directory pool, or use shared temporary storage",
        )
    # Before anything is created: a missing file creates nothing.
    found = run_quiet(host_conn, ["qemu-img", "info", "--", source], 120)
    if found.exited != 0:
        raise KvmImportFailed(
            f"converted disk {source} is not readable on the import host: "
            f"{found.stderr.strip()[-300:]}"
        )
    vol_xml = (
        f"<volume><name>{_escape(name)}</name><capacity>{virtual_size}</capacity>"
        "<allocation>0</allocation><target><format type='qcow2'/></target></volume>"
    )
    vol = pool.createXML(vol_xml, 0)
    try:
        # -n writes into libvirt's volume file (keeping its owner and mode); the new qcow2
        # reads as zeros, so --target-is-zero skips writing the zeros and keeps it sparse.
        argv = ["timeout", "--kill-after=30", f"{int(timeout_seconds)}s"]
        argv += ["qemu-img", "convert", "-p", "-n", "--target-is-zero"]
        argv += ["-f", "qcow2", "-O", "qcow2", "--", source, vol.path()]
        started = time.monotonic()
        result = host_conn.run(
            remote(argv),
            out_stream=_PercentSink(virtual_size, on_progress),
            hide="stderr",
            warn=True,
            in_stream=False,
            timeout=timeout_seconds + 120,
        )
        if result.exited != 0:
            why = (
                f"did not finish in {timeout_seconds:.0f} s"
                if timed_out(result.exited, time.monotonic() - started, timeout_seconds)
                else f"exited {result.exited}: {result.stderr.strip()[-300:]}"
            )
            raise KvmImportFailed(f"qemu-img convert of {source} into {name!r} {why}")
    except BaseException:
        vol.delete(0)
        raise
    pool.refresh()
    return vol


def _escape(text: str) -> str:
    return (
        text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("'", "&apos;")
    )


def parse_v2v_xml(xml_text: str) -> dict:
    """What v2k takes from virt-v2v's XML: osinfo id, machine, disk buses, NIC models."""
    root = ET.fromstring(xml_text)
    osinfo = root.find(f".//{{{OSINFO_NS}}}os")
    osinfo_id = osinfo.get("id") if osinfo is not None else None
    type_el = root.find("./os/type")
    return {
        "osinfo": osinfo_id,
        "machine": type_el.get("machine") if type_el is not None else None,
        "disk_buses": [
            t.get("bus") for t in root.iterfind("./devices/disk[@device='disk']/target")
        ],
        "nic_models": [m.get("type") for m in root.iterfind("./devices/interface/model")],
        "efi": root.find("./os/loader") is not None
        or root.find("./os[@firmware='efi']") is not None,
    }


def network_target(
    nic: NicSpec, network_map: dict[str, str], default: str | None
) -> tuple[str, str]:
    """(`network` or `bridge`, name) for a NIC from the cluster's map; KeyError when unmapped."""
    target = network_map.get(nic.portgroup or "") or default
    if not target:
        raise KeyError(nic.portgroup)
    kind, _, name = target.partition(":")
    return kind, name


def domain_xml(
    *,
    name: str,
    spec: VmSpec,
    dom_type: str,
    volumes: list[tuple[str, str]],
    nics: list[tuple[NicSpec, str, str]],
    v2v: dict,
    source_note: dict[str, str],
) -> str:
    """The domain definition: the source's CPU, memory, firmware and MACs on v2k's mapping.

    Args:
        volumes: (pool, volume) per disk, in source order.
        nics: (nic, kind, target) per NIC, kind `network` or `bridge`.
        v2v: what `parse_v2v_xml` found in virt-v2v's output.
        source_note: where the domain came from, kept in its metadata.
    """
    dom = ET.Element("domain", type=dom_type)
    ET.SubElement(dom, "name").text = name
    metadata = ET.SubElement(dom, "metadata")
    if v2v.get("osinfo"):
        lib = ET.SubElement(metadata, f"{{{OSINFO_NS}}}libosinfo")
        ET.SubElement(lib, f"{{{OSINFO_NS}}}os", id=v2v["osinfo"])
    note = ET.SubElement(metadata, f"{{{V2K_NS}}}migration")
    for key, value in source_note.items():
        ET.SubElement(note, f"{{{V2K_NS}}}{key}").text = value
    ET.SubElement(dom, "memory", unit="MiB").text = str(spec.memory_mb)
    ET.SubElement(dom, "vcpu", placement="static").text = str(spec.num_cpu)
    cores = spec.cores_per_socket if spec.num_cpu % spec.cores_per_socket == 0 else 1
    cpu = (
        ET.SubElement(dom, "cpu", mode="host-model")
        if dom_type == "kvm"
        else ET.SubElement(dom, "cpu")
    )
    ET.SubElement(
        cpu, "topology", sockets=str(spec.num_cpu // cores), dies="1", cores=str(cores), threads="1"
    )
    efi = spec.firmware == "efi"
    machine = v2v.get("machine") or ("q35" if efi else "pc")
    os_el = ET.SubElement(dom, "os", firmware="efi") if efi else ET.SubElement(dom, "os")
    ET.SubElement(os_el, "type", arch="x86_64", machine=machine).text = "hvm"
    if efi:
        fw = ET.SubElement(os_el, "firmware")
        enabled = "yes" if spec.secure_boot else "no"
        ET.SubElement(fw, "feature", enabled=enabled, name="secure-boot")
        ET.SubElement(fw, "feature", enabled=enabled, name="enrolled-keys")
    ET.SubElement(os_el, "boot", dev="hd")
    features = ET.SubElement(dom, "features")
    ET.SubElement(features, "acpi")
    ET.SubElement(features, "apic")
    if efi and spec.secure_boot:
        ET.SubElement(features, "smm", state="on")
    ET.SubElement(dom, "clock", offset="localtime" if spec.is_windows else "utc")
    devices = ET.SubElement(dom, "devices")
    buses = v2v.get("disk_buses") or []
    for index, (pool, volume) in enumerate(volumes):
        bus = buses[index] if index < len(buses) and buses[index] else "virtio"
        disk = ET.SubElement(devices, "disk", type="volume", device="disk")
        ET.SubElement(disk, "driver", name="qemu", type="qcow2")
        ET.SubElement(disk, "source", pool=pool, volume=volume)
        prefix = "vd" if bus == "virtio" else "sd"
        ET.SubElement(disk, "target", dev=f"{prefix}{chr(ord('a') + index)}", bus=bus)
    models = v2v.get("nic_models") or []
    for index, (nic, kind, target) in enumerate(nics):
        iface = ET.SubElement(devices, "interface", type=kind)
        ET.SubElement(iface, "mac", address=nic.mac)
        ET.SubElement(iface, "source", **{kind: target})
        model = models[index] if index < len(models) and models[index] else "virtio"
        ET.SubElement(iface, "model", type=model)
        if not nic.connected:
            ET.SubElement(iface, "link", state="down")
    serial = ET.SubElement(devices, "serial", type="pty")
    ET.SubElement(serial, "target", port="0")
    console = ET.SubElement(devices, "console", type="pty")
    ET.SubElement(console, "target", type="serial", port="0")
    ET.SubElement(devices, "graphics", type="vnc", autoport="yes", listen="127.0.0.1")
    video = ET.SubElement(devices, "video")
    ET.SubElement(video, "model", type="vga")
    rng = ET.SubElement(devices, "rng", model="virtio")
    ET.SubElement(rng, "backend", model="random").text = "/dev/urandom"
    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode")


def define_domain(conn: libvirt.virConnect, xml: str) -> libvirt.virDomain:
    try:
        return conn.defineXML(xml)
    except libvirt.libvirtError as exc:
        raise KvmImportFailed(
            f"libvirt refused the domain definition: {exc.get_error_message()}"
        ) from None


def remove_domain(conn: libvirt.virConnect, name: str) -> bool:
    """Destroy and undefine a domain with its NVRAM; True when there was one."""
    try:
        dom = conn.lookupByName(name)
    except libvirt.libvirtError:
        return False
    if dom.isActive():
        dom.destroy()
    try:
        dom.undefineFlags(
            libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
        )
    except libvirt.libvirtError:
        # Drivers without NVRAM support refuse the flags; a plain undefine is then complete.
        dom.undefine()
    return True


def remove_volume(conn: libvirt.virConnect, pool_name: str, vol_name: str) -> bool:
    """Delete one volume; False when it (or its pool) is already gone, raise on a failure."""
    try:
        vol = conn.storagePoolLookupByName(pool_name).storageVolLookupByName(vol_name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() in (
            libvirt.VIR_ERR_NO_STORAGE_VOL,
            libvirt.VIR_ERR_NO_STORAGE_POOL,
        ):
            return False
        raise
    vol.delete(0)
    return True


def remove_volumes(conn: libvirt.virConnect, volumes: list[tuple[str, str]]) -> None:
    """Delete (pool, volume) pairs that this very call chain created; gone ones are skipped."""
    for pool_name, vol_name in volumes:
        remove_volume(conn, pool_name, vol_name)


def _run_of(dom: libvirt.virDomain) -> str | None:
    """The flow run recorded in a domain's v2k metadata (its ownership mark), if any."""
    root = ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    return root.findtext(f"metadata/{{{V2K_NS}}}migration/{{{V2K_NS}}}flow-run")


def run_domains(conn: libvirt.virConnect, flow_run_id: str) -> list[str]:
    """Names of the domains that a given flow run defined (from v2k's domain metadata)."""
    return [
        dom.name() for dom in conn.listAllDomains() if flow_run_id and _run_of(dom) == flow_run_id
    ]


def remove_run_domain(
    conn: libvirt.virConnect, name: str, flow_run_id: str, run_id: str
) -> list[str] | None:
    """Remove a domain that flow run `flow_run_id` defined, with the volumes it made.

    The domain must carry the run's mark in its metadata, and only its volumes whose names
    carry the run's id go with it: a disk attached by hand afterwards stays.

    Returns:
        The removed volumes as `pool/volume`; None when the domain is already gone.
    """
    try:
        dom = conn.lookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise
    if _run_of(dom) != flow_run_id:
        raise ValueError(f"refusing to remove domain {name!r}: not defined by run {flow_run_id}")
    volumes = [(p, v) for p, v in _volumes_of(dom) if carries_mark(v, run_id)]
    remove_domain(conn, name)
    return remove_run_volumes(conn, run_id, volumes)


def remove_migrated_domain(conn: libvirt.virConnect, name: str) -> list[str]:
    """Undo a migration: remove a domain v2k defined, with the volumes its run made.

    Refuses a domain without v2k's mark. Returns the removed volumes as `pool/volume`.
    """
    try:
        root = ET.fromstring(conn.lookupByName(name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    except libvirt.libvirtError:
        return []
    note = f"metadata/{{{V2K_NS}}}migration/{{{V2K_NS}}}"
    flow_run_id, run_id = root.findtext(note + "flow-run"), root.findtext(note + "run-id")
    if not flow_run_id or not run_id:
        raise ValueError(f"refusing to remove domain {name!r}: v2k did not define it")
    return remove_run_domain(conn, name, flow_run_id, run_id) or []


def wait_for_login(
    conn: libvirt.virConnect,
    dom: libvirt.virDomain,
    timeout: float,
    prompt: bytes = b"login:",
    on_line: Callable[[str], None] | None = None,
) -> str:
    """Read the serial console until the login prompt; return what was read.

    Raises:
        TimeoutError: no prompt within `timeout` seconds (the console text is in the message).
    """
    stream = conn.newStream(libvirt.VIR_STREAM_NONBLOCK)
    dom.openConsole(None, stream, libvirt.VIR_DOMAIN_CONSOLE_FORCE)
    seen = b""
    pending = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            data = stream.recv(4096)
            if data == -2 or data == b"":
                # -2: nothing to read yet on a non-blocking stream.
                if data == b"":
                    break
                time.sleep(0.2)
                continue
            seen += data
            pending += data
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                if on_line:
                    on_line(line.decode(errors="replace").rstrip("\r"))
            if prompt in seen:
                return seen.decode(errors="replace")
    finally:
        try:
            stream.abort()
        except libvirt.libvirtError:
            pass
    tail = seen.decode(errors="replace")[-800:]
    raise TimeoutError(
        f"no {prompt.decode()!r} on the serial console in {timeout:.0f} s; last:\n{tail}"
    )


def check_volume(host_conn, path: str) -> None:
    """`qemu-img check` of a volume on its host; raise KvmImportError when it is damaged."""
    from tasks.hosts import run_quiet

    result = run_quiet(host_conn, ["qemu-img", "check", "-f", "qcow2", "--", path], 600)
    if result.exited != 0:
        raise KvmImportFailed(f"qemu-img check failed for {path}: {result.stdout.strip()[-300:]}")


def import_disks_and_define(
    conn: libvirt.virConnect,
    host_conn,
    *,
    target: str,
    spec: VmSpec,
    sources: list[tuple[Path, int]],
    pools: list[str],
    nics: list[tuple[NicSpec, str, str]],
    v2v_xml: str,
    source_note: dict[str, str],
    on_progress: Callable[[int, int], None] | None = None,
    wanted_type: str = "auto",
    osinfo: str | None = None,
    on_host: bool = False,
    timings: dict[str, float] | None = None,
    run_id: str,
    on_create: Callable[[str, str], None] = lambda _pool, _volume: None,
) -> tuple[libvirt.virDomain, list[tuple[str, str]], str]:
    """Upload each converted disk into its pool, check it, and define the domain.

    Whatever this creates is removed again if a later step of it fails.

    Args:
        sources: (qcow2 file as the worker sees it, virtual size) per disk, in order;
            with `on_host`, the file as the import host sees it.
        pools: destination pool per disk.
        on_host: the files are on the import host only (local temporary storage): each is
            copied there into its volume (`place_volume`) instead of streamed by the worker.
        timings: When given, gets the seconds spent in the uploads (`upload`) and in
            `qemu-img check` (`check`), all disks together.
        run_id: the run's id, which every volume name carries (`volume_name`).
        on_create: called with (pool, volume) before each volume is created, so the run's
            ledger lists it even if the worker dies in the middle.

    Returns:
        The domain, its (pool, volume) list, and the domain type used.
    """
    created: list[tuple[str, str]] = []
    spent = timings if timings is not None else {}
    spent.setdefault("upload", 0.0)
    spent.setdefault("check", 0.0)
    dom_type = domain_type(conn, wanted_type)
    try:
        for index, ((path, virtual_size), pool_name) in enumerate(zip(sources, pools, strict=True)):
            pool = lookup_pool(conn, pool_name)
            vol_name = volume_name(target, index, run_id)
            if volume_exists(pool, vol_name):
                # Only an earlier try of this run makes this name, and the import task
                # removes those first: something else is going on.
                raise KvmImportRefused(
                    f"volume {vol_name!r} already exists in pool {pool_name!r}.",
                    "find out what made it; `v2k cleanup` removes it if this run did",
                )
            on_create(pool_name, vol_name)
            started = time.monotonic()
            if on_host:
                vol = place_volume(pool, host_conn, vol_name, str(path), virtual_size, on_progress)
            else:
                vol = upload_volume(conn, pool, vol_name, path, virtual_size, on_progress)
            created.append((pool_name, vol_name))
            spent["upload"] += time.monotonic() - started
            started = time.monotonic()
            check_volume(host_conn, vol.path())
            spent["check"] += time.monotonic() - started
        v2v = parse_v2v_xml(v2v_xml)
        # The caller's choice (virt-v2v's inspection, else the guestId table) wins.
        v2v["osinfo"] = osinfo
        xml = domain_xml(
            name=target,
            spec=spec,
            dom_type=dom_type,
            volumes=created,
            nics=nics,
            v2v=v2v,
            source_note=source_note,
        )
        dom = define_domain(conn, xml)
    except BaseException:
        remove_volumes(conn, created)
        raise
    return dom, created, dom_type


def boot_check(conn: libvirt.virConnect, name: str, timeout: float, on_line=None) -> str:
    """Start the domain, wait for its login prompt, then power it off again."""
    dom = conn.lookupByName(name)
    dom.create()
    try:
        return wait_for_login(conn, dom, timeout, on_line=on_line)
    finally:
        if dom.isActive():
            dom.destroy()
