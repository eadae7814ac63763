"""`imcloud users`: the IM server's admin API, reached through the cloud's load balancer.

Requests go to ``https://<lb address>`` with the cloud's domain as TLS server name
and Host, verified against the cloud's CA, so they work without DNS for the domain.
"""

from __future__ import annotations

import asyncio
import re
import secrets as pysecrets
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiohttp

from im_server.client import AdminClient, ImError
from installer.core.cloud import Cloud
from installer.core.verify import cloud_tls_context
from installer.errors import ImcloudError

T = TypeVar("T")

#: The server's rules for names and passwords (im_server/server.py), checked before any request.
USERNAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
PASSWORD_MIN = 8


def base_url(cloud: Cloud) -> str:
    address = cloud.lb_address
    return f"https://[{address}]" if ":" in address else f"https://{address}"


def client_options(cloud: Cloud) -> dict[str, Any]:
    """Keyword arguments for im_server.client: trust the cloud's CA, name its domain."""
    return {"ssl_context": cloud_tls_context(cloud), "server_hostname": cloud.config.domain}


def check_username(name: str) -> str:
    if not USERNAME.match(name):
        raise ImcloudError(f"user name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
    return name


def check_password(password: str) -> str:
    if len(password) < PASSWORD_MIN:
        raise ImcloudError(f"password: at least {PASSWORD_MIN} characters, got {len(password)}")
    return password


def generate_password() -> str:
    return pysecrets.token_urlsafe(18)


def _admin_call(cloud: Cloud, call: Callable[[AdminClient], Awaitable[T]], what: str) -> T:
    token = cloud.secrets()["imcloud_admin_token"]

    async def run() -> T:
        async with AdminClient(base_url(cloud), token, **client_options(cloud)) as admin:
            return await call(admin)

    try:
        return asyncio.run(run())
    except ImError as exc:
        raise ImcloudError(f"{what}: {exc.message} ({exc.code})") from None
    except aiohttp.ClientConnectorCertificateError as exc:
        raise ImcloudError(
            f"{what}: TLS certificate of {cloud.public_url} at {cloud.lb_address} not trusted "
            f"({exc.certificate_error}); trusted: {cloud.tls_trust_anchor or 'the system CAs'}"
        ) from None
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise ImcloudError(
            f"{what}: cannot reach {cloud.public_url} at {cloud.lb_address}:443 "
            f"({exc or type(exc).__name__}); is the cloud installed (`imcloud install`)?"
        ) from None


def add_user(cloud: Cloud, name: str, password: str) -> dict[str, Any]:
    """Create a user; returns ``{"id", "username"}``."""
    check_username(name)
    check_password(password)
    return _admin_call(cloud, lambda a: a.create_user(name, password), f"adding user {name}")


def list_users(cloud: Cloud) -> list[dict[str, Any]]:
    """Every user: ``[{"id", "username", "disabled", "created_at"}]``."""
    return _admin_call(cloud, lambda a: a.list_users(), "listing users")


def disable_user(cloud: Cloud, name: str) -> dict[str, Any]:
    """Disable a user, revoke their tokens and disconnect their devices."""
    check_username(name)
    return _admin_call(cloud, lambda a: a.disable_user(name), f"disabling user {name}")


def enable_user(cloud: Cloud, name: str) -> dict[str, Any]:
    """Re-enable a disabled user; returns ``{"id", "disabled": False}``."""
    check_username(name)
    return _admin_call(cloud, lambda a: a.enable_user(name), f"enabling user {name}")


def delete_user(cloud: Cloud, name: str) -> dict[str, Any]:
    """Delete a user (tokens revoked, devices disconnected, name free); their messages stay."""
    check_username(name)
    return _admin_call(cloud, lambda a: a.delete_user(name), f"deleting user {name}")
