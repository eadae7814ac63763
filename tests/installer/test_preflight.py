"""`imcloud check`: parsing and decisions on recorded host output, and a real unreachable host."""

from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

from installer.cli import app
from installer.core import preflight
from installer.core.cloud import Host, init_cloud
from installer.core.config import parse_config

runner = CliRunner()

OS_RELEASE = """PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"
NAME="Debian GNU/Linux"
VERSION_ID="12"
VERSION="12 (bookworm)"
ID=debian
"""
UBUNTU = 'PRETTY_NAME="Ubuntu 22.04.4 LTS"\nID=ubuntu\nVERSION_ID="22.04"\n'
MEMINFO = "MemTotal:        2014088 kB\nMemFree:          123456 kB\n"
DF = (
    "Filesystem     1024-blocks     Used Available Capacity Mounted on\n"
    "/dev/vda1        41152736  3000000  36000000       8% /\n"
)
SS = (
    'LISTEN 0      128          0.0.0.0:22        0.0.0.0:* users:(("sshd",pid=501,fd=3))\n'
    'LISTEN 0      511          0.0.0.0:80        0.0.0.0:* users:(("nginx",pid=7,fd=6),'
    '("nginx",pid=8,fd=6))\n'
    'LISTEN 0      511             [::]:443          [::]:* users:(("apache2",pid=9,fd=4))\n'
    "LISTEN 0      244     10.0.0.5%eth0:5432     0.0.0.0:*\n"
)

HOST = Host(
    name="one",
    address="192.0.2.5",
    internal_address="192.0.2.5",
    user="root",
    port=22,
    private_key_file=None,
    roles=("lb", "app", "db", "cache", "monitoring"),
)


def _sections(**overrides: str) -> dict[str, str]:
    sections = {
        "clock": "1000.5",
        "os-release": OS_RELEASE,
        "pid1": "systemd",
        "system-state": "running",
        "python": "3.11.2",
        "uid": "0",
        "sudo": "",
        "nproc": "2",
        "meminfo": MEMINFO,
        "df": DF,
        "ss": 'LISTEN 0 128 0.0.0.0:22 0.0.0.0:* users:(("sshd",pid=1,fd=3))',
        "markers": "",
        "end": "",
    }
    sections.update(overrides)
    return sections


def _failed(report: preflight.HostReport) -> dict[str, str]:
    return {f.check: f.detail for f in report.findings if not f.ok}


def test_parsers_read_real_command_output() -> None:
    assert preflight.parse_os_release(OS_RELEASE)["VERSION_ID"] == "12"
    assert preflight.parse_meminfo_total(MEMINFO) == 2014088 * 1024
    assert preflight.parse_df_available(DF) == (36000000 * 1024, "/")
    listeners = preflight.parse_listeners(SS)
    assert [(x.address, x.port) for x in listeners] == [
        ("0.0.0.0", 22),
        ("0.0.0.0", 80),
        ("::", 443),
        ("10.0.0.5", 5432),
    ]
    assert listeners[1].processes == ("nginx",)
    assert listeners[3].processes == ()
    probe = "noise\n@@clock\n12.5\n@@os-release\nID=debian\nVERSION_ID=12\n@@end\n"
    assert preflight.split_sections(probe) == {
        "clock": "12.5",
        "os-release": "ID=debian\nVERSION_ID=12",
        "end": "",
    }


def test_a_good_host_passes_every_check() -> None:
    report = preflight.evaluate(HOST, "single", _sections(), sent=1000.0, received=1001.0)
    assert report.ok, report.failure_lines()
    assert {f.check for f in report.findings} >= {
        "os",
        "systemd",
        "python",
        "privileges",
        "cpu",
        "ram",
        "disk",
        "ports",
        "clock",
    }


def test_minimums_come_from_one_table() -> None:
    assert preflight.minimum_for("single", HOST.roles) == preflight.Minimum(2, 2, 10)
    # a cluster host with several roles needs the largest figure of each
    both = preflight.minimum_for("cluster", ["app", "monitoring"])
    assert (both.cores, both.ram_gib, both.disk_gib) == (1, 2, 10)
    assert preflight.minimum_for("cluster", ["lb"]).disk_gib == 5


def test_too_small_host_is_refused_with_reason_and_numbers() -> None:
    sections = _sections(nproc="1", meminfo="MemTotal: 1048576 kB\n")
    report = preflight.evaluate(HOST, "single", sections, 1000.0, 1001.0)
    failed = _failed(report)
    assert set(failed) == {"cpu", "ram"}
    assert "1 CPU core(s), needs at least 2" in failed["cpu"]
    assert "1.0 GiB RAM, needs at least 2 GiB" in failed["ram"]
    lines = report.failure_lines()
    assert lines[0].startswith("one: too small: 1 CPU core(s)")
    assert " — give the host more cores" in lines[0]


def test_wrong_os_no_systemd_no_python_not_root() -> None:
    sections = _sections(
        **{"os-release": UBUNTU, "pid1": "bash", "python": "", "uid": "1000", "sudo": "no"}
    )
    failed = _failed(preflight.evaluate(HOST, "single", sections, 1000.0, 1001.0))
    assert failed["os"] == (
        "runs Ubuntu 22.04.4 LTS (ID=ubuntu, VERSION_ID=22.04), imcloud needs Debian 12"
    )
    assert failed["systemd"] == "PID 1 is bash, not systemd"
    assert failed["python"] == "python3 is missing"
    assert "not root" in failed["privileges"]


def test_ports_taken_by_other_software_fail_but_our_own_services_do_not() -> None:
    fresh = preflight.evaluate(HOST, "single", _sections(ss=SS), 1000.0, 1001.0)
    failed = _failed(fresh)
    assert set(failed) == {"ports"}
    # a fresh host: even nginx on 80 is not ours; 5432 without process info is unknown
    assert "80 (nginx), 443 (apache2), 5432 (unknown)" in failed["ports"]

    rerun = preflight.evaluate(
        HOST, "single", _sections(ss=SS, markers="/etc/imcloud"), 1000.0, 1001.0
    )
    assert _failed(rerun) == {"ports": "port(s) already in use by other software: 443 (apache2)"}


def test_a_host_without_ss_cannot_pass_the_port_check() -> None:
    report = preflight.evaluate(HOST, "single", _sections(ss="no-ss"), 1000.0, 1001.0)
    assert _failed(report) == {"ports": "cannot list listening ports: ss(8) is missing"}


def test_clock_skew_is_measured_against_the_probe_interval() -> None:
    assert preflight.clock_skew(1000.5, 1000.0, 1001.0) == 0.0
    assert preflight.clock_skew(990.0, 1000.0, 1001.0) == 10.0
    report = preflight.evaluate(HOST, "single", _sections(clock="1100.0"), 1000.0, 1001.0)
    assert _failed(report) == {"clock": "clock is 99 s off the controller's"}


@pytest.mark.parametrize(
    ("stderr", "expected"),
    [
        ("ssh: connect to host 192.0.2.5 port 22: Connection refused", "SSH refused on"),
        ("ssh: connect to host 192.0.2.5 port 22: Connection timed out", "timed out"),
        ("root@192.0.2.5: Permission denied (publickey).", "SSH key rejected for root@"),
        ("Host key verification failed.", "host key of 192.0.2.5"),
        ("ssh: Could not resolve hostname nowhere: Name", "cannot resolve"),
        ("kex_exchange_identification: read: Connection reset", "failed: kex_exchange"),
    ],
)
def test_ssh_failures_say_what_to_do(stderr: str, expected: str) -> None:
    finding = preflight.ssh_failure(HOST, stderr)
    assert not finding.ok
    assert expected in finding.detail
    assert finding.fix


def test_report_json_has_every_host_and_check() -> None:
    bad = preflight.evaluate(HOST, "single", _sections(nproc="1"), 1000.0, 1001.0)
    data = json.loads(json.dumps(preflight.CheckReport([bad]).to_dict()))
    assert data["ok"] is False
    assert data["failures"] == bad.failure_lines()
    checks = {c["check"]: c for c in data["hosts"]["one"]["checks"]}
    assert checks["cpu"]["ok"] is False
    assert data["hosts"]["one"]["facts"]["cores"] == 1


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("as_json", [False, True])
def test_check_against_an_unreachable_host_names_it_and_changes_nothing(
    tmp_path: Path, as_json: bool
) -> None:
    port = _closed_port()
    cloud, _ = init_cloud(
        tmp_path / "cloud",
        parse_config(
            {
                "domain": "chat.example.com",
                "ssh": {"port": port, "strict_host_key_checking": False},
                "hosts": [{"name": "ghost", "address": "127.0.0.1"}],
            }
        ),
    )
    before = _tree_digest(cloud.dir)
    args = ["check", "--cloud", str(cloud.dir)] + (["--json"] if as_json else [])
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    line = f"ghost: SSH refused on 127.0.0.1:{port} — start sshd"
    assert line in result.stderr
    if as_json:
        data = json.loads(result.stdout)
        assert data["ok"] is False
        assert data["hosts"]["ghost"]["checks"][0]["check"] == "ssh"
    assert _tree_digest(cloud.dir) == before
