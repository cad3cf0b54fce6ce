"""A VM's identity round-trips, and a wave never sends two VMs to one target (issue 14).

Whatever v2k prints as a VM's path (inventory, plan, summaries and events: all print
`tasks.vmpath.format_path`) resolves back through `find_vm` and a wave's selection to the
same moref, for every name vCenter allows. The simulator holds the names as vCenter
stores them (`/`, `\\`, `%` escaped), in a vCenter of this module's own.
"""

from __future__ import annotations

import threading

import pytest
import yaml
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName

import flows.wave as wave
from flows.wave import ResolvedVm, WaveVm, check_targets, find_vms, migrate_wave
from tasks import inventory as inv
from tasks import vcenter as vc
from tasks import vmpath
from tasks.errors import Refused
from tasks.models import MigrationRequest, MigrationResult, libvirt_name
from tasks.plan import plan_markdown

# Names as people type them in the vSphere Client, by what makes them awkward.
SPECIAL = {
    "slash": "app/db 01",
    "percent": "100% done",
    "backslash": "C:\\new\\table",
    "tab": "tab\tin name",
    "non-ascii": "Ünïcødé 名前",
    "spaces": "  spaced  out  ",
    "quotes": 'it\'s "quoted"',
    "semicolon": "a; rm -rf x",
    "command": "$(reboot) `id`",
    "dotdot": "../../etc/passwd",
    "escape-lookalike": "a%2fb",
    "markup": "[b]web[/b] *01*",
}
# (folder as vCenter stores its names, VM name): one name in two folders, and a name
# that maps to the same domain name as those.
TWINS = [("A", "web 01"), ("B%2fC", "web 01"), ("A", "web-01")]
FOLDER = "Odd%2fFolder ü"  # a folder named `Odd/Folder ü`


def _inventory() -> dict:
    vms = [(FOLDER, name) for name in SPECIAL.values()] + [("", "at the root")] + TWINS
    return {
        "version": 1,
        "datacenters": [
            {
                "name": "DC0",
                "clusters": [{"name": "DC0_C0", "hosts": ["DC0_C0_H0", "DC0_C0_H1"]}],
                "datastores": [{"name": "LocalDS_0"}],
                "networks": {"standard": ["VM Network"]},
                "vms": [
                    {
                        "name": name,
                        "folder": folder,
                        "guest_id": "otherLinux64Guest",
                        "memory_mb": 128,
                        "instance_uuid": f"5003a1b2-0100-4c5e-8a00-{n:012x}",
                        "nics": [{"mac": f"00:50:56:02:00:{n:02x}", "network": "VM Network"}],
                    }
                    for n, (folder, name) in enumerate(vms, 1)
                ],
            }
        ],
    }


@pytest.fixture(scope="module")
def namebed(tmp_path_factory):
    """A vCenter simulator of its own with the awkward names (no KVM hosts)."""
    from testbed.bed import TestBed

    workdir = tmp_path_factory.mktemp("namebed")
    path = workdir / "inventory.yaml"
    path.write_text(yaml.safe_dump(_inventory(), allow_unicode=True))
    with TestBed(workdir, hosts=0, libvirt=False, inventory=path) as bed:
        yield bed


@pytest.fixture(scope="module")
def listed(namebed):
    with namebed.vcsim.connect() as si:
        return inv.list_vms(si, vc.datacenter(si, None))


@pytest.fixture(scope="module")
def vcenter_block(namebed, prefect_harness):
    namebed.blocks("id")["id-vcenter"].save("id-vcenter", overwrite=True)
    return "id-vcenter"


# --- the pair of functions -----------------------------------------------------------


@pytest.mark.parametrize("name", list(SPECIAL.values()), ids=list(SPECIAL))
def test_split_reads_what_format_prints(name):
    stored = vmpath.escape(name)
    assert "/" not in stored and "\\" not in stored
    assert vmpath.escape(stored) == stored  # vCenter's names come back unchanged
    path = vmpath.format_path(["DC0", "vm", FOLDER, name])
    assert vmpath.split_path(path) == ["DC0", "vm", FOLDER, stored]
    assert vmpath.split_path(path + "/") == vmpath.split_path(path[1:])  # as vCenter reads
    if "%" not in name:
        assert vmpath.unescape(stored) == name


def test_escape_is_vcenters():
    assert vmpath.escape("a/b\\c%d") == "a%2fb%5cc%25d"
    assert vmpath.escape("a%2fb %25 %5C") == "a%2fb %25 %5C"  # escape sequences stay
    assert vmpath.unescape("a%2Fb%5c%25") == "a/b\\%"
    assert libvirt_name("app%2fdb 02") == "app-db-02"  # the name as people see it


def test_markdown_shows_a_path_as_it_is():
    assert vmpath.markdown("/DC0/vm/*a*") == "`/DC0/vm/*a*`"
    assert vmpath.markdown("/DC0/vm/a`b``") == "``` /DC0/vm/a`b`` ```"


@pytest.mark.parametrize("text", ["", "/", "a//b", "//DC0/vm/x"])
def test_a_path_with_an_empty_name_is_refused(text):
    with pytest.raises(vmpath.PathError, match="%2f"):
        vmpath.split_path(text)


def test_globs_match_stored_and_shown_names():
    assert vmpath.name_matches("app%2fdb 01", "app/db*")
    assert vmpath.name_matches("app%2fdb 01", "app%2fdb*")
    assert not vmpath.name_matches("App%2fdb 01", "app/db*")
    assert vmpath.name_matches("App%2fdb 01", "app/db*", ignore_case=True)


# --- round trips against the simulator -----------------------------------------------


def test_the_simulator_holds_the_names_as_vcenter_stores_them(listed):
    names = {vm.name for vm in listed}
    for name in SPECIAL.values():
        stored = name.replace("%", "%25").replace("/", "%2f").replace("\\", "%5c")
        assert stored in names
    odd = [vm for vm in listed if vm.folder == FOLDER]
    assert len(odd) == len(SPECIAL)
    assert all(vm.path.startswith(f"/DC0/vm/{FOLDER}/") for vm in odd)


def test_every_printed_path_resolves_to_its_vm(namebed, listed):
    names = [vm.name for vm in listed]
    with namebed.vcsim.connect() as si:
        dc = vc.datacenter(si, None)
        for vm in listed:
            found = vc.find_vm(si, dc, vm.path)
            assert found._moId == vm.moref, vm.path
            # What plan, summaries and events print: the spec's path, the same text.
            spec = vc.read_spec(si, found)
            assert (spec.inventory_path, spec.name) == (vm.path, vm.name)
            assert vc.find_vm(si, dc, vm.path.removeprefix("/DC0/vm/"))._moId == vm.moref
            assert vc.find_vm(si, dc, vm.path.removeprefix("/"))._moId == vm.moref
            if names.count(vm.name) == 1:
                assert vc.find_vm(si, dc, vm.name)._moId == vm.moref, vm.name


@pytest.mark.parametrize("key", [k for k in SPECIAL if k != "escape-lookalike"])
def test_a_name_as_people_see_it_finds_the_vm(namebed, listed, key):
    """`app/db 01` as typed from the vSphere Client: no such path, so the VM of that name."""
    (vm,) = [v for v in listed if v.name == vmpath.escape(SPECIAL[key])]
    with namebed.vcsim.connect() as si:
        assert vc.find_vm(si, vc.datacenter(si, None), SPECIAL[key])._moId == vm.moref


def test_errors_name_the_paths(namebed):
    with namebed.vcsim.connect() as si:
        dc = vc.datacenter(si, None)
        with pytest.raises(vc.SourceError, match="2 VMs are named 'web 01'") as caught:
            vc.find_vm(si, dc, "web 01")
        assert "/DC0/vm/A/web 01 (vm-" in str(caught.value)
        assert "/DC0/vm/B%2fC/web 01 (vm-" in str(caught.value)
        with pytest.raises(vc.SourceError, match="no VM at inventory path '/DC0/vm/A/nope'"):
            vc.find_vm(si, dc, "A/nope")
        with pytest.raises(vc.SourceError, match="empty name"):
            vc.find_vm(si, dc, "A//web 01")


def test_a_wave_selects_each_vm_by_its_printed_path(vcenter_block, listed):
    found = find_vms(vcenter_block, [WaveVm(vm=vm.path) for vm in listed], None)
    assert [(r.moref, r.path, r.error) for r in found] == [
        (vm.moref, vm.path, None) for vm in listed
    ]
    # A glob finds them by name (stored or as shown), and gives them by path.
    globbed = find_vms(vcenter_block, [], "*")
    assert {(r.moref, r.item.vm) for r in globbed} == {(vm.moref, vm.path) for vm in listed}
    shown = find_vms(vcenter_block, [], "app/db*")
    assert [r.path for r in shown] == [f"/DC0/vm/{FOLDER}/app%2fdb 01"]


def test_cli_prints_paths_that_resolve(vcenter_block, namebed, listed):
    import json

    from typer.testing import CliRunner

    from flows.cli import app

    args = ["inventory", "--vcenter", vcenter_block]
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    printed = [row["path"] for row in json.loads(result.stdout)]
    assert printed == [vm.path for vm in listed]
    with namebed.vcsim.connect() as si:
        dc = vc.datacenter(si, None)
        assert [vc.find_vm(si, dc, path)._moId for path in printed] == [vm.moref for vm in listed]
    # The table shows names as they are: `[b]` is no rich markup.
    result = CliRunner().invoke(app, [*args, "--name", "*web*"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert f"/DC0/vm/{FOLDER}/[b]web[%2fb] *01*" in result.stdout
    result = CliRunner().invoke(app, [*args, "--folder", "A//B"], env={"COLUMNS": "400"})
    assert result.exit_code == 2 and "empty name" in result.output


def test_every_vm_of_the_test_bed_plans_by_its_printed_path(bed, bed_blocks):
    """The default inventory (with `ops "blue" ... ü` in `Lab/team%2fblue ü`) through
    plan, whose path goes back into plan and a wave's selection."""
    import json

    from typer.testing import CliRunner

    from flows.cli import app
    from tasks.plan import make_plan

    with bed.vcsim.connect() as si:
        listed = inv.list_vms(si, vc.datacenter(si, None))
    assert any(vm.folder == "Lab/team%2fblue ü" for vm in listed)
    common = dict(
        vcenter=bed_blocks["vcenter"],
        cluster=bed_blocks["cluster"],
        temporary_storage=bed_blocks["scratch"],
    )
    for vm in listed:
        plan = make_plan(MigrationRequest(vm=vm.path, **common))
        assert (plan.spec.moref, plan.vm) == (vm.moref, vm.path)
        assert vmpath.markdown(vm.path) in plan_markdown(plan)
    found = find_vms(bed_blocks["vcenter"], [WaveVm(vm=vm.path) for vm in listed], None)
    assert [r.moref for r in found] == [vm.moref for vm in listed]

    (odd,) = [vm for vm in listed if vm.folder.startswith("Lab/")]
    args = ["plan", odd.path, "--vcenter", common["vcenter"], "--cluster", common["cluster"]]
    result = CliRunner().invoke(app, [*args, "--storage", common["temporary_storage"], "--json"])
    assert result.exit_code in (0, 1), result.output
    printed = json.loads(result.stdout)["vm"]
    assert printed == odd.path
    again = make_plan(MigrationRequest(vm=printed, **common))
    assert again.spec.moref == odd.moref


# --- waves and their targets -----------------------------------------------------------


def _resolved(name: str, moref: str, target: str | None = None) -> ResolvedVm:
    return ResolvedVm(
        item=WaveVm(vm=name, target_name=target), name=name, path=f"/DC0/vm/{name}", moref=moref
    )


def test_check_targets_after_overrides():
    check_targets([_resolved("web 01", "vm-1"), _resolved("web 01", "vm-2", "web-01-b")])
    check_targets([_resolved("x", "vm-1"), ResolvedVm(item=WaveVm(vm="y"), error="not found")])
    with pytest.raises(Refused) as caught:
        check_targets([_resolved("web 01", "vm-1"), _resolved("other", "vm-2", "web-01")])
    assert "'web-01' by /DC0/vm/web 01 (vm-1), /DC0/vm/other (vm-2)" in str(caught.value)
    assert "target_name" in caught.value.fix and "narrow the selection" in caught.value.fix


def _migrate_vm_runs() -> int:
    with get_client(sync_client=True) as client:
        return len(
            client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=["migrate-vm", "id-stand-in"]))
            )
        )


def _limits() -> list[str]:
    with get_client(sync_client=True) as client:
        return sorted(limit.name for limit in client.read_global_concurrency_limits(limit=200))


@pytest.mark.parametrize(
    "selection",
    [
        {"name_glob": "web?01"},  # `web 01` twice and `web-01`: one domain name
        {"vms": ["/DC0/vm/A/web 01", "/DC0/vm/B%2fC/web 01"]},
    ],
    ids=["glob", "paths"],
)
def test_a_wave_with_two_vms_for_one_target_is_refused_before_anything(
    vcenter_block, listed, selection
):
    runs, limits = _migrate_vm_runs(), _limits()
    with pytest.raises(Refused) as caught:
        migrate_wave(
            **selection,
            vcenter=vcenter_block,
            cluster="id-no-cluster",
            temporary_storage="id-no-storage",
        )
    message = str(caught.value)
    assert "'web-01' by " in message
    assert "/DC0/vm/A/web 01 (vm-" in message and "/DC0/vm/B%2fC/web 01 (vm-" in message
    assert ("/DC0/vm/A/web-01 (vm-" in message) == ("name_glob" in selection)
    assert "give these VMs a target_name each" in message
    assert (_migrate_vm_runs(), _limits()) == (runs, limits)


_lock = threading.Lock()
_ran: list[MigrationRequest] = []


@flow(name="id-stand-in")
def _stand_in(request: MigrationRequest) -> MigrationResult:
    with _lock:
        _ran.append(request)
    return MigrationResult(
        vm=request.vm,
        source_moref="vm-0",
        domain_name=request.target_name or "x",
        domain_uuid="00000000-0000-0000-0000-000000000000",
        import_host="h",
        convert_host="h",
        export_host=None,
        stages=[],
        bytes_exported=0,
        checksums={},
        osinfo=None,
    )


@pytest.fixture()
def stand_in(vcenter_block, monkeypatch):
    from blocks import KvmCluster

    KvmCluster(hosts=["id-kvm"]).save("id-cluster", overwrite=True)
    monkeypatch.setattr(wave, "migrate_vm", _stand_in)
    _ran.clear()
    return {"vcenter": vcenter_block, "cluster": "id-cluster", "temporary_storage": "id-s"}


def test_target_name_per_vm_lets_the_wave_go(stand_in):
    summary = migrate_wave(
        vms=[
            {"vm": "/DC0/vm/A/web 01", "target_name": "web-01-a"},
            WaveVm(vm="/DC0/vm/B%2fC/web 01", target_name="web-01-bc"),
        ],
        name_glob="web-01",
        **stand_in,
    )
    assert (summary.total, summary.failed) == (3, 0)
    # One name twice in the wave: its VMs are told apart by path in the summary.
    labels = sorted(v.vm for v in summary.vms)
    assert labels == ["/DC0/vm/A/web 01", "/DC0/vm/B%2fC/web 01", "web-01"]
    assert sorted((r.vm, r.target_name) for r in _ran) == [
        ("/DC0/vm/A/web 01", "web-01-a"),
        ("/DC0/vm/A/web-01", None),
        ("/DC0/vm/B%2fC/web 01", "web-01-bc"),
    ]


def test_cli_wave_refuses_and_takes_target_names(stand_in):
    from typer.testing import CliRunner

    from flows.cli import app

    twins = ["/DC0/vm/A/web 01", "/DC0/vm/B%2fC/web 01"]
    args = ["wave", *twins, "--vcenter", stand_in["vcenter"], "--cluster", stand_in["cluster"]]
    args += ["--storage", stand_in["temporary_storage"]]
    refused = CliRunner().invoke(app, args, env={"COLUMNS": "400"})
    assert refused.exit_code == 2 and "several VMs to one domain name" in refused.output
    assert not _ran
    named = CliRunner().invoke(app, [*args, "--target-name", f"{twins[1]}=web-01-bc", "--json"])
    assert named.exit_code == 0, named.output
    assert sorted((r.vm, r.target_name) for r in _ran) == [
        (twins[0], None),
        (twins[1], "web-01-bc"),
    ]


def test_a_vm_selected_twice_runs_once(stand_in, listed):
    (vm,) = [v for v in listed if v.name == "100%25 done"]
    summary = migrate_wave(
        vms=[vm.path, "100% done", {"vm": vm.moref, "target_name": "done"}],
        name_glob="100*",
        **stand_in,
    )
    assert summary.total == 1
    assert [(r.vm, r.target_name) for r in _ran] == [(vm.moref, "done")]
    with pytest.raises(Refused, match="listed twice in the wave with different settings"):
        migrate_wave(
            vms=[{"vm": vm.path, "target_name": "a"}, {"vm": vm.moref, "target_name": "b"}],
            **stand_in,
        )
