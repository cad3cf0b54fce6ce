"""Preflight: read the source VM and check every rule before anything is created."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from blocks import KvmCluster, KvmHost, MigrationSettings, TemporaryStorage, VCenter
from tasks import kvm, ownership
from tasks import vcenter as vc
from tasks.errors import Refused
from tasks.models import HostChoice, HostProbe, MigrationRequest, VmSpec, libvirt_name


class Concern(BaseModel):
    """One finding of a rule: critical blocks the migration, warning informs."""

    rule: str
    severity: Literal["critical", "warning"]
    message: str
    fix: str


class PreflightError(Refused):
    """A critical concern: the migration is refused before anything was created."""

    def __init__(self, concerns: list[Concern]) -> None:
        self.concerns = concerns
        lines = [f"{c.message} Fix: {c.fix}" for c in concerns]
        super().__init__("migration refused: " + " | ".join(lines))


class Preflight(BaseModel):
    spec: VmSpec
    target_name: str
    concerns: list[Concern]

    @property
    def warnings(self) -> list[str]:
        return [c.message for c in self.concerns if c.severity == "warning"]


# VMware guestId prefixes of the guests virt-v2v can convert (Linux families and Windows).
_CONVERTIBLE = (
    "win",
    "rhel",
    "centos",
    "rocky",
    "alma",
    "oracle",
    "sles",
    "suse",
    "opensuse",
    "debian",
    "ubuntu",
    "fedora",
    "other3xlinux",
    "other4xlinux",
    "other5xlinux",
    "other6xlinux",
    "otherlinux",
    "amazonlinux",
    "asianux",
    "photon",
    "mandrake",
    "mandriva",
    "turbolinux",
    "genericlinux",
    "redhat",
    "coreos",
    "vmwarephoton",
)


def host_rules(spec: VmSpec, import_host: HostProbe) -> list[Concern]:
    """Rules against the chosen import host: firmware the guest needs."""
    concerns: list[Concern] = []
    if spec.firmware == "efi" and not import_host.ovmf:
        concerns.append(
            Concern(
                rule="no-ovmf",
                severity="critical",
                message=f"the guest boots with UEFI and {import_host.name} has no OVMF firmware.",
                fix="install the ovmf package on the import host",
            )
        )
    elif spec.secure_boot and not import_host.ovmf_secure_boot:
        concerns.append(
            Concern(
                rule="no-secure-boot-ovmf",
                severity="critical",
                message=(
                    f"the guest uses UEFI secure boot and {import_host.name} has no "
                    "secure-boot OVMF build."
                ),
                fix="install an OVMF with secure boot (Debian: ovmf) or turn secure boot off",
            )
        )
    return concerns


def temporary_need(spec: VmSpec, storage: TemporaryStorage) -> int:
    """Bytes of temporary storage a run needs at most."""
    # The export and virt-v2v's output both live there until the import is done.
    return 2 * spec.total_disk_bytes + storage.reserve_bytes


def local_storage_rules(
    spec: VmSpec,
    storage: TemporaryStorage,
    choice: HostChoice,
    *,
    use_ovftool: bool,
    pool_types: dict[str, str | None],
) -> list[Concern]:
    """Rules for temporary storage local to the convert host (`shared=False`).

    The worker can neither write nor read that directory, so the convert host must export
    it with ovftool and import from it; and the import copies each disk into its pool's
    directory on the host. No rule applies to shared storage.

    Args:
        choice: the hosts select_hosts chose, with their probes (the probes looked at
            `storage.host_dir`).
        use_ovftool: False when force_ms_export is set.
        pool_types: destination pool -> its libvirt type on the import host (None: unknown;
            a missing pool is reported by the destination rules).
    """
    if storage.shared:
        return []
    concerns: list[Concern] = []
    convert = choice.convert
    where = f"temporary storage {storage.host_dir} is local to the convert host {convert}"
    if choice.export is None and not use_ovftool:
        concerns.append(
            Concern(
                rule="local-storage-ms-export",
                severity="critical",
                message=(
                    f"force_ms_export makes the worker export, but {where} "
                    "(TemporaryStorage.shared is false): the worker cannot write there."
                ),
                fix=(
                    "turn force_ms_export off so that ovftool exports on the convert host, "
                    "or use shared temporary storage"
                ),
            )
        )
    elif choice.export is None:
        concerns.append(
            Concern(
                rule="local-storage-no-ovftool",
                severity="critical",
                message=(
                    f"{where} (TemporaryStorage.shared is false), so ovftool must export on "
                    f"{convert}, and {convert} has no ovftool."
                ),
                fix=(
                    f"install ovftool on {convert}, name a convert host that has it, or use "
                    "shared temporary storage"
                ),
            )
        )
    elif choice.export != convert:
        concerns.append(
            Concern(
                rule="local-storage-export-host",
                severity="critical",
                message=(
                    f"export host {choice.export} is not the convert host, and {where} "
                    f"(TemporaryStorage.shared is false): {convert} could not read what "
                    f"{choice.export} exports."
                ),
                fix=(
                    f"name {convert} as export host too (or leave export_host empty), "
                    "or use shared temporary storage"
                ),
            )
        )
    if choice.import_ != convert:
        concerns.append(
            Concern(
                rule="local-storage-import-host",
                severity="critical",
                message=(
                    f"import host {choice.import_} is not the convert host, and {where} "
                    f"(TemporaryStorage.shared is false): the converted disks stay on "
                    f"{convert}, which {choice.import_} cannot read."
                ),
                fix=(
                    f"name {convert} as import host too (or leave import_host empty), "
                    "or use shared temporary storage"
                ),
            )
        )
    else:
        for pool, kind in pool_types.items():
            if kind is not None and kind not in kvm.FILE_POOL_TYPES:
                concerns.append(
                    Concern(
                        rule="local-storage-pool-type",
                        severity="critical",
                        message=(
                            f"pool {pool!r} on {convert} is of type {kind!r}; with temporary "
                            "storage local to the host, v2k copies the disks into the pool's "
                            f"directory on the host, which only {', '.join(kvm.FILE_POOL_TYPES)} "
                            "pools have."
                        ),
                        fix=(
                            "map the datastore to a directory pool (storage_pool/storage_map), "
                            "or use shared temporary storage"
                        ),
                    )
                )
    probe = next((p for p in choice.probes if p.name == convert), None)
    if probe is not None and probe.scratch_free_bytes is None:
        concerns.append(
            Concern(
                rule="temporary-storage",
                severity="critical",
                message=(
                    f"temporary storage {storage.host_dir} is not a writable directory on the "
                    f"convert host {convert}."
                ),
                fix=f"create it on {convert} (writable by its SSH user), or change host_path",
            )
        )
    elif probe is not None:
        need = temporary_need(spec, storage)
        if probe.scratch_free_bytes < need:
            concerns.append(
                Concern(
                    rule="temporary-space",
                    severity="critical",
                    message=(
                        f"temporary storage {storage.host_dir} on {convert} has "
                        f"{probe.scratch_free_bytes} bytes free, the export and conversion "
                        f"need up to {need}."
                    ),
                    fix=f"free space there on {convert}, or point host_path at a larger place",
                )
            )
    return concerns


def storage_rules(
    spec: VmSpec,
    storage: TemporaryStorage,
    cluster: KvmCluster,
    hosts: dict[str, KvmHost],
    choice: HostChoice,
    *,
    use_ovftool: bool,
) -> list[Concern]:
    """The temporary storage rules that need the chosen hosts (migrate-vm and plan both).

    Shared storage was checked on the worker in preflight; local storage is checked here,
    on the convert and import hosts.
    """
    if storage.shared:
        return []
    pool_types = import_pool_types(hosts[choice.import_], list(pool_needs(spec, cluster)))
    return local_storage_rules(
        spec, storage, choice, use_ovftool=use_ovftool, pool_types=pool_types
    )


def import_pool_types(host: KvmHost, pools: list[str]) -> dict[str, str | None]:
    """pool -> libvirt pool type on a host; None for a pool libvirt cannot tell about."""
    try:
        conn = kvm.open_connection(host.get_libvirt_uri())
    except Exception:  # noqa: BLE001 - unreachable: the destination rules report it
        return dict.fromkeys(pools)
    try:
        return {pool: kvm.pool_type(conn, pool) for pool in pools}
    finally:
        conn.close()


def name_rules(spec: VmSpec, requested: str | None) -> list[Concern]:
    """A source name libvirt cannot take is changed, and the user is told so."""
    if requested is None and libvirt_name(spec.name) != spec.name:
        return [
            Concern(
                rule="domain-name",
                severity="warning",
                message=(
                    f"{spec.name!r} is not a valid libvirt domain name; the domain will be "
                    f"named {libvirt_name(spec.name)!r}."
                ),
                fix="give target_name to choose another name",
            )
        ]
    return []


def source_rules(spec: VmSpec) -> list[Concern]:
    """Rules on the source VM alone."""
    concerns: list[Concern] = []
    if spec.power_state == "poweredOn" and spec.is_windows:
        concerns.append(
            Concern(
                rule="running-windows",
                severity="critical",
                message=f"Windows VM {spec.name!r} is running.",
                fix="shut Windows down gracefully (a crash-consistent copy may not boot)",
            )
        )
    elif spec.power_state == "poweredOn" and spec.standalone:
        concerns.append(
            Concern(
                rule="running-on-esxi",
                severity="critical",
                message=f"VM {spec.name!r} runs on a standalone ESXi host, which cannot clone.",
                fix="power the VM off, or migrate it through vCenter",
            )
        )
    elif spec.power_state == "poweredOn":
        concerns.append(
            Concern(
                rule="running-clone",
                severity="warning",
                message=(
                    f"VM {spec.name!r} is running: a powered-off clone is exported, which is "
                    "crash-consistent."
                ),
                fix="shut the VM down first for a clean copy",
            )
        )
    elif spec.power_state == "suspended":
        concerns.append(
            Concern(
                rule="suspended",
                severity="critical",
                message=f"VM {spec.name!r} is suspended.",
                fix="resume it and shut it down, or power it off",
            )
        )
    for disk in spec.disks:
        if disk.rdm:
            concerns.append(
                Concern(
                    rule="rdm-disk",
                    severity="critical",
                    message=f"{disk.label} is a raw device mapping ({disk.file_name}).",
                    fix="migrate the LUN's data separately and remove the RDM from the VM",
                )
            )
        elif disk.sharing == "sharingMultiWriter":
            concerns.append(
                Concern(
                    rule="shared-disk",
                    severity="critical",
                    message=f"{disk.label} is shared (multi-writer) with other VMs.",
                    fix="migrate the clustered application's data separately; remove the sharing",
                )
            )
        elif disk.mode.startswith("independent"):
            concerns.append(
                Concern(
                    rule="independent-disk",
                    severity="critical",
                    message=f"{disk.label} is in {disk.mode} mode, which cannot be exported.",
                    fix="change the disk mode to dependent (persistent) in vSphere",
                )
            )
    if not spec.disks:
        concerns.append(
            Concern(
                rule="no-disks",
                severity="critical",
                message=f"VM {spec.name!r} has no virtual disk.",
                fix="nothing to convert: create the VM on KVM directly",
            )
        )
    guest = (spec.guest_id or "").lower()
    if guest and not any(guest.startswith(p) for p in _CONVERTIBLE):
        concerns.append(
            Concern(
                rule="guest-os",
                severity="warning",
                message=(
                    f"guest OS {spec.guest_id} ({spec.guest_full_name or 'unknown'}) is not one "
                    "virt-v2v converts (it converts Linux and Windows guests)."
                ),
                fix="check that the guest boots with virtio drivers, or convert it by hand",
            )
        )
    if spec.snapshot_count:
        concerns.append(
            Concern(
                rule="snapshots",
                severity="warning",
                message=f"VM has {spec.snapshot_count} snapshot(s); the current state is exported.",
                fix="consolidate or delete snapshots to migrate an older state",
            )
        )
    return concerns


def destination_rules(
    spec: VmSpec,
    target_name: str,
    cluster: KvmCluster,
    hosts: dict[str, KvmHost],
    storage: TemporaryStorage,
    flow_run_id: str | None = None,
) -> list[Concern]:
    """Rules against the destination: name and MACs free, maps complete, room everywhere.

    Domains that the flow run `flow_run_id` defined are its own (a retried run), not in
    the way.
    """
    concerns: list[Concern] = []
    for nic in spec.nics:
        try:
            kvm.network_target(nic, cluster.network_map, cluster.default_network)
        except KeyError:
            concerns.append(
                Concern(
                    rule="unmapped-portgroup",
                    severity="critical",
                    message=f"{nic.label} is on port group {nic.portgroup!r}, which has no map.",
                    fix="add it to the cluster's network_map or set default_network",
                )
            )
    if storage.shared:
        concerns += _worker_storage_rules(spec, storage)
    # Local storage lives on the convert host: local_storage_rules checks it there, once
    # select_hosts has chosen that host.
    seen_uris: set[str] = set()
    for name, host in hosts.items():
        if not host.enabled:
            continue
        uri = host.get_libvirt_uri()
        if uri in seen_uris:
            continue
        seen_uris.add(uri)
        try:
            conn = kvm.open_connection(uri)
        except kvm.KvmImportError:
            continue  # select_hosts reports unreachable hosts with the reason
        try:
            ours = set(kvm.run_domains(conn, flow_run_id)) if flow_run_id else set()
            # Volumes need no rule: their names carry the run's id (kvm.volume_name).
            concerns += _host_rules(conn, name, spec, target_name, cluster, ours)
        finally:
            conn.close()
    return concerns


def _worker_storage_rules(spec: VmSpec, storage: TemporaryStorage) -> list[Concern]:
    """Shared temporary storage, as the worker sees it: there, and with room."""
    concerns: list[Concern] = []
    workdir = Path(storage.worker_path)
    if not workdir.is_dir():
        concerns.append(
            Concern(
                rule="temporary-storage",
                severity="critical",
                message=f"temporary storage {storage.worker_path} does not exist on the worker.",
                fix="create it, or mount the shared storage there",
            )
        )
    else:
        need = temporary_need(spec, storage)
        free = shutil.disk_usage(workdir).free
        if free < need:
            concerns.append(
                Concern(
                    rule="temporary-space",
                    severity="critical",
                    message=(
                        f"temporary storage {storage.worker_path} has {free} bytes free, "
                        f"the export and conversion need up to {need}."
                    ),
                    fix="free space there or point TemporaryStorage at a larger place",
                )
            )
    return concerns


def _host_rules(
    conn, host: str, spec: VmSpec, target_name: str, cluster: KvmCluster, ours: set[str]
):
    concerns: list[Concern] = []
    if kvm.domain_exists(conn, target_name) and target_name not in ours:
        concerns.append(
            Concern(
                rule="target-exists",
                severity="critical",
                message=f"a domain named {target_name!r} is already defined on {host}.",
                fix="choose another target_name, or remove that domain",
            )
        )
    used = kvm.macs_in_use(conn)
    for nic in spec.nics:
        if nic.mac in used and used[nic.mac] != target_name and used[nic.mac] not in ours:
            concerns.append(
                Concern(
                    rule="mac-in-use",
                    severity="critical",
                    message=(
                        f"MAC {nic.mac} of {nic.label} is used by domain "
                        f"{used[nic.mac]!r} on {host}."
                    ),
                    fix="remove or change that domain's NIC; v2k keeps the source MACs",
                )
            )
    for pool, needed in pool_needs(spec, cluster).items():
        try:
            free = kvm.pool_free_bytes(conn, pool)
        except kvm.KvmImportError as exc:
            concerns.append(
                Concern(
                    rule="storage-pool",
                    severity="critical",
                    message=f"{host}: {exc}.",
                    fix="create and start the pool, or fix the cluster's storage_pool/storage_map",
                )
            )
            continue
        if free < needed:
            concerns.append(
                Concern(
                    rule="destination-space",
                    severity="critical",
                    message=(
                        f"pool {pool!r} on {host} has {free} bytes free, the disks that land "
                        f"there need up to {needed}."
                    ),
                    fix="free space in the pool or map the datastore to another pool",
                )
            )
    return concerns


def disk_pools(spec: VmSpec, cluster: KvmCluster) -> list[str]:
    """The destination pool of each disk, in order, after the cluster's storage map."""
    return [cluster.storage_map.get(d.datastore, cluster.storage_pool) for d in spec.disks]


def pool_needs(spec: VmSpec, cluster: KvmCluster) -> dict[str, int]:
    """Bytes each destination pool receives, after the cluster's storage map."""
    needs: dict[str, int] = {}
    for disk, pool in zip(spec.disks, disk_pools(spec, cluster), strict=True):
        needs[pool] = needs.get(pool, 0) + disk.capacity_bytes
    return needs


class BlockNotFound(Refused, LookupError):
    """A block named in the request does not exist."""


def load_blocks(request: MigrationRequest) -> None:
    """Load every block the request names, so a wrong name fails first and clearly.

    Raises:
        BlockNotFound: one or more names are unknown; all of them are listed.
    """
    named = [
        (VCenter, request.vcenter),
        (KvmCluster, request.cluster),
        (TemporaryStorage, request.temporary_storage),
    ]
    if request.settings:
        named.append((MigrationSettings, request.settings))
    missing = []
    for cls, name in named:
        try:
            cls.load(name)
        except ValueError:
            missing.append(f"no {cls.__name__} block named {name!r}")
    if missing:
        raise BlockNotFound("; ".join(missing) + " (save it first, or check the name)")


def check(request: MigrationRequest, flow_run_id: str | None = None) -> Preflight:
    """Read the VM and evaluate every source and destination rule, raising nothing.

    `flow_run_id`: the run doing the migration, whose own domains (from an earlier try)
    do not count as taken names.

    Raises:
        BlockNotFound: a block named in the request does not exist.
        SourceError: the VM cannot be found (or the name is ambiguous).
    """
    load_blocks(request)
    vcenter = VCenter.load(request.vcenter)
    with vcenter.connect() as si:
        dc = vc.datacenter(si, vcenter.datacenter)
        spec = vc.read_spec(si, vc.find_vm(si, dc, request.vm))
    target = request.target_name or libvirt_name(spec.name)
    cluster = KvmCluster.load(request.cluster)
    concerns = source_rules(spec) + name_rules(spec, request.target_name)
    concerns += reservation_rules(request, spec, target, flow_run_id)
    concerns += destination_rules(
        spec,
        target,
        cluster,
        cluster.load_hosts(),
        TemporaryStorage.load(request.temporary_storage),
        flow_run_id,
    )
    return Preflight(spec=spec, target_name=target, concerns=concerns)


def reservation_rules(
    request: MigrationRequest, spec: VmSpec, target: str, flow_run_id: str | None
) -> list[Concern]:
    """Another live run holds this run's target or source VM (tasks/ownership.py)."""
    concerns = []
    vcenter_host = VCenter.load(request.vcenter).host
    for key in ownership.run_keys(request.cluster, target, spec, vcenter_host):
        found = ownership.held_by_others(key, flow_run_id)
        if found:
            message, fix = ownership.refusal(*found)
            concerns.append(Concern(rule="reserved", severity="critical", message=message, fix=fix))
    return concerns


def refuse_critical(concerns: list[Concern]) -> None:
    """Raise PreflightError when any concern is critical."""
    critical = [c for c in concerns if c.severity == "critical"]
    if critical:
        raise PreflightError(critical)


def preflight(request: MigrationRequest, flow_run_id: str | None = None) -> Preflight:
    """Read the VM and check every rule; raise PreflightError on any critical concern.

    `flow_run_id` is passed to `check`.

    Raises:
        SourceError: the VM cannot be found (or the name is ambiguous).
        PreflightError: a rule refused the migration; nothing was created.
    """
    checked = check(request, flow_run_id)
    refuse_critical(checked.concerns)
    return checked
