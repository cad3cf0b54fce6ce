"""virt-v2v command lines and progress events: quoting, timeout wrapper, event parsing."""

import shlex
import subprocess

import pytest

from tasks.convert import EventStream, step_percent, virt_v2v_argv, wrapped_command
from tasks.hosts import timed_out
from tasks.models import libvirt_name

HOSTILE = ["a b", "it's", "x;rm -rf /", "$(touch /tmp/pwned)", "`id`", "../../etc", "Ünïcødé"]


def test_argv_follows_cloudstack_contract():
    argv = virt_v2v_argv("/tmp/x/export", "/tmp/x/out", "web-01", verbose=False)
    assert argv[:2] == ["virt-v2v", "--root"]
    joined = " ".join(argv)
    for part in (
        "--root first",
        "-i ova /tmp/x/export",
        "-o local",
        "-os /tmp/x/out",
        "-of qcow2",
        "-on web-01",
        "--machine-readable=fd:3",
    ):
        assert part in joined
    assert "-v" not in argv
    verbose = virt_v2v_argv("/e", "/o", "n", verbose=True)
    assert verbose[-2:] == ["-v", "-x"]


def test_wrapped_command_runs_argv_literally_and_reports_on_fd3(tmp_path):
    # A real shell runs the wrapper around a command that echoes its argv as events.
    marker = tmp_path / "pwned"
    script = tmp_path / "fake-v2v"
    script.write_text(
        "#!/bin/sh\n"
        'for a in "$@"; do printf \'{"type":"message","message":"%s"}\\n\' "$a" >&3; done\n'
        "echo to-log\n"
    )
    script.chmod(0o755)
    argv = [str(script), *[h.replace("/tmp/pwned", str(marker)) for h in HOSTILE]]
    command = wrapped_command(
        argv,
        log_file=str(tmp_path / "log"),
        pid_file=str(tmp_path / "pid"),
        timeout_seconds=30,
        env={"A": "b c"},
    )
    out = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=60)
    events = []
    sink = EventStream(events.append)
    sink.write(out.stdout)
    assert out.returncode == 0, out.stderr
    assert [e["message"] for e in events] == argv[1:]
    assert not marker.exists()
    assert (tmp_path / "log").read_text() == "to-log\n"
    assert (tmp_path / "pid").read_text().strip().isdigit()


def test_wrapped_command_kills_at_timeout(tmp_path):
    command = wrapped_command(
        ["sleep", "30"],
        log_file=str(tmp_path / "log"),
        pid_file=str(tmp_path / "pid"),
        timeout_seconds=1,
        env={},
    )
    out = subprocess.run(command, shell=True, capture_output=True, timeout=60)
    assert out.returncode == 124


def test_event_stream_splits_chunks_into_lines():
    seen = []
    sink = EventStream(seen.append)
    sink.write('{"type":"message","mess')
    sink.write('age":"Copying disk 1/2"}\n{"type":"warn')
    sink.write('ing","message":"w"}\nplain text\n')
    assert [e["type"] for e in seen] == ["message", "warning", "message"]
    assert seen[2]["message"] == "plain text"


def test_step_percent_orders_steps():
    assert step_percent("Setting up the source: -i ova") == 0
    assert 0 < step_percent("Inspecting the source") < step_percent("Copying disk 1/1") < 100
    assert step_percent("something else") is None


def test_libvirt_name_is_safe_for_any_vm_name():
    for name in HOSTILE + ["-rf", ".hidden", "", "web 01"]:
        safe = libvirt_name(name) if name else libvirt_name("x")
        assert safe and safe[0] not in ".-" and "/" not in safe
        assert shlex.quote(safe) == safe
    assert libvirt_name("web 01") == "web-01"


@pytest.mark.parametrize(
    ("exited", "elapsed", "expected"),
    [
        (124, 5.0, True),  # timeout's own TERM
        (137, 60.0, True),  # timeout's KILL after --kill-after: the time was up
        (137, 5.0, False),  # KILL from someone on the host, early
        (1, 60.0, False),
        (0, 60.0, False),
    ],
)
def test_timed_out_tells_the_time_limit_from_a_kill_on_the_host(exited, elapsed, expected):
    assert timed_out(exited, elapsed, timeout_seconds=60) is expected
