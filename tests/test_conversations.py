"""Conversations over HTTP: a read position per chat and per ``@user``, the ``chat`` filter
of GET /messages, and notices (``@``). Real servers on port 0, raw HTTP/1.1; time comes
from the ``FakeClock`` and scheduled messages fall due by ``tick()``; nothing sleeps."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

import messenger_server as ms
from tests.conftest import (
    FakeClock,
    Restarter,
    assert_error,
    call,
    connect,
    make_config,
    settle,
)
from tests.test_api import get_json, join, send, status_of, waiting


async def poll(port: int, token: str, query: str = "") -> list[dict[str, Any]]:
    """GET /messages?<query>: the messages."""
    messages: list[dict[str, Any]] = (await get_json(port, f"/messages?{query}", token))[
        "messages"
    ]
    return messages


async def texts(port: int, token: str, query: str = "") -> list[str]:
    return [message["text"] for message in await poll(port, token, query)]


async def unread(port: int, token: str) -> dict[str, Any]:
    counts: dict[str, Any] = (await status_of(port, token))["unread"]
    return counts


@pytest_asyncio.fixture
async def world(server: ms.MessengerServer) -> dict[str, str]:
    """Alice and Bob, both in general and room; Bob's unread: "g" in general, "r" in room,
    "p" from alice privately (in that order)."""
    port = server.port
    tokens = {name: await connect(port, name) for name in ("alice", "bob", "carol")}
    for name in ("alice", "bob"):
        assert (await join(port, tokens[name], "room")).status in (200, 201)
    await send(port, tokens["alice"], "g", chat="general")
    await send(port, tokens["alice"], "r", chat="room")
    await send(port, tokens["alice"], "p", to="bob")
    return tokens


# Read positions ##############################################################


@pytest.mark.asyncio
async def test_read_positions_are_per_conversation_and_shared_by_sessions(
    server: ms.MessengerServer, world: dict[str, str]
) -> None:
    port = server.port
    laptop, phone = world["bob"], await connect(port, "bob")
    room = (await poll(port, laptop, "chat=room"))[0]["id"]
    assert await texts(port, laptop, f"chat=room&since={room}") == []
    assert await texts(port, phone) == ["g", "p"]  # without since: the unread, room's read
    assert await unread(port, phone) == {
        "total": 2, "chats": {"general": 1}, "private": {"alice": 1}, "notices": 0,
    }
    assert await texts(port, phone) == ["g", "p"]  # without since nothing is marked


@pytest.mark.asyncio
async def test_since_marks_exactly_the_conversations_named(
    server: ms.MessengerServer, world: dict[str, str]
) -> None:
    port, bob = server.port, world["bob"]
    last = (await poll(port, bob))[-1]["id"]
    assert await texts(port, bob, f"chat=room&since={last}") == []
    assert await texts(port, bob) == ["g", "p"]
    assert await texts(port, bob, f"chat=@alice&since={last}") == []
    assert await texts(port, bob) == ["g"]
    assert await texts(port, bob, f"since={last}") == []  # no filter: every conversation
    assert await unread(port, bob) == {"total": 0, "chats": {}, "private": {}, "notices": 0}


@pytest.mark.asyncio
async def test_since_answers_everything_after_it_in_the_conversations_named(
    server: ms.MessengerServer, world: dict[str, str]
) -> None:
    """Read or not, one's own included: ``since`` is a place in the stream of ids."""
    port, bob = server.port, world["bob"]
    mine = await send(port, bob, "mine", chat="room")
    assert await texts(port, bob, "since=0") == ["g", "r", "p", "mine"]
    assert await texts(port, bob, "since=0&chat=room&chat=@alice") == ["r", "p", "mine"]
    assert await texts(port, bob, "since=0&chat=@") == ["p"]
    assert await texts(port, bob, f"since={mine['id']}") == []
    assert await texts(port, bob) == []


@pytest.mark.asyncio
async def test_sending_moves_ones_own_position_there_only(
    server: ms.MessengerServer, world: dict[str, str]
) -> None:
    port, alice, bob = server.port, world["alice"], world["bob"]
    await send(port, bob, "me too", chat="room")
    await send(port, bob, "ok", to="alice")
    assert await texts(port, bob) == ["g"]
    assert await unread(port, bob) == {
        "total": 1, "chats": {"general": 1}, "private": {}, "notices": 0,
    }
    assert await texts(port, alice) == ["me too", "ok"]  # never her own


@pytest.mark.asyncio
async def test_a_filter_names_chats_users_and_the_private_ones(
    server: ms.MessengerServer, world: dict[str, str]
) -> None:
    port, bob = server.port, world["bob"]
    await send(port, world["carol"], "c", to="bob")
    assert await texts(port, bob, "chat=general&chat=%40alice") == ["g", "p"]
    assert await texts(port, bob, "chat=@&chat=@carol&chat=@") == ["p", "c"]
    assert await texts(port, bob, "chat=room&chat=room") == ["r"]
    for query, status, code in [
        ("chat=no%20such", 400, "invalid_field"), ("chat=@@", 400, "invalid_field"),
        ("chat=", 400, "invalid_field"), ("chat=nowhere", 404, "not_found"),
        ("chat=@nobody", 404, "not_found"), ("chat=general&chat=den", 404, "not_found"),
    ]:
        assert_error(await call(port, "GET", f"/messages?{query}", token=bob), status, code)
    assert (await join(port, world["alice"], "den", private=True)).status == 201
    den = await call(port, "GET", "/messages?chat=general&chat=den&since=0", token=bob)
    assert_error(den, 403, "not_a_member")
    assert await texts(port, bob) == ["g", "r", "p", "c"]  # the refused ones marked nothing


@pytest.mark.asyncio
async def test_a_long_poll_with_a_filter_answers_only_what_it_names(
    server: ms.MessengerServer, world: dict[str, str]
) -> None:
    port, alice, bob = server.port, world["alice"], world["bob"]
    last = (await poll(port, bob))[-1]["id"]
    waiter = asyncio.create_task(poll(port, bob, f"chat=general&since={last}&wait=30"))
    assert await settle(waiting(server, "bob"))
    await send(port, alice, "elsewhere", chat="room")
    assert await settle(waiting(server, "bob"))  # woken, nothing for it: waiting again
    assert not waiter.done()
    await send(port, alice, "here", chat="general")
    assert [m["text"] for m in await waiter] == ["here"]
    assert await texts(port, bob, "chat=room") == ["r", "elsewhere"]


@pytest.mark.asyncio
async def test_read_positions_survive_a_restart(restartable: Restarter) -> None:
    port = restartable.server.port
    alice, bob = await connect(port, "alice"), await connect(port, "bob")
    await join(port, alice, "room")
    await join(port, bob, "room")
    general = await send(port, alice, "g", chat="general")
    await send(port, alice, "r", chat="room")
    await send(port, alice, "p", to="bob")
    await poll(port, bob, f"chat=general&since={general['id']}")
    await send(port, bob, "mine", chat="room")
    before = await unread(port, bob)

    port = (await restartable.restart()).port

    assert await unread(port, bob) == before == {
        "total": 1, "chats": {}, "private": {"alice": 1}, "notices": 0,
    }
    assert await texts(port, bob) == ["p"]
    await send(port, alice, "r2", chat="room")  # the derived state goes on as before
    assert await texts(port, bob) == ["p", "r2"]


# /status ####################################################################


@pytest.mark.asyncio
async def test_status_lists_at_most_100_chats_those_with_unread_first(
    tmp_path: Path, clock: FakeClock
) -> None:
    config = make_config(tmp_path, rules=ms.Rules(max_owned_chats=200))
    async with ms.MessengerServer(config, clock) as server:
        port = server.port
        alice, bob = await connect(port, "alice"), await connect(port, "bob")
        for number in range(101):
            assert (await join(port, alice, f"room{number}")).status == 201
        await join(port, bob, "room100")
        await send(port, bob, "hi", chat="room100")
        status = await status_of(port, alice)
    assert len(status["chats"]) == 100
    assert status["chats"][0] == {
        "name": "room100", "private": False, "owner": "alice", "members": 2, "unread": 1,
        "requests": 0,
    }
    assert status["unread"]["chats"] == {"room100": 1}


# Notices ####################################################################


def notices(messages: list[dict[str, Any]]) -> list[tuple[dict[str, str], str]]:
    """The notices among messages, each checked for the shape of one."""
    found = []
    for message in messages:
        if message["from"] is None:
            assert (message["chat"], message["reply_to"], message["file"]) == (None, None, None)
            found.append((message["notice"], message["text"]))
        else:
            assert message["notice"] is None
    return found


@pytest.mark.asyncio
async def test_notices_of_invitations_requests_and_decisions(server: ms.MessengerServer) -> None:
    port = server.port
    alice, bob, carol = [await connect(port, name) for name in ("alice", "bob", "carol")]
    await join(port, alice, "plans", private=True)
    await call(port, "POST", "/chat/plans/invite", {"user": "bob"}, token=alice)
    link = (await call(port, "POST", "/chat/plans/link", token=alice)).json()["link"]
    await call(port, "POST", link, token=carol)
    await call(port, "POST", link, token=bob)
    assert notices(await poll(port, bob, "chat=@")) == [
        ({"type": "invited", "chat": "plans", "user": "alice"}, "alice invited you to plans"),
    ]
    assert notices(await poll(port, alice)) == [
        ({"type": "request", "chat": "plans", "user": "carol"}, "carol asks to join plans"),
        ({"type": "request", "chat": "plans", "user": "bob"}, "bob asks to join plans"),
    ]
    await call(port, "POST", "/chat/plans/requests/carol", {"approve": True}, token=alice)
    await call(port, "POST", "/chat/plans/requests/bob", {"approve": False}, token=alice)
    assert notices(await poll(port, carol)) == [
        ({"type": "approved", "chat": "plans", "user": "alice"}, "alice let you into plans"),
    ]
    assert notices(await poll(port, bob))[1:] == [
        ({"type": "denied", "chat": "plans", "user": "alice"},
         "alice turned down your request to join plans"),
    ]
    assert await unread(port, bob) == {"total": 2, "chats": {}, "private": {}, "notices": 2}
    last = (await poll(port, bob))[-1]["id"]
    await poll(port, bob, f"chat=@&since={last}")
    assert (await unread(port, bob))["notices"] == 0


@pytest.mark.asyncio
async def test_notices_of_a_dropped_scheduled_message_and_of_a_ban(
    tmp_path: Path, clock: FakeClock
) -> None:
    config = make_config(tmp_path, rules=ms.Rules(ban_threshold=2))
    async with ms.MessengerServer(config, clock) as server:
        port = server.port
        x, a, b = [await connect(port, name) for name in ("x", "a", "b")]
        await join(port, x, "room")
        later = await call(port, "POST", "/send",
                           {"text": "later", "chat": "room", "send_at": clock.now + 60}, token=x)
        scheduled_id = later.json()["scheduled"]["id"]
        await call(port, "POST", "/chat/room/leave", token=x)
        clock.advance(60)
        server.messenger.tick()
        await send(port, x, "hello", chat="general")  # so that a and b may report x
        for reporter in (a, b):
            await call(port, "POST", "/report", {"user": "x"}, token=reporter)
        found = notices(await poll(port, x, "chat=@"))
    assert found[0] == (
        {"type": "scheduled_dropped", "chat": "room", "scheduled": scheduled_id},
        f"your scheduled message {scheduled_id} was not sent: you are not a member of room",
    )
    assert found[1][0] == {"type": "banned"}
    assert found[1][1].startswith("after reports from other users, you may not send until ")


@pytest.mark.asyncio
async def test_a_notice_reaches_every_session_at_once(server: ms.MessengerServer) -> None:
    port = server.port
    alice = await connect(port, "alice")
    laptop, phone = await connect(port, "bob"), await connect(port, "bob")
    await join(port, alice, "plans", private=True)
    last = (await get_json(port, "/messages?since=0", laptop))["next"]
    waiting_polls = [
        asyncio.create_task(poll(port, token, f"since={last}&chat=@&wait=30"))
        for token in (laptop, phone)
    ]
    assert await settle(lambda: len(server.app.waiters._by_user.get("bob", ())) == 2)
    await call(port, "POST", "/chat/plans/invite", {"user": "bob"}, token=alice)
    for answer in await asyncio.gather(*waiting_polls):
        assert notices(answer) == [
            ({"type": "invited", "chat": "plans", "user": "alice"}, "alice invited you to plans")
        ]


@pytest.mark.asyncio
async def test_a_notice_cannot_be_answered_or_commented_on(server: ms.MessengerServer) -> None:
    port = server.port
    alice, bob = await connect(port, "alice"), await connect(port, "bob")
    await join(port, alice, "plans")
    await call(port, "POST", "/chat/plans/invite", {"user": "bob"}, token=alice)
    (notice,) = await poll(port, bob, "chat=@")
    reply = await call(port, "POST", "/send", {"text": "thanks", "reply_to": notice["id"]},
                       token=bob)
    assert_error(reply, 400, "invalid_field")
    thread = await get_json(port, f"/messages/{notice['id']}", bob)
    assert thread == {"message": notice, "comments": []}


@pytest.mark.asyncio
async def test_notices_survive_a_restart(restartable: Restarter) -> None:
    port = restartable.server.port
    alice, bob = await connect(port, "alice"), await connect(port, "bob")
    await join(port, alice, "plans", private=True)
    await call(port, "POST", "/chat/plans/invite", {"user": "bob"}, token=alice)
    before = await poll(port, bob)

    port = (await restartable.restart()).port

    assert await poll(port, bob) == before and len(notices(before)) == 1
    assert (await unread(port, bob))["notices"] == 1
    assert (await join(port, bob, "plans")).status == 200  # the invitation holds too
