#!/usr/bin/env bash
# One idempotent set-up for a Debian 12 machine: the Debian packages of the test bed,
# the project's virtualenv, and the vCenter simulator binary. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  golang-go golang-github-vmware-govmomi-dev
  virt-v2v libguestfs-tools nbdkit libnbd-bin linux-image-amd64 qemu-utils qemu-system-x86
  libvirt-daemon-system libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev
  pkg-config openssh-server iproute2 dnsmasq-base debootstrap ovmf osinfo-db
  chromium fonts-dejavu-core procps curl postgresql
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

PY=${PYTHON:-python3}
stamp=.venv/.v2k-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing v2k into .venv"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[test]'
  echo "$want" > "$stamp"
fi

echo "setup: building the vCenter simulator"
.venv/bin/python -m testbed build
echo "setup: done"
