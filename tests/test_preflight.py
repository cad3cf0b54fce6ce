"""Rules on the source VM: each gives its severity and a message that names the fix."""

import pytest

from tasks.models import DiskSpec, VmSpec
from tasks.preflight import source_rules


def _spec(**overrides) -> VmSpec:
    values = dict(
        name="vm1",
        moref="vm-1",
        instance_uuid=None,
        inventory_path="/DC0/vm/vm1",
        guest_id="debian12_64Guest",
        power_state="poweredOff",
        num_cpu=1,
        cores_per_socket=1,
        memory_mb=512,
        firmware="bios",
        disks=[
            DiskSpec(
                key=2000,
                label="Hard disk 1",
                capacity_bytes=1 << 20,
                file_name="[ds] vm1/vm1.vmdk",
                datastore="ds",
                controller="scsi0:0",
                mode="persistent",
            )
        ],
        nics=[],
    )
    values.update(overrides)
    return VmSpec(**values)


def _rules(spec: VmSpec) -> dict[str, tuple[str, str]]:
    return {c.rule: (c.severity, f"{c.message} {c.fix}") for c in source_rules(spec)}


def test_stopped_vm_has_no_concern():
    assert _rules(_spec()) == {}


@pytest.mark.parametrize(
    ("overrides", "rule", "severity", "words"),
    [
        (
            {"power_state": "poweredOn", "guest_id": "windows2019srv_64Guest"},
            "running-windows",
            "critical",
            "gracefully",
        ),
        (
            {"power_state": "poweredOn", "standalone": True},
            "running-on-esxi",
            "critical",
            "cannot clone",
        ),
        ({"power_state": "poweredOn"}, "running-clone", "warning", "crash-consistent"),
        ({"power_state": "suspended"}, "suspended", "critical", "resume"),
        ({"snapshot_count": 2}, "snapshots", "warning", "current state"),
        ({"disks": []}, "no-disks", "critical", "no virtual disk"),
    ],
)
def test_rule(overrides, rule, severity, words):
    found = _rules(_spec(**overrides))
    assert rule in found, found
    assert found[rule][0] == severity
    assert words in found[rule][1]


def test_rdm_and_independent_disks_are_critical():
    disk = _spec().disks[0]
    rdm = disk.model_copy(update={"rdm": True, "label": "Hard disk 2"})
    independent = disk.model_copy(update={"mode": "independent_persistent", "label": "Hard disk 3"})
    found = _rules(_spec(disks=[disk, rdm, independent]))
    assert found["rdm-disk"][0] == "critical" and "Hard disk 2" in found["rdm-disk"][1]
    assert found["independent-disk"][0] == "critical"
    assert "Hard disk 3" in found["independent-disk"][1]


def test_uefi_guest_needs_ovmf_on_the_import_host():
    from tasks.models import HostProbe
    from tasks.preflight import host_rules

    bare = HostProbe(name="kvm9", reachable=True)
    efi = _spec(firmware="efi")
    assert [c.rule for c in host_rules(efi, bare)] == ["no-ovmf"]
    plain = bare.model_copy(update={"ovmf": True})
    assert host_rules(efi, plain) == []
    secure = _spec(firmware="efi", secure_boot=True)
    concern = host_rules(secure, plain)[0]
    assert (concern.rule, concern.severity) == ("no-secure-boot-ovmf", "critical")
    assert host_rules(secure, plain.model_copy(update={"ovmf_secure_boot": True})) == []
    assert host_rules(_spec(), bare) == []


def test_pool_needs_follow_the_storage_map():
    from blocks import KvmCluster
    from tasks.preflight import pool_needs

    disk = _spec().disks[0]
    other = disk.model_copy(update={"datastore": "ds2", "capacity_bytes": 5 << 20})
    cluster = KvmCluster(hosts=["h"], storage_pool="main", storage_map={"ds2": "fast"})
    assert pool_needs(_spec(disks=[disk, other]), cluster) == {"main": 1 << 20, "fast": 5 << 20}


def test_guest_os_that_virt_v2v_does_not_convert_is_a_warning():
    found = _rules(_spec(guest_id="solaris11_64Guest", guest_full_name="Oracle Solaris 11"))
    assert found["guest-os"][0] == "warning" and "Linux and Windows" in found["guest-os"][1]
    assert "guest-os" not in _rules(_spec(guest_id="rhel9_64Guest"))
    assert "guest-os" not in _rules(_spec(guest_id="windows2019srv_64Guest"))


def _local_choice(convert="kvm1", import_="kvm1", export="kvm1", free=10 << 30):
    from tasks.models import HostChoice, HostProbe

    probe = HostProbe(
        name=convert, reachable=True, scratch_path="/var/lib/v2k", scratch_free_bytes=free
    )
    return HostChoice(convert=convert, import_=import_, export=export, probes=[probe])


@pytest.mark.parametrize(
    ("choice", "use_ovftool", "rule", "words"),
    [
        (
            _local_choice(export="kvm2"),
            True,
            "local-storage-export-host",
            "export host kvm2 is not the convert host",
        ),
        (_local_choice(export=None), False, "local-storage-ms-export", "cannot write there"),
        (_local_choice(export=None), True, "local-storage-no-ovftool", "kvm1 has no ovftool"),
        (
            _local_choice(import_="kvm2"),
            True,
            "local-storage-import-host",
            "import host kvm2 is not the convert host",
        ),
        (_local_choice(free=None), True, "temporary-storage", "not a writable directory"),
        (_local_choice(free=1 << 20), True, "temporary-space", "on kvm1 has 1048576 bytes free"),
    ],
)
def test_local_storage_rules(choice, use_ovftool, rule, words):
    from blocks import TemporaryStorage
    from tasks.preflight import local_storage_rules

    storage = TemporaryStorage(shared=False, host_path="/var/lib/v2k", reserve_bytes=0)
    found = local_storage_rules(
        _spec(), storage, choice, use_ovftool=use_ovftool, pool_types={"default": "dir"}
    )
    assert [c.rule for c in found] == [rule]
    assert found[0].severity == "critical" and words in found[0].message
    assert "/var/lib/v2k" in found[0].message and found[0].fix
    shared = TemporaryStorage(worker_path="/var/lib/v2k")
    assert local_storage_rules(_spec(), shared, choice, use_ovftool=False, pool_types={}) == []


def test_local_storage_needs_directory_pools():
    from blocks import TemporaryStorage
    from tasks.preflight import local_storage_rules

    storage = TemporaryStorage(shared=False, host_path="/var/lib/v2k", reserve_bytes=0)
    types = {"default": "dir", "nfs": "netfs", "vg0": "logical", "gone": None}
    found = local_storage_rules(
        _spec(), storage, _local_choice(), use_ovftool=True, pool_types=types
    )
    assert [c.rule for c in found] == ["local-storage-pool-type"]
    assert "'vg0'" in found[0].message and "'logical'" in found[0].message
