"""Build the IM server's wheels on the controller, once per content.

App hosts never reach a package index: `imcloud install` calls `build_wheels`,
copies the release directory to the hosts and installs it there with
``pip install --no-index --find-links`` (role ``im_server``).

A release directory ``<dest>/<release id>/`` holds:

- ``imcloud-<version>-py3-none-any.whl``: the ``im_server`` package, built here
  byte for byte reproducibly (fixed timestamps and order), so the same sources
  give the same release id, from a checkout and from an installed imcloud alike;
- the wheels of the ``server`` extra's requirements and their dependencies,
  downloaded for the hosts' platform (Debian 12: CPython 3.11, glibc 2.36),
  plus pip's own wheel (the hosts run pip from it);
- ``requirements.txt`` (the ``server`` extra) and ``release.json`` (id, target);
- ``release.tar``: all of the above in one uncompressed archive, so a host gets
  the release in one transfer instead of one round trip per file;
- ``.complete``, written last: a directory without it is never used.

Downloads are cached under ``<dest>/.deps/<hash of requirements and target>/``,
so a second build with unchanged sources and requirements touches no network.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from email.parser import HeaderParser
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

from installer.errors import ImcloudError

DIST_NAME = "imcloud"
PACKAGE = "im_server"
EXTRA = "server"
#: Debian 12 hosts: the wheels are downloaded for this interpreter and C library.
TARGET_PYTHON = "3.11"
TARGET_PYTHON_FULL = "3.11.2"
TARGET_GLIBC_MINOR = 36
COMPLETE_MARKER = ".complete"
ARCHIVE_NAME = "release.tar"
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
#: Bumped when the layout of a release directory changes (invalidates caches).
_LAYOUT_VERSION = 2
_DOWNLOAD_TIMEOUT_S = 600


@dataclass(frozen=True)
class Release:
    """One buildable IM server release: what the hosts install."""

    id: str
    wheel_dir: Path
    version: str
    python: str
    arch: str
    requirements: tuple[str, ...]
    wheels: tuple[str, ...]


def server_requirements(dist: str = DIST_NAME, extra: str = EXTRA) -> list[str]:
    """The requirements of ``dist[extra]`` from its installed metadata, markers removed."""
    try:
        declared = importlib.metadata.requires(dist) or []
    except importlib.metadata.PackageNotFoundError:
        raise ImcloudError(
            f"the {dist} distribution is not installed: run `pip install -e .` in the checkout"
        ) from None
    found = []
    for text in declared:
        req = Requirement(text)
        marker = req.marker
        if marker is None or marker.evaluate({"extra": ""}):
            continue
        if not marker.evaluate({"extra": extra}):
            continue
        req.marker = None
        found.append(str(req))
    if not found:
        raise ImcloudError(f"{dist} declares no requirements for its [{extra}] extra")
    return sorted(found)


def _package_files(package: str) -> list[tuple[str, bytes]]:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImcloudError(f"the {package} package cannot be found next to the installer")
    root = Path(next(iter(spec.submodule_search_locations)))
    files = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root.parent)
        if path.is_dir() or "__pycache__" in rel.parts or path.suffix in (".pyc", ".pyo"):
            continue
        files.append((rel.as_posix(), path.read_bytes()))
    return files


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return "sha256=" + digest.decode()


def build_server_wheel(version: str, requirements: list[str]) -> tuple[str, bytes]:
    """The ``imcloud`` wheel with only the ``im_server`` package: (file name, bytes).

    Reproducible: entries are sorted and carry a fixed timestamp and mode.
    """
    dist_info = f"{DIST_NAME}-{version}.dist-info"
    metadata = "".join(
        [
            "Metadata-Version: 2.1\n",
            f"Name: {DIST_NAME}\n",
            f"Version: {version}\n",
            "Summary: imcloud IM server (app hosts)\n",
            f"Requires-Python: >={TARGET_PYTHON}\n",
            *(f"Requires-Dist: {req}\n" for req in requirements),
        ]
    )
    wheel_meta = (
        "Wheel-Version: 1.0\nGenerator: imcloud\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    entries = _package_files(PACKAGE) + [
        (f"{dist_info}/METADATA", metadata.encode()),
        (f"{dist_info}/WHEEL", wheel_meta.encode()),
    ]
    record = "".join(f"{name},{_record_hash(data)},{len(data)}\n" for name, data in entries)
    entries.append((f"{dist_info}/RECORD", (record + f"{dist_info}/RECORD,,\n").encode()))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries:
            info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data)
    return f"{DIST_NAME}-{version}-py3-none-any.whl", buffer.getvalue()


def _platform_args(arch: str) -> list[str]:
    tags = [f"manylinux_2_{minor}_{arch}" for minor in range(TARGET_GLIBC_MINOR, 4, -1)]
    tags += [f"manylinux2014_{arch}", f"manylinux2010_{arch}", f"manylinux1_{arch}"]
    args = []
    for tag in tags:
        args += ["--platform", tag]
    return args


def _target_environment(arch: str) -> dict[str, str]:
    env = {key: str(value) for key, value in default_environment().items()}
    env.update(
        python_version=TARGET_PYTHON, python_full_version=TARGET_PYTHON_FULL,
        implementation_name="cpython", implementation_version=TARGET_PYTHON_FULL,
        platform_python_implementation="CPython", platform_machine=arch,
        platform_system="Linux", sys_platform="linux", os_name="posix",
    )  # fmt: skip
    return env


def _missing_for_target(dest: Path, arch: str) -> list[str]:
    """Dependencies the hosts need but pip skipped.

    pip evaluates environment markers with *this* interpreter, not the target
    (e.g. ``async-timeout; python_full_version < "3.11.3"`` is needed on Debian's
    3.11.2), so the downloaded wheels' metadata is re-checked for the target.
    """
    env = {**_target_environment(arch), "extra": ""}
    have = {canonicalize_name(parse_wheel_filename(p.name)[0]) for p in dest.glob("*.whl")}
    missing: dict[str, str] = {}
    for wheel in sorted(dest.glob("*.whl")):
        with zipfile.ZipFile(wheel) as archive:
            name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
            meta = HeaderParser().parsestr(archive.read(name).decode("utf-8", "replace"))
        for text in meta.get_all("Requires-Dist") or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            if canonicalize_name(req.name) not in have:
                req.marker = None
                missing.setdefault(canonicalize_name(req.name), str(req))
    return sorted(missing.values())


def _download(requirements_file: Path, dest: Path, arch: str) -> None:
    """Download binary wheels for the hosts (never sdists: hosts have no compiler).

    pip itself comes along: hosts create the venv without pip and run the
    installer from its wheel (``python pip-*.whl/pip install ...``), which is
    much faster than ensurepip.
    """
    _pip_download(["-r", str(requirements_file), "pip"], dest, arch)
    for _ in range(5):
        missing = _missing_for_target(dest, arch)
        if not missing:
            return
        _pip_download(missing, dest, arch)
    raise ImcloudError(f"cannot complete the IM server's dependencies for the hosts: {missing}")


def _pip_download(args: list[str], dest: Path, arch: str) -> None:
    abi = "cp" + TARGET_PYTHON.replace(".", "")
    cmd = [
        sys.executable, "-m", "pip", "download",
        "--disable-pip-version-check", "--quiet", "--progress-bar", "off",
        "--only-binary=:all:", "--python-version", TARGET_PYTHON_FULL, "--implementation", "cp",
        "--abi", abi, "--abi", "abi3", "--abi", "none", *_platform_args(arch),
        "--dest", str(dest), *args,
    ]  # fmt: skip
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=_DOWNLOAD_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired:
        raise ImcloudError(
            f"downloading the IM server's dependencies took over {_DOWNLOAD_TIMEOUT_S} s: "
            "check this machine's access to the package index"
        ) from None
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        reason = lines[-1].strip() if lines else f"pip exited with {proc.returncode}"
        raise ImcloudError(f"cannot download the IM server's dependencies: {reason}")


def _write_archive(src: Path, archive: Path) -> None:
    """Tar every file of ``src`` (flat, sorted, fixed owner and time)."""
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(p for p in src.iterdir() if p != archive):
            info = tar.gettarinfo(str(path), arcname=path.name)
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            info.mtime = 0
            info.mode = 0o644
            with path.open("rb") as handle:
                tar.addfile(info, handle)
    archive.chmod(0o644)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _publish(tmp: Path, final: Path) -> None:
    """Move a fully written directory into place; a concurrent builder may have won."""
    (tmp / COMPLETE_MARKER).write_text("")
    try:
        os.replace(tmp, final)
    except OSError:
        if not (final / COMPLETE_MARKER).is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _fresh_dir(parent: Path, final: Path) -> Path:
    """A temporary sibling of ``final``; a stale, incomplete ``final`` is removed."""
    if final.exists() and not (final / COMPLETE_MARKER).is_file():
        shutil.rmtree(final)
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=parent))


def _dependency_wheels(dest_dir: Path, requirements: list[str], arch: str) -> Path:
    text = "\n".join(requirements) + "\n"
    key = hashlib.sha256(
        f"{_LAYOUT_VERSION}|{TARGET_PYTHON_FULL}|{arch}|{text}".encode()
    ).hexdigest()[:16]
    cache = dest_dir / ".deps" / key
    if (cache / COMPLETE_MARKER).is_file():
        return cache
    tmp = _fresh_dir(cache.parent, cache)
    try:
        (tmp / "requirements.txt").write_text(text)
        _download(tmp / "requirements.txt", tmp, arch)
        _publish(tmp, cache)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return cache


def build_wheels(
    dest_dir: Path,
    *,
    requirements: list[str] | None = None,
    arch: str | None = None,
) -> Release:
    """Build (or reuse) the release the app hosts install; see the module docstring.

    ``requirements`` defaults to the installed ``imcloud[server]`` requirements and
    ``arch`` to this machine's (the hosts' architecture must match).
    """
    dest_dir = Path(dest_dir).expanduser().resolve()
    arch = arch or platform.machine()
    version = importlib.metadata.version(DIST_NAME)
    reqs = sorted(requirements) if requirements is not None else server_requirements()
    wheel_name, wheel_bytes = build_server_wheel(version, reqs)
    deps = _dependency_wheels(dest_dir, reqs, arch)
    dep_wheels = sorted(p for p in deps.iterdir() if p.suffix == ".whl")

    digest = hashlib.sha256(f"{_LAYOUT_VERSION}|{TARGET_PYTHON}|{arch}|".encode() + wheel_bytes)
    for path in dep_wheels:
        digest.update(f"|{path.name}:{_sha256(path)}".encode())
    release_id = f"{version}-{digest.hexdigest()[:12]}"
    final = dest_dir / release_id
    names = tuple(sorted([wheel_name, *(p.name for p in dep_wheels)]))
    release = Release(release_id, final, version, TARGET_PYTHON, arch, tuple(reqs), names)
    if (final / COMPLETE_MARKER).is_file():
        return release

    tmp = _fresh_dir(dest_dir, final)
    try:
        for path in dep_wheels:
            os.link(path, tmp / path.name)
        (tmp / wheel_name).write_bytes(wheel_bytes)
        (tmp / "requirements.txt").write_text("\n".join(reqs) + "\n")
        pip_wheel = next(p.name for p in dep_wheels if p.name.startswith("pip-"))
        info = {"id": release_id, "version": version, "python": TARGET_PYTHON, "arch": arch,
                "wheel": wheel_name, "pip_wheel": pip_wheel}  # fmt: skip
        (tmp / "release.json").write_text(json.dumps(info, indent=2) + "\n")
        for path in tmp.iterdir():
            path.chmod(0o644)
        _write_archive(tmp, tmp / ARCHIVE_NAME)
        tmp.chmod(0o755)
        _publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return release
