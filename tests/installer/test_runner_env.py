"""The environment `imcloud install` gives ansible-playbook: mitogen by default, and off."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from installer.core.cloud import init_cloud
from installer.core.config import parse_config
from installer.core.runner import ansible_env

PLAY = """\
- hosts: all
  gather_facts: false
  tasks:
    - name: Name the process the module runs under
      ansible.builtin.shell: ps -o args= -p $PPID
      register: parent
      changed_when: false
    - name: Print it
      ansible.builtin.debug: {msg: "parent={{ parent.stdout }}"}
"""


@pytest.mark.parametrize("mitogen", [True, False])
def test_modules_run_through_mitogen_unless_turned_off(tmp_path: Path, mitogen: bool) -> None:
    config = {
        "domain": "chat.example.com",
        "hosts": [{"name": "one", "address": "192.0.2.10"}],
        "ssh": {"mitogen": mitogen},
    }
    cloud, _ = init_cloud(tmp_path / "cloud", parse_config(config))
    playbook = tmp_path / "play.yml"
    playbook.write_text(PLAY)
    env = {**os.environ, **ansible_env(cloud)}
    # This pinned ansible-core and mitogen must agree: a too-new ansible-core makes
    # mitogen's strategy refuse to load and this play fail.
    proc = subprocess.run(
        [Path(sys.executable).parent / "ansible-playbook", "-c", "local", "-i", "localhost,",
         "-e", "ansible_python_interpreter=/usr/bin/python3", str(playbook)],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert ("parent=/usr/bin/python3(mitogen:" in proc.stdout) is mitogen, proc.stdout[-2000:]
