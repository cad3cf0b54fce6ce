"""The guest OS of a migrated VM as a libosinfo id, never a silent placeholder.

libvirt records the guest OS in the domain's metadata as a libosinfo id in URL form
(`<libosinfo:os id="http://debian.org/debian/12"/>`), the form virt-v2v writes too.
v2k uses the same form everywhere.

Where the id comes from, best first (`choose_osinfo`):

1. virt-v2v's inspection of the disk (the `libosinfo:os` element of the XML it writes):
   it looked inside the guest, so it knows the release.
2. The VMware guestId of the source VM, through the table below (`osinfo_for`). A
   guestId is what the VMware admin picked, and it often names only a family: VMware has
   one `ubuntu64Guest` for every Ubuntu release, one `rockylinux_64Guest` for Rocky 8
   and 9, one `windows8Server64Guest` for Windows Server 2012 and 2012 R2.

How a guestId maps (every result carries a note when it is not an exact match):

- it names a release that osinfo-db knows: that release's id. When it names a major
  version only, the osinfo-db id for "that major, minor unknown" (`rhel/9-unknown`),
  or, where osinfo-db has none, the major's first release (`ol/7.0`), whose feature
  set every later minor release has.
- it names a family but no release (`ubuntu64Guest`, `rockylinux_64Guest`, "Other 5.x
  Linux"), or a release newer than osinfo-db: the family's own "unknown" id where
  osinfo-db has one (`rocky/unknown`), else the generic Linux id of the era
  (`http://libosinfo.org/linux/2016` ...), with `generic=True` and a note.
- it says nothing usable (`otherGuest`, "Other Linux", nested ESXi, macOS, a future
  Windows, an id v2k does not know): no id (`osinfo_id=None`) and a note saying why.

Every id in the table exists in osinfo-db (the test suite checks them against the
installed database, `/usr/share/osinfo`). Debian 12's osinfo-db (20221130) predates a
few current releases; `OSINFO_SINCE` lists those ids with the osinfo-db release that
added them, and the test checks that a database at least that new has them.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

OSINFO_DB = Path("/usr/share/osinfo")

_WIN = "http://microsoft.com/win/"
_RHEL = "http://redhat.com/rhel/"
_CENTOS = "http://centos.org/centos/"
_DEBIAN = "http://debian.org/debian/"
_OL = "http://oracle.com/ol/"
_SUSE = "http://suse.com/"
_FREEBSD = "http://freebsd.org/freebsd/"
_LINUX = "http://libosinfo.org/linux/"

# Ids newer than the osinfo-db of Debian 12 (20221130), with the osinfo-db release that
# added them (YYYYMMDD). Where no release tag was known yet, the date of the upstream
# commit that added the id: any release made on or after that date has it.
OSINFO_SINCE: dict[str, str] = {
    f"{_DEBIAN}12": "20230308",
    f"{_DEBIAN}13": "20250124",
    f"{_WIN}2k25": "20250319",
    f"{_RHEL}10-unknown": "20250124",
    f"{_OL}9-unknown": "20231215",
    f"{_SUSE}sles/16-unknown": "20260416",
    f"{_FREEBSD}14.0": "20231215",
    f"{_FREEBSD}15.0": "20251202",
    f"{_LINUX}2024": "20250124",
}


class GuestOs(BaseModel):
    """The libosinfo id chosen for a guest, where it came from, and what to know about it."""

    osinfo_id: str | None = Field(
        description="libosinfo id in URL form, e.g. http://debian.org/debian/12; None: unknown."
    )
    source: Literal["virt-v2v", "guest-id", "none"] = Field(
        description="virt-v2v's inspection, the VMware guestId table, or nothing."
    )
    note: str | None = Field(
        default=None, description="Why there is no id, or how approximate the id is."
    )
    generic: bool = Field(
        default=False, description="The id names a family or an era, not the exact release."
    )
    guest_id: str | None = Field(default=None, description="The VMware guestId looked up.")


@dataclass(frozen=True)
class _Entry:
    osinfo_id: str | None
    note: str | None = None
    generic: bool = False


def _exact(osinfo_id: str, note: str | None = None) -> _Entry:
    return _Entry(osinfo_id, note)


def _generic(osinfo_id: str, note: str) -> _Entry:
    return _Entry(osinfo_id, note, generic=True)


def _none(note: str) -> _Entry:
    return _Entry(None, note)


def _both(name: str, entry: _Entry) -> dict[str, _Entry]:
    """VMware's 32-bit `<name>Guest` and 64-bit `<name>_64Guest` ids of one OS."""
    return {f"{name}Guest": entry, f"{name}_64Guest": entry}


_MINOR = "the guestId names the major version only"
_NO_RELEASE = "names no release"

GUEST_IDS: dict[str, _Entry] = {
    # --- Windows desktop -----------------------------------------------------------
    **_both("windows9", _exact(f"{_WIN}10")),  # VMware's "windows9" is Windows 10
    "windows11_64Guest": _exact(f"{_WIN}11"),
    "windows12_64Guest": _none(
        "windows12_64Guest is VMware's id for a Windows release after 11; "
        "osinfo-db has no id for it"
    ),
    **_both(
        "windows8",
        _exact(f"{_WIN}8", "VMware uses this guestId for Windows 8.1 too"),
    ),
    **_both("windows7", _exact(f"{_WIN}7")),
    "winVistaGuest": _exact(f"{_WIN}vista"),
    "winVista64Guest": _exact(f"{_WIN}vista"),
    "winXPProGuest": _exact(f"{_WIN}xp"),
    "winXPPro64Guest": _exact(f"{_WIN}xp"),
    "winXPHomeGuest": _exact(f"{_WIN}xp"),
    "win2000ProGuest": _exact(f"{_WIN}2k"),
    "win2000ServGuest": _exact(f"{_WIN}2k"),
    "win2000AdvServGuest": _exact(f"{_WIN}2k"),
    "winNTGuest": _exact("http://microsoft.com/winnt/4.0", "VMware's Windows NT is NT 4.0"),
    "winMeGuest": _exact(f"{_WIN}me"),
    "win98Guest": _exact(f"{_WIN}98"),
    "win95Guest": _exact(f"{_WIN}95"),
    "win31Guest": _exact(f"{_WIN}3.1"),
    "dosGuest": _exact("http://microsoft.com/msdos/6.22", "VMware's MS-DOS: 6.22 assumed"),
    # --- Windows Server --------------------------------------------------------------
    "windows2022srvNext_64Guest": _exact(f"{_WIN}2k25"),  # VMware: Windows Server 2025
    "windows2019srvNext_64Guest": _exact(f"{_WIN}2k22"),  # VMware: Windows Server 2022
    "windows2019srv_64Guest": _exact(f"{_WIN}2k19"),
    "windows9Server64Guest": _exact(f"{_WIN}2k16"),
    "windows8Server64Guest": _exact(
        f"{_WIN}2k12",
        "VMware uses this guestId for Windows Server 2012 R2 too "
        "(http://microsoft.com/win/2k12r2); virt-v2v's inspection tells them apart",
    ),
    "windows7Server64Guest": _exact(f"{_WIN}2k8r2"),
    "winLonghornGuest": _exact(f"{_WIN}2k8"),
    "winLonghorn64Guest": _exact(f"{_WIN}2k8"),
    **{
        f"winNet{edition}Guest": _exact(
            f"{_WIN}2k3", "VMware uses this guestId for Windows Server 2003 R2 too"
        )
        for edition in (
            "Standard",
            "Standard64",
            "Enterprise",
            "Enterprise64",
            "Datacenter",
            "Datacenter64",
            "Web",
            "Business",
        )
    },
    "windowsHyperVGuest": _none(
        "windowsHyperVGuest (Hyper-V Server) names no release that osinfo-db has an id for"
    ),
    # --- Red Hat family --------------------------------------------------------------
    "rhel10_64Guest": _exact(f"{_RHEL}10-unknown", _MINOR),
    "rhel9_64Guest": _exact(f"{_RHEL}9-unknown", _MINOR),
    "rhel8_64Guest": _exact(f"{_RHEL}8-unknown", _MINOR),
    **_both("rhel7", _exact(f"{_RHEL}7-unknown", _MINOR)),
    **_both("rhel6", _exact(f"{_RHEL}6-unknown", _MINOR)),
    **_both("rhel5", _exact(f"{_RHEL}5.0", _MINOR + "; its first release assumed")),
    **_both("rhel4", _exact(f"{_RHEL}4.0", _MINOR + "; its first release assumed")),
    **_both("rhel3", _exact(f"{_RHEL}3", _MINOR)),
    "rhel2Guest": _exact(f"{_RHEL}2.1", _MINOR),
    "redhatGuest": _none("redhatGuest is the old Red Hat Linux; v2k does not map it"),
    "centos9_64Guest": _exact("http://centos.org/centos-stream/9", "VMware's CentOS 9 is Stream"),
    "centos8_64Guest": _exact(f"{_CENTOS}8", "VMware uses this guestId for CentOS Stream 8 too"),
    **_both("centos7", _exact(f"{_CENTOS}7.0", "osinfo-db's id for every CentOS 7 release")),
    **_both("centos6", _exact(f"{_CENTOS}6.0", _MINOR + "; its first release assumed")),
    "centosGuest": _none("centosGuest covers CentOS 4 to 7; " + _NO_RELEASE),
    "centos64Guest": _none("centos64Guest covers CentOS 4 to 7; " + _NO_RELEASE),
    "rockylinux_64Guest": _generic(
        "http://rockylinux.org/rocky/unknown", "VMware's rockylinux_64Guest " + _NO_RELEASE
    ),
    "almalinux_64Guest": _generic(
        f"{_LINUX}2020",
        "VMware's almalinux_64Guest " + _NO_RELEASE + "; generic Linux of 2020 used "
        "(osinfo-db has no version-less AlmaLinux id)",
    ),
    "oracleLinux10_64Guest": _generic(
        f"{_LINUX}2024",
        "osinfo-db has no Oracle Linux 10 id yet; generic Linux of 2024 used",
    ),
    "oracleLinux9_64Guest": _exact(f"{_OL}9-unknown", _MINOR),
    "oracleLinux8_64Guest": _exact(f"{_OL}8.0", _MINOR + "; its first release assumed"),
    **_both("oracleLinux7", _exact(f"{_OL}7.0", _MINOR + "; its first release assumed")),
    **_both("oracleLinux6", _exact(f"{_OL}6.0", _MINOR + "; its first release assumed")),
    "oracleLinuxGuest": _none("oracleLinuxGuest covers Oracle Linux 4 and 5; " + _NO_RELEASE),
    "oracleLinux64Guest": _none("oracleLinux64Guest covers Oracle Linux 4 and 5; " + _NO_RELEASE),
    **{
        id_: _generic("http://fedoraproject.org/fedora/unknown", f"VMware's {id_} {_NO_RELEASE}")
        for id_ in ("fedoraGuest", "fedora64Guest")
    },
    "miraclelinux_64Guest": _generic(
        f"{_LINUX}2020", "VMware's miraclelinux_64Guest " + _NO_RELEASE + "; generic Linux used"
    ),
    **{
        id_: _generic(
            "http://asianux.com/asianux/unknown",
            "v2k maps every Asianux guestId to osinfo-db's version-less Asianux id",
        )
        for id_ in (
            "asianux3Guest",
            "asianux3_64Guest",
            "asianux4Guest",
            "asianux4_64Guest",
            "asianux5_64Guest",
            "asianux7_64Guest",
            "asianux8_64Guest",
            "asianux9_64Guest",
        )
    },
    **{
        id_: _none(f"{id_}: osinfo-db has no id for this distribution")
        for id_ in (
            "kylinlinux_64Guest",
            "fusionos_64Guest",
            "prolinux_64Guest",
            "pardus_64Guest",
            "nld9Guest",
            "oesGuest",
            "sjdsGuest",
        )
    },
    # --- Debian and Ubuntu ----------------------------------------------------------
    **{
        id_: _exact(f"{_DEBIAN}{v}")
        for v in range(4, 14)
        for id_ in (f"debian{v}Guest", f"debian{v}_64Guest")
    },
    **{
        id_: _generic(
            f"{_LINUX}2016",
            f"VMware's {id_} {_NO_RELEASE}; osinfo-db has no version-less Ubuntu id, so "
            "the generic Linux of 2016 (Ubuntu 16.04's era) is used",
        )
        for id_ in ("ubuntuGuest", "ubuntu64Guest")
    },
    # --- SUSE -------------------------------------------------------------------------
    "sles16_64Guest": _exact(f"{_SUSE}sles/16-unknown", _MINOR),
    "sles15_64Guest": _exact(f"{_SUSE}sle/15-unknown", _MINOR),
    **_both("sles12", _exact(f"{_SUSE}sles/12-unknown", _MINOR)),
    **_both("sles11", _exact(f"{_SUSE}sles/11", _MINOR + "; its first release assumed")),
    **_both("sles10", _exact(f"{_SUSE}sles/10", _MINOR + "; its first release assumed")),
    "slesGuest": _generic(f"{_SUSE}sle/unknown", "VMware's slesGuest " + _NO_RELEASE),
    "sles64Guest": _generic(f"{_SUSE}sle/unknown", "VMware's sles64Guest " + _NO_RELEASE),
    **{
        id_: _generic("http://opensuse.org/opensuse/unknown", f"VMware's {id_} " + _NO_RELEASE)
        for id_ in ("opensuseGuest", "opensuse64Guest")
    },
    "suseGuest": _none("suseGuest is the old SUSE Linux; v2k does not map it"),
    "suse64Guest": _none("suse64Guest is the old SUSE Linux; v2k does not map it"),
    # --- Other Linux ------------------------------------------------------------------
    "vmwarePhoton64Guest": _generic(
        f"{_LINUX}2016", "osinfo-db has no Photon OS id; generic Linux of 2016 used"
    ),
    "amazonlinux2_64Guest": _generic(
        f"{_LINUX}2016", "osinfo-db has no Amazon Linux id; generic Linux of 2016 used"
    ),
    "amazonlinux3_64Guest": _generic(
        f"{_LINUX}2022", "osinfo-db has no Amazon Linux id; generic Linux of 2022 used"
    ),
    "coreos64Guest": _generic(
        f"{_LINUX}2016", "osinfo-db has no CoreOS id; generic Linux of 2016 used"
    ),
    "flatcar_64Guest": _generic(
        f"{_LINUX}2018", "osinfo-db has no Flatcar id; generic Linux of 2018 used"
    ),
    **{
        f"other7xLinux{bits}Guest": _generic(
            f"{_LINUX}2024", "Linux 7.x of unknown distribution: generic Linux of 2024 used"
        )
        for bits in ("", "64")
    },
    **{
        f"other6xLinux{bits}Guest": _generic(
            f"{_LINUX}2022", "Linux 6.x of unknown distribution: generic Linux of 2022 used"
        )
        for bits in ("", "64")
    },
    **{
        f"other5xLinux{bits}Guest": _generic(
            f"{_LINUX}2018", "Linux 5.x of unknown distribution: generic Linux of 2018 used"
        )
        for bits in ("", "64")
    },
    **{
        f"other4xLinux{bits}Guest": _generic(
            f"{_LINUX}2016", "Linux 4.x of unknown distribution: generic Linux of 2016 used"
        )
        for bits in ("", "64")
    },
    **{
        f"other{kernel}Linux{bits}Guest": _none(
            f"Linux {name} of unknown distribution: osinfo-db has no generic Linux id "
            "that old; virt-v2v's inspection of the disk is needed"
        )
        for kernel, name in (("3x", "3.x"), ("26x", "2.6"), ("24x", "2.4"))
        for bits in ("", "64")
    },
    **{
        id_: _none(
            f"{id_} says only 'Other Linux' (no kernel version, no distribution); "
            "virt-v2v's inspection of the disk is needed"
        )
        for id_ in ("otherLinuxGuest", "otherLinux64Guest", "genericLinuxGuest")
    },
    # --- BSD, Solaris ---------------------------------------------------------------
    **{
        id_: _exact(f"{_FREEBSD}{v}.0", _MINOR + "; its first release assumed")
        for v in (11, 12, 13, 14, 15)
        for id_ in (f"freebsd{v}Guest", f"freebsd{v}_64Guest")
    },
    **{
        id_: _none(f"{id_} {_NO_RELEASE} and osinfo-db has no version-less FreeBSD id")
        for id_ in ("freebsdGuest", "freebsd64Guest")
    },
    **_both("solaris10", _exact("http://sun.com/solaris/10")),
    "solaris11_64Guest": _exact("http://oracle.com/solaris/11"),
    "solaris9Guest": _exact("http://sun.com/solaris/9"),
    # --- Nothing usable ---------------------------------------------------------------
    "otherGuest": _none("otherGuest says only 'Other' (no OS family)"),
    "otherGuest64": _none("otherGuest64 says only 'Other' (no OS family)"),
    **{
        f"vmkernel{v}Guest": _none("a nested ESXi host: osinfo-db has no id for ESXi")
        for v in ("", "5", "6", "65", "7", "8", "9")
    },
}

_FOLDED = {k.lower(): v for k, v in GUEST_IDS.items()}

# VMware families with no osinfo-db entry at all, by guestId prefix.
_NO_OSINFO_PREFIXES = {
    "darwin": "macOS guests have no libosinfo id v2k can use (and do not run on KVM here)",
    "netware": "NetWare has no osinfo-db id",
    "os2": "OS/2 has no osinfo-db id",
    "eComStation": "eComStation has no osinfo-db id",
    "openServer": "SCO OpenServer has no osinfo-db id",
    "unixWare": "UnixWare has no osinfo-db id",
    "solaris": "this Solaris release has no osinfo-db id",
    "turboLinux": "Turbolinux has no osinfo-db id",
    "mandr": "Mandrake/Mandriva guestIds are not mapped by v2k",
    "crx": "a vSphere Pod VM has no guest OS to migrate",
}


def osinfo_for(guest_id: str | None) -> GuestOs:
    """The libosinfo id for a VMware guestId (see the module docstring for the rules).

    Never a placeholder: an unknown or uninformative guestId gives `osinfo_id=None` and
    a note saying why.
    """
    if guest_id is None or not guest_id.strip():
        return GuestOs(
            osinfo_id=None, source="none", note="the VM has no guestId", guest_id=guest_id
        )
    key = guest_id.strip()
    entry = GUEST_IDS.get(key)
    if entry is None:
        # guestIds are case-sensitive in vSphere, but an id typed by hand may not be.
        entry = _FOLDED.get(key.lower())
    if entry is None:
        reason = next(
            (why for prefix, why in _NO_OSINFO_PREFIXES.items() if key.startswith(prefix)),
            f"VMware guestId {key!r} is not in v2k's table",
        )
        return GuestOs(osinfo_id=None, source="none", note=reason, guest_id=guest_id)
    return GuestOs(
        osinfo_id=entry.osinfo_id,
        source="guest-id" if entry.osinfo_id else "none",
        note=entry.note,
        generic=entry.generic,
        guest_id=guest_id,
    )


def choose_osinfo(v2v_osinfo: str | None, guest_id: str | None) -> GuestOs:
    """virt-v2v's inspection when it found the OS, else the VMware guestId table.

    `v2v_osinfo` is the id from virt-v2v's XML (URL form). A short id (`debian11`) is
    turned into its URL form through the installed osinfo-db. The note says when the
    two sources disagree, or why virt-v2v's value was not used.
    """
    table = osinfo_for(guest_id)
    v2v = (v2v_osinfo or "").strip()
    unusable = None
    if v2v and "://" not in v2v:
        full = osinfo_db().short_ids.get(v2v)
        if full is None:
            unusable = f"virt-v2v gave {v2v!r}, which is no libosinfo id or short id"
        v2v = full or ""
    if v2v == "http://libosinfo.org/unknown":
        unusable, v2v = "virt-v2v's inspection did not recognise the OS", ""
    if v2v:
        note = None
        if table.osinfo_id and table.osinfo_id != v2v and not table.generic:
            note = f"VMware's guestId {guest_id!r} suggests {table.osinfo_id}; the disk says {v2v}"
        return GuestOs(osinfo_id=v2v, source="virt-v2v", note=note, guest_id=guest_id)
    reason = unusable or "virt-v2v's inspection gave no libosinfo id"
    detail = f"{reason}; {table.note}" if table.note else reason
    return table.model_copy(update={"note": detail})


@dataclass(frozen=True)
class OsinfoDb:
    """What v2k reads from an osinfo-db directory: its version, ids and short ids."""

    version: str
    ids: frozenset[str]
    short_ids: dict[str, str]


_OS_ID = re.compile(r'<os\s+id="([^"]+)"')
_SHORT_ID = re.compile(r"<short-id>([^<]+)</short-id>")


@functools.lru_cache(maxsize=4)
def osinfo_db(root: Path = OSINFO_DB) -> OsinfoDb:
    """Read the installed osinfo-db (Debian/Ubuntu package `osinfo-db`).

    An absent database gives an empty one (version ""): callers then skip what needs it.
    """
    ids: set[str] = set()
    short: dict[str, str] = {}
    for path in sorted((root / "os").glob("*/*.xml")):
        text = path.read_text(errors="replace")
        for os_block in text.split("<os ")[1:]:
            found = _OS_ID.search("<os " + os_block)
            if not found:
                continue
            ids.add(found.group(1))
            for short_id in _SHORT_ID.findall(os_block.split("</os>")[0]):
                short.setdefault(short_id.strip(), found.group(1))
    version_file = root / "VERSION"
    version = version_file.read_text().strip() if version_file.exists() else ""
    return OsinfoDb(version=version, ids=frozenset(ids), short_ids=short)
