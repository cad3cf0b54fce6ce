"""The simulated vCenter's inventory: the YAML model, its checks, and applying it."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from testbed import images
from testbed.inventory import (
    DEFAULT_INVENTORY,
    DatastoreHttp,
    InventoryError,
    apply_inventory,
    expected_vm,
    find_vm,
    for_esx,
    load_inventory,
    observe_vm,
    parse_inventory,
    parse_size,
    safe_component,
    vcenter_name,
)

MiB = 1024 * 1024
GiB = 1024 * MiB


# ---------------------------------------------------------------------------------------
# The model (no simulator)
# ---------------------------------------------------------------------------------------


def _raw_default() -> dict:
    return yaml.safe_load(DEFAULT_INVENTORY.read_text())


def _vm_raw(data: dict, name: str) -> dict:
    return next(v for v in data["datacenters"][0]["vms"] if v["name"] == name)


def test_default_inventory_has_the_vms_the_tests_need():
    inv = load_inventory()
    vms = {vm.name: vm for _, vm in inv.vms()}

    real = vms["debian-stopped"]
    assert real.power == "poweredOff" and real.guest_id == "debian12_64Guest"
    assert [d.content for d in real.disks] == ["debian-guest"]
    assert real.disks[0].size == GiB

    # Running Linux VMs: synthetic ones (fast failure paths) and the real guest, which
    # the UI test migrates through a clone and boots.
    linux_on = {v.name: v for v in vms.values() if v.power == "poweredOn" and "Linux" in v.folder}
    assert [d.content for d in linux_on["debian-running"].disks] == ["synthetic"]
    assert [d.content for d in linux_on["debian-live"].disks] == ["debian-guest"]
    windows = [v for v in vms.values() if v.guest_id.startswith("windows")]
    assert {v.power for v in windows} == {"poweredOn", "poweredOff"}

    multi = vms["multi-disk-efi"]
    assert multi.firmware == "efi" and len(multi.disks) == 3 and len(multi.nics) == 2
    assert len({d.datastore for d in multi.disks}) == 2
    assert {n.network for n in multi.nics} == {"VM Network", "DC0_DVPG0"}

    spaced = vms["web server 01"]
    assert spaced.folder == "Prod/Web"
    assert vms["app/db 02"].vcenter_name == "app%2fdb 02"
    assert any(d.mode == "independent_persistent" for v in vms.values() for d in v.disks)
    # synthetic disks stay small so tests are fast
    assert all(
        d.size <= 64 * MiB for v in vms.values() for d in v.disks if d.content == "synthetic"
    )


@pytest.mark.parametrize(
    ("text", "value"),
    [(4096, 4096), ("64MiB", 64 * MiB), ("1 GiB", GiB), ("512K", 512 * 1024), ("2g", 2 * GiB)],
)
def test_parse_size(text, value):
    assert parse_size(text) == value


def test_names():
    assert vcenter_name("app/db 02") == "app%2fdb 02"
    assert vcenter_name("100%") == "100%25"
    assert safe_component("../../etc") == "_.._etc"
    assert safe_component("web server 01") == "web server 01"
    assert "/" not in safe_component("a/b") and not safe_component("..").startswith(".")


def _expect_error(data: dict, *fragments: str) -> str:
    with pytest.raises(InventoryError) as exc:
        parse_inventory(data, source="test.yaml")
    message = str(exc.value)
    assert message.startswith("test.yaml: invalid inventory")
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_duplicate_vm_name_in_a_folder_is_refused():
    data = _raw_default()
    twin = copy.deepcopy(_vm_raw(data, "web server 01"))
    twin["instance_uuid"] = "5003a1b2-00ff-4c5e-8a00-0000000000ff"
    twin["nics"][0]["mac"] = "00:50:56:01:00:ff"
    data["datacenters"][0]["vms"].append(twin)
    _expect_error(data, "duplicate VM name 'web server 01' in folder 'DC0/vm/Prod/Web'")

    twin["folder"] = "Prod"  # same name in another folder is fine, as in vCenter
    parse_inventory(data)


def test_duplicate_mac_is_refused():
    data = _raw_default()
    _vm_raw(data, "debian-running")["nics"][0]["mac"] = "00:50:56:01:00:01"
    _expect_error(data, "duplicate MAC address: '00:50:56:01:00:01'")


def test_duplicate_mac_is_found_whatever_its_case():
    data = _raw_default()
    _vm_raw(data, "debian-running")["nics"][0]["mac"] = "00-50-56-01-00-01".upper()
    _expect_error(data, "duplicate MAC address")


@pytest.mark.parametrize(
    ("size", "fragment"),
    [
        (0, "disk size must be positive"),
        (-5, "disk size must be positive"),
        ("12XB", "bad size '12XB'"),
        (1000, "not a whole number of KiB"),
        ("100TiB", "larger than 62TiB"),
    ],
)
def test_bad_disk_sizes_are_refused(size, fragment):
    data = _raw_default()
    _vm_raw(data, "win2019-stopped")["disks"][0]["size"] = size
    message = _expect_error(data, fragment)
    # the error says where: the VM by name and the field
    assert "vms['win2019-stopped'].disks[0]" in message


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("cores_per_socket", 3, "cores_per_socket 3 does not divide num_cpu 4"),
        ("secure_boot", True, "secure_boot needs firmware efi"),
        ("memory_mb", 1001, "memory_mb must be a positive multiple of 4"),
        ("guest_id", "debian99Guest", "unknown VMware guestId 'debian99Guest'"),
        ("folder", "Prod/../x", "bad folder path"),
        ("folder", "Prod/100%", "bad folder name '100%'"),  # written as stored: 100%25
        ("folder", "Prod/a\\b", "bad folder name"),
        ("instance_uuid", "not-a-uuid", "instance_uuid"),
        ("name", "bad\nname", "control character"),
        ("colour", "red", "colour: Extra inputs are not permitted"),
    ],
)
def test_bad_vm_fields_are_refused(field, value, fragment):
    data = _raw_default()
    vm = _vm_raw(data, "win2019-running")
    vm[field] = value
    if field == "secure_boot":
        vm["firmware"] = "bios"
    _expect_error(data, fragment)


def test_names_as_vcenter_takes_them():
    """A tab is allowed (vCenter takes it), folder names are written as vCenter stores them."""
    data = _raw_default()
    vm = _vm_raw(data, "win2019-running")
    vm["name"], vm["folder"] = "tab\there", "Prod/team%2fblue ü"
    spec = parse_inventory(data).vm("tab\there")
    assert (spec.vcenter_name, spec.folder) == ("tab\there", "Prod/team%2fblue ü")


def test_a_vm_needs_somewhere_to_run():
    data = _raw_default()
    data["datacenters"][0]["clusters"] = []
    _expect_error(data, "VM 'debian-stopped' needs a cluster or a host, none declared")

    data["datacenters"][0]["hosts"] = ["esx1"]
    _vm_raw(data, "debian-running")["host"] = "esx2"
    _expect_error(data, "VM 'debian-running': unknown host 'esx2'")


def test_bad_references_are_refused():
    data = _raw_default()
    _vm_raw(data, "debian-running")["disks"][0]["datastore"] = "NoSuchDS"
    _expect_error(data, "VM 'debian-running': unknown datastore 'NoSuchDS'")

    data = _raw_default()
    _vm_raw(data, "debian-running")["nics"][0]["network"] = "Nowhere"
    _expect_error(data, "VM 'debian-running': unknown network 'Nowhere'")

    data = _raw_default()
    _vm_raw(data, "debian-running")["nics"][0]["mac"] = "00:50:56:zz:00:01"
    _expect_error(data, "bad MAC address '00:50:56:zz:00:01'")

    data = _raw_default()
    _vm_raw(data, "debian-running")["instance_uuid"] = _vm_raw(data, "debian-stopped")[
        "instance_uuid"
    ]
    _expect_error(data, "duplicate instance_uuid")


def test_load_inventory_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("datacenters: [")
    with pytest.raises(InventoryError, match="bad.yaml: not valid YAML"):
        load_inventory(bad)
    bad.write_text("datacenters:\n  - name: DC0\n")
    with pytest.raises(InventoryError, match=r"bad\.yaml: invalid inventory") as exc:
        load_inventory(bad)
    assert "datacenters['DC0'].datastores: Field required" in str(exc.value)


# ---------------------------------------------------------------------------------------
# Applied to the simulator
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vcenter(tmp_path_factory):
    """A running test bed vCenter simulator: (VcSim, connected ServiceInstance)."""
    with _simulator(tmp_path_factory) as pair:
        yield pair


@contextlib.contextmanager
def _simulator(tmp_path_factory, esx: bool = False):
    """A running test bed simulator (vCenter, or ESXi with `esx`) and a session to it."""
    from testbed.vcsim import VcSim

    with VcSim(tmp_path_factory.mktemp("vcsim"), esx=esx) as sim, sim.connect() as si:
        yield sim, si


@pytest.fixture(scope="module")
def applied(vcenter, tmp_path_factory):
    sim, si = vcenter
    work = tmp_path_factory.mktemp("inventory")
    result = apply_inventory(
        si,
        load_inventory(),
        verify=_verify(sim),
        datastore_root=work / "datastores",
        work_dir=work / "images",
    )
    return result


def _verify(sim) -> str:
    return str(sim.ca_cert)


def _http(si, sim) -> DatastoreHttp:
    return DatastoreHttp.from_service_instance(si, verify=_verify(sim))


def _download(sim, si, dc: str, ds: str, path: str, dest: Path) -> Path:
    http = _http(si, sim)
    with http._client() as client:
        resp = client.get(http.url(path), params={"dcPath": dc, "dsName": ds})
    assert resp.status_code == 200, (path, resp.status_code)
    dest.write_bytes(resp.content)
    return dest


def test_every_vm_has_the_declared_hardware(vcenter, applied):
    _, si = vcenter
    inv = load_inventory()
    assert set(applied.vms) == {vm.name for _, vm in inv.vms()}
    for dc, spec in inv.vms():
        vm = find_vm(si, dc.name, spec.folder, spec.vcenter_name)
        assert vm is not None, f"{spec.name} not found in {dc.name}/vm/{spec.folder}"
        assert observe_vm(vm) == expected_vm(dc, spec), spec.name


def test_names_and_folders(vcenter, applied):
    _, si = vcenter
    spaced = find_vm(si, "DC0", "Prod/Web", "web server 01")
    assert (
        spaced is not None and spaced.parent.name == "Web" and spaced.parent.parent.name == "Prod"
    )
    slashed = find_vm(si, "DC0", "Prod", "app%2fdb 02")
    assert slashed is not None and slashed.config.name == "app%2fdb 02"
    assert applied.vms["app/db 02"].directory == "app_db 02"
    assert slashed.config.files.vmPathName == "[LocalDS_0] app_db 02/app_db 02.vmx"
    assert find_vm(si, "DC0", "Templates", "nothing") is None  # the empty folder exists
    from pyVmomi import vim

    dc = next(e for e in si.content.rootFolder.childEntity if e.name == "DC0")
    assert any(isinstance(f, vim.Folder) and f.name == "Templates" for f in dc.vmFolder.childEntity)


def test_disk_files_hold_the_synthetic_vmdk(vcenter, applied, tmp_path):
    sim, si = vcenter
    inv = load_inventory()
    spec = inv.vm("multi-disk-efi")
    vm = find_vm(si, "DC0", spec.folder, spec.vcenter_name)
    files = applied.vms["multi-disk-efi"].disk_files
    assert files == [
        "[LocalDS_0] multi-disk-efi/multi-disk-efi.vmdk",
        "[LocalDS_1] multi-disk-efi/multi-disk-efi_1.vmdk",
        "[LocalDS_0] multi-disk-efi/multi-disk-efi_2.vmdk",
    ]
    from pyVmomi import vim

    backings = [
        d.backing.fileName
        for d in sorted(vm.config.hardware.device, key=lambda d: d.key)
        if isinstance(d, vim.vm.device.VirtualDisk)
    ]
    assert backings == files

    for i, (disk, name) in enumerate(zip(spec.disks, files, strict=True)):
        ds, rel = name[1:].split("] ", 1)
        got = _download(sim, si, "DC0", ds, rel, tmp_path / f"d{i}.vmdk")
        info = images.vmdk_info(got)
        assert info["format-specific"]["data"]["create-type"] == "streamOptimized"
        assert info["virtual-size"] == disk.size
        raw = images.synthetic_raw(tmp_path / f"d{i}.raw", disk.size, disk.seed, disk.fill)
        cmp = subprocess.run(
            ["qemu-img", "compare", "-f", "raw", "-F", "vmdk", str(raw), str(got)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert cmp.returncode == 0, cmp.stdout + cmp.stderr
        # the simulator's check for an existing disk: the -flat file is there (empty)
        flat = rel.replace(".vmdk", "-flat.vmdk")
        assert _download(sim, si, "DC0", ds, flat, tmp_path / "flat").stat().st_size == 0


def _export(sim, si, vm) -> list[bytes]:
    """Every disk of a powered-off VM through ExportVm and its NFC lease."""
    lease = vm.ExportVm()
    deadline = time.monotonic() + 30
    while str(lease.state) == "initializing" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert str(lease.state) == "ready", lease.error
    out = []
    try:
        cookie = si._stub.cookie.split(";", 1)[0]
        with httpx.Client(verify=sim.ssl_context(), timeout=60) as client:
            for device in lease.info.deviceUrl:
                url = device.url.replace("https://*/", f"https://{sim.host}:{sim.port}/")
                resp = client.get(url, headers={"Cookie": cookie})
                assert resp.status_code == 200, (url, resp.status_code)
                out.append(resp.content)
    finally:
        lease.HttpNfcLeaseComplete()
    return out


def test_export_serves_the_uploaded_vmdks(vcenter, applied):
    """What ExportVm serves for each disk is the streamOptimized VMDK put there."""
    sim, si = vcenter
    spec = load_inventory().vm("multi-disk-efi")
    vm = find_vm(si, "DC0", spec.folder, spec.vcenter_name)
    exported = _export(sim, si, vm)
    assert len(exported) == len(spec.disks)
    for data, name in zip(exported, applied.vms["multi-disk-efi"].disk_files, strict=True):
        ds, rel = name[1:].split("] ", 1)
        stored = sim.datastore_path(ds) / rel
        assert hashlib.sha256(data).digest() == hashlib.sha256(stored.read_bytes()).digest()


def test_applying_twice_is_refused(vcenter, applied, tmp_path):
    from pyVmomi import vim

    sim, si = vcenter
    before = len(
        si.content.viewManager.CreateContainerView(
            si.content.rootFolder, [vim.VirtualMachine], True
        ).view
    )
    with pytest.raises(InventoryError, match="VM 'debian-stopped' already exists in DC0/vm/Linux"):
        apply_inventory(si, load_inventory(), verify=_verify(sim), work_dir=tmp_path)
    # nothing was made before the refusal
    after = si.content.viewManager.CreateContainerView(
        si.content.rootFolder, [vim.VirtualMachine], True
    ).view
    assert len(after) == before
    assert not list(tmp_path.iterdir())


def test_guest_image_must_fit(vcenter, applied, tmp_path):
    sim, si = vcenter
    data = _raw_default()
    dc = data["datacenters"][0]
    vm = _vm_raw(data, "debian-stopped")
    vm.update(name="debian-other", instance_uuid="5003a1b2-0011-4c5e-8a00-000000000011")
    vm["nics"][0]["mac"] = "00:50:56:01:00:11"
    vm["disks"][0]["size"] = "2GiB"
    dc["vms"], dc["folders"] = [vm], []
    small = tmp_path / "small.vmdk"
    images.synthetic_vmdk(small, 4 * MiB)
    with pytest.raises(InventoryError, match="disk size 2GiB differs from the guest image's"):
        apply_inventory(si, parse_inventory(data), guest_image=small, verify=_verify(sim))
    flat = tmp_path / "flat.vmdk"
    images.synthetic_vmdk(flat, 2 * GiB, "monolithicFlat", fill_bytes=0)
    with pytest.raises(InventoryError, match="is monolithicFlat, not streamOptimized"):
        apply_inventory(si, parse_inventory(data), guest_image=flat, verify=_verify(sim))
    assert find_vm(si, "DC0", "Linux", "debian-other") is None


def test_missing_infrastructure_is_created(vcenter, applied, tmp_path):
    """A new datacenter with its cluster, host, datastore, port groups and a VM."""
    sim, si = vcenter
    data = {
        "datacenters": [
            {
                "name": "DC9",
                "clusters": [{"name": "C9", "hosts": ["h9.example"]}],
                "datastores": [{"name": "DS9"}],
                "networks": {
                    "standard": ["Net9"],
                    "distributed": [{"name": "DVS9", "portgroups": ["PG9"]}],
                },
                "vms": [
                    {
                        "name": "vm9",
                        "folder": "A/B/C",
                        "guest_id": "otherGuest64",
                        "instance_uuid": "5003a1b2-0009-4c5e-8a00-000000000009",
                        "disks": [
                            {"size": "4MiB", "datastore": "DS9", "controller": "sata"},
                            {"size": "2MiB", "datastore": "DS9", "fill": 0},
                        ],
                        "nics": [
                            {"mac": "00:50:56:09:00:01", "network": "Net9"},
                            {"mac": "00:50:56:09:00:02", "network": "PG9", "adapter": "e1000"},
                        ],
                        "power": "poweredOn",
                    }
                ],
            }
        ]
    }
    inv = parse_inventory(data)
    result = apply_inventory(
        si,
        inv,
        verify=_verify(sim),
        datastore_root=tmp_path / "ds",
        work_dir=tmp_path / "img",
    )
    assert result.created[:3] == ["datacenter DC9", "cluster C9", "host h9.example"]
    assert "datastore DS9" in result.created
    assert result.datastore_dirs == [tmp_path / "ds" / "DC9-DS9"]
    assert (tmp_path / "ds" / "DC9-DS9" / "vm9" / "vm9.vmdk").is_file()
    dc, spec = next(inv.vms())
    vm = find_vm(si, "DC9", "A/B/C", "vm9")
    assert observe_vm(vm) == expected_vm(dc, spec)


def test_esx_inventory(tmp_path_factory):
    """The default VMs on a standalone ESXi host: one datacenter, no folders, no DVS."""
    inv = for_esx(load_inventory())
    with _simulator(tmp_path_factory, esx=True) as (sim, si):
        work = tmp_path_factory.mktemp("esx")
        result = apply_inventory(si, inv, verify=_verify(sim), work_dir=work / "img")
        assert result.created == []
        for dc, spec in inv.vms():
            vm = find_vm(si, "ha-datacenter", "", spec.vcenter_name)
            assert vm is not None, spec.name
            assert observe_vm(vm) == expected_vm(dc, spec)
            assert vm.runtime.host.name == "localhost.localdomain"


@pytest.mark.slow
def test_real_guest_disk_is_uploaded_as_is(vcenter, tmp_path):
    """The real Debian guest's streamOptimized VMDK lands in the datastore byte for byte."""
    sim, si = vcenter
    guest = images.debian_guest()
    data = _raw_default()
    dc = data["datacenters"][0]
    dc["folders"] = []
    vm = _vm_raw(data, "debian-stopped")
    vm["name"] = "debian-real"
    vm["folder"] = "Real"
    vm["instance_uuid"] = "5003a1b2-0010-4c5e-8a00-000000000010"
    vm["nics"][0]["mac"] = "00:50:56:01:00:10"
    dc["vms"] = [vm]
    result = apply_inventory(si, parse_inventory(data), guest_image=guest, verify=_verify(sim))
    assert result.vms["debian-real"].disk_files == ["[LocalDS_0] debian-real/debian-real.vmdk"]
    got = _download(sim, si, "DC0", "LocalDS_0", "debian-real/debian-real.vmdk", tmp_path / "g")
    digest = hashlib.sha256(got.read_bytes()).hexdigest()
    assert digest == images.debian_guest_meta()["sha256"]
    # and ExportVm serves exactly these bytes
    vm = find_vm(si, "DC0", "Real", "debian-real")
    (exported,) = _export(sim, si, vm)
    assert hashlib.sha256(exported).hexdigest() == digest
