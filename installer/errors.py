"""The one exception type the CLI turns into a clean error line."""

from __future__ import annotations


class ImcloudError(Exception):
    """An operator-facing failure: printed as one line, exit code 1, no traceback."""
