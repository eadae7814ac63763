"""Small wrappers around the Linux tools the lab drives: ip, nft, mount, processes, locks.

Every helper that removes something is safe to call when the thing is already
gone, so `imcloud lab down` can run after a crash or twice in a row.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import psutil

from installer.errors import ImcloudError

NETNS_DIR = Path("/run/netns")


def run(cmd: Sequence[str], *, check: bool = True, timeout: float = 120,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure raise ImcloudError with the command and its last stderr line."""
    try:
        proc = subprocess.run(
            list(cmd), capture_output=True, text=True, timeout=timeout, check=False,
            stdin=subprocess.DEVNULL, env=env,
        )
    except subprocess.TimeoutExpired as exc:
        raise ImcloudError(f"`{' '.join(cmd)}` did not finish within {timeout:.0f} s") from exc
    except FileNotFoundError as exc:
        raise ImcloudError(f"`{cmd[0]}` is not installed: run `bash scripts/setup.sh`") from exc
    if check and proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise ImcloudError(
            f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {lines[-1] if lines else ''}"
        )
    return proc


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive flock on `path`, held for the duration of the block (blocks until free)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.chmod(mode)
    tmp.replace(path)


# -- links, namespaces, firewall --------------------------------------------

def link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def delete_link(name: str) -> None:
    if link_exists(name):
        run(["ip", "link", "del", name], check=False)


def create_bridge(name: str, address_cidr: str) -> None:
    """A bridge holding `address_cidr` (recreated from scratch if it already exists)."""
    delete_link(name)
    run(["ip", "link", "add", name, "type", "bridge"])
    run(["ip", "addr", "add", address_cidr, "dev", name])
    run(["ip", "link", "set", name, "up"])


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def list_netns(prefix: str) -> list[str]:
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(prefix))


def create_host_netns(netns: str, veth: str, bridge: str, address_cidr: str,
                      routes: Sequence[tuple[str, str]]) -> None:
    """A fresh netns whose `eth0` is the peer of veth `veth` (imlv-...) on `bridge`.

    `routes` are (destination, gateway) pairs added inside the namespace.
    """
    delete_netns(netns)
    delete_link(veth)
    peer = "imlp" + veth[4:]  # temporary name of the namespace end (renamed to eth0)
    run(["ip", "netns", "add", netns])
    run(["ip", "link", "add", veth, "type", "veth", "peer", "name", peer])
    run(["ip", "link", "set", veth, "master", bridge, "up"])
    run(["ip", "link", "set", peer, "netns", netns])
    ns = ["ip", "-n", netns]
    run([*ns, "link", "set", peer, "name", "eth0"])
    run([*ns, "addr", "add", address_cidr, "dev", "eth0"])
    run([*ns, "link", "set", "lo", "up"])
    run([*ns, "link", "set", "eth0", "up"])
    for dst, via in routes:
        run([*ns, "route", "add", dst, "via", via, "dev", "eth0"])


def netns_pids(netns: str) -> list[int]:
    if not netns_exists(netns):
        return []
    out = run(["ip", "netns", "pids", netns], check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def delete_netns(netns: str) -> None:
    if netns_exists(netns):
        run(["ip", "netns", "del", netns], check=False)
    with contextlib.suppress(FileNotFoundError):
        (NETNS_DIR / netns).unlink()


def nft_table_exists(family: str, table: str) -> bool:
    return run(["nft", "list", "table", family, table], check=False).returncode == 0


def install_forward_guard(table: str, bridge: str) -> None:
    """Drop anything routed into or out of `bridge`: lab hosts never reach past the controller.

    Traffic between hosts of one lab is bridged and traffic to the controller's
    own addresses is delivered locally, so neither is touched.
    """
    delete_nft_table(table)
    ruleset = {
        "nftables": [
            {"table": {"family": "inet", "name": table}},
            {"chain": {"family": "inet", "table": table, "name": "forward", "type": "filter",
                       "hook": "forward", "prio": -10, "policy": "accept"}},
            *({"rule": {"family": "inet", "table": table, "chain": "forward", "expr": [
                {"match": {"op": "==", "left": {"meta": {"key": a}}, "right": bridge}},
                {"match": {"op": "!=", "left": {"meta": {"key": b}}, "right": bridge}},
                {"drop": None},
            ]}} for a, b in (("iifname", "oifname"), ("oifname", "iifname"))),
        ]
    }
    proc = subprocess.run(["nft", "-j", "-f", "-"], input=json.dumps(ruleset), text=True,
                          capture_output=True, check=False)
    if proc.returncode != 0:
        raise ImcloudError(f"could not install the lab forward guard: {proc.stderr.strip()}")


def delete_nft_table(table: str) -> None:
    if nft_table_exists("inet", table):
        run(["nft", "delete", "table", "inet", table], check=False)


# -- mounts -----------------------------------------------------------------

def is_mounted(path: Path) -> bool:
    target = str(path)
    with open("/proc/self/mounts") as fh:
        return any(line.split()[1] == target for line in fh)


def mount_overlay(lower: Path, upper: Path, work: Path, merged: Path) -> None:
    for d in (upper, work, merged):
        d.mkdir(parents=True, exist_ok=True)
    if is_mounted(merged):
        return
    run(["mount", "-t", "overlay", "overlay", "-o",
         f"lowerdir={lower},upperdir={upper},workdir={work}", str(merged)])


def unmount(path: Path) -> None:
    for _ in range(3):
        if not is_mounted(path):
            return
        if run(["umount", str(path)], check=False).returncode != 0:
            run(["umount", "-l", str(path)], check=False)
    if is_mounted(path):
        raise ImcloudError(f"could not unmount {path}")


def mounts_under(root: Path) -> list[Path]:
    prefix = str(root).rstrip("/") + "/"
    with open("/proc/self/mounts") as fh:
        return [Path(line.split()[1]) for line in fh if line.split()[1].startswith(prefix)]


# -- processes --------------------------------------------------------------

def nspawn_pids(netns: str) -> list[int]:
    """systemd-nspawn processes that run a container in `netns` (found by their command line)."""
    marker = f"--network-namespace-path={NETNS_DIR / netns}"
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = proc.info.get("cmdline") or []
        if cmdline and cmdline[0].endswith("systemd-nspawn") and marker in cmdline:
            found.append(proc.info["pid"])
    return found


def signal_pids(pids: Sequence[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def wait_until(done: Callable[[], bool], timeout: float) -> bool:
    """Poll `done` every 0.2 s until it is true or `timeout` passes; return its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if done():
            return True
        time.sleep(0.2)
    return done()


def pid_alive(pid: int) -> bool:
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# -- cgroups -----------------------------------------------------------------------
#: The hierarchies a container's systemd writes to. Without a systemd on the
#: controller, systemd-nspawn leaves every container in the controller's root
#: cgroup, so all hosts would share /system.slice/<unit> directories and one
#: host's systemd would remove or kill another's. Each host gets its own.
CGROUP_ROOTS = (Path("/sys/fs/cgroup/systemd"), Path("/sys/fs/cgroup/unified"))
CGROUP_PARENT = "imcloud-lab"


def host_cgroups(name: str) -> list[Path]:
    return [root / CGROUP_PARENT / name for root in CGROUP_ROOTS if root.is_dir()]


def create_cgroups(paths: Sequence[Path]) -> None:
    for path in paths:
        path.mkdir(parents=True, exist_ok=True)


def in_cgroups(paths: Sequence[Path], command: Sequence[str]) -> list[str]:
    """`command` wrapped so that it execs inside `paths` (a thread-safe preexec)."""
    joins = "".join(f"echo $$ > {shlex.quote(str(p / 'cgroup.procs'))} && " for p in paths)
    return ["sh", "-c", f'{joins}exec "$@"', "sh", *command]


def wait_for_exec(proc: subprocess.Popen[bytes], program: str, timeout: float = 10) -> None:
    """Wait until a process started through `in_cgroups` has exec'ed `program` (or died)."""

    def execed() -> bool:
        if proc.poll() is not None:
            return True
        try:
            cmdline = psutil.Process(proc.pid).cmdline()
        except psutil.Error:
            return True
        return bool(cmdline) and cmdline[0].endswith(program)

    wait_until(execed, timeout)


def remove_cgroups(paths: Sequence[Path]) -> None:
    """Remove cgroup trees bottom-up; a cgroup still holding processes stays."""
    for path in paths:
        if not path.is_dir():
            continue
        tree = sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
        for cgroup in [*tree, path]:
            with contextlib.suppress(OSError):
                cgroup.rmdir()
