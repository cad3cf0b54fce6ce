"""The `inventory` flow: every VM of a datacenter, as a table artifact."""

from __future__ import annotations

from fnmatch import fnmatch

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from blocks import VCenter
from tasks import vcenter as vc
from tasks.models import VmSummary


def read_inventory(
    vcenter: VCenter, name_glob: str = "*", power_state: str | None = None
) -> list[VmSummary]:
    """List the VMs of the block's datacenter, filtered by name glob and power state."""
    with vcenter.connect() as si:
        vms = vc.list_vms(si, vc.datacenter(si, vcenter.datacenter))
    return [
        vm
        for vm in vms
        if fnmatch(vm.name, name_glob) and (power_state is None or vm.power_state == power_state)
    ]


@flow(name="inventory")
def inventory(
    vcenter: str, name_glob: str = "*", power_state: str | None = None
) -> list[VmSummary]:
    """List every VM of a saved vCenter (block name) with its hardware, as a table artifact."""
    vms = read_inventory(VCenter.load(vcenter), name_glob, power_state)
    create_table_artifact(
        [vm.model_dump(mode="json") for vm in vms],
        key="inventory",
        description=f"{len(vms)} VM(s) in {vcenter}",
    )
    get_run_logger().info("%d VM(s) in %s", len(vms), vcenter)
    return vms
