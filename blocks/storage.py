"""The TemporaryStorage block: where exported OVF files wait for virt-v2v."""

from __future__ import annotations

from pathlib import PurePosixPath

from prefect.blocks.core import Block
from pydantic import Field, field_validator, model_validator

from blocks.cache import LoadedOnce


class TemporaryStorage(LoadedOnce, Block):
    """A directory where exports wait for virt-v2v, shared or local to the convert host.

    Shared (`shared=True`, NFS or a cluster file system, or the worker is the host): the
    worker and the KVM hosts see the same files, each under its own mount point:
    `worker_path` on the worker, `host_path` on the hosts (empty: the same path). The
    worker can export into it, and any host can export, convert and import from it.

    Local (`shared=False`): the directory is on the convert host only, at `host_path`.
    The worker never reads or writes it, so ovftool exports on the convert host itself,
    and the same host imports the converted disks into a directory pool. Blocks saved
    with `worker_path` alone keep working: that path is then taken as the host's.

    Example:
        ```python
        from blocks import TemporaryStorage

        # NFS: /mnt/v2k on the worker, /srv/v2k on the KVM hosts.
        TemporaryStorage(worker_path="/mnt/v2k", host_path="/srv/v2k").save("nfs-scratch")
        # A local disk of each KVM host: export, convert and import all run on one host.
        TemporaryStorage(shared=False, host_path="/var/lib/v2k").save("host-scratch")
        ```
    """

    _block_type_name = "v2k Temporary Storage"
    _block_type_slug = "v2k-temporary-storage"
    _description = "Scratch space for exported VMware disks before conversion."

    worker_path: str | None = Field(
        default=None,
        description=(
            "Shared storage: the directory as the worker sees it (required). Local storage: "
            "unused, except as the host's path when host_path is empty."
        ),
    )
    host_path: str | None = Field(
        default=None,
        description=(
            "The directory as the KVM hosts see it. Shared storage: empty means the same "
            "path as worker_path. Local storage: the directory on each convert host."
        ),
    )
    shared: bool = Field(
        default=True,
        description=(
            "True: worker and KVM hosts see the same files (shared storage or one machine). "
            "False: the directory is local to the convert host, which then also exports "
            "(ovftool) and imports."
        ),
    )
    reserve_bytes: int = Field(
        default=1 << 30,
        ge=0,
        description="Free space to keep on top of what an export needs.",
    )

    @field_validator("worker_path", "host_path")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        if value is not None and not PurePosixPath(value).is_absolute():
            raise ValueError(f"{value!r} is not an absolute path")
        return value

    @model_validator(mode="after")
    def _has_its_path(self) -> TemporaryStorage:
        if self.shared and not self.worker_path:
            raise ValueError(
                "shared storage needs worker_path (where the worker mounts it); for a "
                "directory on the convert host only, set shared=False and host_path"
            )
        if not self.shared and not (self.host_path or self.worker_path):
            raise ValueError("local storage (shared=False) needs host_path on the convert host")
        return self

    @property
    def host_dir(self) -> str:
        """The storage directory as the KVM hosts see it."""
        return self.host_path or self.worker_path  # the validator makes one of them set

    def run_dir(self, run_id: str) -> str:
        """The directory of one run, in the terms the flow passes between its stages.

        Shared storage: the path on the worker (`path_on_host` gives the hosts' path).
        Local storage: the path on the convert host; the worker never sees it.
        """
        base = self.worker_path if self.shared else self.host_dir
        return str(PurePosixPath(base) / f"v2k-{run_id}")

    def path_on_host(self, worker_path: str) -> str:
        """Translate a path under `worker_path` to the same file as the KVM hosts see it.

        With local storage the flow holds host paths already, so they come back unchanged.
        """
        if not self.shared:
            return worker_path
        relative = PurePosixPath(worker_path).relative_to(self.worker_path)
        return str(PurePosixPath(self.host_dir) / relative)
