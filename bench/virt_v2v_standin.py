"""Stand-in for virt-v2v, for the orchestration benchmark only (bench/orchestration.py).

Why: the benchmark measures what v2k itself costs around a migration (Prefect runs, API
calls, block loads, SSH sessions, checks), not the conversion. Its VMs have 1 MiB
synthetic disks without an operating system, which real virt-v2v refuses (its inspection
finds no root file system), so the bench's KVM hosts get this program first on their
PATH instead. Its time still counts as external time (the convert command), as real
virt-v2v's would. It is never installed by the test bed or used by the tests.

It keeps the part of virt-v2v's contract that v2k relies on:

    virt-v2v --version
    virt-v2v [--root first] -i ova DIR -o local -os OUT -of qcow2 -on NAME
             [--machine-readable[=fd:N]] [-b SRC:DST]... [-v] [-x]

It reads the OVF descriptor in DIR for the disk files in order (every *.vmdk in name
order when there is no descriptor), writes OUT/NAME-sda, NAME-sdb... with
`qemu-img convert -O qcow2`, and OUT/NAME.xml, a libvirt domain like the one virt-v2v
writes (disks on virtio, NICs with the virtio model, no libosinfo id: there was no
inspection, so v2k falls back on the guestId). With --machine-readable it prints
virt-v2v's step messages as JSON lines on fd N (stdout by default), as virt-v2v 2.x does.

Standard library only: it runs as `python -I -S` on the host, without v2k's packages.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

VERSION = "virt-v2v 2.2.0 (v2k bench stand-in: copies disks, no conversion)"
OVF = "{http://schemas.dmtf.org/ovf/envelope/1}"
RASD = "{http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData}"
# virt-v2v's own step messages (tasks.convert.STEPS), which v2k turns into progress.
STEPS = [
    "Setting up the source: -i ova {src}",
    "Opening the source",
    "Inspecting the source",
    "Checking for sufficient free disk space in the guest",
    "Converting the guest (stand-in: nothing to convert)",
    "Mapping filesystem data to avoid copying unused and blank areas",
    "Closing the overlay",
    "Assigning disks to buses",
    "Checking if the guest needs BIOS or UEFI to boot",
    "Setting up the destination: -o local -os {out}",
    "Copying disk {n}/{count}",
    "Creating output metadata",
    "Finishing off",
]


class Events:
    """virt-v2v's --machine-readable output: one JSON object per line on a file descriptor."""

    def __init__(self, fd: int | None) -> None:
        self.stream = os.fdopen(fd, "w", buffering=1, closefd=False) if fd is not None else None

    def send(self, kind: str, message: str) -> None:
        if self.stream is not None:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            event = {"message": message, "timestamp": stamp, "type": kind}
            self.stream.write(json.dumps(event) + "\n")
        print(f"[{kind}] {message}", file=sys.stderr)


def parse_args(argv: list[str]) -> dict[str, object]:
    """The options v2k passes, by name; anything else is refused like virt-v2v does."""
    opts: dict[str, object] = {"fd": None, "bridges": []}
    takes_value = {"-i": "input", "-o": "output", "-os": "out", "-of": "format", "-on": "name"}
    positional: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in takes_value:
            opts[takes_value[arg]] = argv[i + 1]
            i += 2
            continue
        if arg in ("--root", "-b"):
            if arg == "-b":
                opts["bridges"].append(argv[i + 1])  # type: ignore[union-attr]
            i += 2
            continue
        if arg == "--machine-readable":
            opts["fd"] = 1
        elif arg.startswith("--machine-readable=fd:"):
            opts["fd"] = int(arg.split(":", 1)[1])
        elif arg in ("-v", "-x"):
            pass
        elif arg.startswith("-"):
            raise SystemExit(f"virt-v2v: error: unknown option {arg}")
        else:
            positional.append(arg)
        i += 1
    if len(positional) != 1:
        raise SystemExit("virt-v2v: error: expected one input (-i ova DIR)")
    opts["source"] = positional[0]
    return opts


def disk_files(source: Path) -> tuple[list[Path], int]:
    """The disk files in the OVF's order, and the number of NICs it declares."""
    descriptors = sorted(source.glob("*.ovf"))
    if not descriptors:
        return sorted(source.glob("*.vmdk")), 0
    root = ET.parse(descriptors[0]).getroot()
    hrefs = {
        f.get(f"{OVF}id"): f.get(f"{OVF}href") for f in root.iter(f"{OVF}File") if f.get(f"{OVF}id")
    }
    disks = [
        source / hrefs[d.get(f"{OVF}fileRef")]
        for d in root.iter(f"{OVF}Disk")
        if d.get(f"{OVF}fileRef") in hrefs
    ]
    nics = sum(1 for r in root.iter(f"{RASD}ResourceType") if (r.text or "").strip() == "10")
    return disks or sorted(source.glob("*.vmdk")), nics


def domain_xml(name: str, disks: list[Path], nics: int) -> str:
    """The libvirt XML virt-v2v writes with -o local (the parts v2k reads)."""
    dom = ET.Element("domain", type="kvm")
    ET.SubElement(dom, "name").text = name
    ET.SubElement(dom, "memory", unit="KiB").text = "1048576"
    ET.SubElement(dom, "vcpu").text = "1"
    os_el = ET.SubElement(dom, "os")
    ET.SubElement(os_el, "type", arch="x86_64", machine="q35").text = "hvm"
    devices = ET.SubElement(dom, "devices")
    for index, disk in enumerate(disks):
        el = ET.SubElement(devices, "disk", type="file", device="disk")
        ET.SubElement(el, "driver", name="qemu", type="qcow2")
        ET.SubElement(el, "source", file=str(disk))
        ET.SubElement(el, "target", dev=f"vd{chr(ord('a') + index)}", bus="virtio")
    for _ in range(nics):
        el = ET.SubElement(devices, "interface", type="network")
        ET.SubElement(el, "source", network="default")
        ET.SubElement(el, "model", type="virtio")
    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode") + "\n"


def main(argv: list[str]) -> int:
    if "--version" in argv or "-V" in argv:
        print(VERSION)
        return 0
    opts = parse_args(argv)
    events = Events(opts["fd"])  # type: ignore[arg-type]
    if opts.get("input") != "ova" or opts.get("output") != "local" or "out" not in opts:
        events.send("error", "the stand-in only does -i ova DIR -o local -os OUT")
        return 1
    source, out = Path(str(opts["source"])), Path(str(opts["out"]))
    name = str(opts.get("name") or source.name)
    disks, nics = disk_files(source)
    if not disks:
        events.send("error", f"no disk in {source}")
        return 1
    made = []
    for step in STEPS:
        if step.startswith("Copying disk"):
            for n, disk in enumerate(disks, 1):
                events.send("message", step.format(n=n, count=len(disks)))
                target = out / f"{name}-sd{chr(ord('a') + n - 1)}"
                done = subprocess.run(
                    ["qemu-img", "convert", "-O", str(opts.get("format", "qcow2"))]
                    + [str(disk.resolve()), str(target.resolve())],
                    capture_output=True,
                    text=True,
                )
                if done.returncode:
                    events.send("error", f"qemu-img convert {disk.name}: {done.stderr.strip()}")
                    return 1
                made.append(target)
            continue
        events.send("message", step.format(src=source, out=out))
    (out / f"{name}.xml").write_text(domain_xml(name, made, nics))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
