"""A real message over WSS through nginx, from a user on one app node to a user on another.

Two temporary users are created with the admin API and deleted at the end. Each
connects to ``wss://<lb address>/ws`` (TLS name: the domain, trust: the cloud's CA);
the server names its node in the ``hello`` frame, and the second user reconnects
until nginx has placed it on a different app node than the first.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets as pysecrets

import pytest

from im_server.client import AdminClient, Client
from installer.core.cloud import Cloud
from installer.core.users import base_url, client_options

#: Connections the second user may open to land on another app node than the first.
PLACEMENT_ATTEMPTS = 12
DELIVERY_TIMEOUT_S = 15.0


async def _connect(url: str, token: str, options: dict[str, object]) -> Client:
    client = Client(url, token, reconnect=False, **options)  # type: ignore[arg-type]
    await client.connect()
    return client


async def _exchange(cloud: Cloud, admin_token: str) -> str:
    """Returns a note on placement; raises AssertionError on any failure."""
    url, options = base_url(cloud), client_options(cloud)
    app_nodes = len(cloud.hosts_in("app"))
    suffix = pysecrets.token_hex(4)
    names = [f"imcloud-verify-{suffix}-a", f"imcloud-verify-{suffix}-b"]
    password = pysecrets.token_urlsafe(18)
    clients: list[Client] = []
    async with AdminClient(url, admin_token, **options) as admin:  # type: ignore[arg-type]
        created: list[str] = []
        try:
            for name in names:
                await admin.create_user(name, password)
                created.append(name)
            alice = await Client.login(url, names[0], password, reconnect=False, **options)
            clients.append(alice)
            await alice.connect()
            bob_login = await Client.login(url, names[1], password, reconnect=False, **options)
            clients.append(bob_login)
            bob = bob_login
            await bob.connect()
            for _ in range(PLACEMENT_ATTEMPTS):
                if app_nodes < 2 or bob.node != alice.node:
                    break
                await bob.close()
                bob = await _connect(url, bob_login.access_token, options)
                clients.append(bob)
            app_names = sorted(h.name for h in cloud.hosts_in("app"))
            for client in (alice, bob):
                # the im_server role sets IM_NODE_ID to the host's name in the cloud
                assert client.node in app_names, (
                    f"connected to node {client.node!r}, not one of the app hosts {app_names}"
                )
            if app_nodes >= 2:
                assert bob.node != alice.node, (
                    f"{PLACEMENT_ATTEMPTS + 1} WebSocket connections through nginx all landed on "
                    f"node {alice.node!r} ({app_nodes} app nodes): are the others up and in "
                    "nginx's upstream?"
                )
            conv = await alice.direct(bob.user_id)
            text = f"verify {pysecrets.token_hex(8)}"
            ack = await alice.send(conv, {"text": text})
            try:
                message = await bob.next_message(timeout=DELIVERY_TIMEOUT_S)
            except TimeoutError:
                raise AssertionError(
                    f"message acked (seq {ack.seq}) on node {alice.node} but not delivered to "
                    f"node {bob.node} within {DELIVERY_TIMEOUT_S:g} s (Redis fan-out?)"
                ) from None
            assert (message.conv, message.seq, message.sender) == (conv, ack.seq, alice.user_id)
            assert message.body == {"text": text}
            return f"{alice.node} -> {bob.node}"
        finally:
            for client in clients:
                with contextlib.suppress(Exception):
                    await client.close()
            for name in created:
                with contextlib.suppress(Exception):
                    await admin.delete_user(name)


def test_message_between_app_nodes_over_wss(cloud: Cloud, secrets: dict[str, str]) -> None:
    if not cloud.hosts_in("app"):
        pytest.skip("the cloud has no app host")
    route = asyncio.run(_exchange(cloud, secrets["imcloud_admin_token"]))
    print(f"delivered {route}")
