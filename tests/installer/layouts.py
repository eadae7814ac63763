"""imcloud.yml data shared by the installer tests."""

from __future__ import annotations

from typing import Any

#: The smallest ha cloud: three hosts, each app, db and cache; two lbs; one monitoring.
HA: dict[str, Any] = {
    "domain": "chat.example.com",
    "profile": "ha",
    "ha": {"floating_address": "10.0.0.100"},
    "hosts": [
        {"name": "n1", "address": "10.0.0.1", "roles": ["lb", "app", "db", "cache"]},
        {"name": "n2", "address": "10.0.0.2", "roles": ["lb", "app", "db", "cache"]},
        {"name": "n3", "address": "10.0.0.3", "roles": ["app", "db", "cache", "monitoring"]},
    ],
}
