"""Alert receivers (validation) and Alertmanager (firing alerts, test notifications).

``validate_receivers`` is pure and runs at ``imcloud init``/``install`` before any
change. The rest talks to Alertmanager's v2 API through an :class:`~installer.core.status.Api`.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from installer.core.status import Api, parse_metrics
from installer.errors import ImcloudError

__all__ = [
    "RESERVED_RECEIVERS",
    "TEST_ALERTNAME",
    "FiringAlert",
    "ReceiverResult",
    "firing_alerts",
    "send_test_alerts",
    "validate_receivers",
]

# Names the Alertmanager template uses for its own receivers.
RESERVED_RECEIVERS = frozenset({"blackhole", "watchdog"})
TEST_ALERTNAME = "ImcloudTestAlert"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_EMAIL = re.compile(r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+$")
_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:]+\]|[A-Za-z0-9.-]+):([0-9]{1,5})$")
_FIELDS = {
    "webhook": ({"name", "type", "url"}, {"send_resolved"}),
    "email": (
        {"name", "type", "to", "smarthost"},
        {"from", "require_tls", "auth_username", "auth_password", "send_resolved"},
    ),
}


def _check_url(value: Any) -> str | None:
    if not isinstance(value, str) or any(c.isspace() for c in value):
        return "is not a URL"
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https"):
        return f"{value!r} is not an http:// or https:// URL"
    try:
        port = parts.port
    except ValueError:
        return f"{value!r} has an invalid port"
    if not parts.hostname or port == 0:
        return f"{value!r} has no host"
    return None


def _check_email(value: Any) -> str | None:
    if not isinstance(value, str) or not _EMAIL.match(value):
        return f"{value!r} is not an email address"
    return None


def _check_smarthost(value: Any) -> str | None:
    match = _HOST_PORT.match(value) if isinstance(value, str) else None
    if match is None or not 0 < int(match.group(2)) < 65536:
        return f"{value!r} is not host:port"
    return None


def _check_bool(value: Any) -> str | None:
    return None if isinstance(value, bool) else f"{value!r} is not true or false"


def _check_text(value: Any) -> str | None:
    return None if isinstance(value, str) and value else "must be a non-empty string"


_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "url": _check_url,
    "to": _check_email,
    "from": _check_email,
    "smarthost": _check_smarthost,
    "require_tls": _check_bool,
    "send_resolved": _check_bool,
    "auth_username": _check_text,
    "auth_password": _check_text,
}


def validate_receivers(receivers: Any) -> None:
    """Raise ImcloudError naming the first bad field, e.g. ``alerts.receivers[1].url``.

    A receiver is ``{name, type: webhook, url}`` or
    ``{name, type: email, to, smarthost[, from, require_tls, auth_username, auth_password]}``.
    """
    if not isinstance(receivers, list):
        raise ImcloudError("alerts.receivers: must be a list")
    seen: set[str] = set()
    for index, receiver in enumerate(receivers):
        where = f"alerts.receivers[{index}]"
        if not isinstance(receiver, dict):
            raise ImcloudError(f"{where}: must be a mapping with name and type")
        name = receiver.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ImcloudError(
                f"{where}.name: {name!r} must be 1-63 letters, digits, '.', '_' or '-'"
            )
        if name in RESERVED_RECEIVERS:
            raise ImcloudError(f"{where}.name: {name!r} is reserved")
        if name in seen:
            raise ImcloudError(f"{where}.name: {name!r} is used twice")
        seen.add(name)
        kind = receiver.get("type")
        if kind not in _FIELDS:
            raise ImcloudError(f"{where}.type: {kind!r} must be webhook or email")
        required, optional = _FIELDS[kind]
        for field in sorted(required - receiver.keys()):
            raise ImcloudError(f"{where}.{field}: required for a {kind} receiver")
        for field in sorted(receiver.keys() - required - optional):
            raise ImcloudError(f"{where}.{field}: unknown field for a {kind} receiver")
        if "auth_password" in receiver and "auth_username" not in receiver:
            raise ImcloudError(f"{where}.auth_username: required with auth_password")
        for field in sorted(receiver.keys() - {"name", "type"}):
            problem = _CHECKS[field](receiver[field])
            if problem is not None:
                raise ImcloudError(f"{where}.{field}: {problem}")


# -- Alertmanager ------------------------------------------------------------


@dataclass(frozen=True)
class FiringAlert:
    name: str
    severity: str
    instance: str
    summary: str
    description: str
    since: str
    receivers: tuple[str, ...]
    state: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "alertname": self.name,
            "severity": self.severity,
            "instance": self.instance,
            "summary": self.summary,
            "description": self.description,
            "since": self.since,
            "receivers": list(self.receivers),
            "state": self.state,
        }


_SEVERITY_ORDER = {"critical": 0, "warning": 1, "info": 2}


def firing_alerts(alertmanager: Api, *, include_muted: bool = False) -> list[FiringAlert]:
    """Alerts Alertmanager holds, most severe first; the Watchdog is left out."""
    query = "active=true" if include_muted else "active=true&silenced=false&inhibited=false"
    raw = alertmanager.get_json(f"/api/v2/alerts?{query}")
    alerts = [
        FiringAlert(
            name=a["labels"].get("alertname", ""),
            severity=a["labels"].get("severity", ""),
            instance=a["labels"].get("instance", ""),
            summary=a.get("annotations", {}).get("summary", ""),
            description=a.get("annotations", {}).get("description", ""),
            since=a.get("startsAt", ""),
            receivers=tuple(sorted(r["name"] for r in a.get("receivers", []))),
            state=a.get("status", {}).get("state", ""),
        )
        for a in raw
        if a["labels"].get("alertname") not in ("Watchdog", TEST_ALERTNAME)
    ]
    return sorted(alerts, key=lambda a: (_SEVERITY_ORDER.get(a.severity, 9), a.name, a.instance))


@dataclass(frozen=True)
class ReceiverResult:
    name: str
    integration: str
    accepted: bool
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "receiver": self.name,
            "integration": self.integration,
            "accepted": self.accepted,
            "detail": self.detail,
        }


def _notification_counts(alertmanager: Api, integration: str) -> tuple[float, float]:
    """(finished, failed) notification requests of one integration (webhook, email).

    The latency histogram is observed when a request returns, just before a failure is
    counted, so a caller that sees ``finished`` move reads again before trusting ``failed``.
    """
    metrics = parse_metrics(alertmanager.get_text("/metrics"))

    def value(name: str) -> float:
        return sum(
            v for labels, v in metrics.get(name, []) if labels.get("integration") == integration
        )

    return (
        value("alertmanager_notification_latency_seconds_count"),
        value("alertmanager_notification_requests_failed_total"),
    )


def send_test_alerts(
    alertmanager: Api,
    receivers: list[dict[str, Any]],
    *,
    timeout: float = 30.0,
    poll: float = 0.5,
    settle: float = 12.0,
) -> list[ReceiverResult]:
    """Send one test alert per receiver, one at a time, and report which accepted it.

    The Alertmanager config routes ``ImcloudTestAlert`` with
    ``imcloud_test_receiver=<name>`` to that receiver alone, without group wait.
    Alertmanager 0.25 counts notifications per integration type, not per receiver,
    so receivers are tried one after the other and the counters read in between.
    After a failure Alertmanager keeps retrying for the test route's group_interval
    (10 s): wait ``settle`` seconds so those retries are not counted for the next one.
    """
    if not receivers:
        raise ImcloudError("no alert receivers configured (alerts.receivers in imcloud.yml)")
    run_id = uuid.uuid4().hex[:8]
    results: list[ReceiverResult] = []
    for receiver in receivers:
        name, integration = receiver["name"], receiver["type"]
        if results and not results[-1].accepted and results[-1].integration == integration:
            time.sleep(settle)
        done_before, failed_before = _notification_counts(alertmanager, integration)
        now = datetime.now(UTC)
        alertmanager.post_json(
            "/api/v2/alerts",
            [
                {
                    "labels": {
                        "alertname": TEST_ALERTNAME,
                        "severity": "info",
                        "imcloud_test_receiver": name,
                        "imcloud_test_run": run_id,
                    },
                    "annotations": {
                        "summary": "Test alert sent by `imcloud alerts test`.",
                        "description": f"If {name} got this, alerts reach it. Nothing to do.",
                    },
                    "startsAt": now.isoformat(),
                    "endsAt": (now + timedelta(minutes=5)).isoformat(),
                }
            ],
        )
        deadline = time.monotonic() + timeout
        result = ReceiverResult(name, integration, False, f"no delivery within {timeout:.0f}s")
        while time.monotonic() < deadline:
            done, _ = _notification_counts(alertmanager, integration)
            if done > done_before:
                time.sleep(poll)
                _, failed = _notification_counts(alertmanager, integration)
                result = (
                    ReceiverResult(name, integration, False, "refused or unreachable")
                    if failed > failed_before
                    else ReceiverResult(name, integration, True, "delivered")
                )
                break
            time.sleep(poll)
        results.append(result)
    return results
