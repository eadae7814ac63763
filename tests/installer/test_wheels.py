"""installer.core.wheels: the IM server release that app hosts install offline.

Downloads the real dependency wheels from the package index once per session
(cached like in `imcloud install`) and installs them into a fresh venv with
``--no-index``, as the im_server role does on a host.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from installer.core import wheels
from installer.errors import ImcloudError


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, wheels.Release]:
    dest = tmp_path_factory.mktemp("wheels")
    return dest, wheels.build_wheels(dest)


def test_release_directory_holds_everything_a_host_needs(
    built: tuple[Path, wheels.Release],
) -> None:
    _, release = built
    files = {p.name for p in release.wheel_dir.iterdir()}
    assert set(release.wheels) <= files
    assert {"requirements.txt", "release.json", "release.tar", wheels.COMPLETE_MARKER} <= files
    info = json.loads((release.wheel_dir / "release.json").read_text())
    assert info["id"] == release.id and info["python"] == wheels.TARGET_PYTHON
    assert (release.wheel_dir / info["pip_wheel"]).is_file()
    reqs = (release.wheel_dir / "requirements.txt").read_text().split()
    assert reqs == wheels.server_requirements()
    assert any(r.startswith("aiohttp") for r in reqs)
    assert not any(r.startswith("ansible") for r in reqs), "controller-only deps leaked"
    # Dependencies hosts need under their own markers (Debian's 3.11.2) are present.
    assert wheels._missing_for_target(release.wheel_dir, release.arch) == []


def test_server_wheel_carries_the_package_and_its_data(
    built: tuple[Path, wheels.Release],
) -> None:
    _, release = built
    info = json.loads((release.wheel_dir / "release.json").read_text())
    with zipfile.ZipFile(release.wheel_dir / info["wheel"]) as archive:
        names = set(archive.namelist())
        record = archive.read(f"imcloud-{release.version}.dist-info/RECORD").decode()
    assert "im_server/__main__.py" in names
    assert any(n.startswith("im_server/migrations/") and n.endswith(".sql") for n in names)
    assert not any("__pycache__" in n or n.startswith("installer/") for n in names)
    assert {line.split(",")[0] for line in record.splitlines()} == names


def test_server_wheel_is_reproducible() -> None:
    reqs = wheels.server_requirements()
    assert wheels.build_server_wheel("1.2.3", reqs) == wheels.build_server_wheel("1.2.3", reqs)


def test_second_build_reuses_the_release(built: tuple[Path, wheels.Release]) -> None:
    dest, release = built
    marker = release.wheel_dir / wheels.COMPLETE_MARKER
    before = marker.stat().st_mtime_ns
    again = wheels.build_wheels(dest)
    assert again == release
    assert marker.stat().st_mtime_ns == before
    assert len(list((dest / ".deps").iterdir())) == 1


def test_release_installs_offline_into_a_fresh_venv(
    built: tuple[Path, wheels.Release], tmp_path: Path
) -> None:
    """What the im_server role runs on a host, with no package index."""
    _, release = built
    info = json.loads((release.wheel_dir / "release.json").read_text())
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    wheel_dir = release.wheel_dir
    proc = subprocess.run(
        [
            str(venv / "bin" / "python"), str(wheel_dir / info["pip_wheel"] / "pip"), "install",
            "--no-index", "--disable-pip-version-check", "--find-links", str(wheel_dir),
            "--requirement", str(wheel_dir / "requirements.txt"), str(wheel_dir / info["wheel"]),
        ],  # fmt: skip
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    check = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "im_server", "--help"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert check.returncode == 0, check.stderr
    assert "migrate" in check.stdout


def test_unsatisfiable_requirement_fails_cleanly_and_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(ImcloudError, match="cannot download the IM server's dependencies"):
        wheels.build_wheels(tmp_path, requirements=["aiohttp==0.0.1"])
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert leftovers == []
