#!/usr/bin/python3
"""Ensure services run, are enabled on boot, and run with the settings files on disk.

Handlers live in the memory of one ansible-playbook run: a settings file written
by a run that is then killed never gets its restart, and the next run sees the
file unchanged. This module decides from what is on the host instead. After it
(re)starts a service it records a fingerprint of that service's settings files
under ``state_dir``; whenever the files differ from the record (or there is no
record yet), the service is due. A run aborted anywhere between writing a file
and recording leaves the old record, so the next run applies the file.
It also starts and enables the services, so a role needs no task of its own for that.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: imcloud_apply_settings
short_description: Ensure services run, enabled, with the settings files on disk.
description:
  - Compares a fingerprint of each service's settings files (content, or target for
    a symlink) with the one recorded when the service last (re)started, restarts or
    reloads the services that differ, then records their new fingerprint.
  - A failed restart records nothing, so the next run tries again.
  - Then starts each service that is not running and enables each that is not enabled.
options:
  services:
    description:
      - Services to check. Restarts run before reloads; a service restarted here is
        not reloaded on top of it.
    type: list
    elements: dict
    required: true
    suboptions:
      name: {description: systemd unit., type: str, required: true}
      action:
        description: C(restarted), or C(reloaded) (C(systemctl reload-or-restart)).
        type: str
        choices: [restarted, reloaded]
        default: restarted
      paths:
        description: Files (or symlinks) the service reads its settings from.
        type: list
        elements: path
        required: true
      force: {description: Apply even if the files did not change., type: bool, default: false}
  state_dir:
    description: Where the fingerprints are recorded (created mode 0700).
    type: path
    default: /var/lib/imcloud/applied
"""

RETURN = r"""
applied:
  description:
    - C(<action> <name>) for each service restarted, reloaded, started or enabled
      (would be, in check mode).
  type: list
  elements: str
"""

COMMANDS = {"restarted": "restart", "reloaded": "reload-or-restart"}


def fingerprint(paths: list[str]) -> dict[str, str]:
    """Content hash (or link target) of every path; a missing file is part of the state too."""
    result = {}
    for path in sorted(set(paths)):
        if os.path.islink(path):
            result[path] = "link:" + os.readlink(path)
        elif os.path.isfile(path):
            with open(path, "rb") as handle:
                result[path] = "sha256:" + hashlib.sha256(handle.read()).hexdigest()
        else:
            result[path] = "absent"
    return result


def record_path(state_dir: str, service: dict) -> str:
    return os.path.join(state_dir, f"{service['name']}.{service['action']}.json")


def recorded(state_dir: str, service: dict) -> dict[str, str] | None:
    try:
        with open(record_path(state_dir, service)) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def write_record(state_dir: str, service: dict, state: dict[str, str]) -> None:
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=state_dir, prefix=".tmp-")
    with os.fdopen(fd, "w") as handle:
        json.dump(state, handle, indent=1, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, record_path(state_dir, service))


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "services": {
                "type": "list",
                "elements": "dict",
                "required": True,
                "options": {
                    "name": {"type": "str", "required": True},
                    "action": {"type": "str", "choices": list(COMMANDS), "default": "restarted"},
                    "paths": {"type": "list", "elements": "path", "required": True},
                    "force": {"type": "bool", "default": False},
                },
            },
            "state_dir": {"type": "path", "default": "/var/lib/imcloud/applied"},
        },
        supports_check_mode=True,
    )
    state_dir = module.params["state_dir"]
    services = module.params["services"]
    systemctl = module.get_bin_path("systemctl", required=True)
    due = []
    for service in services:
        state = fingerprint(service["paths"])
        if service["force"] or recorded(state_dir, service) != state:
            due.append((service, state))
    units = list(dict.fromkeys(s["name"] for s in services))
    disabled = [u for u in units if module.run_command([systemctl, "is-enabled", "--quiet", u])[0]]
    # A due restart or reload (reload-or-restart) starts a stopped unit anyway.
    stopped = [
        u
        for u in units
        if u not in {s["name"] for s, _ in due}
        and module.run_command([systemctl, "is-active", "--quiet", u])[0]
    ]
    applied = (
        [f"{s['action']} {s['name']}" for s, _ in due]
        + [f"started {u}" for u in stopped]
        + [f"enabled {u}" for u in disabled]
    )
    if module.check_mode or not applied:
        module.exit_json(changed=bool(applied), applied=applied)

    def systemctl_do(*args: str) -> None:
        rc, out, err = module.run_command([systemctl, *args])
        if rc != 0:
            hint = f" (see journalctl -u {args[-1]})" if len(args) > 1 else ""
            module.fail_json(
                msg=f"systemctl {' '.join(args)} failed: {(err or out).strip()}{hint}",
                applied=applied,
            )

    restarted = {s["name"] for s, _ in due if s["action"] == "restarted"}
    if restarted:
        systemctl_do("daemon-reload")
    # Restarts first: a service restarted here has read every file, so its reload is recorded only.
    for service, state in sorted(due, key=lambda d: d[0]["action"] != "restarted"):
        if not (service["action"] == "reloaded" and service["name"] in restarted):
            systemctl_do(COMMANDS[service["action"]], service["name"])
        write_record(state_dir, service, state)
    for unit in stopped:
        systemctl_do("start", unit)
    for unit in disabled:
        systemctl_do("enable", unit)
    module.exit_json(changed=True, applied=applied)


if __name__ == "__main__":
    main()
