"""The dry run: its concerns, decisions and commands, and that it agrees with migrate-vm."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from flows.cli import app
from flows.migrate import migrate_vm
from flows.plan import plan
from tasks.hosts import HostSelectionError
from tasks.preflight import PreflightError
from testbed.testing import request_for


def test_plan_of_a_ready_vm(bed, bed_blocks):
    result = plan(request_for(bed_blocks, "multi-disk-efi"))
    assert result.critical == []
    assert result.target_name == "multi-disk-efi"
    assert [n.target for n in result.nics] == [
        f"network:{bed.networks[0]}",
        f"network:{bed.networks[1]}",
    ]
    assert result.hosts is not None and result.hosts.convert in bed_blocks.values()
    assert all(s.free is not None and s.free >= s.needed for s in result.space)
    assert any(c.startswith("ExportVm") and "3 disk(s)" in c for c in result.commands)
    v2v = next(c for c in result.commands if "virt-v2v" in c)
    assert "-i ova" in v2v and "-on multi-disk-efi" in v2v
    assert sum("create volume" in c for c in result.commands) == 3


def test_plan_lists_every_concern_with_a_fix(bed_blocks):
    result = plan(request_for(bed_blocks, "win2019-running"))
    rules = {c.rule: c for c in result.concerns}
    assert rules["running-windows"].severity == "critical"
    assert rules["hosts"].severity == "critical" and "virtio-win" in rules["hosts"].message
    assert all(c.fix for c in result.concerns)


def test_plan_warns_about_a_name_libvirt_cannot_take(bed_blocks):
    result = plan(request_for(bed_blocks, "Prod/Web/web server 01"))
    rules = {c.rule: c for c in result.concerns}
    assert rules["domain-name"].severity == "warning"
    assert "'web-server-01'" in rules["domain-name"].message
    assert result.target_name == "web-server-01"


@pytest.mark.parametrize("vm", ["win2019-running", "independent-disk", "win2019-stopped"])
def test_plan_and_migrate_agree_on_refusals(bed_blocks, vm):
    result = plan(request_for(bed_blocks, vm))
    assert result.critical, vm
    with pytest.raises((PreflightError, HostSelectionError)) as refused:
        migrate_vm(request_for(bed_blocks, vm))
    first = result.critical[0]
    assert first.message.split(":")[0][:30] in str(refused.value)


def test_cli_plan_exit_code_and_json(bed_blocks):
    runner = CliRunner()
    args = [
        "--vcenter",
        bed_blocks["vcenter"],
        "--cluster",
        bed_blocks["cluster"],
        "--storage",
        bed_blocks["scratch"],
    ]
    refused = runner.invoke(app, ["plan", "independent-disk", *args, "--json"])
    assert refused.exit_code == 1, refused.output
    data = json.loads(refused.stdout)
    assert any(c["rule"] == "independent-disk" for c in data["concerns"])
    ready = runner.invoke(app, ["plan", "multi-disk-efi", *args])
    assert ready.exit_code == 0, ready.output
    assert "ready to migrate" in ready.stdout
    missing = runner.invoke(app, ["plan", "no-such-vm", *args])
    assert missing.exit_code == 2 and "no VM named" in missing.output
