"""Fixture rendering the monitoring role's configs through Ansible, as the role does."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from monhelpers import ROOT, VENV_BIN


@pytest.fixture
def render(tmp_path: Path) -> Callable[..., dict[str, Path]]:
    """Render alertmanager.yml, prometheus.yml and blackbox.yml for an inventory."""
    counter = iter(range(1000))

    def _render(inv: dict[str, Any], **extra_vars: str) -> dict[str, Path]:
        work = tmp_path / f"render{next(counter)}"
        work.mkdir()
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
        return {name: work / f"{name}.yml" for name in ("alertmanager", "prometheus", "blackbox")}

    return _render
