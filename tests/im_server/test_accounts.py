"""Admin API, registration, login/refresh/logout, disable, forged and expired tokens."""

from __future__ import annotations

import asyncio
import time

import pytest
from im_helpers import login, make_user, unique

from im_server.auth import Tokens
from im_server.client import AdminClient, Client, ImError
from im_server.localstack import ServerProcess, Stack


async def test_admin_api_needs_the_admin_token(stack: Stack, server: ServerProcess) -> None:
    async with AdminClient(server.url, "wrong") as admin:
        with pytest.raises(ImError) as err:
            await admin.create_user(unique(), "password123")
    assert (err.value.status, err.value.code) == (401, "admin_token_invalid")
    async with AdminClient(server.url, stack.admin_token) as admin:
        name = unique()
        created = await admin.create_user(name, "password123")
        with pytest.raises(ImError) as err:
            await admin.create_user(name, "password123")
        assert err.value.status == 409
        with pytest.raises(ImError) as err:
            await admin.create_user("bad name!", "password123")
        assert err.value.status == 400
        with pytest.raises(ImError) as err:
            await admin.create_user(unique(), "short")
        assert err.value.status == 400
        users = {u["username"]: u for u in await admin.list_users()}
        assert users[name]["id"] == created["id"] and not users[name]["disabled"]


async def test_registration_is_closed_unless_enabled(stack: Stack, server: ServerProcess) -> None:
    client = Client(server.url, "")
    with pytest.raises(ImError) as err:
        await client._http.call("POST", "/api/register",
                                body={"username": unique(), "password": "password123"})
    assert err.value.code == "registration_closed"
    await client.close()
    open_node = stack.add_server(IM_OPEN_REGISTRATION="true")
    name = unique()
    client = Client(open_node.url, "")
    await client._http.call("POST", "/api/register",
                            body={"username": name, "password": "password123"})
    await client.close()
    await (await login(open_node.url, name)).close()  # the new account works
    open_node.stop()


async def test_login_refresh_logout(stack: Stack, server: ServerProcess) -> None:
    name, uid = await make_user(stack, server.url)
    with pytest.raises(ImError) as err:
        await Client.login(server.url, name, "wrong-password")
    assert (err.value.status, err.value.code) == (401, "bad_credentials")
    phone = await login(server.url, name)
    laptop = await login(server.url, name)
    assert phone.user_id == laptop.user_id == uid and phone.device_id != laptop.device_id
    old_refresh = phone.refresh_token
    await phone.refresh()
    assert phone.refresh_token != old_refresh
    stale = Client(server.url, "", refresh_token=old_refresh)
    with pytest.raises(ImError) as err:
        await stale.refresh()
    assert err.value.code == "refresh_invalid"
    await stale.close()
    token = phone.access_token
    await phone.logout()
    assert phone.close_code is None or phone.close_code in (1000, 4003)
    # the revoked device can neither connect nor refresh; the other device is unaffected
    ghost = Client(server.url, token, reconnect=False)
    with pytest.raises(ImError) as err:
        await ghost.connect()
    assert err.value.status == 401
    await ghost.close()
    await laptop.ping()
    await laptop.close()


async def test_logout_elsewhere_closes_the_socket(stack: Stack, server: ServerProcess,
                                                  server2: ServerProcess) -> None:
    name, _ = await make_user(stack, server.url)
    ws_client = await login(server2.url, name, reconnect=False)
    http_side = Client(server.url, ws_client.access_token)
    await http_side._http.call("POST", "/api/logout", ws_client.access_token)
    await http_side.close()
    with pytest.raises(ImError):
        await ws_client.next_message(timeout=10)
    assert ws_client.close_code == 4003
    await ws_client.close()


async def test_disable_user_kicks_every_device(stack: Stack, server: ServerProcess,
                                               server2: ServerProcess) -> None:
    name, _ = await make_user(stack, server.url)
    devices = [await login(url, name, reconnect=False) for url in (server.url, server2.url)]
    async with AdminClient(server.url, stack.admin_token) as admin:
        result = await admin.disable_user(name)
        assert result["revoked_devices"] == 2
        assert {u["username"]: u["disabled"] for u in await admin.list_users()}[name]
    for dev in devices:
        with pytest.raises(ImError):
            await dev.next_message(timeout=10)
        assert dev.close_code == 4003
        await dev.close()
    with pytest.raises(ImError) as err:
        await Client.login(server.url, name, "password123")
    assert err.value.code == "user_disabled"


@pytest.mark.parametrize("kind", ["forged", "expired", "garbage"])
async def test_bad_tokens_are_refused(stack: Stack, server: ServerProcess, kind: str) -> None:
    name, uid = await make_user(stack, server.url)
    real = await login(server.url, name)
    token = {
        "forged": Tokens("x" * 32, 900).issue(uid, real.device_id),
        "expired": Tokens(stack.token_secret, 60).issue(uid, real.device_id,
                                                         now=time.time() - 3600),
        "garbage": "abc.def.ghi",
    }[kind]
    expected = "token_expired" if kind == "expired" else "token_invalid"
    bad = Client(server.url, token, reconnect=False)
    with pytest.raises(ImError) as err:
        await bad.conversations()
    assert (err.value.status, err.value.code) == (401, expected)
    with pytest.raises(ImError) as err:
        await bad.connect()
    assert err.value.status == 401
    await bad.close()
    await asyncio.wait_for(real.ping(), 5)  # others keep being served
    await real.close()


async def test_delete_user_while_connected(stack: Stack, server: ServerProcess,
                                           server2: ServerProcess) -> None:
    name, uid = await make_user(stack, server.url)
    friend_name, friend_id = await make_user(stack, server.url)
    devices = [await login(url, name, reconnect=False) for url in (server.url, server2.url)]
    friend = await login(server.url, friend_name)
    conv = await devices[0].direct(friend_id)
    await devices[0].send(conv, {"text": "before the delete"})
    async with AdminClient(server.url, stack.admin_token) as admin:
        result = await admin.delete_user(name)
        assert (result["id"], result["deleted"], result["revoked_devices"]) == (uid, True, 2)
        for dev in devices:
            with pytest.raises(ImError):
                while True:  # the other device first gets the message sent above
                    await dev.next_message(timeout=10)
            assert dev.close_code == 4003
            await dev.close()
        with pytest.raises(ImError) as err:
            await admin.delete_user(name)
        assert (err.value.status, err.value.code) == (404, "not_found")
        for call in (admin.delete_user, admin.disable_user, admin.enable_user):
            with pytest.raises(ImError) as err:
                await call(unique("nobody"))
            assert (err.value.status, err.value.code) == (404, "not_found")
        assert name not in {u["username"] for u in await admin.list_users()}
        with pytest.raises(ImError) as err:
            await Client.login(server.url, name, "password123")
        assert err.value.code == "bad_credentials"
        with pytest.raises(ImError) as err:
            await friend.user_id_of(name)
        assert err.value.status == 404
        # the name is free again, for a new account; the old messages stay with the friend
        again = await admin.create_user(name, "password123")
        assert again["id"] != uid
    history = await friend.history(conv)
    assert [(m.sender, m.body) for m in history] == [(uid, {"text": "before the delete"})]
    await friend.close()


async def test_enable_a_disabled_user(stack: Stack, server: ServerProcess) -> None:
    name, uid = await make_user(stack, server.url)
    async with AdminClient(server.url, stack.admin_token) as admin:
        await admin.disable_user(name)
        with pytest.raises(ImError) as err:
            await Client.login(server.url, name, "password123")
        assert err.value.code == "user_disabled"
        assert await admin.enable_user(name) == {"id": uid, "disabled": False}
        assert await admin.enable_user(name) == {"id": uid, "disabled": False}  # idempotent
        assert not {u["username"]: u for u in await admin.list_users()}[name]["disabled"]
    client = await login(server.url, name)
    await client.ping()
    await client.close()
