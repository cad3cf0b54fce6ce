"""The TemporaryStorage block: where exported OVF files wait for virt-v2v."""

from __future__ import annotations

from pathlib import PurePosixPath

from prefect.blocks.core import Block
from pydantic import Field, field_validator

from blocks.cache import LoadedOnce


class TemporaryStorage(LoadedOnce, Block):
    """A directory for exports that the worker writes and the convert host reads.

    On shared storage (NFS, a cluster file system) each side may mount it elsewhere:
    `worker_path` is the path on the worker, `host_path` the same place on the KVM hosts.

    Example:
        ```python
        from blocks import TemporaryStorage

        TemporaryStorage(worker_path="/mnt/v2k", host_path="/srv/v2k").save("nfs-scratch")
        ```
    """

    _block_type_name = "v2k Temporary Storage"
    _block_type_slug = "v2k-temporary-storage"
    _description = "Scratch space for exported VMware disks before conversion."

    worker_path: str = Field(description="Directory on the worker that receives the exports.")
    host_path: str | None = Field(
        default=None,
        description="The same directory as the KVM hosts see it. Empty: the same path.",
    )
    shared: bool = Field(
        default=True,
        description="Worker and KVM hosts see the same files (shared storage or one machine).",
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

    def path_on_host(self, worker_path: str) -> str:
        """Translate a path under `worker_path` to the same file as the KVM hosts see it."""
        relative = PurePosixPath(worker_path).relative_to(self.worker_path)
        return str(PurePosixPath(self.host_path or self.worker_path) / relative)
