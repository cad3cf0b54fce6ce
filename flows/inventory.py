"""The `inventory` flow: every VM of a datacenter, as a table artifact."""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from pydantic import BaseModel, Field

from blocks import VCenter
from tasks import inventory as inv
from tasks import vcenter as vc
from tasks.models import VmSummary


class InlineVCenter(BaseModel):
    """A vCenter or ESXi host given in the run itself instead of a saved VCenter block.

    The password is never a parameter (Prefect stores run parameters in plain text):
    give the name of a Prefect `Secret` block that holds it.
    """

    host: str = Field(description="Host name or IP address of vCenter or of the ESXi host.")
    port: int = Field(default=443, ge=1, le=65535)
    username: str
    password_secret: str = Field(
        description="Name of the Prefect Secret block that holds the password."
    )
    datacenter: str | None = Field(
        default=None, description="Empty: the only datacenter (`ha-datacenter` on ESXi)."
    )
    verify_tls: bool = True
    ca_cert: str | None = Field(default=None, description="CA as PEM text or a path.")

    def to_block(self) -> VCenter:
        """A VCenter block (not saved) with the password read from the Secret block."""
        from prefect.blocks.system import Secret

        password = Secret.load(self.password_secret).get()
        return VCenter(
            host=self.host,
            port=self.port,
            username=self.username,
            password=str(password),
            datacenter=self.datacenter,
            verify_tls=self.verify_tls,
            ca_cert=self.ca_cert,
        )


def read_inventory(
    vcenter: VCenter,
    name_glob: str = "*",
    power_state: str | None = None,
    folder: str | None = None,
) -> list[VmSummary]:
    """List the VMs of the block's datacenter, filtered (see `tasks.inventory.filter_vms`)."""
    inv.check_power_state(power_state)  # a typo fails before connecting
    with vcenter.connect() as si:
        vms = inv.list_vms(si, vc.datacenter(si, vcenter.datacenter))
    return inv.filter_vms(vms, name_glob, folder, power_state)


def source_block(vcenter: str | None, inline: InlineVCenter | None) -> VCenter:
    """The VCenter block to read: saved (by name) or inline; exactly one of them."""
    if (vcenter is None) == (inline is None):
        raise ValueError("give either vcenter (a VCenter block name) or inline, not both")
    return VCenter.load(vcenter) if vcenter is not None else inline.to_block()


@task(name="read-inventory")
def read_inventory_task(
    vcenter: str | None,
    inline: InlineVCenter | None,
    name_glob: str,
    folder: str | None,
    power_state: str | None,
) -> list[VmSummary]:
    return read_inventory(source_block(vcenter, inline), name_glob, power_state, folder)


@flow(name="inventory")
def inventory(
    vcenter: str | None = None,
    inline: InlineVCenter | None = None,
    name_glob: str = "*",
    folder: str | None = None,
    power_state: str | None = None,
) -> list[VmSummary]:
    """List every VM of a datacenter with its hardware, as a table artifact `inventory`.

    The source is either `vcenter`, the name of a saved VCenter block, or `inline`:
    host, user, datacenter and the NAME of a Prefect Secret block holding the password
    (a password given as a run parameter would be stored in plain text). Both work for
    a vCenter and for a standalone ESXi host.

    Filters: `name_glob` (shell glob on the name, any case), `folder` (that folder and
    below, `Prod/Web` or `/DC0/vm/Prod`), `power_state` (poweredOn, poweredOff or
    suspended).

    Every VM comes from one paged PropertyCollector retrieval (see tasks/inventory.py).
    """
    inv.check_power_state(power_state)
    source = vcenter or (inline.host if inline else "?")
    vms = read_inventory_task(vcenter, inline, name_glob, folder, power_state)
    filters = [
        f"{label} {value!r}"
        for label, value in (("name", name_glob), ("folder", folder), ("power", power_state))
        if value not in (None, "", "*")
    ]
    create_table_artifact(
        inv.table_rows(vms),
        key="inventory",
        description=f"{len(vms)} VM(s) in {source}"
        + (f" ({', '.join(filters)})" if filters else ""),
    )
    get_run_logger().info("%d VM(s) in %s", len(vms), source)
    return vms
