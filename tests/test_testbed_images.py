"""Guest images of the test bed: synthetic VMDKs (fast) and the real Debian guest (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from testbed import images

MiB = 1024 * 1024


def _compare(a, b, fmt_a: str = "raw") -> subprocess.CompletedProcess:
    return subprocess.run(
        ["qemu-img", "compare", "-f", fmt_a, "-F", "vmdk", str(a), str(b)],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("subformat", images.SUBFORMATS)
def test_synthetic_vmdk_matches_its_raw_source(tmp_path, subformat):
    size = 24 * MiB
    dest = tmp_path / "disk.vmdk"
    files = images.synthetic_vmdk(dest, size, subformat, seed=7, fill_bytes=3 * MiB + 512)

    expected = [dest] + ([tmp_path / "disk-flat.vmdk"] if subformat == "monolithicFlat" else [])
    assert files == expected
    assert all(f.is_file() for f in files)

    info = images.vmdk_info(dest)
    assert info["format"] == "vmdk"
    assert info["virtual-size"] == size
    assert info["format-specific"]["data"]["create-type"] == subformat

    raw = images.synthetic_raw(tmp_path / "src.raw", size, seed=7, fill_bytes=3 * MiB + 512)
    result = _compare(raw, dest)
    assert result.returncode == 0, result.stdout + result.stderr
    # no temporary files left next to the result
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f.name for f in files] + ["src.raw"]
    )


def test_synthetic_data_depends_on_the_seed(tmp_path):
    a = images.synthetic_raw(tmp_path / "a.raw", 2 * MiB, seed=1)
    b = images.synthetic_raw(tmp_path / "b.raw", 2 * MiB, seed=1)
    c = images.synthetic_raw(tmp_path / "c.raw", 2 * MiB, seed=2)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    assert a.read_bytes()[:16] != bytes(16)


def test_synthetic_default_fill_and_zero_tail(tmp_path):
    raw = images.synthetic_raw(tmp_path / "d.raw", 8 * MiB, seed=3)
    data = raw.read_bytes()
    assert len(data) == 8 * MiB
    assert data[4 * MiB :] == bytes(4 * MiB)
    assert data[4 * MiB - 64 : 4 * MiB] != bytes(64)


def test_stream_optimized_is_small(tmp_path):
    dest = tmp_path / "big.vmdk"
    images.synthetic_vmdk(dest, 1024 * MiB, seed=0, fill_bytes=MiB)
    assert images.vmdk_info(dest)["virtual-size"] == 1024 * MiB
    assert dest.stat().st_size < 3 * MiB


def test_synthetic_vmdk_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="multiple of 512"):
        images.synthetic_vmdk(tmp_path / "x.vmdk", 1000)
    with pytest.raises(ValueError, match="subformat"):
        images.synthetic_vmdk(tmp_path / "x.vmdk", MiB, subformat="twoGbMaxExtentSparse")
    with pytest.raises(ValueError, match="fill_bytes"):
        images.synthetic_vmdk(tmp_path / "x.vmdk", MiB, fill_bytes=2 * MiB)


def test_recipe_hash_follows_the_recipe(monkeypatch):
    before = images.recipe_hash()
    monkeypatch.setattr(images, "DEBIAN_PACKAGES", images.DEBIAN_PACKAGES + ("openssh-server",))
    assert images.recipe_hash() != before
    assert images.debian_guest_dir().name == f"debian-{images.recipe_hash()}"


def test_apt_mirror_is_configured():
    mirror = images.apt_mirror()
    assert mirror.startswith(("http://", "https://", "file:"))


@pytest.mark.slow
def test_debian_guest_builds_with_grub_and_kernel():
    vmdk = images.debian_guest()  # minutes the first time, then cached
    assert vmdk.name == "guest.vmdk" and vmdk.is_file()
    assert sorted(p.name for p in vmdk.parent.iterdir()) == ["guest.vmdk", "meta.json"]

    info = images.vmdk_info(vmdk)
    assert info["format-specific"]["data"]["create-type"] == "streamOptimized"
    assert info["virtual-size"] == 1024 * MiB

    meta = json.loads((vmdk.parent / "meta.json").read_text())
    assert meta["virtual_size"] == info["virtual-size"]
    assert meta["sha256"] == images.sha256_file(vmdk)
    assert meta["build_seconds"] > 0
    assert images.debian_guest() == vmdk  # cached: same path, no rebuild

    env = dict(os.environ, **images.LIBGUESTFS_ENV)
    script = "\n".join(
        [
            "is-file /boot/grub/grub.cfg",
            "is-file /boot/grub/i386-pc/core.img",
            "glob is-file /boot/vmlinuz-*",
            "glob is-file /boot/initrd.img-*",
            "is-symlink /etc/systemd/system/getty.target.wants/serial-getty@ttyS0.service",
            "cat /etc/fstab",
            "cat /etc/hostname",
            "cat /etc/initramfs-tools/conf.d/v2k-small.conf",
            "cat /boot/grub/grub.cfg",
        ]
    )
    out = subprocess.run(
        ["guestfish", "--ro", "-a", str(vmdk), "-i"],
        input=script,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout
    assert lines.split("LABEL=rootfs")[0].split() == ["true"] * 5, lines[:500]
    assert "LABEL=rootfs / ext4" in lines
    assert images.HOSTNAME in lines
    assert "MODULES=list" in lines
    assert "console=ttyS0" in lines and "/boot/vmlinuz-" in lines


def _fake_build(calls: list, fail: bool = False):
    def build(work):
        calls.append(work)
        time.sleep(0.2)
        (work / "guest.vmdk").write_bytes(b"not really a vmdk")
        if fail:
            raise RuntimeError("debootstrap broke")
        (work / "meta.json").write_text("{}")

    return build


def test_debian_guest_cache_is_atomic_and_locked(tmp_path, monkeypatch):
    monkeypatch.setenv("V2K_CACHE", str(tmp_path))
    calls: list = []
    monkeypatch.setattr(images, "_build_debian", _fake_build(calls, fail=True))
    with pytest.raises(RuntimeError, match="debootstrap broke"):
        images.debian_guest()
    final = images.debian_guest_dir()
    assert not final.exists()  # a broken build never looks done
    assert [p.name for p in final.parent.iterdir()] == [f"{final.name}.lock"]

    calls.clear()
    monkeypatch.setattr(images, "_build_debian", _fake_build(calls))
    with ThreadPoolExecutor(3) as pool:
        paths = list(pool.map(lambda _: images.debian_guest(), range(3)))
    assert paths == [final / "guest.vmdk"] * 3
    assert len(calls) == 1  # one build, the others waited for it
    assert sorted(p.name for p in final.iterdir()) == ["guest.vmdk", "meta.json"]

    images.debian_guest(rebuild=True)
    assert len(calls) == 2


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount")
def test_remove_tree_unmounts_first(tmp_path):
    inner = tmp_path / "root" / "proc"
    inner.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(inner)], check=True)
    (inner / "keep").write_text("x")
    images._remove_tree(tmp_path / "root")
    assert not (tmp_path / "root").exists()
    assert images._mounts_below(tmp_path) == []
