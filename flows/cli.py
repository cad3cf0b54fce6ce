"""The `v2k` command line: list what is in vCenter and migrate VMs, with readable progress."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

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
    from tasks.inventory import COLUMNS, check_folder, check_power_state, table_rows
    from tasks.vcenter import SourceError

    try:
        check_power_state(power_state)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--power-state") from None
    try:
        check_folder(folder)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--folder") from None
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
    table = Table(title=Text(f"{len(vms)} VM(s) in {vcenter}"))
    for column in COLUMNS:
        table.add_column(column, overflow="fold")
    for row in table_rows(vms):
        # Text: a name holding `[b]` is shown as it is, not read as rich markup.
        table.add_row(*(Text(row[c]) for c in COLUMNS))
    Console().print(table)


def _request(
    vm: str,
    vcenter: str,
    cluster: str,
    storage: str,
    settings: str | None,
    target_name: str | None,
    convert_host: str | None,
    import_host: str | None,
    verify_boot: bool = False,
):
    """The MigrationRequest that `migrate` and `plan` build from their common options."""
    from tasks.models import MigrationRequest

    return MigrationRequest(
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
    via_deployment: bool = typer.Option(
        False, help="Start a run of the migrate-vm deployment (a worker runs it) and follow it."
    ),
    idempotency_key: str | None = typer.Option(
        None, help="With --via-deployment: a repeated request with this key starts nothing new."
    ),
    timeout: float | None = typer.Option(
        None, help="With --via-deployment: stop waiting after this many seconds (exit 3)."
    ),
) -> None:
    """Migrate one VM, running the migrate-vm flow here (or on a worker).

    Exit codes: 0 migrated, 1 failed, 2 bad arguments or Prefect unreachable, 3 still
    running when --timeout passed.

    Examples:
      v2k migrate web-01 --vcenter prod-vc --cluster kvm-prod --storage scratch
      v2k migrate web-01 --vcenter prod-vc --cluster kvm-prod --storage scratch \\
          --via-deployment --idempotency-key CHG-1234
    """
    from flows.migrate import migrate_vm

    request = _request(
        vm,
        vcenter,
        cluster,
        storage,
        settings,
        target_name,
        convert_host,
        import_host,
        verify_boot=verify_boot,
    )
    if via_deployment:
        from deployments.runs import MIGRATE_VM

        _run_deployment(
            MIGRATE_VM,
            {"request": request.model_dump(mode="json", exclude_none=True)},
            idempotency_key,
            timeout,
            as_json,
        )
    try:
        result = migrate_vm(request)
    except Exception as exc:  # noqa: BLE001 - the command line shows the reason, not a trace
        console.print(f"[red]migration failed:[/red] {exc}")
        raise typer.Exit(1) from None
    # Migrated, but a person must look: the boot check failed, or litter may be left.
    needs_a_look = result.booted is False or bool(result.cleanup_left)
    if as_json:
        print(result.model_dump_json(indent=2))
    else:
        title = f"{result.vm} -> {result.domain_name} on {result.import_host}"
        table = Table(title=Text(title))
        table.add_column("stage")
        table.add_column("seconds", justify="right")
        table.add_column("detail")
        for stage in result.stages:
            table.add_row(stage.name, f"{stage.seconds:.1f}", stage.detail)
        Console().print(table)
        if result.booted is False:
            console.print(f"[red]migrated, not verified:[/red] {result.verify_error}")
        for line in result.cleanup_left:
            console.print(f"[red]cleanup incomplete:[/red] {line}")
    if needs_a_look:
        raise typer.Exit(1)


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

    from tasks.plan import make_plan, plan_markdown

    request = _request(
        vm, vcenter, cluster, storage, settings, target_name, convert_host, import_host
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


def _finish_run(described: dict, as_json: bool) -> None:
    """Print a run (JSON on stdout, or for people) and exit with its exit code."""
    from deployments.runs import exit_code, render

    if as_json:
        print(json.dumps(described, indent=2, default=str))
    else:
        render(described, Console())
    raise typer.Exit(exit_code(described["state"]["type"], described["state"].get("name")))


def _run_deployment(
    deployment: str, parameters: dict, key: str | None, timeout: float | None, as_json: bool
) -> None:
    """Start a run of a deployment, follow it with progress bars, print it, exit."""
    from deployments.runs import EXIT_USAGE, start, watch

    try:
        run = start(deployment, parameters, key)
    except Exception as exc:  # noqa: BLE001 - unknown deployment, Prefect unreachable...
        console.print(f"[red]cannot start {deployment}:[/red] {exc}")
        raise typer.Exit(EXIT_USAGE) from None
    console.print(f"started {run['name']} ({run['id']}) of {deployment}")
    _finish_run(watch(run["id"], console, timeout=timeout), as_json)


@app.command()
def wave(
    vms: Annotated[
        list[str] | None, typer.Argument(help="VMs: names, paths, morefs or UUIDs.")
    ] = None,
    file: str | None = typer.Option(None, "--file", "-f", help="YAML wave file."),
    name: str | None = typer.Option(None, help="Also every VM whose name matches this glob."),
    target_name: Annotated[
        list[str] | None,
        typer.Option(
            "--target-name", help="VM=NAME: the domain name for one VM (given as in the list)."
        ),
    ] = None,
    vcenter: str | None = typer.Option(None, help="VCenter block name."),
    cluster: str | None = typer.Option(None, help="KvmCluster block name."),
    storage: str | None = typer.Option(None, help="TemporaryStorage block name."),
    settings: str | None = typer.Option(None, help="MigrationSettings block name."),
    max_in_flight: int | None = typer.Option(None, min=1, help="VMs at once (default 4)."),
    verify_boot: bool | None = typer.Option(None, help="Boot each migrated domain."),
    per_esxi_host: int | None = typer.Option(None, min=1, help="Set the per-ESXi-host cap."),
    per_kvm_host: int | None = typer.Option(None, min=1, help="Set the per-KVM-host cap."),
    spread: bool = typer.Option(
        False, help="Each VM as its own migrate-vm deployment run: every worker takes a share."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    via_deployment: bool = typer.Option(
        False, help="Start a run of the wave deployment (workers run it) and follow it."
    ),
    idempotency_key: str | None = typer.Option(None, help="With --via-deployment."),
    timeout: float | None = typer.Option(None, help="With --via-deployment (exit 3)."),
) -> None:
    """Migrate many VMs, at most --max-in-flight at once; one failure stops no other.

    Exit codes: 0 all migrated, 1 some VMs failed, 2 bad arguments, 3 still running.

    Examples:
      v2k wave web-01 web-02 db-01 --vcenter prod-vc --cluster kvm-prod --storage scratch
      v2k wave --file waves/tuesday.yaml --max-in-flight 8
      v2k wave /DC0/vm/A/web-01 /DC0/vm/B/web-01 --target-name /DC0/vm/B/web-01=web-01-b ...
      v2k wave --name 'web-*' --vcenter prod-vc --cluster kvm-prod --storage scratch \\
          --via-deployment
    """
    from flows.wave import WaveFailed, migrate_wave
    from tasks.progress import human_bytes

    entries: list = list(vms or [])
    for pair in target_name or []:
        vm, _, domain = pair.rpartition("=")  # a domain name holds no `=`, a VM name may
        if not vm:
            raise typer.BadParameter(f"{pair!r}: write VM=NAME", param_hint="--target-name")
        entry = {"vm": vm, "target_name": domain}
        entries = [entry if e == vm else e for e in entries]
        if entry not in entries:
            entries.append(entry)
    params = dict(
        vms=entries or None,
        wave_file=file,
        name_glob=name,
        vcenter=vcenter,
        cluster=cluster,
        temporary_storage=storage,
        settings=settings,
        max_in_flight=max_in_flight,
        verify_boot=verify_boot,
        per_esxi_host=per_esxi_host,
        per_kvm_host=per_kvm_host,
        via_deployment=spread,
    )
    if via_deployment:
        from deployments.runs import WAVE

        parameters = {k: v for k, v in params.items() if v not in (None, False)}
        if file:
            from pathlib import Path

            parameters["wave_file"] = str(Path(file).resolve())  # as the worker will see it
        _run_deployment(WAVE, parameters, idempotency_key, timeout, as_json)
    try:
        summary = migrate_wave(**params)
        code = 0
    except WaveFailed as failed:
        summary, code = failed.summary, 1
    except Exception as exc:  # noqa: BLE001 - the command line shows the reason, not a trace
        console.print(f"[red]wave not started:[/red] {exc}")
        raise typer.Exit(2) from None
    if as_json:
        print(summary.model_dump_json(indent=2))
        raise typer.Exit(code)
    table = Table(
        title=f"{summary.completed} of {summary.total} VM(s) migrated, {summary.failed} failed"
    )
    for column in ("VM", "result", "seconds", "bytes", "ESXi", "convert", "import", "error"):
        table.add_column(column, overflow="fold")
    for v in summary.vms:
        table.add_row(
            Text(v.vm),
            v.result,
            f"{v.seconds:.0f}",
            human_bytes(v.bytes_exported) if v.bytes_exported is not None else "",
            v.esxi_host or "",
            v.convert_host or "",
            v.import_host or "",
            v.error or "",
        )
    Console().print(table)
    raise typer.Exit(code)


@app.command()
def status(
    run_id: str = typer.Argument(..., help="Flow run id (migrate-vm, wave, inventory...)."),
    watch: bool = typer.Option(False, "--watch", "-w", help="Follow it until it ends."),
    as_json: bool = typer.Option(False, "--json", help="Print it as JSON."),
) -> None:
    """Show a run: state, message, summary or wave table, subflow runs.

    Exit codes: 0 completed, 1 failed/crashed/cancelled, 2 no such run, 3 still running.

    Example: v2k status 0f3c9a6e-... --watch
    """
    from deployments.runs import EXIT_USAGE, describe
    from deployments.runs import watch as follow_run

    try:
        described = follow_run(run_id, console) if watch else describe(run_id)
    except Exception as exc:  # noqa: BLE001 - a bad id, an unknown run, Prefect unreachable
        console.print(f"[red]cannot read run {run_id}:[/red] {exc}")
        raise typer.Exit(EXIT_USAGE) from None
    _finish_run(described, as_json)


@app.command()
def resume(
    run_id: str = typer.Argument(..., help="The migrate-vm flow run that stopped."),
    force: bool = typer.Option(
        False, "--force", help="Also a run still shown running whose worker is gone."
    ),
    watch: bool = typer.Option(False, "--watch", "-w", help="Follow it until it ends."),
) -> None:
    """Retry a crashed or failed migration: finished stages and disks are not done again,
    a partial download goes on from the bytes on disk.

    Example: v2k resume 0f3c9a6e-... --watch
    """
    from deployments.runs import EXIT_USAGE, RunStateError, retry
    from deployments.runs import watch as follow_run

    try:
        resumed = retry(run_id, force)
    except RunStateError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(EXIT_USAGE) from None
    console.print(f"scheduled {resumed['name']} ({resumed['id']}) again")
    if watch:
        _finish_run(follow_run(run_id, console), as_json=False)


@app.command()
def cleanup(
    run_id: str = typer.Argument(..., help="The migrate-vm flow run to clean up after."),
    force: bool = typer.Option(
        False, "--force", help="Also a run still shown running whose worker is gone."
    ),
) -> None:
    """Remove what a migration left: what a crashed run kept for resuming (its clone,
    temporary files, half-imported domains and volumes), or what a run could not remove
    when it ended. Only what the run's ledger lists and what carries its mark is touched.

    Example: v2k cleanup 0f3c9a6e-...
    """
    from deployments.runs import EXIT_FAILED, EXIT_USAGE, RunStateError, read_stopped
    from flows.cleanup import cleanup_flow_run

    try:
        run = read_stopped(run_id, force, cleanup=True)
    except RunStateError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(EXIT_USAGE) from None
    left = cleanup_flow_run(run)
    if left:
        for line in left:
            console.print(f"[red]may be left:[/red] {line}")
        raise typer.Exit(EXIT_FAILED)
    console.print(f"cleaned up after {run.name} ({run.id})")


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="Address the Prefect server listens on."),
    port: int = typer.Option(4200, help="Port of the Prefect server and UI."),
    home: str | None = typer.Option(None, help="PREFECT_HOME (default ~/.local/state/v2k)."),
    workers: int = typer.Option(1, min=1, help="Process workers to start."),
    testbed: bool = typer.Option(False, help="Also start the test bed; save its blocks."),
    slot: int | None = typer.Option(None, help="Test bed slot (0-4)."),
    database_url: str | None = typer.Option(None, help="PostgreSQL URL for the server."),
) -> None:
    """Start a local Prefect server, register the blocks, deploy, start a worker, and print
    the UI address; hold until Ctrl-C, then stop them all.

    Example: v2k serve --testbed    (then open http://127.0.0.1:4200)
    """
    from pathlib import Path

    from deployments.serve import serve as run_server

    raise typer.Exit(
        run_server(
            host=host,
            port=port,
            home=Path(home) if home else None,
            workers=workers,
            testbed=testbed,
            slot=slot,
            database_url=database_url,
            echo=console.print,
        )
    )


if __name__ == "__main__":
    app()
