"""`make demo`: the real Debian guest, stopped in the simulated vCenter, migrated to KVM.

It starts the whole test bed, saves the blocks a user would save, lists the vCenter's
VMs, runs the `migrate-vm` flow with the boot check, prints a summary and stops
everything again, the migrated domain included.
"""

from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.table import Table

from testbed.paths import run_dir

DEMO_VM = "debian-stopped"


def run_demo() -> int:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.inventory import read_inventory
    from flows.migrate import migrate_vm
    from tasks import kvm
    from tasks.models import MigrationRequest
    from tasks.progress import human_bytes
    from testbed.bed import TestBed
    from testbed.testing import host_of

    console = Console()
    console.rule("v2k demo: starting the test bed (vCenter simulator, 2 KVM hosts with libvirtd)")
    with TestBed(run_dir() / "demo", hosts=2, libvirt=True, real_guest=True) as bed:
        names = bed.save_blocks("demo")
        vcenter = bed.blocks("demo")[names["vcenter"]]
        table = Table(title="VMs in the simulated vCenter")
        for column in ("path", "power", "guest", "vCPU", "memory", "disks", "NICs"):
            table.add_column(column)
        for vm in read_inventory(vcenter):
            table.add_row(
                vm.path,
                vm.power_state,
                vm.guest_id or "?",
                str(vm.num_cpu),
                f"{vm.memory_mb} MiB",
                f"{vm.disks} ({human_bytes(vm.disk_bytes)})",
                ", ".join(vm.nics),
            )
        console.print(table)

        console.rule(f"migrating {DEMO_VM} (export, virt-v2v, libvirt import, boot check)")
        request = MigrationRequest(
            vcenter=names["vcenter"],
            vm=DEMO_VM,
            cluster=names["cluster"],
            temporary_storage=names["scratch"],
            settings=names["settings"],
            verify_boot=True,
        )
        try:
            result = migrate_vm(request)
        except Exception as exc:  # noqa: BLE001 - the demo reports and exits non-zero
            console.print(f"[red]demo migration failed:[/red] {exc}")
            return 1
        # The import host's own libvirtd (each test bed host has one).
        conn = kvm.open_connection(bed.libvirt[host_of(result.import_host)].uri)
        try:
            summary = Table(title=f"{result.vm} -> domain {result.domain_name}")
            summary.add_column("stage")
            summary.add_column("seconds", justify="right")
            summary.add_column("detail")
            for stage in result.stages:
                summary.add_row(stage.name, f"{stage.seconds:.1f}", stage.detail)
            console.print(summary)
            console.print(
                f"domain {result.domain_name} ({result.domain_uuid}) on {result.import_host}, "
                f"guest OS {result.osinfo}, {human_bytes(result.bytes_exported)} exported, "
                f"boot check: {'passed' if result.booted else 'not passed'}"
            )
            kvm.remove_migrated_domain(conn, result.domain_name)
        finally:
            conn.close()
    console.rule("demo done; the test bed is stopped")
    return 0 if result.booted else 1


if __name__ == "__main__":
    sys.exit(run_demo())
