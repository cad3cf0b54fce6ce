"""The MigrationSettings block: CloudStack's import settings, plus retries and timeouts."""

from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import BaseModel, Field

from blocks.cache import LoadedOnce

CLONE_TIMEOUT_FLOOR = 600.0
"""Seconds every clone gets besides its copy time: task queueing, registration, small VMs."""


class StagePolicy(BaseModel):
    """Retries and time allowed for one stage of the migration."""

    retries: int = Field(default=0, ge=0, le=20, description="Retries after a transient fault.")
    retry_delay_seconds: float = Field(default=10, ge=0, description="Wait between retries.")
    timeout_seconds: float = Field(
        gt=0,
        description=(
            "Time allowed for one try of the stage (Prefect's task timeout; in a wave the "
            "stage is bounded by v2k's own limits instead, see the README)."
        ),
    )


class MigrationSettings(LoadedOnce, Block):
    """How migrations run: parallelism, timeouts, verbosity, per-stage retries.

    The first four fields are CloudStack's VMware-import settings under clear names.

    Example:
        ```python
        from blocks import MigrationSettings

        MigrationSettings(threads_on_ms=2, convert_timeout=6).save("big-vms")
        ```
    """

    _block_type_name = "v2k Migration Settings"
    _block_type_slug = "v2k-migration-settings"
    _description = "Parallelism, timeouts and retries of v2k migrations."

    threads_on_ms: int = Field(
        default=0,
        ge=-1,
        le=10,
        description=(
            "Disks downloaded at once by the worker (CloudStack "
            "threads.on.ms.to.import.vmware.vm.files): -1 or 1 one at a time, 0 one per "
            "disk, N up to N."
        ),
    )
    threads_on_kvm_host: int = Field(
        default=0,
        ge=-1,
        le=64,
        description=(
            "ovftool --parallelThreads on a KVM host (CloudStack "
            "threads.on.kvm.host.to.import.vmware.vm.files): 0 one per disk, -1 or 1 off."
        ),
    )
    convert_timeout: float = Field(
        default=3,
        gt=0,
        description=(
            "Hours allowed for the export by ovftool and for virt-v2v, each (CloudStack "
            "convert.vmware.instance.to.kvm.timeout). The remote process is killed after it."
        ),
    )
    force_ms_export: bool = Field(
        default=False,
        description=(
            "Always export through the worker (management export), even when a KVM host "
            "has ovftool."
        ),
    )
    virt_v2v_verbose: bool = Field(
        default=False, description="Run virt-v2v with -v -x (CloudStack virtv2v.verbose.enabled)."
    )
    http_timeout: float = Field(
        default=120, gt=0, description="Seconds without a byte before a disk download fails."
    )
    boot_timeout: float = Field(
        default=600, gt=0, description="Seconds to wait for a login prompt in the boot check."
    )
    remove_unverified: bool = Field(
        default=False,
        description="Remove the new domain and its volumes when the boot check fails. Off: "
        "the migration is kept and the run ends as 'Migrated, not verified'.",
    )
    keep_exports_hours: float = Field(
        default=24,
        gt=0,
        description="Hours a kept export (reuse_exports) may be reused before it is removed.",
    )
    clone_timeout: float | None = Field(
        default=None,
        gt=0,
        description=(
            "Seconds allowed for cloning a running VM before the export; the vSphere task is "
            "cancelled after it. Empty: 600 s plus the VM's disk capacity at clone_rate."
        ),
    )
    clone_rate: float = Field(
        default=50,
        gt=0,
        description=(
            "MB/s a clone is assumed to copy at when clone_timeout is empty (a slow "
            "datastore needs a lower value)."
        ),
    )
    preflight: StagePolicy = Field(
        default_factory=lambda: StagePolicy(retries=2, timeout_seconds=300),
        description="Reading the VM and checking the rules.",
    )
    select_hosts: StagePolicy = Field(
        default_factory=lambda: StagePolicy(retries=2, timeout_seconds=120),
        description="Probing the KVM hosts.",
    )
    export: StagePolicy = Field(
        default_factory=lambda: StagePolicy(retries=3, timeout_seconds=6 * 3600),
        description="Downloading the disks (per disk).",
    )
    convert: StagePolicy = Field(
        default_factory=lambda: StagePolicy(retries=1, timeout_seconds=4 * 3600),
        description="virt-v2v on the convert host.",
    )
    kvm_import: StagePolicy = Field(
        default_factory=lambda: StagePolicy(retries=2, timeout_seconds=3600),
        description="Copying disks into the pool and defining the domain.",
    )
    verify: StagePolicy = Field(
        default_factory=lambda: StagePolicy(retries=0, timeout_seconds=1200),
        description="Booting the domain and waiting for its login prompt.",
    )

    def policy(self, stage: str) -> StagePolicy:
        """The StagePolicy of a stage by its name in the DAG (`import` is `kvm_import`)."""
        return getattr(self, "kvm_import" if stage == "import" else stage)

    def clone_timeout_seconds(self, disk_bytes: int) -> float:
        """Seconds allowed for a clone of a VM with `disk_bytes` of disk capacity."""
        if self.clone_timeout is not None:
            return self.clone_timeout
        return CLONE_TIMEOUT_FLOOR + disk_bytes / (self.clone_rate * 1e6)

    @property
    def convert_timeout_seconds(self) -> float:
        return self.convert_timeout * 3600

    def ovftool_threads(self, disks: int) -> int | None:
        """ovftool --parallelThreads with CloudStack's meaning; None leaves the flag out."""
        if self.threads_on_kvm_host in (-1, 1):
            return None
        if self.threads_on_kvm_host == 0:
            return max(disks, 1)
        return max(1, min(self.threads_on_kvm_host, disks))

    def download_threads(self, disks: int) -> int:
        """How many disks download at once, with CloudStack's meaning of threads_on_ms."""
        if self.threads_on_ms in (-1, 1):
            return 1
        if self.threads_on_ms == 0:
            return max(disks, 1)
        return max(1, min(self.threads_on_ms, disks))
