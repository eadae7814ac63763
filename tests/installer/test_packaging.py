"""`pip install .` gives a working imcloud that finds its playbooks, templates and rules."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_wheel_carries_its_data_and_finds_it_at_run_time(tmp_path: Path) -> None:
    dist, venv = tmp_path / "dist", tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", dist, REPO],
        check=True,
        capture_output=True,
    )
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    wheel = next(dist.glob("imcloud-*.whl"))
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "-q", wheel],
        check=True,
        capture_output=True,
    )
    # The dependencies come from this environment; the package itself from the wheel.
    (Path(purelib) / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    probe = (
        "import installer, installer.paths as p; print(installer.__file__); "
        "print((p.playbooks_dir() / 'site.yml').is_file(), "
        "(p.templates_dir() / 'imcloud.yml.j2').is_file(), "
        "(p.monitoring_dir() / 'prometheus' / 'rules').is_dir())"
    )
    out = subprocess.run(
        [python, "-c", probe], check=True, capture_output=True, text=True, cwd=tmp_path
    ).stdout.split("\n")
    assert out[0].startswith(purelib), out
    assert out[1] == "True True True"
    help_text = subprocess.run(
        [venv / "bin" / "imcloud", "--help"], check=True, capture_output=True, text=True
    ).stdout
    assert "quickstart" in help_text
