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
    TRUSTING,
    Api,
    FakeClock,
    Restarter,
    assert_error,
    login,
    make_config,
    settle,
    waiting,
)


@pytest_asyncio.fixture
async def world(server: ms.MessengerServer) -> dict[str, Api]:
    """Alice and Bob, both in general and room; Bob's unread: "g" in general, "r" in room,
    "p" from alice privately (in that order)."""
    users = {user.name: user for user in await login(server, "alice", "bob", "carol")}
    for name in ("alice", "bob"):
        assert (await users[name].join("room")).status in (200, 201)
    await users["alice"].posted("g", chat="general")
    await users["alice"].posted("r", chat="room")
    await users["alice"].posted("p", to="bob")
    return users


# Read positions ##############################################################


@pytest.mark.asyncio
async def test_read_positions_are_per_conversation_and_shared_by_sessions(
    server: ms.MessengerServer, world: dict[str, Api]
) -> None:
    laptop, (phone,) = world["bob"], await login(server, "bob")
    room = (await laptop.messages("/messages?chat=room"))[0]["id"]
    assert await laptop.texts(f"/messages?chat=room&since={room}") == []
    assert await phone.texts("/messages") == ["g", "p"]  # without since: the unread, room's read
    assert (await phone.status())["unread"] == {
        "total": 2, "chats": {"general": 1}, "private": {"alice": 1}, "notices": 0,
    }
    assert await phone.texts("/messages") == ["g", "p"]  # without since nothing is marked


@pytest.mark.asyncio
async def test_since_marks_exactly_the_conversations_named(
    server: ms.MessengerServer, world: dict[str, Api]
) -> None:
    bob = world["bob"]
    last = (await bob.messages("/messages"))[-1]["id"]
    assert await bob.texts(f"/messages?chat=room&since={last}") == []
    assert await bob.texts("/messages") == ["g", "p"]
    assert await bob.texts(f"/messages?chat=@alice&since={last}") == []
    assert await bob.texts("/messages") == ["g"]
    assert await bob.texts(f"/messages?since={last}") == []  # no filter: every conversation
    assert (await bob.status())["unread"] == {"total": 0, "chats": {}, "private": {}, "notices": 0}


@pytest.mark.asyncio
async def test_since_answers_everything_after_it_in_the_conversations_named(
    server: ms.MessengerServer, world: dict[str, Api]
) -> None:
    """Read or not, one's own included: ``since`` is a place in the stream of ids."""
    bob = world["bob"]
    mine = await bob.posted("mine", chat="room")
    assert await bob.texts("/messages?since=0") == ["g", "r", "p", "mine"]
    assert await bob.texts("/messages?since=0&chat=room&chat=@alice") == ["r", "p", "mine"]
    assert await bob.texts("/messages?since=0&chat=@") == ["p"]
    assert await bob.texts(f"/messages?since={mine['id']}") == []
    assert await bob.texts("/messages") == []


@pytest.mark.asyncio
async def test_sending_moves_ones_own_position_there_only(
    server: ms.MessengerServer, world: dict[str, Api]
) -> None:
    alice, bob = world["alice"], world["bob"]
    await bob.posted("me too", chat="room")
    await bob.posted("ok", to="alice")
    assert await bob.texts("/messages") == ["g"]
    assert (await bob.status())["unread"] == {
        "total": 1, "chats": {"general": 1}, "private": {}, "notices": 0,
    }
    assert await alice.texts("/messages") == ["me too", "ok"]  # never her own


@pytest.mark.asyncio
async def test_a_filter_names_chats_users_and_the_private_ones(
    server: ms.MessengerServer, world: dict[str, Api]
) -> None:
    bob = world["bob"]
    await world["carol"].posted("c", to="bob")
    assert await bob.texts("/messages?chat=general&chat=%40alice") == ["g", "p"]
    assert await bob.texts("/messages?chat=@&chat=@carol&chat=@") == ["p", "c"]
    assert await bob.texts("/messages?chat=room&chat=room") == ["r"]
    not_a_name = "each chat must be a chat name, @user or @"
    for query, status, code, message in [
        ("chat=no%20such", 400, "invalid_field", not_a_name),
        ("chat=@@", 400, "invalid_field", not_a_name),
        ("chat=", 400, "invalid_field", not_a_name),
        ("chat=nowhere", 404, "not_found", "no chat named 'nowhere'"),
        ("chat=@nobody", 404, "not_found", "no user named 'nobody'"),
        ("chat=general&chat=den", 404, "not_found", "no chat named 'den'"),
    ]:
        assert_error(await bob.get(f"/messages?{query}"), status, code, message)
    assert (await world["alice"].join("den", private=True)).status == 201
    den = await bob.get("/messages?chat=general&chat=den&since=0")
    assert_error(den, 403, "not_a_member", "you are not a member of den")
    assert await bob.texts("/messages") == ["g", "r", "p", "c"]  # the refused ones marked nothing


@pytest.mark.asyncio
async def test_a_long_poll_with_a_filter_answers_only_what_it_names(
    server: ms.MessengerServer, world: dict[str, Api]
) -> None:
    alice, bob = world["alice"], world["bob"]
    last = (await bob.messages("/messages"))[-1]["id"]
    waiter = asyncio.create_task(bob.messages(f"/messages?chat=general&since={last}&wait=30"))
    assert await settle(waiting(server, "bob"))
    await alice.posted("elsewhere", chat="room")
    assert await settle(waiting(server, "bob"))  # woken, nothing for it: waiting again
    assert not waiter.done()
    await alice.posted("here", chat="general")
    assert [m["text"] for m in await waiter] == ["here"]
    assert await bob.texts("/messages?chat=room") == ["r", "elsewhere"]


@pytest.mark.asyncio
async def test_read_positions_survive_a_restart(restartable: Restarter) -> None:
    alice, bob = await login(restartable.server, "alice", "bob")
    await alice.join("room")
    await bob.join("room")
    general = await alice.posted("g", chat="general")
    await alice.posted("r", chat="room")
    await alice.posted("p", to="bob")
    await bob.messages(f"/messages?chat=general&since={general['id']}")
    await bob.posted("mine", chat="room")
    before = (await bob.status())["unread"]

    restarted = await restartable.restart()
    alice, bob = alice.on(restarted), bob.on(restarted)

    assert (await bob.status())["unread"] == before == {
        "total": 1, "chats": {}, "private": {"alice": 1}, "notices": 0,
    }
    assert await bob.texts("/messages") == ["p"]
    await alice.posted("r2", chat="room")  # the derived state goes on as before
    assert await bob.texts("/messages") == ["p", "r2"]


# /status ####################################################################


@pytest.mark.asyncio
async def test_status_lists_at_most_100_chats_those_with_unread_first(
    tmp_path: Path, clock: FakeClock
) -> None:
    config = make_config(tmp_path, rules=ms.Rules(max_owned_chats=200))
    async with ms.MessengerServer(config, clock) as server:
        alice, bob = await login(server, "alice", "bob")
        for number in range(101):
            assert (await alice.join(f"room{number}")).status == 201
        await bob.join("room100")
        await bob.posted("hi", chat="room100")
        status = await alice.status()
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
    alice, bob, carol = await login(server, "alice", "bob", "carol")
    await alice.join("plans", private=True)
    await alice.post("/chat/plans/invite", {"user": "bob"})
    link = (await alice.call("POST", "/chat/plans/link")).json()["link"]
    await carol.call("POST", link)
    await bob.call("POST", link)
    assert notices(await bob.messages("/messages?chat=@")) == [
        ({"type": "invited", "chat": "plans", "user": "alice"}, "alice invited you to plans"),
    ]
    assert notices(await alice.messages("/messages")) == [
        ({"type": "request", "chat": "plans", "user": "carol"}, "carol asks to join plans"),
        ({"type": "request", "chat": "plans", "user": "bob"}, "bob asks to join plans"),
    ]
    await alice.post("/chat/plans/requests/carol", {"approve": True})
    await alice.post("/chat/plans/requests/bob", {"approve": False})
    assert notices(await carol.messages("/messages")) == [
        ({"type": "approved", "chat": "plans", "user": "alice"}, "alice let you into plans"),
    ]
    assert notices(await bob.messages("/messages"))[1:] == [
        ({"type": "denied", "chat": "plans", "user": "alice"},
         "alice turned down your request to join plans"),
    ]
    assert (await bob.status())["unread"] == {"total": 2, "chats": {}, "private": {}, "notices": 2}
    last = (await bob.messages("/messages"))[-1]["id"]
    await bob.messages(f"/messages?chat=@&since={last}")
    assert (await bob.status())["unread"]["notices"] == 0


@pytest.mark.asyncio
async def test_notices_of_a_dropped_scheduled_message_and_of_a_ban(
    tmp_path: Path, clock: FakeClock
) -> None:
    config = make_config(tmp_path, rules=ms.Rules(ban_threshold=2), **TRUSTING)
    async with ms.MessengerServer(config, clock) as server:
        x, a, b = await login(server, "x", "a", "b", apart=True)
        await x.join("room")
        later = await x.send("later", chat="room", send_at=clock.now + 60)
        scheduled_id = later.json()["scheduled"]["id"]
        await x.call("POST", "/chat/room/leave")
        clock.advance(60)
        server.messenger.tick()
        await x.posted("hello", chat="general")  # so that a and b may report x
        for reporter in (a, b):
            await reporter.post("/report", {"user": "x"})
        found = notices(await x.messages("/messages?chat=@"))
    assert found[0] == (
        {"type": "scheduled_dropped", "chat": "room", "scheduled": scheduled_id},
        f"your scheduled message {scheduled_id} was not sent: you are not a member of room",
    )
    assert found[1][0] == {"type": "banned"}
    assert found[1][1].startswith("after reports from other users, you may not send until ")


@pytest.mark.asyncio
async def test_a_notice_reaches_every_session_at_once(server: ms.MessengerServer) -> None:
    alice, laptop, phone = await login(server, "alice", "bob", "bob")
    await alice.join("plans", private=True)
    last = (await laptop.json("/messages?since=0"))["next"]
    waiting_polls = [
        asyncio.create_task(token.messages(f"/messages?since={last}&chat=@&wait=30"))
        for token in (laptop, phone)
    ]
    assert await settle(lambda: len(server.app.waiters._by_user.get("bob", ())) == 2)
    await alice.post("/chat/plans/invite", {"user": "bob"})
    for answer in await asyncio.gather(*waiting_polls):
        assert notices(answer) == [
            ({"type": "invited", "chat": "plans", "user": "alice"}, "alice invited you to plans")
        ]


@pytest.mark.asyncio
async def test_a_notice_cannot_be_answered_or_commented_on(server: ms.MessengerServer) -> None:
    alice, bob = await login(server, "alice", "bob")
    await alice.join("plans")
    await alice.post("/chat/plans/invite", {"user": "bob"})
    (notice,) = await bob.messages("/messages?chat=@")
    reply = await bob.send("thanks", reply_to=notice["id"])
    assert_error(reply, 400, "invalid_field", "a notice cannot be answered or commented on")
    thread = await bob.json(f"/messages/{notice['id']}")
    assert thread == {"message": notice, "comments": []}


@pytest.mark.asyncio
async def test_notices_survive_a_restart(restartable: Restarter) -> None:
    alice, bob = await login(restartable.server, "alice", "bob")
    await alice.join("plans", private=True)
    await alice.post("/chat/plans/invite", {"user": "bob"})
    before = await bob.messages("/messages")

    bob = bob.on(await restartable.restart())

    assert await bob.messages("/messages") == before and len(notices(before)) == 1
    assert (await bob.status())["unread"]["notices"] == 1
    assert (await bob.join("plans")).status == 200  # the invitation holds too
