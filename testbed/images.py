"""Guest disk images for the test bed.

- `debian_guest()` builds, once, a real small Debian 12 guest (BIOS, grub, serial console)
  as a streamOptimized VMDK and caches it under `cache_dir()/images/`.
- `synthetic_vmdk()` writes tiny deterministic VMDKs for fast tests.
- `vmdk_info()` reads `qemu-img info`.

Run `python -m testbed.images` to build (or find) the Debian guest and print its path.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import random
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from testbed.paths import cache_dir

log = logging.getLogger("testbed.images")

MiB = 1024 * 1024

SUBFORMATS = ("streamOptimized", "monolithicSparse", "monolithicFlat")

# ---------------------------------------------------------------------------------------
# The recipe of the Debian guest. Any change here changes the cache key, so the image is
# rebuilt. Bump RECIPE_VERSION when a step changes in a way the data below does not show.
# ---------------------------------------------------------------------------------------
RECIPE_VERSION = "1"
DEBIAN_SUITE = "bookworm"
DEBIAN_PACKAGES = ("linux-image-amd64", "grub-pc", "systemd-sysv", "udev", "ifupdown")
HOSTNAME = "v2k-debian"
FS_LABEL = "rootfs"
IMAGE_SIZE = "1G"
KERNEL_CMDLINE = "console=tty0 console=ttyS0,115200n8"
INITRAMFS_MODULES = (
    "virtio_pci",
    "virtio_blk",
    "virtio_scsi",
    "virtio_net",
    "ext4",
    "sd_mod",
    "ata_piix",
)
# Module trees dropped from the kernel (relative to /lib/modules/KVER/kernel).
TRIM_MODULE_DIRS = (
    "sound",
    "drivers/gpu",
    "drivers/media",
    "drivers/net/wireless",
    "drivers/infiniband",
    "drivers/staging",
    "drivers/bluetooth",
    "drivers/iio",
    "drivers/isdn",
    "net/wireless",
    "net/mac80211",
    "net/bluetooth",
)
# Paths (relative to the root) emptied to keep the image small.
TRIM_PATHS = (
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "usr/share/lintian",
    "var/cache/apt",
    "var/lib/apt/lists",
    "var/log",
)

LIBGUESTFS_ENV = {"LIBGUESTFS_BACKEND": "direct", "LIBGUESTFS_BACKEND_SETTINGS": "force_tcg"}


def debian_recipe() -> dict:
    """Everything that defines the Debian guest; its hash names the cache directory."""
    return {
        "version": RECIPE_VERSION,
        "suite": DEBIAN_SUITE,
        "variant": "minbase",
        "packages": list(DEBIAN_PACKAGES),
        "hostname": HOSTNAME,
        "fs_label": FS_LABEL,
        "fs_type": "ext4",
        "partition": "mbr",
        "size": IMAGE_SIZE,
        "kernel_cmdline": KERNEL_CMDLINE,
        "serial_getty": "ttyS0",
        "initramfs_modules": list(INITRAMFS_MODULES),
        "trim_module_dirs": list(TRIM_MODULE_DIRS),
        "trim_paths": list(TRIM_PATHS),
        "grub_target": "i386-pc",
        "vmdk_subformat": "streamOptimized",
    }


def recipe_hash(recipe: dict | None = None) -> str:
    blob = json.dumps(recipe or debian_recipe(), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def debian_guest_dir() -> Path:
    """The cache directory of the current recipe (it may not exist yet)."""
    return cache_dir() / "images" / f"debian-{recipe_hash()}"


def apt_mirror() -> str:
    """The Debian mirror apt is configured with (deb822 `URIs:` or a `deb` line)."""
    candidates: list[Path] = sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))
    candidates += [Path("/etc/apt/sources.list")]
    candidates += sorted(Path("/etc/apt/sources.list.d").glob("*.list"))
    for path in candidates:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = _deb822_fields(stanza)
                if "deb" not in fields.get("types", "").split():
                    continue
                if DEBIAN_SUITE not in fields.get("suites", "").split():
                    continue
                for uri in fields.get("uris", "").split():
                    return uri
        else:
            for line in text.splitlines():
                parts = line.split("#", 1)[0].split()
                if len(parts) >= 3 and parts[0] == "deb":
                    rest = [p for p in parts[1:] if not p.startswith("[")]
                    if len(rest) >= 2 and rest[1] == DEBIAN_SUITE:
                        return rest[0]
    raise RuntimeError(f"no Debian mirror for {DEBIAN_SUITE} found in /etc/apt sources")


def _deb822_fields(stanza: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    key = None
    for line in stanza.splitlines():
        if line.startswith("#"):
            continue
        if line[:1] in (" ", "\t") and key:
            fields[key] += " " + line.strip()
            continue
        if ":" in line:
            key, value = line.split(":", 1)
            key = key.strip().lower()
            fields[key] = value.strip()
    return fields


# ---------------------------------------------------------------------------------------
# Debian guest
# ---------------------------------------------------------------------------------------


def debian_guest(*, rebuild: bool = False) -> Path:
    """Path of the cached streamOptimized VMDK of the real Debian guest; build it if needed.

    The first build takes a few minutes (debootstrap, then libguestfs under TCG). A lock
    file keeps two processes from building at once; the build happens in a temporary
    directory renamed into place at the end, so a broken build never looks finished.
    """
    final = debian_guest_dir()
    vmdk = final / "guest.vmdk"
    if not rebuild and _is_complete(final):
        return vmdk
    final.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(final.parent / f"{final.name}.lock"):
        if rebuild and final.exists():
            shutil.rmtree(final)
        if _is_complete(final):
            return vmdk
        if final.exists():  # left over by something else; never trust it
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.build-", dir=final.parent))
        try:
            _build_debian(tmp)
            tmp.chmod(0o755)
            os.rename(tmp, final)
            log.info("debian guest ready: %s", vmdk)
        finally:
            if tmp.exists():
                _remove_tree(tmp)
    return vmdk


def _mounts_below(path: Path) -> list[str]:
    prefix = str(path.resolve()).rstrip("/") + "/"
    found = []
    with open("/proc/self/mounts") as fh:
        for line in fh:
            target = line.split()[1].replace("\\040", " ")
            if target.startswith(prefix):
                found.append(target)
    return found


def _remove_tree(path: Path) -> None:
    """rmtree that first unmounts what a broken debootstrap may have left mounted below
    (proc, sys, a bind-mounted /dev), and refuses to delete through a mount."""
    for target in sorted(_mounts_below(path), key=len, reverse=True):
        subprocess.run(["umount", "-l", target], check=False, timeout=30)
    left = _mounts_below(path)
    if left:
        log.error("not removing %s: still mounted below it: %s", path, left)
        return
    shutil.rmtree(path, ignore_errors=True)


def debian_guest_meta() -> dict:
    """`meta.json` of the cached Debian guest (builds it if needed)."""
    return json.loads((debian_guest().parent / "meta.json").read_text())


def _is_complete(path: Path) -> bool:
    return (path / "guest.vmdk").is_file() and (path / "meta.json").is_file()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process building %s", path.stem)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def raw_to_vmdk(raw: Path, dest: Path, subformat: str, *, timeout: float) -> None:
    """Convert a raw image into a VMDK of the given subformat with qemu-img."""
    argv = ["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", f"subformat={subformat}"]
    _run([*argv, str(raw), str(dest)], timeout=timeout)


def _run(argv: list[str], *, env: dict | None = None, timeout: float = 1800) -> str:
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    proc = subprocess.run(
        argv,
        env=full_env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        timeout=timeout,
    )
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-40:])
        raise RuntimeError(f"{argv[0]} failed with exit code {proc.returncode}:\n{tail}")
    return proc.stdout


@contextlib.contextmanager
def _step(name: str, timings: dict) -> Iterator[None]:
    log.info("debian guest: %s ...", name)
    start = time.monotonic()
    yield
    seconds = round(time.monotonic() - start, 1)
    timings[name] = seconds
    log.info("debian guest: %s done in %.1f s", name, seconds)


def _build_debian(work: Path) -> None:
    started = time.monotonic()
    timings: dict[str, float] = {}
    root = work / "root"
    img = work / "guest.img"
    vmdk = work / "guest.vmdk"
    mirror = apt_mirror()

    with _step("debootstrap", timings):
        _run(
            [
                "debootstrap",
                "--variant=minbase",
                "--include=" + ",".join(DEBIAN_PACKAGES),
                DEBIAN_SUITE,
                str(root),
                mirror,
            ],
            timeout=1800,
        )

    with _step("configure and trim", timings):
        kver = _configure_root(root)

    with _step("virt-make-fs", timings):
        _run(
            [
                "virt-make-fs",
                "--format=raw",
                "--type=ext4",
                f"--label={FS_LABEL}",
                "--partition=mbr",
                f"--size={IMAGE_SIZE}",
                str(root),
                str(img),
            ],
            env=LIBGUESTFS_ENV,
        )
        _remove_tree(root)

    with _step("grub-install", timings):
        _run(
            [
                "virt-customize",
                "--no-network",
                "-a",
                str(img),
                "--run-command",
                "grub-install --target=i386-pc /dev/sda && update-grub",
            ],
            env=LIBGUESTFS_ENV,
        )

    with _step("qemu-img convert", timings):
        raw_to_vmdk(img, vmdk, "streamOptimized", timeout=1800)
        img.unlink()

    info = vmdk_info(vmdk)
    meta = {
        "recipe_hash": recipe_hash(),
        "recipe": debian_recipe(),
        "mirror": mirror,
        "kernel": kver,
        "virtual_size": info["virtual-size"],
        "file_size": vmdk.stat().st_size,
        "sha256": sha256_file(vmdk),
        "build_seconds": round(time.monotonic() - started, 1),
        "step_seconds": timings,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (work / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    log.info(
        "debian guest built in %.0f s (%d MB)",
        meta["build_seconds"],
        meta["file_size"] // 1_000_000,
    )


def _configure_root(root: Path) -> str:
    """Trim the debootstrapped tree and set it up to boot on a serial console."""
    kernels = sorted((root / "lib" / "modules").iterdir())
    if len(kernels) != 1:
        raise RuntimeError(f"expected one kernel in the guest, found {kernels}")
    kver = kernels[0].name

    for rel in TRIM_MODULE_DIRS:
        shutil.rmtree(kernels[0] / "kernel" / rel, ignore_errors=True)
    for rel in TRIM_PATHS:
        base = root / rel
        if base.is_dir():
            for child in base.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
    (root / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)
    (root / "var/lib/apt/lists/partial").mkdir(parents=True, exist_ok=True)

    (root / "etc/fstab").write_text(f"LABEL={FS_LABEL} / ext4 errors=remount-ro 0 1\n")
    (root / "etc/hostname").write_text(HOSTNAME + "\n")
    (root / "etc/hosts").write_text(f"127.0.0.1\tlocalhost\n127.0.1.1\t{HOSTNAME}\n")
    (root / "etc/network/interfaces").write_text(
        "source /etc/network/interfaces.d/*\n\nauto lo\niface lo inet loopback\n"
    )

    grub_default = root / "etc/default/grub"
    text = grub_default.read_text() if grub_default.exists() else ""
    settings = {
        "GRUB_TIMEOUT": "1",
        "GRUB_CMDLINE_LINUX_DEFAULT": '""',
        "GRUB_CMDLINE_LINUX": f'"{KERNEL_CMDLINE}"',
        "GRUB_TERMINAL": '"console serial"',
        "GRUB_SERIAL_COMMAND": '"serial --unit=0 --speed=115200"',
    }
    lines = [ln for ln in text.splitlines() if ln.split("=", 1)[0].strip() not in settings]
    lines += [f"{k}={v}" for k, v in settings.items()]
    grub_default.parent.mkdir(parents=True, exist_ok=True)
    grub_default.write_text("\n".join(lines) + "\n")

    # A login prompt on the serial console, whatever the kernel command line says.
    wants = root / "etc/systemd/system/getty.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    link = wants / "serial-getty@ttyS0.service"
    if not link.is_symlink():
        link.symlink_to("/lib/systemd/system/serial-getty@.service")

    conf = root / "etc/initramfs-tools/conf.d"
    conf.mkdir(parents=True, exist_ok=True)
    (conf / "v2k-small.conf").write_text("MODULES=list\nCOMPRESS=gzip\n")
    (root / "etc/initramfs-tools/modules").write_text("\n".join(INITRAMFS_MODULES) + "\n")

    _run(["chroot", str(root), "depmod", "-a", kver])
    with _proc_mounted(root):
        _run(["chroot", str(root), "update-initramfs", "-u", "-k", kver])
    return kver


@contextlib.contextmanager
def _proc_mounted(root: Path) -> Iterator[None]:
    target = root / "proc"
    target.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "proc", "proc", str(target)], check=True, timeout=30)
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False, timeout=30)


# ---------------------------------------------------------------------------------------
# Synthetic disks
# ---------------------------------------------------------------------------------------


def default_fill(size_bytes: int) -> int:
    return min(size_bytes, 4 * MiB)


def synthetic_raw(
    dest: Path, size_bytes: int, seed: int = 0, fill_bytes: int | None = None
) -> Path:
    """A sparse raw file of `size_bytes` whose first `fill_bytes` are random bytes from `seed`."""
    if size_bytes <= 0 or size_bytes % 512:
        raise ValueError(f"size_bytes must be a positive multiple of 512, got {size_bytes}")
    fill = default_fill(size_bytes) if fill_bytes is None else fill_bytes
    if not 0 <= fill <= size_bytes:
        raise ValueError(f"fill_bytes must be between 0 and {size_bytes}, got {fill}")
    rng = random.Random(seed)
    dest = Path(dest)
    with open(dest, "wb") as fh:
        left = fill
        while left:
            n = min(left, MiB)
            fh.write(rng.randbytes(n))
            left -= n
        fh.truncate(size_bytes)
    return dest


def synthetic_vmdk(
    dest: Path,
    size_bytes: int,
    subformat: str = "streamOptimized",
    seed: int = 0,
    fill_bytes: int | None = None,
) -> list[Path]:
    """Write a small deterministic VMDK at `dest`; return every file made.

    The first `fill_bytes` (default: up to 4 MiB) hold random bytes from `seed`, the rest
    is zero. `monolithicFlat` makes `dest` (descriptor) plus `<stem>-flat.vmdk`.
    """
    if subformat not in SUBFORMATS:
        raise ValueError(f"subformat must be one of {SUBFORMATS}, got {subformat!r}")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".synthetic-", dir=dest.parent) as tmp:
        raw = synthetic_raw(Path(tmp) / "disk.raw", size_bytes, seed, fill_bytes)
        for old in (dest, flat_extent_path(dest)):
            old.unlink(missing_ok=True)
        raw_to_vmdk(raw, dest, subformat, timeout=300)
    files = [dest]
    if subformat == "monolithicFlat":
        files.append(flat_extent_path(dest))
    return files


def flat_extent_path(descriptor: Path) -> Path:
    """`X.vmdk` -> `X-flat.vmdk` (the name qemu-img and VMware give a flat extent)."""
    descriptor = Path(descriptor)
    return descriptor.with_name(descriptor.stem + "-flat.vmdk")


def vmdk_info(path: Path) -> dict:
    """`qemu-img info --output=json` of an image (virtual-size, format-specific, ...)."""
    out = subprocess.run(
        ["qemu-img", "info", "--output=json", str(path)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    return json.loads(out)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(4 * MiB), b""):
            digest.update(chunk)
    return digest.hexdigest()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    print(debian_guest())
