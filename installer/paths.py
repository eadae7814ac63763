"""Where the shipped playbooks, templates and monitoring files are at run time.

In a wheel they sit under ``installer/_data`` (see pyproject's force-include);
in a source checkout or editable install they are at the repository root.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def data_root() -> Path:
    packaged = _PACKAGE_DIR / "_data"
    if packaged.is_dir():
        return packaged
    return _PACKAGE_DIR.parent


def playbooks_dir() -> Path:
    return data_root() / "playbooks"


def templates_dir() -> Path:
    return data_root() / "templates"


def monitoring_dir() -> Path:
    return data_root() / "monitoring"
