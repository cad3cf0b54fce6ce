"""`python -m testbed up/down`: the test bed in the background, described as JSON."""

import json
import os
import ssl
import subprocess
import sys

import pytest
from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim


@pytest.fixture()
def env(tmp_path):
    return {**os.environ, "V2K_TESTBED_DIR": str(tmp_path / "run")}


def _run(env, *args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "testbed", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _vm_names(vc: dict) -> set[str]:
    si = SmartConnect(
        host=vc["host"],
        port=vc["port"],
        user=vc["user"],
        pwd=vc["password"],
        sslContext=ssl.create_default_context(cafile=vc["ca_cert"]),
    )
    try:
        view = si.content.viewManager.CreateContainerView(
            si.content.rootFolder, [vim.VirtualMachine], True
        )
        return {vm.name for vm in view.view}
    finally:
        Disconnect(si)


def test_up_prints_json_and_down_stops_everything(env):
    up = _run(env, "up", "--hosts", "1", "--esx")
    assert up.returncode == 0, up.stdout + up.stderr
    state = json.loads(up.stdout)
    vc = state["vcenter"]
    try:
        assert vc["datacenter"] == "ha-datacenter"
        host = state["hosts"][0]
        assert os.path.exists(host["key_path"]) and os.path.exists(host["known_hosts"])
        assert "debian-stopped" in _vm_names(vc)
        again = _run(env, "up", "--hosts", "1")
        assert again.returncode == 1 and "already up" in again.stdout
    finally:
        down = _run(env, "down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert not _alive(vc["pid"])
    assert not _alive(state["supervisor_pid"])
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert state["hosts"][0]["netns"] not in namespaces
