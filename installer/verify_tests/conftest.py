"""Fixtures of the verify suite: the cloud, one testinfra host per cloud host, results.

Run by `imcloud verify` (installer/core/verify.py) as
``pytest installer/verify_tests -c installer/verify_tests/pytest.ini
--imcloud-cloud DIR --imcloud-results FILE``. Tests that take a ``node`` argument
run once per host (``@pytest.mark.role("app")`` narrows that to a role;
``@pytest.mark.expand("service", func)`` adds one case per ``func(cloud, host)``
value). ``infra`` is the testinfra host for ``node`` over ssh(1), with the
cloud's SSH user, key and options and one multiplexed connection per host.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
import testinfra

from installer.core.cloud import Cloud, Host
from installer.core.preflight import Listener, parse_listeners
from installer.core.verify import has_monitoring

CLOUD = pytest.StashKey[Cloud]()
CONTROL_DIR = pytest.StashKey[str]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("imcloud")
    group.addoption(
        "--imcloud-cloud",
        default=os.environ.get("IMCLOUD_DIR", "cloud"),
        help="cloud directory to verify (default: $IMCLOUD_DIR or ./cloud)",
    )
    group.addoption("--imcloud-results", default=None, help="append one JSON line per test here")


def pytest_configure(config: pytest.Config) -> None:
    config.stash[CLOUD] = Cloud.load(Path(config.getoption("--imcloud-cloud")))
    # Short: the ControlPath socket name must fit in sun_path (108 bytes).
    config.stash[CONTROL_DIR] = tempfile.mkdtemp(prefix="imv-")
    results = config.getoption("--imcloud-results")
    if results:
        config.pluginmanager.register(ResultsWriter(results), "imcloud-results")


def pytest_unconfigure(config: pytest.Config) -> None:
    control_dir = config.stash.get(CONTROL_DIR, None)
    if control_dir is None:
        return
    for host in config.stash[CLOUD].hosts:
        # Close the multiplexed master connection we opened, if any.
        subprocess.run(
            ["ssh", *_control_options(control_dir), "-O", "exit", *host.ssh_args()],
            capture_output=True,
            timeout=15,
            check=False,
        )
    shutil.rmtree(control_dir, ignore_errors=True)


def _control_options(control_dir: str) -> list[str]:
    return ["-o", f"ControlPath={control_dir}/%C"]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "node" not in metafunc.fixturenames:
        return
    cloud = metafunc.config.stash[CLOUD]
    role = metafunc.definition.get_closest_marker("role")
    hosts = cloud.hosts_in(role.args[0]) if role else cloud.hosts
    expand = metafunc.definition.get_closest_marker("expand")
    if expand is None:
        metafunc.parametrize("node", hosts, ids=[h.name for h in hosts])
        return
    argname, func = expand.args
    cases = [(h, value) for h in hosts for value in func(cloud, h)]
    metafunc.parametrize(("node", argname), cases, ids=[f"{h.name}-{value}" for h, value in cases])


@pytest.fixture(scope="session")
def cloud(pytestconfig: pytest.Config) -> Cloud:
    return pytestconfig.stash[CLOUD]


@pytest.fixture(scope="session")
def secrets(cloud: Cloud) -> dict[str, str]:
    return cloud.secrets()


@pytest.fixture
def infra(node: Host, pytestconfig: pytest.Config) -> Any:
    """The testinfra host of ``node`` (cached per host by testinfra itself)."""
    options = [*node.ssh_options(), *_control_options(pytestconfig.stash[CONTROL_DIR])]
    if node.private_key_file is not None:
        options += ["-i", str(node.private_key_file), "-o", "IdentitiesOnly=yes"]
    return testinfra.get_host(
        f"ssh://{node.user}@{node.address}:{node.port}",
        ssh_extra_args=" ".join(shlex.quote(o) for o in options),
        sudo=node.user != "root",
    )


@pytest.fixture
def listeners(infra: Any) -> list[Listener]:
    """Listening TCP sockets of the host, with process names."""
    out = infra.check_output("ss -ltnpH")
    return parse_listeners(out)


@pytest.fixture(scope="session")
def monitoring_required(cloud: Cloud) -> None:
    if not has_monitoring(cloud):
        pytest.skip("the cloud has no monitoring host")


def run_on(node: Host, command: str, stdin: str, timeout: float = 60) -> str:
    """Run a command on a host with data on stdin (never on its command line)."""
    proc = subprocess.run(
        ["ssh", *node.ssh_args(), "--", command],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode == 255:
        raise RuntimeError(f"ssh to {node.address} failed: {proc.stderr.strip()}")
    return proc.stdout


# -- results: one JSON line per test, for `imcloud verify` ------------------------


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        callspec = getattr(item, "callspec", None)
        node = callspec.params.get("node") if callspec else None
        item.user_properties.append(("target", node.name if node else "controller"))


class ResultsWriter:
    """Appends one JSON line per finished test: its first failure or skip, else its call."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.kept: dict[str, pytest.TestReport] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        kept = self.kept.get(report.nodeid)
        if kept is None or (kept.passed and (report.when == "call" or not report.passed)):
            self.kept[report.nodeid] = report

    def pytest_runtest_logfinish(self, nodeid: str) -> None:
        report = self.kept.pop(nodeid, None)
        if report is None:
            return
        module, _, rest = nodeid.partition("::")
        function = rest.split("[", 1)[0]
        param = rest[len(function) :].strip("[]")
        record = {
            "area": Path(module).stem.removeprefix("test_"),
            "check": function.removeprefix("test_") + (f"[{param}]" if param else ""),
            "target": dict(report.user_properties).get("target", "controller"),
            "outcome": "error" if report.failed and report.when != "call" else report.outcome,
            "message": _message(report),
            "duration_s": round(report.duration, 3),
            "nodeid": nodeid,
        }
        with open(self.path, "a") as feed:
            feed.write(json.dumps(record) + "\n")


def _message(report: pytest.TestReport) -> str:
    if report.passed:
        return ""
    longrepr = report.longrepr
    if report.skipped and isinstance(longrepr, tuple):
        return str(longrepr[2]).removeprefix("Skipped: ")
    crash = getattr(longrepr, "reprcrash", None)
    text = str(crash.message) if crash is not None else str(longrepr or "").strip()
    lines = text.strip().splitlines() if crash is not None else text.splitlines()[-1:]
    # The first line says what is wrong; pytest's explanation follows in the log.
    first = lines[0] if lines else ""
    for prefix in ("Failed: ", "AssertionError: ", "installer.errors.ImcloudError: "):
        first = first.removeprefix(prefix)
    return first
