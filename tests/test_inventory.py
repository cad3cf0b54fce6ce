"""The inventory: list_vms against the test bed's vCenter and ESXi host, filters, the
flow with its table artifact, and `v2k inventory`."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections import Counter
from contextlib import contextmanager

import pytest
from typer.testing import CliRunner

import tasks.inventory as inv
from tasks import vcenter as vc

DEFAULT_VMS = {
    # name: (path, power state, folder, NICs, firmware, disks)
    "debian-stopped": (
        "/DC0/vm/Linux/debian-stopped",
        "poweredOff",
        "Linux",
        ["00:50:56:01:00:01@VM Network"],
        "bios",
        1,
    ),
    "debian-data": (
        "/DC0/vm/Linux/debian-data",
        "poweredOff",
        "Linux",
        ["00:50:56:01:00:0c@VM Network"],
        "bios",
        2,
    ),
    "debian-running": (
        "/DC0/vm/Linux/debian-running",
        "poweredOn",
        "Linux",
        ["00:50:56:01:00:02@VM Network"],
        "bios",
        1,
    ),
    "debian-live": (
        "/DC0/vm/Linux/debian-live",
        "poweredOn",
        "Linux",
        ["00:50:56:01:00:0a@VM Network"],
        "bios",
        1,
    ),
    "win2019-running": (
        "/DC0/vm/Windows/win2019-running",
        "poweredOn",
        "Windows",
        ["00:50:56:01:00:03@DC0_DVPG0"],
        "efi",
        1,
    ),
    "win2019-stopped": (
        "/DC0/vm/Windows/win2019-stopped",
        "poweredOff",
        "Windows",
        ["00:50:56:01:00:04@VM Network"],
        "bios",
        1,
    ),
    "multi-disk-efi": (
        "/DC0/vm/Linux/multi-disk-efi",
        "poweredOff",
        "Linux",
        ["00:50:56:01:00:05@VM Network", "00:50:56:01:00:06@DC0_DVPG0"],
        "efi",
        3,
    ),
    "web server 01": (
        "/DC0/vm/Prod/Web/web server 01",
        "poweredOff",
        "Prod/Web",
        ["00:50:56:01:00:07@DC0_DVPG0"],
        "bios",
        1,
    ),
    "app%2fdb 02": (
        "/DC0/vm/Prod/app%2fdb 02",
        "poweredOff",
        "Prod",
        ["00:50:56:01:00:08@VM Network"],
        "bios",
        1,
    ),
    "independent-disk": (
        "/DC0/vm/Linux/independent-disk",
        "poweredOff",
        "Linux",
        ["00:50:56:01:00:09@VM Network"],
        "bios",
        2,
    ),
    # As vCenter stores it: `%`, `\\` and `/` escaped, tab and the rest as they are.
    "ops \"blue\" 'q' $(id); 100%25 %5c ..%2ftmp\tü": (
        "/DC0/vm/Lab/team%2fblue ü/ops \"blue\" 'q' $(id); 100%25 %5c ..%2ftmp\tü",
        "poweredOff",
        "Lab/team%2fblue ü",
        ["00:50:56:01:00:0b@VM Network"],
        "bios",
        1,
    ),
}
SNAPSHOT_VM = "debian-running"
MiB = 1 << 20


@pytest.fixture(scope="module")
def invbed(tmp_path_factory):
    """The default inventory in a vCenter simulator of its own (slot 2), with two nested
    snapshots on one VM."""
    from testbed.bed import TestBed

    with TestBed(
        tmp_path_factory.mktemp("invbed"), hosts=0, libvirt=False, slot=2, real_guest=False
    ) as bed:
        with bed.vcsim.connect() as si:
            vm = vc.find_vm(si, vc.datacenter(si, None), SNAPSHOT_VM)
            for name in ("before-patch", "after-patch"):
                task = vm.CreateSnapshot_Task(
                    name=name, description="", memory=False, quiesce=False
                )
                vc.wait_for_task(task, 30)
        yield bed


@pytest.fixture(scope="module")
def vms(invbed):
    with invbed.vcsim.connect() as si:
        return inv.list_vms(si, vc.datacenter(si, None))


@contextmanager
def counted(si):
    """Counts the vSphere calls made on the connection, pyvmomi's and the direct ones."""
    calls: Counter[str] = Counter()
    stub = si._stub
    invoke, raw = stub.InvokeMethod, inv._invoke_raw

    def counting_invoke(mo, info, args, *rest):
        calls[info.wsdlName] += 1
        return invoke(mo, info, args, *rest)

    def counting_raw(stub, mo, method, args):
        calls[method] += 1
        return raw(stub, mo, method, args)

    stub.InvokeMethod = counting_invoke
    inv._invoke_raw = counting_raw
    try:
        yield calls
    finally:
        stub.InvokeMethod = invoke
        inv._invoke_raw = raw


def test_default_inventory(vms):
    assert sorted(vm.name for vm in vms) == sorted(DEFAULT_VMS)
    assert [vm.path for vm in vms] == sorted(vm.path for vm in vms)
    for vm in vms:
        path, power, folder, nics, firmware, disks = DEFAULT_VMS[vm.name]
        assert (vm.path, vm.power_state, vm.folder, vm.nics, vm.firmware, vm.disks) == (
            path,
            power,
            folder,
            nics,
            firmware,
            disks,
        ), vm.name
        assert vm.moref.startswith("vm-")
        assert vm.instance_uuid and vm.instance_uuid.startswith("5003a1b2-")
        assert vm.tools_status == "toolsNotInstalled"
        assert vm.snapshot_count == (2 if vm.name == SNAPSHOT_VM else 0)
    by_name = {vm.name: vm for vm in vms}
    win = by_name["win2019-running"]
    assert (win.guest_id, win.num_cpu, win.memory_mb) == ("windows2019srv_64Guest", 4, 4096)
    assert by_name["multi-disk-efi"].disk_bytes == (32 + 16 + 8) * MiB
    assert by_name["debian-stopped"].disk_bytes == 1024 * MiB


def test_both_readers_give_the_same_rows(invbed, vms):
    with invbed.vcsim.connect() as si:
        assert inv.list_vms(si, vc.datacenter(si, None), parser="pyvmomi") == vms


@pytest.mark.parametrize("parser", ["xml", "pyvmomi"])
def test_one_retrieval_and_a_constant_number_of_calls(invbed, parser):
    with invbed.vcsim.connect() as si:
        dc = vc.datacenter(si, None)
        with counted(si) as calls:
            inv.list_vms(si, dc, parser=parser)
    assert calls["RetrievePropertiesEx"] == 1
    assert calls["ContinueRetrievePropertiesEx"] == 0
    # The datacenter's path and VM folder, the view: never a call per VM.
    assert sum(calls.values()) <= 10, calls


def _split_pages(body: bytes, first: int) -> tuple[bytes, bytes]:
    """One RetrievePropertiesEx answer as two pages: `first` objects and a token, the rest."""
    ns = "{urn:vim25}"
    one, two = ET.fromstring(body), ET.fromstring(body)
    for root, keep in ((one, slice(None, first)), (two, slice(first, None))):
        returnval = root.find(f".//{ns}returnval")
        objects = returnval.findall(f"{ns}objects")
        for o in objects:
            returnval.remove(o)
        for o in objects[keep]:
            returnval.append(o)
    token = ET.SubElement(one.find(f".//{ns}returnval"), f"{ns}token")
    token.text = "page-2"
    return ET.tostring(one), ET.tostring(two)


def test_pages_are_followed_with_the_token(invbed, vms, monkeypatch):
    """vcsim never splits an answer; split it here the way vCenter does."""
    raw = inv._invoke_raw
    asked = []

    def paged(stub, mo, method, args):
        asked.append(method)
        if method == "RetrievePropertiesEx":
            assert args[1].maxObjects == inv.PAGE_SIZE
            paged.pages = _split_pages(raw(stub, mo, method, args), 5)
            return paged.pages[0]
        assert (method, args) == ("ContinueRetrievePropertiesEx", ["page-2"])
        return paged.pages[1]

    monkeypatch.setattr(inv, "_invoke_raw", paged)
    with invbed.vcsim.connect() as si:
        assert inv.list_vms(si, vc.datacenter(si, None)) == vms
    assert asked == ["RetrievePropertiesEx", "ContinueRetrievePropertiesEx"]


def test_a_broken_paged_retrieval_is_cancelled(invbed, monkeypatch):
    raw = inv._invoke_raw

    def broken(stub, mo, method, args):
        if method == "RetrievePropertiesEx":
            return _split_pages(raw(stub, mo, method, args), 5)[0]
        raise ConnectionResetError("cut")

    monkeypatch.setattr(inv, "_invoke_raw", broken)
    with invbed.vcsim.connect() as si:
        dc = vc.datacenter(si, None)
        with counted(si) as calls, pytest.raises(ConnectionResetError):
            inv.list_vms(si, dc)
    assert calls["CancelRetrievePropertiesEx"] == 1
    assert calls["DestroyView"] == 1


def test_pyvmomi_reader_follows_pages_too(monkeypatch):
    """retrieve_many with a stand-in collector that answers in two pages."""
    from types import SimpleNamespace as NS

    class Collector:
        def __init__(self):
            self.calls = []

        def RetrievePropertiesEx(self, specs, options):  # noqa: N802 - vSphere's name
            self.calls.append(("first", options.maxObjects))
            return NS(token="t1", objects=[NS(obj="a", propSet=[NS(name="name", val="A")])])

        def ContinueRetrievePropertiesEx(self, token):  # noqa: N802
            self.calls.append(("next", token))
            return NS(token=None, objects=[NS(obj="b", propSet=[NS(name="name", val="B")])])

    collector = Collector()
    view = NS(DestroyView=lambda: collector.calls.append(("destroy",)))
    content = NS(
        propertyCollector=collector,
        viewManager=NS(CreateContainerView=lambda root, types, recursive: view),
    )
    monkeypatch.setattr(inv, "_filter_spec", lambda view, props: "spec")
    # A connection's SOAP stub keys its cached ServiceContent.
    si = NS(RetrieveContent=lambda: content, _stub=type("Stub", (), {})())
    found = inv.retrieve_many(si, "root", {}, page_size=2)
    assert found == [("a", {"name": "A"}), ("b", {"name": "B"})]
    assert collector.calls == [("first", 2), ("next", "t1"), ("destroy",)]


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, set(DEFAULT_VMS)),
        (
            {"name_glob": "debian-*"},
            {"debian-stopped", "debian-data", "debian-running", "debian-live"},
        ),
        ({"name_glob": "WIN*"}, {"win2019-running", "win2019-stopped"}),
        ({"folder": "Prod"}, {"web server 01", "app%2fdb 02"}),
        ({"folder": "Prod/Web"}, {"web server 01"}),
        ({"folder": "/DC0/vm/Prod/"}, {"web server 01", "app%2fdb 02"}),
        ({"folder": "/DC0/vm/Windows"}, {"win2019-running", "win2019-stopped"}),
        ({"folder": "Pro"}, set()),
        ({"folder": "Web"}, set()),
        ({"power_state": "poweredOn"}, {"debian-running", "debian-live", "win2019-running"}),
        ({"power_state": "ON"}, {"debian-running", "debian-live", "win2019-running"}),
        ({"power_state": "suspended"}, set()),
        (
            {"folder": "Linux", "power_state": "poweredOff", "name_glob": "*disk*"},
            {"multi-disk-efi", "independent-disk"},
        ),
    ],
)
def test_filters(vms, kwargs, expected):
    assert {vm.name for vm in inv.filter_vms(vms, **kwargs)} == expected


def test_a_wrong_power_state_says_what_is_allowed(vms):
    with pytest.raises(ValueError, match="poweredOn, poweredOff, suspended"):
        inv.filter_vms(vms, power_state="running")


def test_table_rows_have_the_columns(vms):
    rows = inv.table_rows(vms)
    assert [list(r) for r in rows] == [list(inv.COLUMNS)] * len(vms)
    row = next(r for r in rows if r["path"].endswith("/multi-disk-efi"))
    assert row["disks"] == "3 (56.0 MiB)"
    assert row["NICs"] == "00:50:56:01:00:05@VM Network, 00:50:56:01:00:06@DC0_DVPG0"
    assert (row["firmware"], row["snapshots"], row["guest OS"]) == ("efi", "0", "rhel9_64Guest")


def test_standalone_esxi(tmp_path):
    """The same inventory on an ESXi host: ha-datacenter, no folders, one port group."""
    from flows.inventory import read_inventory
    from testbed.bed import TestBed

    with TestBed(tmp_path, hosts=0, libvirt=False, slot=2, esx=True) as bed:
        vcenter = bed.blocks("esx")["esx-vcenter"]
        found = read_inventory(vcenter)
        filtered = read_inventory(vcenter, "*-running", "poweredOn", "/ha-datacenter/vm")
        with bed.vcsim.connect() as si:
            assert inv.list_vms(si, vc.datacenter(si, None), parser="pyvmomi") == found
    assert sorted(vm.name for vm in found) == sorted(DEFAULT_VMS)
    for vm in found:
        assert vm.path == f"/ha-datacenter/vm/{vm.name}"
        assert vm.folder == ""
        assert all(nic.endswith("@VM Network") for nic in vm.nics)
        assert vm.disks == DEFAULT_VMS[vm.name][5]
    assert {vm.name for vm in filtered} == {"debian-running", "win2019-running"}


@pytest.fixture(scope="module")
def saved(invbed, prefect_harness):
    """The bed's VCenter block and a Secret with its password, saved: their names."""
    from prefect.blocks.system import Secret

    invbed.blocks("inv")["inv-vcenter"].save("inv-vcenter", overwrite=True)
    Secret(value=invbed.vcsim.password).save("inv-vcenter-password", overwrite=True)
    return {"vcenter": "inv-vcenter", "secret": "inv-vcenter-password"}


def test_flow_makes_a_table_artifact(saved):
    from prefect.artifacts import Artifact

    from flows.inventory import inventory

    found = inventory(vcenter=saved["vcenter"], folder="Linux", power_state="poweredOff")
    assert {vm.name for vm in found} == {
        "debian-stopped",
        "debian-data",
        "multi-disk-efi",
        "independent-disk",
    }
    artifact = Artifact.get("inventory")
    assert artifact is not None and artifact.type == "table"
    rows = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
    assert [r["path"] for r in rows] == [vm.path for vm in found]
    assert list(rows[0]) == list(inv.COLUMNS)
    assert "4 VM(s) in inv-vcenter" in artifact.description
    assert "folder 'Linux'" in artifact.description


def test_flow_with_an_inline_vcenter_keeps_the_password_out_of_the_run(saved, invbed):
    from prefect import get_client

    from flows.inventory import InlineVCenter, inventory

    sim = invbed.vcsim
    inline = InlineVCenter(
        host=sim.host,
        port=sim.port,
        username=sim.user,
        password_secret=saved["secret"],
        datacenter="DC0",
        ca_cert=sim.ca_cert.read_text(),
    )
    state = inventory(inline=inline, name_glob="win*", return_state=True)
    assert {vm.name for vm in state.result()} == {"win2019-running", "win2019-stopped"}
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
        assert sim.password not in json.dumps(run.parameters)
        assert run.parameters["inline"]["password_secret"] == saved["secret"]


def test_flow_needs_exactly_one_source(saved, invbed):
    from flows.inventory import InlineVCenter, inventory

    with pytest.raises(ValueError, match="either vcenter"):
        inventory()
    inline = InlineVCenter(host="h", username="u", password_secret=saved["secret"])
    with pytest.raises(ValueError, match="either vcenter"):
        inventory(vcenter=saved["vcenter"], inline=inline)


def test_cli_json(saved):
    from flows.cli import app

    result = CliRunner().invoke(app, ["inventory", "--vcenter", saved["vcenter"], "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert sorted(r["name"] for r in rows) == sorted(DEFAULT_VMS)
    snap = next(r for r in rows if r["name"] == SNAPSHOT_VM)
    assert (snap["snapshot_count"], snap["folder"], snap["tools_status"]) == (
        2,
        "Linux",
        "toolsNotInstalled",
    )


def test_cli_filters_and_table(saved):
    from flows.cli import app

    args = ["inventory", "--vcenter", saved["vcenter"], "--folder", "Prod", "--json"]
    result = CliRunner().invoke(app, [*args, "--name", "web*", "--power-state", "off"])
    assert result.exit_code == 0, result.output
    assert [r["path"] for r in json.loads(result.stdout)] == ["/DC0/vm/Prod/Web/web server 01"]

    result = CliRunner().invoke(
        app,
        ["inventory", "--vcenter", saved["vcenter"], "--folder", "Windows"],
        env={"COLUMNS": "250"},  # rich's table width
    )
    assert result.exit_code == 0, result.output
    assert "2 VM(s) in inv-vcenter" in result.stdout
    for text in ("win2019-running", "win2019-stopped", "snapshots", "firmware", "efi"):
        assert text in result.stdout


def test_cli_missing_block_and_bad_power_state_exit_2(saved):
    from flows.cli import app

    result = CliRunner().invoke(app, ["inventory", "--vcenter", "no-such-block"])
    assert result.exit_code == 2
    assert "no VCenter block 'no-such-block'" in result.output
    result = CliRunner().invoke(
        app, ["inventory", "--vcenter", saved["vcenter"], "--power-state", "running"]
    )
    assert result.exit_code == 2
    assert "poweredOn" in result.output


def test_an_empty_container_gives_nothing(invbed):
    with invbed.vcsim.connect() as si:
        dc = vc.datacenter(si, None)
        folder = next(f for f in dc.vmFolder.childEntity if f.name == "Templates")
        assert inv._read_xml(si, folder, inv.PAGE_SIZE) == []
        assert inv._read_pyvmomi(si, folder, inv.PAGE_SIZE) == []


def test_a_fault_comes_back_as_the_pyvmomi_exception(invbed):
    from pyVmomi import vmodl

    with invbed.vcsim.connect() as si:
        collector = si.RetrieveContent().propertyCollector
        with pytest.raises(vmodl.MethodFault):
            inv._invoke_raw(si._stub, collector, "ContinueRetrievePropertiesEx", ["no-token"])


def test_benchmark_1000_vms(tmp_path):
    """Issue 5's targets, as `python -m bench.inventory` measures them (fewer naive VMs)."""
    from bench.inventory import TARGET_SECONDS, TARGET_SPEEDUP, report, run

    result = run(vms=1000, repeats=3, sample=50, workdir=tmp_path)
    print(report(result))
    assert result.rows_match, report(result)
    assert result.list_vms_calls["RetrievePropertiesEx"] == 1
    assert result.best <= TARGET_SECONDS, report(result)
    assert result.speedup >= TARGET_SPEEDUP, report(result)
