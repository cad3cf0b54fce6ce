"""The `v2k` command line: list what is in vCenter and migrate VMs, with readable progress."""

from __future__ import annotations

import json
import sys

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="v2k moves virtual machines from VMware vCenter/ESXi to KVM hosts.",
    no_args_is_help=True,
)
console = Console(stderr=True)


@app.command()
def inventory(
    vcenter: str = typer.Option(..., help="Name of the saved VCenter block (vCenter or ESXi)."),
    name: str = typer.Option("*", help="Only VMs whose name matches this glob (any case)."),
    folder: str | None = typer.Option(
        None, help="Only VMs in this folder and below: Prod/Web or /DC0/vm/Prod."
    ),
    power_state: str | None = typer.Option(None, help="poweredOn, poweredOff or suspended."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List every VM with power state, guest OS, CPU, memory, disks, NICs, firmware,
    snapshots and VMware Tools state.

    Example: v2k inventory --vcenter prod-vc --folder Prod --name 'web-*' --power-state poweredOff
    """
    from blocks import VCenter
    from blocks.vcenter import VCenterError
    from flows.inventory import read_inventory
    from tasks.inventory import COLUMNS, check_power_state, table_rows
    from tasks.vcenter import SourceError

    try:
        check_power_state(power_state)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--power-state") from None
    try:
        block = VCenter.load(vcenter)
    except ValueError as exc:
        console.print(f"[red]no VCenter block {vcenter!r}:[/red] {exc}")
        raise typer.Exit(2) from None
    try:
        vms = read_inventory(block, name, power_state, folder)
    except (VCenterError, SourceError) as exc:
        console.print(f"[red]inventory failed:[/red] {exc}")
        raise typer.Exit(1) from None
    if as_json:
        json.dump([vm.model_dump(mode="json") for vm in vms], sys.stdout, indent=2)
        print()
        return
    table = Table(title=f"{len(vms)} VM(s) in {vcenter}")
    for column in COLUMNS:
        table.add_column(column, overflow="fold")
    for row in table_rows(vms):
        table.add_row(*(row[c] for c in COLUMNS))
    Console().print(table)


@app.command()
def migrate(
    vm: str = typer.Argument(..., help="VM name, inventory path, moref or instance UUID."),
    vcenter: str = typer.Option(..., help="VCenter block name."),
    cluster: str = typer.Option(..., help="KvmCluster block name."),
    storage: str = typer.Option(..., help="TemporaryStorage block name."),
    settings: str | None = typer.Option(None, help="MigrationSettings block name."),
    target_name: str | None = typer.Option(None, help="Domain name on KVM."),
    convert_host: str | None = typer.Option(None, help="KvmHost block that runs virt-v2v."),
    import_host: str | None = typer.Option(None, help="KvmHost block that gets the domain."),
    verify_boot: bool = typer.Option(False, help="Boot the domain and wait for its login."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Migrate one VM, running the migrate-vm flow here.

    Example: v2k migrate web-01 --vcenter prod-vc --cluster kvm-prod --storage scratch
    """
    from flows.migrate import migrate_vm
    from tasks.models import MigrationRequest

    request = MigrationRequest(
        vcenter=vcenter,
        vm=vm,
        cluster=cluster,
        temporary_storage=storage,
        settings=settings,
        target_name=target_name,
        convert_host=convert_host,
        import_host=import_host,
        verify_boot=verify_boot,
    )
    try:
        result = migrate_vm(request)
    except Exception as exc:  # noqa: BLE001 - the command line shows the reason, not a trace
        console.print(f"[red]migration failed:[/red] {exc}")
        raise typer.Exit(1) from None
    if as_json:
        print(result.model_dump_json(indent=2))
        return
    table = Table(title=f"{result.vm} -> {result.domain_name} on {result.import_host}")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    table.add_column("detail")
    for stage in result.stages:
        table.add_row(stage.name, f"{stage.seconds:.1f}", stage.detail)
    Console().print(table)


@app.command()
def plan(
    vm: str = typer.Argument(..., help="VM name, inventory path, moref or instance UUID."),
    vcenter: str = typer.Option(..., help="VCenter block name."),
    cluster: str = typer.Option(..., help="KvmCluster block name."),
    storage: str = typer.Option(..., help="TemporaryStorage block name."),
    settings: str | None = typer.Option(None, help="MigrationSettings block name."),
    target_name: str | None = typer.Option(None, help="Domain name on KVM."),
    convert_host: str | None = typer.Option(None, help="KvmHost block that runs virt-v2v."),
    import_host: str | None = typer.Option(None, help="KvmHost block that gets the domain."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
) -> None:
    """Dry run: show what a migration would check, decide and run, moving nothing.

    Exits 1 when a critical concern would refuse the migration.

    Example: v2k plan web-01 --vcenter prod-vc --cluster kvm-prod --storage scratch
    """
    from rich.markdown import Markdown

    from tasks.models import MigrationRequest
    from tasks.plan import make_plan, plan_markdown

    request = MigrationRequest(
        vcenter=vcenter,
        vm=vm,
        cluster=cluster,
        temporary_storage=storage,
        settings=settings,
        target_name=target_name,
        convert_host=convert_host,
        import_host=import_host,
    )
    try:
        result = make_plan(request)
    except Exception as exc:  # noqa: BLE001 - the command line shows the reason, not a trace
        console.print(f"[red]cannot plan:[/red] {exc}")
        raise typer.Exit(2) from None
    if as_json:
        print(result.model_dump_json(indent=2))
    else:
        Console().print(Markdown(plan_markdown(result)))
    raise typer.Exit(1 if result.critical else 0)


if __name__ == "__main__":
    app()
