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
