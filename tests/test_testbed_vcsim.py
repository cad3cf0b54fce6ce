"""The test bed's vCenter simulator: TLS, login, the 0.24.2 fixes, ExportVm,
CreateDescriptor, CloneVM_Task, fault injection and a clean stop."""

from __future__ import annotations

import hashlib
import os
import re
import ssl
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import httpx
import pytest
from pyVim.connect import SmartConnect
from pyVim.task import WaitForTask
from pyVmomi import vim, vmodl

from testbed.testing import write_disk
from testbed.vcsim import VcSim

OVF = "{http://schemas.dmtf.org/ovf/envelope/1}"
RASD = "{http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData}"
VMW = "{http://www.vmware.com/schema/ovf}"


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory):
    with VcSim(tmp_path_factory.mktemp("vcsim")) as s:
        yield s


@pytest.fixture(scope="module")
def si(sim: VcSim):
    with sim.connect() as si:
        yield si


def _pool(si):
    dc = si.content.rootFolder.childEntity[0]
    return dc, dc.hostFolder.childEntity[0].resourcePool


def make_vm(
    sim: VcSim,
    si,
    name: str,
    disks: list[bytes],
    *,
    datastore: str = "LocalDS_0",
    macs: list[str | None] = (None,),
    firmware: str = "bios",
) -> vim.VirtualMachine:
    """Create a VM whose disks are files put into the datastore beforehand."""
    dc, pool = _pool(si)
    changes = [
        vim.vm.device.VirtualDeviceSpec(
            operation="add",
            device=vim.vm.device.ParaVirtualSCSIController(
                key=-100, busNumber=0, sharedBus="noSharing"
            ),
        )
    ]
    for i, data in enumerate(disks):
        path = f"{name}/{name}_{i}.vmdk"
        sim.upload(path, data, datastore=datastore)
        changes.append(
            vim.vm.device.VirtualDeviceSpec(
                operation="add",
                device=vim.vm.device.VirtualDisk(
                    key=-101 - i,
                    controllerKey=-100,
                    unitNumber=i,
                    capacityInKB=64 * 1024,
                    backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
                        fileName=f"[{datastore}] {path}", diskMode="persistent"
                    ),
                ),
            )
        )
    for i, mac in enumerate(macs):
        nic = vim.vm.device.VirtualVmxnet3(
            key=-200 - i,
            backing=vim.vm.device.VirtualEthernetCard.NetworkBackingInfo(deviceName="VM Network"),
        )
        if mac:
            nic.addressType, nic.macAddress = "manual", mac
        changes.append(vim.vm.device.VirtualDeviceSpec(operation="add", device=nic))
    spec = vim.vm.ConfigSpec(
        name=name,
        guestId="debian11_64Guest",
        numCPUs=4,
        numCoresPerSocket=2,
        memoryMB=1536,
        firmware=firmware,
        # A .vmx path: the folder already holds the disks, and a bare folder name
        # would make the simulator pick "name (0)".
        files=vim.vm.FileInfo(vmPathName=f"[{datastore}] {name}/{name}.vmx"),
        deviceChange=changes,
    )
    task = dc.vmFolder.CreateVM_Task(spec, pool)
    WaitForTask(task)
    return task.info.result


def disks_of(vm) -> list[vim.vm.device.VirtualDisk]:
    return [d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)]


def macs_of(vm) -> list[str]:
    return [
        d.macAddress
        for d in vm.config.hardware.device
        if isinstance(d, vim.vm.device.VirtualEthernetCard)
    ]


def device_url(sim: VcSim, url: str) -> str:
    assert url.startswith("https://*/")
    return url.replace("*", f"{sim.host}:{sim.port}", 1)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def exported(sim: VcSim, si):
    """A powered-off VM with two disks of random bytes."""
    disks = [os.urandom(3 * 1024 * 1024 + 17), os.urandom(1024 * 1024 + 5)]
    vm = make_vm(sim, si, "exp1", disks, macs=[None, "00:50:56:01:02:03"], firmware="efi")
    return vm, disks


def test_tls_is_verified_against_the_test_ca(sim: VcSim):
    with sim.connect() as si:
        assert si.content.about.apiType == "VirtualCenter"
    untrusted = ssl.create_default_context()
    with pytest.raises(ssl.SSLError):
        SmartConnect(
            host=sim.host,
            port=sim.port,
            user=sim.user,
            pwd=sim.password,
            sslContext=untrusted,
        )


def test_only_the_generated_password_logs_in(sim: VcSim):
    with pytest.raises(vim.fault.InvalidLogin):
        SmartConnect(
            host=sim.host,
            port=sim.port,
            user=sim.user,
            pwd=sim.password + "x",
            sslContext=sim.ssl_context(),
        )
    with pytest.raises(vim.fault.InvalidLogin):
        SmartConnect(
            host=sim.host,
            port=sim.port,
            user="someone@vsphere.local",
            pwd=sim.password,
            sslContext=sim.ssl_context(),
        )
    info = sim.info()
    assert info["port"] == sim.port and info["url"].endswith("/sdk")
    assert info["datacenter"] == "DC0" and Path(info["ca_cert"]).is_file()


def test_unset_properties_read_as_none_and_the_connection_survives(sim: VcSim, si, exported):
    vm, _ = exported
    assert vm.snapshot is None
    assert vm.parentVApp is None
    assert list(vm.rootSnapshot) == []
    # the same connection still works
    assert vm.name == "exp1"
    assert vm.runtime.powerState == "poweredOff"


def test_export_refuses_a_powered_on_vm(sim: VcSim, si):
    vm = make_vm(sim, si, "running1", [os.urandom(4096)])
    WaitForTask(vm.PowerOnVM_Task())
    with pytest.raises(vim.fault.InvalidPowerState) as err:
        vm.ExportVm()
    assert err.value.requestedState == "poweredOff"
    assert err.value.existingState == "poweredOn"
    WaitForTask(vm.PowerOffVM_Task())


def test_export_serves_the_disks_with_range_and_complete_ends_it(sim: VcSim, si, exported):
    vm, disks = exported
    lease = vm.ExportVm()
    assert lease.state == "ready"
    info = lease.info
    assert info.entity == vm
    assert info.leaseTimeout > 0
    assert info.totalDiskCapacityInKB == 2 * 64 * 1024
    urls = info.deviceUrl
    assert len(urls) == 2
    assert urls[0].key == f"/{vm._moId}/ParaVirtualSCSIController0:0"
    assert urls[1].key == f"/{vm._moId}/ParaVirtualSCSIController0:1"
    assert all(u.disk for u in urls)
    assert [u.fileSize for u in urls] == [len(d) for d in disks]

    with httpx.Client(verify=sim.ssl_context(), timeout=30) as client:
        for u, data in zip(urls, disks, strict=True):
            r = client.get(device_url(sim, u.url))
            assert r.status_code == 200
            assert int(r.headers["content-length"]) == len(data)
            assert sha256(r.content) == sha256(data)
        url0 = device_url(sim, urls[0].url)
        r = client.get(url0, headers={"Range": "bytes=1000-1999"})
        assert r.status_code == 206
        assert r.headers["content-range"] == f"bytes 1000-1999/{len(disks[0])}"
        assert r.content == disks[0][1000:2000]
        r = client.head(url0)
        assert r.status_code == 200 and int(r.headers["content-length"]) == len(disks[0])

        lease.HttpNfcLeaseProgress(50)
        manifest = lease.HttpNfcLeaseGetManifest()
        assert [m.sha1 for m in manifest] == [hashlib.sha1(d).hexdigest() for d in disks]

        lease.HttpNfcLeaseComplete()
        assert lease.state == "done"
        assert client.get(url0).status_code == 404


def test_abort_ends_a_lease(sim: VcSim, si, exported):
    vm, _ = exported
    lease = vm.ExportVm()
    url = device_url(sim, lease.info.deviceUrl[0].url)
    lease.HttpNfcLeaseAbort()
    assert lease.state == "error"
    with httpx.Client(verify=sim.ssl_context(), timeout=30) as client:
        assert client.get(url).status_code == 404


def test_a_cut_download_resumes_with_range(sim: VcSim, si, exported):
    vm, disks = exported
    data = disks[0]
    lease = vm.ExportVm()
    url = device_url(sim, lease.info.deviceUrl[0].url)
    armed = sim.fault(nfc_cut_after=1_000_000, times=1)
    assert armed["nfc_cut_times"] == 1
    got = bytearray()
    with httpx.Client(verify=sim.ssl_context(), timeout=30) as client:
        with pytest.raises(httpx.HTTPError):
            with client.stream("GET", url) as r:
                assert r.status_code == 200
                for chunk in r.iter_raw():
                    got += chunk
        assert 0 < len(got) <= 1_000_000
        r = client.get(url, headers={"Range": f"bytes={len(got)}-"})
        assert r.status_code == 206
        got += r.content
    assert sha256(bytes(got)) == sha256(data)

    sim.fault(nfc_status=503, times=1)
    with httpx.Client(verify=sim.ssl_context(), timeout=30) as client:
        assert client.get(url).status_code == 503
        assert client.get(url).status_code == 200
    assert sim.fault(clear=1)["nfc_cut_times"] == 0
    lease.HttpNfcLeaseComplete()


def test_create_descriptor_names_files_hardware_and_macs(sim: VcSim, si, exported):
    vm, disks = exported
    lease = vm.ExportVm()
    files = [
        vim.OvfManager.OvfFile(deviceId=u.key, path=f"exp1-disk{i + 1}.vmdk", size=len(d))
        for i, (u, d) in enumerate(zip(lease.info.deviceUrl, disks, strict=True))
    ]
    lease.HttpNfcLeaseComplete()
    result = si.content.ovfManager.CreateDescriptor(
        obj=vm, cdp=vim.OvfManager.CreateDescriptorParams(ovfFiles=files)
    )
    root = ET.fromstring(result.ovfDescriptor)

    refs = root.findall(f"{OVF}References/{OVF}File")
    assert [f.get(f"{OVF}href") for f in refs] == ["exp1-disk1.vmdk", "exp1-disk2.vmdk"]
    assert [int(f.get(f"{OVF}size")) for f in refs] == [len(d) for d in disks]
    disk_section = root.findall(f"{OVF}DiskSection/{OVF}Disk")
    assert [int(d.get(f"{OVF}capacity")) for d in disk_section] == [64 << 20, 64 << 20]

    system = root.find(f"{OVF}VirtualSystem")
    assert system.findtext(f"{OVF}Name") == "exp1"
    os_section = system.find(f"{OVF}OperatingSystemSection")
    assert os_section.get(f"{VMW}osType") == "debian11_64Guest"
    hw = system.find(f"{OVF}VirtualHardwareSection")
    items = hw.findall(f"{OVF}Item")

    def of_type(n: int):
        return [i for i in items if i.findtext(f"{RASD}ResourceType") == str(n)]

    (cpu,) = of_type(3)
    assert cpu.findtext(f"{RASD}VirtualQuantity") == "4"
    assert cpu.findtext(f"{VMW}CoresPerSocket") == "2"
    (mem,) = of_type(4)
    assert mem.findtext(f"{RASD}VirtualQuantity") == "1536"
    (scsi,) = of_type(6)
    assert scsi.findtext(f"{RASD}ResourceSubType") == "VirtualSCSI"
    disk_items = of_type(17)
    assert [d.findtext(f"{RASD}HostResource") for d in disk_items] == [
        "ovf:/disk/vmdisk1",
        "ovf:/disk/vmdisk2",
    ]
    assert {d.findtext(f"{RASD}Parent") for d in disk_items} == {scsi.findtext(f"{RASD}InstanceID")}
    nics = of_type(10)
    assert [n.findtext(f"{RASD}Address") for n in nics] == macs_of(vm)
    assert "00:50:56:01:02:03" in macs_of(vm)
    assert {n.findtext(f"{RASD}Connection") for n in nics} == {"VM Network"}
    assert {n.findtext(f"{RASD}ResourceSubType") for n in nics} == {"VmxNet3"}
    firmware = [c for c in hw.findall(f"{VMW}Config") if c.get(f"{VMW}key") == "firmware"]
    assert [c.get(f"{VMW}value") for c in firmware] == ["efi"]


def test_full_clone_keeps_the_source_disks_and_copies_them(sim: VcSim, si):
    data = os.urandom(2 * 1024 * 1024 + 3)
    src = make_vm(sim, si, "clonesrc", [data])
    src_file = disks_of(src)[0].backing.fileName
    dc, pool = _pool(si)
    spec = vim.vm.CloneSpec(location=vim.vm.RelocateSpec(pool=pool), powerOn=False)
    task = src.CloneVM_Task(folder=dc.vmFolder, name="clonedst", spec=spec)
    WaitForTask(task)
    clone = task.info.result

    assert disks_of(src)[0].backing.fileName == src_file
    clone_file = disks_of(clone)[0].backing.fileName
    assert clone_file != src_file
    assert clone_file.startswith("[LocalDS_0] clonedst/")
    assert not set(macs_of(src)) & set(macs_of(clone))

    lease = clone.ExportVm()
    with httpx.Client(verify=sim.ssl_context(), timeout=30) as client:
        r = client.get(device_url(sim, lease.info.deviceUrl[0].url))
    lease.HttpNfcLeaseComplete()
    assert sha256(r.content) == sha256(data)

    WaitForTask(clone.Destroy_Task())
    assert disks_of(src)[0].backing.fileName == src_file
    lease = src.ExportVm()
    with httpx.Client(verify=sim.ssl_context(), timeout=30) as client:
        r = client.get(device_url(sim, lease.info.deviceUrl[0].url))
    lease.HttpNfcLeaseComplete()
    assert sha256(r.content) == sha256(data)


def test_clone_copies_a_descriptor_and_its_flat_extent(sim: VcSim, si):
    flat = os.urandom(4096 * 512)
    descriptor = (
        b"# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n"
        b'createType="monolithicFlat"\n\n# Extent description\n'
        b'RW 4096 FLAT "flatsrc_0-flat.vmdk" 0\n'
    )
    sim.upload("flatsrc/flatsrc_0-flat.vmdk", flat)
    src = make_vm(sim, si, "flatsrc", [descriptor])
    dc, pool = _pool(si)
    spec = vim.vm.CloneSpec(location=vim.vm.RelocateSpec(pool=pool), powerOn=False)
    task = src.CloneVM_Task(folder=dc.vmFolder, name="flatdst", spec=spec)
    WaitForTask(task)
    clone_file = disks_of(task.info.result)[0].backing.fileName
    assert clone_file == "[LocalDS_0] flatdst/flatdst.vmdk"
    with httpx.Client(verify=sim.ssl_context(), timeout=30) as client:
        text = client.get(sim.datastore_url("flatdst/flatdst.vmdk")).text
        assert 'RW 4096 FLAT "flatdst-flat.vmdk" 0' in text
        copied = client.get(sim.datastore_url("flatdst/flatdst-flat.vmdk")).content
        assert sha256(copied) == sha256(flat)
        original = client.get(sim.datastore_url("flatsrc/flatsrc_0.vmdk")).content
        assert original == descriptor


def test_generated_macs_are_distinct_and_given_ones_kept(sim: VcSim, si):
    a = make_vm(sim, si, "maca", [b"x" * 512], macs=[None, None])
    b = make_vm(sim, si, "macb", [b"y" * 512], macs=[None, "00:50:56:3f:00:01"])
    macs = macs_of(a) + macs_of(b)
    assert len(set(macs)) == 4 and all(macs)
    assert "00:50:56:3f:00:01" in macs_of(b)

    # ReconfigVM: an added NIC gets a new MAC, an edited one keeps its own.
    nic = next(d for d in b.config.hardware.device if isinstance(d, vim.vm.device.VirtualVmxnet3))
    before = nic.macAddress
    nic.macAddress = None
    nic.deviceInfo.summary = "edited"
    added = vim.vm.device.VirtualE1000(
        key=-300,
        backing=vim.vm.device.VirtualEthernetCard.NetworkBackingInfo(deviceName="VM Network"),
    )
    spec = vim.vm.ConfigSpec(
        deviceChange=[
            vim.vm.device.VirtualDeviceSpec(operation="edit", device=nic),
            vim.vm.device.VirtualDeviceSpec(operation="add", device=added),
        ]
    )
    WaitForTask(b.ReconfigVM_Task(spec))
    after = macs_of(b)
    assert before in after
    assert len(after) == 3 and len(set(after + macs_of(a))) == 5


def test_change_version_is_set_and_moves_with_a_reconfigure(sim: VcSim, si):
    vm = make_vm(sim, si, "versioned", [b"v" * 512])
    first = vm.config.changeVersion
    assert first and first == vm.config.changeVersion  # stable while nothing changes
    WaitForTask(vm.ReconfigVM_Task(vim.vm.ConfigSpec(annotation="changed")))
    assert vm.config.changeVersion > first


def test_stop_leaves_nothing_behind(tmp_path: Path):
    sim = VcSim(tmp_path / "stopme", model={"ds": 1})
    sim.start()
    pid = sim.pid
    stores = list(sim.datastore_dir.iterdir())
    assert stores and all(p.name.startswith("govcsim-") for p in stores)
    with sim.connect() as si:
        assert si.content.rootFolder.childEntity[0].name == "DC0"
    sim.stop()
    assert sim.returncode == 0  # it exited on SIGTERM, after removing its datastores
    assert "stopping" in sim.log_file.read_text()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not sim.datastore_dir.exists()
    assert not sim.running


def test_an_idle_lease_times_out(tmp_path: Path):
    with VcSim(tmp_path / "timeout", model={"ds": 1, "lease_timeout": 1}) as sim:
        with sim.connect() as si:
            vm = make_vm(sim, si, "idle", [b"z" * 4096])
            lease = vm.ExportVm()
            assert lease.info.leaseTimeout == 1
            url = device_url(sim, lease.info.deviceUrl[0].url)
            time.sleep(2.5)
            assert lease.state == "error"
            assert isinstance(lease.error, vim.fault.Timedout)
            with httpx.Client(verify=sim.ssl_context(), timeout=30) as client:
                assert client.get(url).status_code == 404


def test_esx_model(tmp_path: Path):
    with VcSim(tmp_path / "esx", esx=True) as sim:
        assert sim.user == "root" and sim.datacenter == "ha-datacenter"
        with sim.connect() as si:
            assert si.content.about.apiType == "HostAgent"
            assert si.content.rootFolder.childEntity[0].name == "ha-datacenter"


# ---- facts about data: instance UUID, datastore browser, CBT, space, slow clones ----------

CHANGE_ID = re.compile(r"^52( [0-9a-f]{2}){7}-[0-9a-f]{2}( [0-9a-f]{2}){7}/(\d+)$")


def make_flat_vm(sim: VcSim, si, name: str, flat: bytes, datastore: str = "LocalDS_0"):
    """A VM whose disk is a monolithicFlat descriptor with its flat extent."""
    descriptor = (
        b"# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n"
        b'createType="monolithicFlat"\n\n# Extent description\n'
        + f'RW {len(flat) // 512} FLAT "{name}_0-flat.vmdk" 0\n'.encode()
    )
    sim.upload(f"{name}/{name}_0-flat.vmdk", flat, datastore=datastore)
    return make_vm(sim, si, name, [descriptor], datastore=datastore)


def search(si, vm, path: str, sub_folders: bool = False, **spec):
    browser = vm.datastore[0].browser
    details = vim.host.DatastoreBrowser.FileInfo.Details(
        fileSize=True, modification=True, fileType=True
    )
    spec = vim.host.DatastoreBrowser.SearchSpec(details=details, **spec)
    method = browser.SearchDatastoreSubFolders_Task if sub_folders else browser.SearchDatastore_Task
    task = method(datastorePath=path, searchSpec=spec)
    WaitForTask(task)
    return task.info.result


def test_instance_uuid_is_settable_reported_and_differs_per_simulator(
    sim: VcSim, si, tmp_path: Path
):
    assert si.content.about.instanceUuid == sim.info()["instance_uuid"] == sim.instance_uuid
    pair = "6a2e0a4e-5bd3-4c1e-9a57-3b1f2e0c1d10"
    with VcSim(tmp_path / "dr", model={"ds": 1}, instance_uuid=pair) as other:
        with other.connect() as osi:
            assert osi.content.about.instanceUuid == pair
        assert other.info()["instance_uuid"] == pair
    assert pair != sim.instance_uuid  # two simulators differ unless told otherwise


def test_datastore_browser_shows_a_disk_as_one_file_with_its_real_size_and_time(sim: VcSim, si):
    flat = os.urandom(8 * 1024 * 1024)
    vm = make_flat_vm(sim, si, "browsed", flat)
    folder = sim.datastore_path() / "browsed"
    files = {p.name: p.stat() for p in folder.iterdir()}

    result = search(si, vm, "[LocalDS_0] browsed")
    found = {f.path: f for f in result.file}
    assert "browsed_0-flat.vmdk" not in found  # vSphere shows the descriptor only
    disk = found["browsed_0.vmdk"]
    assert isinstance(disk, vim.host.DatastoreBrowser.VmDiskInfo)
    assert disk.fileSize == files["browsed_0.vmdk"].st_size + len(flat)
    latest = max(files["browsed_0.vmdk"].st_mtime, files["browsed_0-flat.vmdk"].st_mtime)
    assert abs(disk.modification.timestamp() - latest) < 0.01
    assert (found["browsed.vmx"].fileSize or 0) == files["browsed.vmx"].st_size  # 0 is unset

    # A guest write moves the disk's time; the size stays.
    time.sleep(0.05)
    write_disk(sim, vm, 4096, b"\x5a" * 4096)
    again = {f.path: f for f in search(si, vm, "[LocalDS_0] browsed").file}
    assert again["browsed_0.vmdk"].modification > disk.modification
    assert again["browsed_0.vmdk"].fileSize == disk.fileSize

    # The same facts through a recursive search from the datastore's root, with a pattern.
    tree = search(si, vm, "[LocalDS_0]", sub_folders=True, matchPattern=["*.vmdk"])
    (sub,) = [r for r in tree if r.folderPath.rstrip("/").endswith("browsed")]
    assert [f.path for f in sub.file] == ["browsed_0.vmdk"]
    assert sub.file[0].modification == again["browsed_0.vmdk"].modification


def test_change_id_is_set_with_cbt_and_moves_with_a_write(sim: VcSim, si):
    vm = make_flat_vm(sim, si, "tracked", os.urandom(2 * 1024 * 1024))
    assert not vm.config.changeTrackingEnabled
    assert not disks_of(vm)[0].backing.changeId

    WaitForTask(vm.ReconfigVM_Task(vim.vm.ConfigSpec(changeTrackingEnabled=True)))
    assert vm.config.changeTrackingEnabled
    first = disks_of(vm)[0].backing.changeId
    assert CHANGE_ID.match(first), first
    assert disks_of(vm)[0].backing.changeId == first  # stable while nothing is written

    time.sleep(0.05)
    write_disk(sim, vm, 0, os.urandom(512))
    second = disks_of(vm)[0].backing.changeId
    assert second != first
    epoch = first.rsplit("/", 1)[0]
    assert second.startswith(epoch + "/")  # same tracking epoch, later sequence
    assert int(CHANGE_ID.match(second)[3]) > int(CHANGE_ID.match(first)[3])

    WaitForTask(vm.ReconfigVM_Task(vim.vm.ConfigSpec(changeTrackingEnabled=False)))
    assert not disks_of(vm)[0].backing.changeId
    WaitForTask(vm.ReconfigVM_Task(vim.vm.ConfigSpec(changeTrackingEnabled=True)))
    assert not disks_of(vm)[0].backing.changeId.startswith(epoch)  # tracking starts anew


def test_write_disk_changes_the_bytes_of_a_stream_optimized_disk(sim: VcSim, si, tmp_path):
    raw = tmp_path / "d.raw"
    raw.write_bytes(os.urandom(1024 * 1024))
    vmdk = tmp_path / "d.vmdk"
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized"]
        + [str(raw), str(vmdk)],
        check=True,
    )
    vm = make_vm(sim, si, "streamed", [vmdk.read_bytes()])
    write_disk(sim, vm, 65536, b"new bytes")
    back = tmp_path / "back.vmdk"
    back.write_bytes(sim.download("streamed/streamed_0.vmdk"))
    out = tmp_path / "back.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(back), str(out)], check=True)
    expected = bytearray(raw.read_bytes())
    expected[65536 : 65536 + 9] = b"new bytes"
    assert out.read_bytes() == bytes(expected)


def _clone(si, vm, name: str, annotation: str | None = None):
    dc, pool = _pool(si)
    spec = vim.vm.CloneSpec(location=vim.vm.RelocateSpec(pool=pool), powerOn=False)
    if annotation:
        spec.config = vim.vm.ConfigSpec(annotation=annotation)
    return vm.CloneVM_Task(folder=dc.vmFolder, name=name, spec=spec)


def _vm_names(si) -> set[str]:
    view = si.content.viewManager.CreateContainerView(
        si.content.rootFolder, [vim.VirtualMachine], True
    )
    try:
        return {v.name for v in view.view}
    finally:
        view.Destroy()


def _wait_done(task, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while task.info.state in ("queued", "running"):
        assert time.monotonic() < deadline, "task still running"
        time.sleep(0.1)
    return task.info


def test_a_slow_clone_runs_cancelable_and_cancel_leaves_nothing(sim: VcSim, si):
    vm = make_flat_vm(sim, si, "slowsrc", os.urandom(1024 * 1024))
    sim.knob(clone_min_ms=4000)
    try:
        task = _clone(si, vm, "slowdst", annotation="v2k run r1")
        time.sleep(1)
        info = task.info
        assert info.state == "running" and info.cancelable
        assert info.entity == vm and info.descriptionId == "VirtualMachine.clone"
        assert 0 < info.progress < 100
        assert task in si.content.taskManager.recentTask
        # Whose clone it is: the task's events name the destination.
        events = si.content.eventManager.QueryEvents(
            vim.event.EventFilterSpec(
                entity=vim.event.EventFilterSpec.ByEntity(entity=vm, recursion="self"),
                eventTypeId=["VmBeingClonedEvent"],
            )
        )
        mine = [e for e in events if e.chainId == info.eventChainId]
        assert [e.destName for e in mine] == ["slowdst"]
        assert "slowdst" not in _vm_names(si)  # registered at the end, as vCenter does

        task.CancelTask()
        done = _wait_done(task)
        assert done.state == "error" and isinstance(done.error, vmodl.fault.RequestCanceled)
        assert done.cancelled
        assert "slowdst" not in _vm_names(si)
        assert not (sim.datastore_path() / "slowdst").exists()
        with pytest.raises(vim.fault.InvalidState):
            task.CancelTask()
    finally:
        sim.knob(clone_min_ms=0)


def test_clone_rate_sets_the_time_and_the_clone_carries_its_annotation(sim: VcSim, si):
    vm = make_flat_vm(sim, si, "ratesrc", os.urandom(2 * 1024 * 1024))
    sim.knob(clone_rate_kbps=1024)  # 2 MiB: about 2 s
    try:
        started = time.monotonic()
        task = _clone(si, vm, "ratedst", annotation="v2k run r2: export clone")
        info = _wait_done(task)
        took = time.monotonic() - started
    finally:
        sim.knob(clone_rate_kbps=0)
    assert info.state == "success", info.error
    assert 1.8 < took < 6
    clone = info.result
    assert clone.name == "ratedst" and clone.config.annotation == "v2k run r2: export clone"
    # One clone task for the client; the simulator's own inner task is not shown.
    clones = [
        t
        for t in si.content.taskManager.recentTask
        if t.info.entity == vm and t.info.descriptionId == "VirtualMachine.clone"
    ]
    assert clones == [task]
    WaitForTask(clone.Destroy_Task())


def test_a_small_datastore_reports_its_space_and_refuses_a_clone(sim: VcSim, si):
    vm = make_flat_vm(sim, si, "bigsrc", os.urandom(4 * 1024 * 1024), datastore="LocalDS_1")
    ds = next(d for d in vm.datastore if d.name == "LocalDS_1")
    root = sim.datastore_path("LocalDS_1")
    st = os.statvfs(root)
    assert ds.summary.capacity == st.f_blocks * st.f_frsize
    assert abs(ds.summary.freeSpace - st.f_bavail * st.f_frsize) < 64 * 1024 * 1024

    used = sum(p.stat().st_blocks * 512 for p in root.rglob("*") if p.is_file())
    sim.knob(datastore="LocalDS_1", capacity_bytes=used + 1024 * 1024)
    try:
        assert ds.summary.capacity == used + 1024 * 1024
        assert ds.summary.freeSpace == 1024 * 1024
        info = _wait_done(_clone(si, vm, "bigdst"))
        assert info.state == "error" and isinstance(info.error, vim.fault.NoDiskSpace)
        assert info.error.datastore == "LocalDS_1"
        assert "bigdst" not in _vm_names(si)
    finally:
        sim.knob(datastore="LocalDS_1", capacity_bytes=0)
    assert ds.summary.capacity == st.f_blocks * st.f_frsize
