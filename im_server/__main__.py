"""``python -m im_server [serve|migrate]``: run a node, or apply schema migrations."""

from __future__ import annotations

import argparse
import logging
import sys

import uvloop

from .migrate import migrate
from .settings import SettingsError, load_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m im_server",
        description="imcloud IM server. Settings come from IM_* variables (and IM_CONFIG_FILE).",
    )
    parser.add_argument("command", nargs="?", default="serve", choices=["serve", "migrate"])
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"im_server: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format=f"%(asctime)s %(levelname)s {settings.node_id} %(name)s: %(message)s",
    )
    try:
        if args.command == "migrate":
            ran = uvloop.run(migrate(settings.database_url))
            names = ", ".join(f"{m.version:04d}_{m.name}" for m in ran) or "none (up to date)"
            print(f"im_server: applied migrations: {names}")
            return 0
        from .server import serve

        uvloop.run(serve(settings))
    except (TimeoutError, OSError, RuntimeError) as exc:
        print(f"im_server: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # e.g. asyncpg authentication errors: one line, not a trace
        if type(exc).__module__.split(".")[0] in ("asyncpg", "redis"):
            print(f"im_server: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
