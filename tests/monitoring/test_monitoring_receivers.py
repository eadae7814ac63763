"""validate_receivers: bad receivers are refused with the field named, good ones pass."""

from __future__ import annotations

from typing import Any

import pytest

from installer.core.alerts import validate_receivers
from installer.errors import ImcloudError

HOOK = {"name": "hook", "type": "webhook", "url": "https://hooks.example.test/alert"}
MAIL = {
    "name": "mail", "type": "email", "to": "ops@example.test", "smarthost": "mx.example.test:25",
}  # fmt: skip


def test_good_receivers_pass() -> None:
    validate_receivers([])
    validate_receivers(
        [
            HOOK,
            {"name": "lab", "type": "webhook", "url": "http://10.213.0.1:9999/hook"},
            MAIL,
            {**MAIL, "name": "mail2", "from": "imcloud@example.test", "require_tls": False,
             "auth_username": "u", "auth_password": "p", "send_resolved": True},
        ]
    )  # fmt: skip


@pytest.mark.parametrize(
    ("receivers", "field", "why"),
    [
        ({"name": "x"}, "alerts.receivers", "must be a list"),
        (["hook"], "alerts.receivers[0]", "mapping"),
        ([{**HOOK, "url": "htp://hooks.example.test/a"}], "alerts.receivers[0].url", "htp://"),
        ([HOOK, {**HOOK, "name": "h2", "url": "https://"}], "alerts.receivers[1].url", "no host"),
        ([{**HOOK, "url": "https://exa mple.test/"}], "alerts.receivers[0].url", "not a URL"),
        ([{**HOOK, "url": "https://h.test:99999/"}], "alerts.receivers[0].url", "invalid port"),
        ([HOOK, {**MAIL, "to": "ops.example.test"}], "alerts.receivers[1].to", "not an email"),
        ([{**MAIL, "to": "ops@localhost"}], "alerts.receivers[0].to", "not an email"),
        ([{**MAIL, "from": "me@"}], "alerts.receivers[0].from", "not an email"),
        ([{**MAIL, "smarthost": "mx.example.test"}], "alerts.receivers[0].smarthost", "host:port"),
        ([{**MAIL, "require_tls": "yes"}], "alerts.receivers[0].require_tls", "true or false"),
        ([{k: v for k, v in MAIL.items() if k != "to"}], "alerts.receivers[0].to", "required"),
        ([{**HOOK, "to": "a@b.test"}], "alerts.receivers[0].to", "unknown field"),
        ([{**HOOK, "type": "slack"}], "alerts.receivers[0].type", "webhook or email"),
        ([{**HOOK, "name": "bad name"}], "alerts.receivers[0].name", "letters"),
        ([{**HOOK, "name": "watchdog"}], "alerts.receivers[0].name", "reserved"),
        ([HOOK, {**MAIL, "name": "hook"}], "alerts.receivers[1].name", "used twice"),
        ([{**MAIL, "auth_password": "p"}], "alerts.receivers[0].auth_username", "required"),
    ],
)
def test_bad_receivers_name_the_field(receivers: Any, field: str, why: str) -> None:
    with pytest.raises(ImcloudError) as caught:
        validate_receivers(receivers)
    message = str(caught.value)
    assert message.startswith(f"{field}:"), message
    assert why in message
    assert "\n" not in message
