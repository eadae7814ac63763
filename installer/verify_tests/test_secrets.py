"""Secrets are readable only by those who need them, on the hosts and on the controller."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest

from installer.core.cloud import Cloud, Host
from installer.core.verify import ENV_FILE, KEY_FORBIDDEN_BITS, SECRET_FORBIDDEN_BITS
from installer.verify_tests.conftest import run_on

#: Where secrets live on the hosts: configuration, not data or program files.
SEARCH_ROOTS = "/etc"


def _modes(infra: Any, paths: list[str]) -> list[tuple[str, int, str]]:
    if not paths:
        return []
    out = infra.check_output("stat -c '%a %U:%G %n' -- " + " ".join(f"'{p}'" for p in paths))
    result = []
    for line in out.splitlines():
        mode, owner, name = line.split(" ", 2)
        result.append((name, int(mode, 8), owner))
    return result


@pytest.mark.role("app")
def test_im_server_env_file_mode(infra: Any) -> None:
    env = infra.file(ENV_FILE)
    assert env.is_file, f"{ENV_FILE} is missing"
    got = (oct(env.mode), env.user, env.group)
    assert got == (oct(0o640), "root", "imcloud"), f"{ENV_FILE} is {got}, want 0640 root:imcloud"


def test_private_keys_not_readable_by_others(infra: Any) -> None:
    found = infra.run(
        f"grep -rlIs --exclude-dir=ssh -e '-----BEGIN [A-Z ]*PRIVATE KEY-----' {SEARCH_ROOTS}"
    ).stdout.split()
    bad = [
        f"{name} {oct(mode)} {owner}"
        for name, mode, owner in _modes(infra, found)
        if mode & KEY_FORBIDDEN_BITS
    ]
    assert not bad, "private keys open to group write or others: " + ", ".join(bad)


def test_files_with_cloud_secrets_not_readable_by_others(
    infra: Any, node: Host, secrets: dict[str, str]
) -> None:
    # The secret values go over SSH's stdin, never on a command line.
    patterns = "\n".join(v for v in secrets.values() if v) + "\n"
    found = run_on(node, f"grep -rlIsF -f - {SEARCH_ROOTS}", stdin=patterns).split()
    bad = [
        f"{name} {oct(mode)} {owner}"
        for name, mode, owner in _modes(infra, found)
        if mode & SECRET_FORBIDDEN_BITS
    ]
    assert not bad, "files holding cloud secrets readable by others: " + ", ".join(bad)


def test_controller_vault_and_ca_key_private(cloud: Cloud) -> None:
    files: list[Path] = [cloud.secrets_path, cloud.vault_password_path, cloud.ca_dir / "ca.key"]
    bad = [
        f"{p} {oct(stat.S_IMODE(p.stat().st_mode))}"
        for p in files
        if stat.S_IMODE(p.stat().st_mode) & 0o077
    ]
    assert not bad, "controller secrets readable by others than their owner: " + ", ".join(bad)
