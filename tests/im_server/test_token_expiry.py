"""A WebSocket lives as long as its access token: the client renews the token over the
open socket (an ``auth`` frame) before it expires; without that the socket closes with
4001 and the client refreshes, reconnects and syncs. Either way nothing is missed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import jwt
import orjson
import pytest
from aiohttp import ClientSession
from im_helpers import login, make_user

from im_server.client import Client, ImError
from im_server.localstack import ServerProcess, Stack
from im_server.protocol import CloseCode

TTL_S = 3


@pytest.fixture(scope="module")
def short_tokens(stack: Stack) -> Iterator[ServerProcess]:
    """A node that issues access tokens valid for TTL_S seconds."""
    node = stack.add_server(IM_ACCESS_TOKEN_TTL_S=str(TTL_S))
    yield node
    node.stop()


async def _receive_across_lifetimes(
    stack: Stack, server: ServerProcess, short_tokens: ServerProcess, *, renew_in_place: bool
) -> tuple[Client, list[int | None]]:
    """Alice (short tokens) receives what bob sends for a token lifetime and more."""
    alice_name, _ = await make_user(stack, server.url)
    bob_name, bob_id = await make_user(stack, server.url)
    closes: list[int | None] = []
    alice = await login(short_tokens.url, alice_name, renew_in_place=renew_in_place)
    bob = await login(server.url, bob_name)
    conv = await alice.direct(bob_id)
    first_token = alice.access_token
    deadline = time.monotonic() + 2 * TTL_S + 1
    sent = []
    while time.monotonic() < deadline:  # bob keeps sending across alice's token lifetimes
        sent.append((await bob.send(conv, {"n": len(sent)})).seq)
        if alice.close_code is not None and not closes:
            closes.append(alice.close_code)
        await asyncio.sleep(0.02)
    got = [(await alice.next_message(timeout=10)).seq for _ in sent]
    assert got == sent == list(range(1, len(sent) + 1))
    assert alice.access_token != first_token  # refreshed, and the socket in use works
    await alice.ping()
    await bob.close()
    return alice, closes


async def test_the_client_renews_its_token_on_the_open_socket(
    stack: Stack, server: ServerProcess, short_tokens: ServerProcess
) -> None:
    alice, closes = await _receive_across_lifetimes(stack, server, short_tokens,
                                                    renew_in_place=True)
    assert closes == [] and alice.close_code is None  # two lifetimes, never reconnected
    await alice.close()


async def test_socket_closes_at_expiry_and_client_catches_up(
    stack: Stack, server: ServerProcess, short_tokens: ServerProcess
) -> None:
    alice, closes = await _receive_across_lifetimes(stack, server, short_tokens,
                                                    renew_in_place=False)
    assert closes == [CloseCode.TOKEN_EXPIRED]
    await alice.close()


def _exp(token: str) -> int:
    return int(jwt.decode(token, options={"verify_signature": False})["exp"])


async def test_auth_frame_takes_only_a_valid_token_of_the_same_device(
    stack: Stack, short_tokens: ServerProcess
) -> None:
    alice = await Client.login(short_tokens.url, (await make_user(stack, short_tokens.url))[0],
                               "password123")
    bob = await Client.login(short_tokens.url, (await make_user(stack, short_tokens.url))[0],
                             "password123")
    first_exp = _exp(alice.access_token)
    async with ClientSession() as session:
        ws = await session.ws_connect(short_tokens.url + "/ws",
                                      headers={"Authorization": f"Bearer {alice.access_token}"})
        assert orjson.loads((await ws.receive(timeout=5)).data)["type"] == "hello"

        async def reply(frame: dict[str, object]) -> dict[str, object]:
            await ws.send_bytes(orjson.dumps({**frame, "ref": "r"}))
            answer: dict[str, object] = orjson.loads((await ws.receive(timeout=5)).data)
            return answer

        assert (await reply({"type": "auth"}))["code"] == "bad_frame"
        assert (await reply({"type": "auth", "token": "x.y.z"}))["code"] == "token_invalid"
        forged = alice.access_token[:-4] + ("AAAA" if alice.access_token[-4:] != "AAAA" else "BBBB")
        assert (await reply({"type": "auth", "token": forged}))["code"] == "token_invalid"
        other = await reply({"type": "auth", "token": bob.access_token})
        assert (other["code"], other["message"]) == ("token_invalid", "token of another device")
        # exp is in whole seconds: refreshing 1.5 s before the first token expires gives
        # one that expires at least 1 s after it.
        await asyncio.sleep(first_exp - 1.5 - time.time())
        await alice.refresh()
        assert _exp(alice.access_token) >= first_exp + 1
        ok = await reply({"type": "auth", "token": alice.access_token})
        assert ok["type"] == "auth_ok" and ok["ref"] == "r"
        await asyncio.sleep(first_exp + 0.4 - time.time())  # past the first token's expiry
        assert (await reply({"type": "ping"}))["type"] == "pong"
        await ws.close()
    await alice.close()
    await bob.close()


async def test_without_a_refresh_token_the_client_stops(
    stack: Stack, short_tokens: ServerProcess
) -> None:
    name, _ = await make_user(stack, short_tokens.url)
    tokens = await Client.login(short_tokens.url, name, "password123")
    await tokens.close()
    client = Client(short_tokens.url, tokens.access_token)  # no refresh token
    await client.connect()
    with pytest.raises(ImError) as err:
        await client.next_message(timeout=TTL_S + 5)
    assert err.value.code == "disconnected"
    assert client.close_code == CloseCode.TOKEN_EXPIRED
    await client.close()


async def test_a_rotated_away_refresh_token_stops_the_client(
    stack: Stack, short_tokens: ServerProcess
) -> None:
    """Someone else refreshed with this device's refresh token: only a new login helps."""
    name, _ = await make_user(stack, short_tokens.url)
    client = await login(short_tokens.url, name)
    thief = Client(short_tokens.url, "", refresh_token=client.refresh_token)
    await thief.refresh()
    await thief.close()
    with pytest.raises(ImError) as err:
        await client.next_message(timeout=TTL_S + 5)
    assert err.value.code == "disconnected"
    assert client.close_code == CloseCode.TOKEN_EXPIRED
    await client.close()


async def test_an_already_expired_token_is_refused_at_the_upgrade(
    stack: Stack, short_tokens: ServerProcess
) -> None:
    name, _ = await make_user(stack, short_tokens.url)
    client = await Client.login(short_tokens.url, name, "password123", reconnect=False)
    await asyncio.sleep(TTL_S + 1)
    with pytest.raises(ImError) as err:
        await client.connect()
    assert err.value.status == 401
    await client.refresh()
    await client.connect()
    await client.ping()
    await client.close()


async def test_reconnecting_with_a_revoked_device_stops(
    stack: Stack, server: ServerProcess
) -> None:
    """The node went away, and the device was logged out before it came back."""
    node = stack.add_server()
    name, _ = await make_user(stack, server.url)
    client = await login(node.url, name)
    node.stop()  # drains: close 1012, the client starts reconnecting
    http = Client(server.url, client.access_token)
    await http._http.call("POST", "/api/logout", client.access_token)
    await http.close()
    node.start()
    with pytest.raises(ImError) as err:
        await client.next_message(timeout=30)
    assert err.value.code == "disconnected"
    assert client.close_code == 1012
    await client.close()
    node.stop()
