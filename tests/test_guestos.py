"""The VMware guestId -> libosinfo id table, and the choice between it and virt-v2v."""

from __future__ import annotations

import pytest
from pyVmomi import vim

from tasks.guestos import GUEST_IDS, OSINFO_DB, OSINFO_SINCE, choose_osinfo, osinfo_db, osinfo_for

VMWARE_GUEST_IDS = sorted(vim.vm.GuestOsDescriptor.GuestOsIdentifier.values)


@pytest.fixture(scope="module")
def db():
    found = osinfo_db(OSINFO_DB)
    if not found.ids:
        pytest.skip(f"no osinfo-db under {OSINFO_DB} (apt-get install osinfo-db)")
    return found


def test_every_table_id_exists_in_osinfo_db(db):
    """Each id is in the installed osinfo-db, or is newer than it and listed in
    OSINFO_SINCE with the release that added it; a database that new must have it."""
    table_ids = {e.osinfo_id for e in GUEST_IDS.values() if e.osinfo_id}
    assert len(table_ids) > 50
    missing = sorted(i for i in table_ids if i not in db.ids and i not in OSINFO_SINCE)
    assert not missing, f"not in osinfo-db {db.version}: {missing}"
    for osinfo_id, since in OSINFO_SINCE.items():
        assert osinfo_id in table_ids, f"{osinfo_id} is listed in OSINFO_SINCE but not used"
        if db.version >= since:
            assert osinfo_id in db.ids, f"osinfo-db {db.version} should have {osinfo_id}"
        else:
            assert osinfo_id not in db.ids, f"{osinfo_id} is in osinfo-db {db.version} already"


def test_table_keys_are_real_vmware_guest_ids():
    assert set(GUEST_IDS) <= set(VMWARE_GUEST_IDS), set(GUEST_IDS) - set(VMWARE_GUEST_IDS)


@pytest.mark.parametrize("guest_id", VMWARE_GUEST_IDS)
def test_every_vmware_guest_id_gives_an_id_or_a_reason(guest_id):
    found = osinfo_for(guest_id)
    assert found.guest_id == guest_id
    if found.osinfo_id is None:
        assert found.source == "none"
        assert found.note and "not in v2k's table" not in found.note
    else:
        assert found.source == "guest-id"
        assert found.osinfo_id.startswith("http://")
        assert found.osinfo_id != "http://libosinfo.org/unknown"
        if found.generic:
            assert found.note, "a generic id always says so"


@pytest.mark.parametrize(
    ("guest_id", "expected"),
    [
        ("windows9_64Guest", "http://microsoft.com/win/10"),
        ("windows11_64Guest", "http://microsoft.com/win/11"),
        ("windows8Server64Guest", "http://microsoft.com/win/2k12"),
        ("windows9Server64Guest", "http://microsoft.com/win/2k16"),
        ("windows2019srv_64Guest", "http://microsoft.com/win/2k19"),
        ("windows2019srvNext_64Guest", "http://microsoft.com/win/2k22"),
        ("windows2022srvNext_64Guest", "http://microsoft.com/win/2k25"),
        ("rhel7_64Guest", "http://redhat.com/rhel/7-unknown"),
        ("rhel8_64Guest", "http://redhat.com/rhel/8-unknown"),
        ("rhel9_64Guest", "http://redhat.com/rhel/9-unknown"),
        ("centos7_64Guest", "http://centos.org/centos/7.0"),
        ("centos8_64Guest", "http://centos.org/centos/8"),
        ("centos9_64Guest", "http://centos.org/centos-stream/9"),
        ("debian10_64Guest", "http://debian.org/debian/10"),
        ("debian11_64Guest", "http://debian.org/debian/11"),
        ("debian12_64Guest", "http://debian.org/debian/12"),
        ("sles12_64Guest", "http://suse.com/sles/12-unknown"),
        ("sles15_64Guest", "http://suse.com/sle/15-unknown"),
        ("oracleLinux9_64Guest", "http://oracle.com/ol/9-unknown"),
        ("oracleLinux8_64Guest", "http://oracle.com/ol/8.0"),
        ("freebsd13_64Guest", "http://freebsd.org/freebsd/13.0"),
        ("solaris11_64Guest", "http://oracle.com/solaris/11"),
    ],
)
def test_sample_mappings(guest_id, expected):
    found = osinfo_for(guest_id)
    assert (found.osinfo_id, found.source, found.generic) == (expected, "guest-id", False)


def test_2012_note_mentions_r2():
    assert "2012 R2" in osinfo_for("windows8Server64Guest").note


@pytest.mark.parametrize(
    ("guest_id", "expected", "words"),
    [
        ("ubuntu64Guest", "http://libosinfo.org/linux/2016", "no release"),
        ("rockylinux_64Guest", "http://rockylinux.org/rocky/unknown", "no release"),
        ("almalinux_64Guest", "http://libosinfo.org/linux/2020", "no release"),
        ("other5xLinux64Guest", "http://libosinfo.org/linux/2018", "Linux 5.x"),
        ("vmwarePhoton64Guest", "http://libosinfo.org/linux/2016", "Photon"),
    ],
)
def test_generic_ids_say_so(guest_id, expected, words):
    found = osinfo_for(guest_id)
    assert (found.osinfo_id, found.generic) == (expected, True)
    assert words in found.note


@pytest.mark.parametrize(
    ("guest_id", "words"),
    [
        (None, "no guestId"),
        ("", "no guestId"),
        ("otherGuest64", "Other"),
        ("otherLinux64Guest", "Other Linux"),
        ("other3xLinux64Guest", "that old"),
        ("centos64Guest", "CentOS 4 to 7"),
        ("windows12_64Guest", "after 11"),
        ("vmkernel8Guest", "ESXi"),
        ("darwin22_64Guest", "macOS"),
        ("beos5Guest", "not in v2k's table"),
    ],
)
def test_unknown_or_uninformative_ids_give_none_with_a_reason(guest_id, words):
    found = osinfo_for(guest_id)
    assert found.osinfo_id is None
    assert found.source == "none"
    assert words in found.note


def test_guest_id_case_is_forgiven():
    assert osinfo_for("DEBIAN11_64GUEST").osinfo_id == "http://debian.org/debian/11"


def test_choose_prefers_virt_v2v():
    found = choose_osinfo("http://debian.org/debian/12", "debian12_64Guest")
    assert (found.osinfo_id, found.source, found.note) == (
        "http://debian.org/debian/12",
        "virt-v2v",
        None,
    )
    # virt-v2v looked inside the disk: it wins over a guestId that disagrees, and the
    # note says so.
    found = choose_osinfo("http://debian.org/debian/12", "rhel9_64Guest")
    assert (found.osinfo_id, found.source) == ("http://debian.org/debian/12", "virt-v2v")
    assert "rhel/9-unknown" in found.note
    # A generic guestId (every Ubuntu) is no disagreement worth a note.
    found = choose_osinfo("http://ubuntu.com/ubuntu/22.04", "ubuntu64Guest")
    assert (found.osinfo_id, found.note) == ("http://ubuntu.com/ubuntu/22.04", None)


def test_choose_falls_back_to_the_table_and_says_why():
    found = choose_osinfo(None, "windows2019srv_64Guest")
    assert (found.osinfo_id, found.source) == ("http://microsoft.com/win/2k19", "guest-id")
    assert "virt-v2v" in found.note
    found = choose_osinfo("http://libosinfo.org/unknown", "debian11_64Guest")
    assert (found.osinfo_id, found.source) == ("http://debian.org/debian/11", "guest-id")
    assert "did not recognise" in found.note
    found = choose_osinfo(None, "otherGuest")
    assert found.osinfo_id is None and found.source == "none"
    assert "virt-v2v" in found.note and "Other" in found.note


def test_choose_reads_short_ids_through_osinfo_db(db):
    found = choose_osinfo("debian11", "otherLinux64Guest")
    assert (found.osinfo_id, found.source) == ("http://debian.org/debian/11", "virt-v2v")
    found = choose_osinfo("not-an-os", "debian11_64Guest")
    assert (found.osinfo_id, found.source) == ("http://debian.org/debian/11", "guest-id")
    assert "not-an-os" in found.note
