"""The `inventory` flow: every VM of a datacenter, as a table artifact."""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact

from blocks import VCenter
from blocks.vcenter import InlineVCenter
from tasks import inventory as inv
from tasks import vcenter as vc
from tasks.models import VmSummary


def read_inventory(
    vcenter: VCenter,
    name_glob: str = "*",
    power_state: str | None = None,
    folder: str | None = None,
) -> list[VmSummary]:
    """List the VMs of the block's datacenter, filtered (see `tasks.inventory.filter_vms`)."""
    inv.check_power_state(power_state)  # a typo fails before connecting
    inv.check_folder(folder)
    with vcenter.connect() as si:
        vms = inv.list_vms(si, vc.datacenter(si, vcenter.datacenter))
    return inv.filter_vms(vms, name_glob, folder, power_state)


def _check_source(vcenter: str | None, inline: InlineVCenter | None) -> None:
    if (vcenter is None) == (inline is None):
        raise ValueError("give either vcenter (a VCenter block name) or inline, not both")


def source_block(vcenter: str | None, inline: InlineVCenter | None) -> VCenter:
    """The VCenter block to read: saved (by name) or inline; exactly one of them."""
    _check_source(vcenter, inline)
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

    The source is either a saved VCenter block (`vcenter`) or `inline`: host, user,
    datacenter and the NAME of a Prefect Secret block holding the password (a password
    given as a run parameter would be stored in plain text). Both work for a vCenter and
    for a standalone ESXi host. Every VM comes from one paged PropertyCollector
    retrieval (see tasks/inventory.py).

    Args:
        vcenter: Name of a saved VCenter block. Leave empty when `inline` is given.
        inline: vCenter or ESXi host given here, its password in a Secret block.
        name_glob: Only VMs whose name matches this shell glob (any case), e.g. `web-*`.
        folder: Only VMs in this folder and below: `Prod/Web` or `/DC0/vm/Prod`.
        power_state: Only VMs in this state: poweredOn, poweredOff or suspended.
    """
    _check_source(vcenter, inline)  # mistakes fail before any connection
    inv.check_power_state(power_state)
    inv.check_folder(folder)
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
