"""Typed server settings read from an optional ``KEY=value`` file, then the environment."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

__all__ = ["Settings", "SettingsError", "load_settings", "sentinel_addresses"]


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names it."""


@dataclass(frozen=True, slots=True)
class Settings:
    """Every ``IM_*`` setting. Field ``database_url`` is read from ``IM_DATABASE_URL`` etc."""

    database_url: str
    redis_url: str
    admin_token: str
    token_secret: str
    tls_ca_file: str | None = None
    # Redis through Sentinel (profile ha): empty = IM_REDIS_URL's host is the Redis.
    redis_sentinels: str = ""
    redis_sentinel_master: str = "imcloud"
    redis_sentinel_password: str = ""
    host: str = "127.0.0.1"
    port: int = 8080
    node_id: str = ""
    open_registration: bool = False
    config_file: str | None = None
    # Tuning knobs (documented in docs/protocol.md); defaults suit production.
    access_token_ttl_s: int = 900
    max_frame_bytes: int = 65536
    rate_per_s: float = 1000.0
    rate_burst: int = 2000
    drain_seconds: float = 10.0
    db_pool_size: int = 10
    migrate_on_start: bool = False
    presence_ttl_s: int = 30
    redis_health_timeout_s: float = 3.0
    argon2_time_cost: int = 2
    argon2_memory_kib: int = 19456
    log_level: str = "INFO"


_REQUIRED = ("database_url", "redis_url", "admin_token", "token_secret")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _read_file(path: str) -> dict[str, str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise SettingsError(f"IM_CONFIG_FILE {path}: {exc.strerror}") from exc
    values: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise SettingsError(f"IM_CONFIG_FILE {path}:{lineno}: expected KEY=value")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def _convert(name: str, kind: object, raw: str) -> object:
    env = "IM_" + name.upper()
    try:
        if kind in ("int", int):
            return int(raw)
        if kind in ("float", float):
            return float(raw)
    except ValueError:
        raise SettingsError(f"{env}: expected a number, got {raw!r}") from None
    if kind in ("bool", bool):
        low = raw.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise SettingsError(f"{env}: expected true or false, got {raw!r}")
    return raw


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Build settings: file named by ``IM_CONFIG_FILE`` first, the environment overrides it."""
    env = dict(os.environ if environ is None else environ)
    merged: dict[str, str] = {}
    config_file = env.get("IM_CONFIG_FILE") or None
    if config_file:
        merged.update(_read_file(config_file))
    merged.update({k: v for k, v in env.items() if k.startswith("IM_")})
    values: dict[str, object] = {}
    for f in fields(Settings):
        key = "IM_" + f.name.upper()
        if key in merged:
            kind = f.type if f.type in ("int", "float", "bool") else "str"
            values[f.name] = _convert(f.name, kind, merged[key])
    missing = [f"IM_{n.upper()}" for n in _REQUIRED if not values.get(n)]
    if missing:
        raise SettingsError("missing required setting(s): " + ", ".join(missing))
    values["config_file"] = config_file
    if not values.get("node_id"):
        values["node_id"] = socket.gethostname()
    values.setdefault("tls_ca_file", None)
    if values["tls_ca_file"] == "":
        values["tls_ca_file"] = None
    settings = Settings(**values)  # type: ignore[arg-type]
    if not 0 < settings.port < 65536:
        raise SettingsError(f"IM_PORT: {settings.port} is not a TCP port")
    sentinel_addresses(settings.redis_sentinels)
    if settings.redis_health_timeout_s <= 0:
        raise SettingsError("IM_REDIS_HEALTH_TIMEOUT_S: must be more than 0")
    return settings


def sentinel_addresses(value: str) -> list[tuple[str, int]]:
    """``IM_REDIS_SENTINELS`` (``h1:26379,h2:26379``) as (host, port) pairs."""
    found = []
    for item in filter(None, (part.strip() for part in value.split(","))):
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise SettingsError(f"IM_REDIS_SENTINELS: expected host:port, got {item!r}")
        found.append((host.strip("[]"), int(port)))
    return found
