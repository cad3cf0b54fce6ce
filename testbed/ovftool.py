"""Stand-in for VMware's ovftool, which is proprietary and cannot be installed here.

It keeps the part of ovftool's command-line contract that v2k uses:

    ovftool --version
    ovftool [--noSSLVerify] [--parallelThreads=N] [--acceptAllEulas] [--X:...]
            vi://USER[:PASSWORD]@HOST[:PORT]/DC/vm/FOLDER/.../VM  TARGET_DIR

It prompts `Password:` on stdout and reads the password from stdin when the locator has
none (once: a refused login ends the run with `Error: Incorrect login credentials` and
`Completed with errors`, exit status 1, as ovftool does), verifies TLS unless
--noSSLVerify (trusting SSL_CERT_FILE like OpenSSL does), and writes TARGET_DIR/VM/VM.ovf,
VM-disk1.vmdk ... and VM.mf, exporting through the vSphere API (ExportVm lease, HTTPS
downloads, OvfManager.CreateDescriptor) as ovftool does. It prints `Disk progress: N%`
lines and `Transfer Completed`. Each call's arguments (never a password) are appended to
$V2K_TESTBED_WORKDIR/ovftool-calls.log so tests can check them.
"""

from __future__ import annotations

import hashlib
import json
import os
import ssl
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import unquote, urlsplit

VERSION = "VMware ovftool 4.6.3 (build-24031167)"


def _fail(message: str) -> int:
    # ovftool ends every failed run this way, its exit status 1.
    print(f"Error: {message}", flush=True)
    print("Completed with errors", flush=True)
    return 1


def _find_vm(si, names: list[str]):
    from pyVmomi import vim

    node = si.content.rootFolder
    for name in names:
        children = node.childEntity if hasattr(node, "childEntity") else []
        if isinstance(node, vim.Datacenter):
            children = [node.vmFolder] if name == "vm" else []
        match = [c for c in children if c.name == name]
        if not match:
            return None
        node = match[0]
    return node if isinstance(node, vim.VirtualMachine) else None


def main(argv: list[str]) -> int:
    if "--version" in argv or "-v" in argv:
        print(VERSION)
        return 0
    options = [a for a in argv if a.startswith("--")]
    positional = [a for a in argv if not a.startswith("--")]
    if len(positional) != 2:
        return _fail("expected a source locator and a target directory")
    source, target = positional
    threads = 1
    for option in options:
        if option.startswith("--parallelThreads="):
            threads = int(option.split("=", 1)[1])
    log_dir = os.environ.get("V2K_TESTBED_WORKDIR")
    if log_dir:
        with open(Path(log_dir) / "ovftool-calls.log", "a") as log:
            log.write(
                json.dumps(
                    {"options": options, "target": target, "source": _without_password(source)}
                )
                + "\n"
            )

    url = urlsplit(source)
    if url.scheme != "vi":
        return _fail(f"unsupported source locator scheme {url.scheme!r}")
    user = unquote(url.username or "")
    password = unquote(url.password) if url.password else None
    if password is None:
        print("Password: ", end="", flush=True)
        password = sys.stdin.readline().rstrip("\n")
    context = ssl.create_default_context()
    if "--noSSLVerify" in options:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE

    from pyVim.connect import Disconnect, SmartConnect
    from pyVmomi import vim

    try:
        si = SmartConnect(
            host=url.hostname, port=url.port or 443, user=user, pwd=password, sslContext=context
        )
    except vim.fault.InvalidLogin:
        # ovftool's words for vCenter's InvalidLogin fault; it asks no second time.
        return _fail("Incorrect login credentials")
    except ssl.SSLError as exc:
        return _fail(f"SSL certificate verification failed: {exc}")
    try:
        names = [unquote(p) for p in url.path.strip("/").split("/")]
        vm = _find_vm(si, names)
        if vm is None:
            return _fail(f"Locator does not refer to an object: {_without_password(source)}")
        return _export(si, vm, Path(target), threads, context, url.hostname, url.port or 443)
    finally:
        Disconnect(si)


def _export(si, vm, target: Path, threads: int, context, host: str, port: int) -> int:
    import httpx
    from pyVmomi import vim

    if vm.runtime.powerState != vim.VirtualMachinePowerState.poweredOff:
        return _fail("The virtual machine must be powered off to be exported")
    name = vm.name.replace("/", "_")
    out = target / name
    out.mkdir(parents=True, exist_ok=True)
    lease = vm.ExportVm()
    while lease.state == vim.HttpNfcLease.State.initializing:
        threading.Event().wait(0.2)
    disks = [d for d in lease.info.deviceUrl if d.disk]
    done = [0] * len(disks)
    lock = threading.Lock()
    cookie = si._stub.cookie

    def fetch(index: int) -> tuple[str, str, int, str]:
        device = disks[index]
        url = device.url.replace("://*", f"://{host}:{port}", 1)
        file_name = f"{name}-disk{index + 1}.vmdk"
        digest = hashlib.sha256()
        with httpx.Client(verify=context, timeout=120, headers={"Cookie": cookie}) as client:
            with client.stream("GET", url) as response, (out / file_name).open("wb") as f:
                response.raise_for_status()
                for chunk in response.iter_bytes(1 << 20):
                    f.write(chunk)
                    digest.update(chunk)
                    with lock:
                        done[index] += len(chunk)
        return device.key, file_name, done[index], digest.hexdigest()

    total = sum(d.fileSize or 0 for d in disks) or 1
    reporter_stop = threading.Event()

    def report() -> None:
        last = -1
        while not reporter_stop.wait(0.5):
            percent = min(99, 100 * sum(done) // total)
            if percent != last:
                print(f"Disk progress: {percent}%", flush=True)
                last = percent

    reporter = threading.Thread(target=report, daemon=True)
    reporter.start()
    try:
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            results = list(pool.map(fetch, range(len(disks))))
    except Exception as exc:  # noqa: BLE001 - reported like ovftool does
        reporter_stop.set()
        lease.HttpNfcLeaseAbort()
        return _fail(f"Transfer failed: {exc}")
    reporter_stop.set()
    params = vim.OvfManager.CreateDescriptorParams(
        name=vm.name,
        ovfFiles=[
            vim.OvfManager.OvfFile(deviceId=key, path=file, size=size)
            for key, file, size, _ in results
        ],
    )
    descriptor = si.content.ovfManager.CreateDescriptor(obj=vm, cdp=params)
    (out / f"{name}.ovf").write_text(descriptor.ovfDescriptor)
    manifest = [f"SHA256({file})= {digest}" for _, file, _, digest in results]
    (out / f"{name}.mf").write_text("\n".join(manifest) + "\n")
    lease.HttpNfcLeaseComplete()
    print("Disk progress: 100%", flush=True)
    print("Transfer Completed", flush=True)
    return 0


def _without_password(locator: str) -> str:
    url = urlsplit(locator)
    if url.password:
        return locator.replace(f":{url.password}@", ":***@", 1)
    return locator


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
