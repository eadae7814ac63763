"""What every lab shares: the cached Debian 12 base tree and the apt-cacher-ng package cache.

Base tree: built once with debootstrap (through the package cache, so a
rebuild is warm) under ``/var/cache/imcloud-lab/base-bookworm-<hash>``; the
hash covers everything that shapes the tree, so a changed package list gives a
new directory instead of changing one that running labs use as overlay lower
layer. A file lock makes concurrent `lab up` runs wait for one build.

Package cache: the controller has no systemd as PID 1, so the lab does not use
Debian's apt-cacher-ng service. It runs its own ``apt-cacher-ng`` daemon (as
the package's ``apt-cacher-ng`` user) with its own config dir
(``/var/lib/imcloud-lab/acng``) and pid file (``/run/imcloud-lab/acng/``),
storing into Debian's ``/var/cache/apt-cacher-ng`` so later runs are warm.
It listens on 127.0.0.1:3142 and on one fixed cache address, 10.213.0.1,
held by a port-less bridge ``imlab-cache``. Every lab host has a host route
to that address through its lab's gateway; the controller delivers it
locally (no forwarding), so the daemon never needs a restart when labs come
and go, and two labs share one warm cache. `lab up` starts it if it is not
running; the last `lab down` stops it (only if this code started it).
"""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import psutil

from installer.core import lab_system as sysx
from installer.errors import ImcloudError

CACHE_ROOT = Path("/var/cache/imcloud-lab")
STATE_ROOT = Path("/var/lib/imcloud-lab")
RUN_ROOT = Path("/run/imcloud-lab")

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = (
    "systemd", "systemd-sysv", "dbus", "libpam-systemd", "openssh-server",
    "openssh-sftp-server", "python3", "python3-apt", "iproute2", "iputils-ping",
    "ca-certificates", "sudo", "procps", "netbase", "nftables", "acl", "tzdata",
    "less", "curl", "gnupg",
)
# Units that make no sense in a lab host (no console reader, no unattended apt
# runs that would race Ansible for the dpkg lock).
MASKED_UNITS = (
    "console-getty.service", "getty@.service", "apt-daily.timer", "apt-daily-upgrade.timer",
    "systemd-networkd-wait-online.service",
)

CACHE_ADDRESS = "10.213.0.1"
CACHE_PORT = 3142
CACHE_LINK = "imlab-cache"
CACHE_USER = "apt-cacher-ng"
CACHE_DIR = Path("/var/cache/apt-cacher-ng")
CACHE_LOG_DIR = Path("/var/log/apt-cacher-ng")
ACNG_CONF_DIR = STATE_ROOT / "acng"
ACNG_RUN_DIR = RUN_ROOT / "acng"
ACNG_PID_FILE = ACNG_RUN_DIR / "apt-cacher-ng.pid"
ACNG_BIN = Path("/usr/sbin/apt-cacher-ng")

SOURCES_LIST = f"""\
deb {MIRROR} {SUITE} main
deb {MIRROR} {SUITE}-updates main
deb http://deb.debian.org/debian-security {SUITE}-security main
"""
APT_PROXY_CONF = f'Acquire::http::Proxy "http://{CACHE_ADDRESS}:{CACHE_PORT}";\n'


def cache_proxy_url() -> str:
    return f"http://{CACHE_ADDRESS}:{CACHE_PORT}"


# -- base tree --------------------------------------------------------------

def base_dir() -> Path:
    recipe = "\n".join([SUITE, MIRROR, *BASE_PACKAGES, *MASKED_UNITS, SOURCES_LIST,
                        APT_PROXY_CONF, "v1"])
    return CACHE_ROOT / f"base-{SUITE}-{hashlib.sha256(recipe.encode()).hexdigest()[:10]}"


def ensure_base() -> tuple[Path, bool]:
    """The base tree, built if missing. Returns (path, built_now). Needs the cache running."""
    target = base_dir()
    if target.is_dir():
        return target, False
    with sysx.file_lock(CACHE_ROOT / "base.lock"):
        if target.is_dir():  # another run built it while we waited
            return target, False
        tmp = target.with_name(f".{target.name}.building")
        if tmp.exists():
            shutil.rmtree(tmp)
        try:
            _debootstrap(tmp)
            _customize_base(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        tmp.rename(target)
    return target, True


def _proxy_env() -> dict[str, str]:
    env = dict(os.environ)
    env["http_proxy"] = f"http://127.0.0.1:{CACHE_PORT}"
    env.pop("https_proxy", None)
    return env


def _debootstrap(root: Path) -> None:
    root.parent.mkdir(parents=True, exist_ok=True)
    sysx.run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
              SUITE, str(root), MIRROR], timeout=1200, env=_proxy_env())


def _customize_base(root: Path) -> None:
    (root / "etc/apt/sources.list").write_text(SOURCES_LIST)
    (root / "etc/apt/apt.conf.d/01imcloud-lab-proxy").write_text(APT_PROXY_CONF)
    # No DNS in the lab: peers are in /etc/hosts, packages come through the proxy.
    resolv = root / "etc/resolv.conf"
    resolv.unlink(missing_ok=True)
    resolv.write_text("# imcloud lab: no DNS; peer names are in /etc/hosts\n")
    for unit in MASKED_UNITS:
        link = root / "etc/systemd/system" / unit
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()  # each host gets its own
    (root / "etc/machine-id").write_text("")
    sysx.run(["chroot", str(root), "apt-get", "-q", "update", "-o",
              f"Acquire::http::Proxy=http://127.0.0.1:{CACHE_PORT}"], timeout=600)
    sysx.run(["chroot", str(root), "apt-get", "clean"])


# -- package cache ----------------------------------------------------------

def _acng_conf() -> str:
    return "\n".join([
        f"CacheDir: {CACHE_DIR}",
        f"LogDir: {CACHE_LOG_DIR}",
        "SupportDir: /usr/lib/apt-cacher-ng",
        f"Port: {CACHE_PORT}",
        f"BindAddress: 127.0.0.1 {CACHE_ADDRESS}",
        f"PidFile: {ACNG_PID_FILE}",
        f"SocketPath: {ACNG_RUN_DIR / 'socket'}",
        f"Remap-debrep: file:deb_mirror*.gz /debian ; file:{ACNG_CONF_DIR / 'backends_debian'}",
        "Remap-secdeb: security.debian.org security.debian.org/debian-security "
        "deb.debian.org/debian-security /debian-security ; deb.debian.org/debian-security",
        "ReportPage: acng-report.html",
        "ExThreshold: 4",
        "FollowIndexFileRemoval: 1",
        "",
    ])


def cache_pid() -> int | None:
    """Pid of the apt-cacher-ng this code started, if it still runs (checked by name)."""
    try:
        pid = int(ACNG_PID_FILE.read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        alive = sysx.pid_alive(pid) and psutil.Process(pid).name() == ACNG_BIN.name
    except psutil.Error:
        return None
    return pid if alive else None


def _port_open(address: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((address, port)) == 0


def ensure_cache() -> None:
    """Cache address link up and apt-cacher-ng listening on it (started if needed).

    Call with the global lab lock held.
    """
    if not sysx.link_exists(CACHE_LINK):
        sysx.create_bridge(CACHE_LINK, f"{CACHE_ADDRESS}/32")
    serving = _port_open(CACHE_ADDRESS, CACHE_PORT)
    if serving:
        return  # ours, or one the operator runs on the same address
    if cache_pid() is not None:
        stop_cache(keep_link=True)  # ours, but no longer answering: start afresh
    user = pwd.getpwnam(CACHE_USER)
    ACNG_CONF_DIR.mkdir(parents=True, exist_ok=True)
    sysx.write_atomic(ACNG_CONF_DIR / "acng.conf", _acng_conf())
    sysx.write_atomic(ACNG_CONF_DIR / "backends_debian", f"{MIRROR}/\n")
    for d in (ACNG_RUN_DIR, CACHE_DIR, CACHE_LOG_DIR):
        d.mkdir(parents=True, exist_ok=True)
        os.chown(d, user.pw_uid, user.pw_gid)
    ACNG_PID_FILE.unlink(missing_ok=True)
    with open(ACNG_RUN_DIR / "stdout.log", "ab") as log:
        daemon = subprocess.Popen(
            [str(ACNG_BIN), "-c", str(ACNG_CONF_DIR), "ForeGround=1"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, user=user.pw_uid, group=user.pw_gid, extra_groups=[],
        )
    sysx.write_atomic(ACNG_PID_FILE, f"{daemon.pid}\n")
    if not sysx.wait_until(lambda: _port_open(CACHE_ADDRESS, CACHE_PORT), 15):
        tail = (ACNG_RUN_DIR / "stdout.log").read_text(errors="replace").strip()[-300:]
        stop_cache()
        raise ImcloudError(f"apt-cacher-ng did not start on {CACHE_ADDRESS}:{CACHE_PORT}: {tail}")


def stop_cache(keep_link: bool = False) -> None:
    """Stop the apt-cacher-ng this code started and drop the cache address. Global lock held."""
    pid = cache_pid()
    if pid is not None:
        sysx.signal_pids([pid], signal.SIGTERM)
        if not sysx.wait_until(lambda: not sysx.pid_alive(pid), 10):
            sysx.signal_pids([pid], signal.SIGKILL)
    ACNG_PID_FILE.unlink(missing_ok=True)
    if not keep_link:
        sysx.delete_link(CACHE_LINK)
