"""Fixture rendering the monitoring role's configs through Ansible, as the role does."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from monhelpers import ROOT, VENV_BIN


@pytest.fixture(scope="session")
def render(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., dict[str, Path]]:
    """Render alertmanager.yml, prometheus.yml, blackbox.yml and the rules file for an inventory.

    Each distinct inventory and set of extra vars is rendered once per session.
    """
    cache: dict[str, dict[str, Path]] = {}

    def _render(inv: dict[str, Any], **extra_vars: str) -> dict[str, Path]:
        key = json.dumps([inv, extra_vars], sort_keys=True)
        if key in cache:
            return cache[key]
        work = tmp_path_factory.mktemp("render")
        (work / "inventory.yml").write_text(yaml.safe_dump(inv))
        args = [
            str(VENV_BIN / "ansible-playbook"), "-i", str(work / "inventory.yml"),
            str(ROOT / "tests/monitoring/render.yml"),
            "-e", f"out_dir={work}", "-e", f"roles_dir={ROOT / 'playbooks/roles'}",
            "-e", f"monitoring_files_dir={ROOT / 'monitoring'}",
        ]  # fmt: skip
        for key, value in extra_vars.items():
            args += ["-e", f"{key}={value}"]
        result = subprocess.run(
            args, capture_output=True, text=True, timeout=180,
            env={"ANSIBLE_NOCOLOR": "1", "PATH": f"{VENV_BIN}:/usr/bin:/bin",
                 "ANSIBLE_LOCAL_TEMP": str(work / "tmp"), "HOME": str(work)},
        )  # fmt: skip
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
        cache[key] = {
            n: work / f"{n}.yml" for n in ("alertmanager", "prometheus", "blackbox", "rules")
        }
        return cache[key]

    return _render
