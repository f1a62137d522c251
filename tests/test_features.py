"""Features of the contract over real sockets: comments, scheduled messages, private chats,
limits and moderation, files, and what survives a restart.

Time is a FakeClock: tests move it with ``clock.advance`` and run the due timers with
``server.messenger.tick()`` (or wake the server's timer and await a long-poll); nothing sleeps.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import pytest_asyncio

import messenger_server as ms
from tests.conftest import (
    TRUSTING,
    Api,
    Client,
    FakeClock,
    RawResponse,
    Restarter,
    assert_error,
    login,
    make_config,
)

T0 = 1_800_000_000.0  # where the FakeClock starts
WEEK = 7 * 24 * 3600.0  # seconds; the furthest a message may be scheduled
TTL = 60.0
RATE_LIMIT = 3
RATE_WINDOW = 100.0
BAN_DURATION = 1000.0
SMALL_RULES = ms.Rules(
    message_ttl=TTL,
    rate_limit=RATE_LIMIT,
    rate_window=RATE_WINDOW,
    ban_threshold=3,
    ban_duration=BAN_DURATION,
)
MAX_FILE = 1024  # bytes; --max-file-size of the files server
DEFAULT_BAN = ms.Rules().ban_duration
RATE_LIMITED = f"at most {RATE_LIMIT} messages per window in general"
OUTSIDE_A_WEEK = "send_at must be in the future, at most 7 days ahead"


# Helpers ####################################################################


def ids(messages: list[dict[str, Any]]) -> list[int]:
    return [message["id"] for message in messages]


async def create_private(owner: Api, name: str = "vault") -> dict[str, Any]:
    response = await owner.join(name, private=True)
    assert response.status == 201, response.body
    chat: dict[str, Any] = response.json()["chat"]
    return chat


async def make_link(owner: Api, chat: str = "vault") -> str:
    response = await owner.post(f"/chat/{chat}/link")
    assert response.status == 201, response.body
    link: str = response.json()["link"]
    return link


async def ban(target: Api, *reporters: Api) -> float:
    """Have each reporter report ``target`` for a message in general; return the ban's end."""
    assert (await target.send("buy cheap watches", chat="general")).status == 201
    response = None
    for reporter in reporters:
        response = await reporter.post("/report", {"user": target.name, "reason": "spam"})
        assert response.status == 200, response.body
    assert response is not None
    until: float = response.json()["banned_until"]
    assert until is not None
    return until


def stored_blobs(server: ms.MessengerServer) -> list[str]:
    return sorted(path.name for path in server.store.files.iterdir())


@pytest_asyncio.fixture
async def moderated(tmp_path: Path, clock: FakeClock) -> AsyncIterator[ms.MessengerServer]:
    """A server with small rules: TTL 60 s, 3 sends to general per 100 s, 3 reports ban."""
    config = make_config(tmp_path, rules=SMALL_RULES, **TRUSTING)
    async with ms.MessengerServer(config, clock) as running:
        yield running


@pytest_asyncio.fixture
async def files_server(tmp_path: Path, clock: FakeClock) -> AsyncIterator[ms.MessengerServer]:
    """A server whose --max-file-size is 1 KiB."""
    async with ms.MessengerServer(make_config(tmp_path, max_file_size=MAX_FILE), clock) as running:
        yield running


# Comments ###################################################################


@pytest.mark.asyncio
async def test_comment_on_chat_message_lands_in_its_chat(server: ms.MessengerServer) -> None:
    alice, bob = await login(server, "alice", "bob")
    await alice.join("lounge")
    await bob.join("lounge")
    parent = await alice.posted("question", chat="lounge")
    await bob.join("general")  # bob's active chat is general again

    comment = await bob.posted("answer", reply_to=parent["id"])

    assert (comment["chat"], comment["to"], comment["reply_to"]) == ("lounge", None, parent["id"])
    assert await alice.history("lounge") == ["question", "answer"]
    assert "answer" not in await alice.history("general")


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("commenter", "other"),
    [("bob", "alice"), ("alice", "bob")],
    ids=["by-recipient", "by-sender"],
)
async def test_comment_on_private_message_is_private_between_the_same_two(
    server: ms.MessengerServer, commenter: str, other: str
) -> None:
    alice, bob, carol = await login(server, "alice", "bob", "carol")
    parent = await alice.posted("psst", to="bob")

    comment = await {"alice": alice, "bob": bob}[commenter].posted("re", reply_to=parent["id"])

    assert (comment["chat"], comment["to"], comment["from"]) == (None, other, commenter)
    assert comment["reply_to"] == parent["id"]
    for party in (alice, bob):
        assert comment["id"] in ids(await party.seen())
    assert comment["id"] not in ids(await carol.seen())
    unseen = f"no message {comment['id']} that you can see"
    assert_error(await carol.get(f"/messages/{comment['id']}"), 404, "not_found", unseen)
    assert "re" not in await carol.history("general")


@pytest.mark.asyncio
async def test_thread_returns_the_message_with_its_comments_oldest_first(
    server: ms.MessengerServer,
) -> None:
    alice, bob, carol = await login(server, "alice", "bob", "carol")
    parent = await alice.posted("topic")
    await alice.posted("unrelated")
    first = await bob.posted("one", reply_to=parent["id"])
    second = await carol.posted("two", reply_to=parent["id"])
    third = await alice.posted("three", reply_to=parent["id"])

    response = await carol.get(f"/messages/{parent['id']}")

    assert response.status == 200
    body = response.json()
    assert body["message"] == parent
    assert body["comments"] == [first, second, third]


@pytest.mark.asyncio
@pytest.mark.parametrize("where", ["private-message", "private-chat", "public-chat", "left-chat"])
async def test_comment_stranger_can_neither_see_nor_comment(
    server: ms.MessengerServer, where: str
) -> None:
    alice, bob, carol = await login(server, "alice", "bob", "carol")
    if where == "private-message":
        parent = await alice.posted("between us", to="bob")
    elif where == "private-chat":
        await create_private(alice)
        parent = await alice.posted("members only", chat="vault")
    else:
        await alice.join("lobby")
        parent = await alice.posted("members only", chat="lobby")
        if where == "left-chat":
            await carol.join("lobby")
            assert (await carol.post("/chat/lobby/leave")).status == 200

    seen = await carol.get(f"/messages/{parent['id']}")
    commented = await carol.send("me too", reply_to=parent["id"])

    assert_error(seen, 404, "not_found", "no message 1 that you can see")
    assert_error(commented, 404, "not_found", "no message 1 that you can see")
    thread = await alice.get(f"/messages/{parent['id']}")
    assert thread.json()["comments"] == []
    assert "me too" not in await alice.seen_texts() + await bob.seen_texts()


@pytest.mark.asyncio
async def test_comment_on_unknown_message_is_404(server: ms.MessengerServer) -> None:
    (alice,) = await login(server, "alice")

    response = await alice.send("into the void", reply_to=999_999)

    assert_error(response, 404, "not_found", "no message 999999 that you can see")
    assert await alice.history() == []


@pytest.mark.asyncio
async def test_comment_arrives_in_a_long_poll_of_the_parents_audience(
    server: ms.MessengerServer,
) -> None:
    alice, bob = await login(server, "alice", "bob")
    parent = await alice.posted("topic")
    poll = asyncio.create_task(alice.get(f"/messages?since={parent['id']}&wait=10"))

    comment = await bob.posted("reply", reply_to=parent["id"])

    response = await asyncio.wait_for(poll, 10)
    assert response.json()["messages"] == [comment]


# Scheduled messages ##########################################################


@pytest.mark.asyncio
async def test_scheduled_send_answers_202_with_the_record(server: ms.MessengerServer) -> None:
    (alice,) = await login(server, "alice")

    response = await alice.send("later", send_at=T0 + 60)

    assert response.status == 202
    record = response.json()["scheduled"]
    assert isinstance(record["id"], str) and record["id"]
    assert {key: value for key, value in record.items() if key != "id"} == {
        "send_at": T0 + 60,
        "text": "later",
        "chat": "general",
        "to": None,
        "reply_to": None,
        "file": None,
    }
    assert "later" not in await alice.history()


@pytest.mark.asyncio
@pytest.mark.parametrize("where", ["chat", "private", "comment"])
async def test_scheduled_message_goes_out_when_due_and_not_before(
    server: ms.MessengerServer, clock: FakeClock, where: str
) -> None:
    alice, bob = await login(server, "alice", "bob")
    fields: dict[str, Any] = {}
    if where == "private":
        fields = {"to": "bob"}
    elif where == "comment":
        fields = {"reply_to": (await bob.posted("topic"))["id"]}
    assert (await alice.send("later", send_at=T0 + 60, **fields)).status == 202

    clock.advance(59)
    server.messenger.tick()
    assert "later" not in await bob.seen_texts()

    clock.advance(1)
    server.messenger.tick()
    delivered = [message for message in await bob.seen() if message["text"] == "later"]
    assert len(delivered) == 1
    message = delivered[0]
    assert message["from"] == "alice" and message["ts"] == T0 + 60
    expected = {"chat": "general", "to": None, "reply_to": None, **fields}
    if where == "private":
        expected["chat"] = None
    assert {key: message[key] for key in ("chat", "to", "reply_to")} == expected
    assert await alice.scheduled() == []


@pytest.mark.asyncio
async def test_scheduled_message_wakes_a_long_poll_when_the_timer_runs(
    server: ms.MessengerServer, clock: FakeClock
) -> None:
    alice, bob = await login(server, "alice", "bob")
    assert (await alice.send("wake up", send_at=T0 + 30)).status == 202
    poll = asyncio.create_task(bob.get("/messages?since=0&wait=10"))

    clock.advance(30)
    server.wake_timer()

    response = await asyncio.wait_for(poll, 10)
    assert [message["text"] for message in response.json()["messages"]] == ["wake up"]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("send_at", "message"),
    [(T0 - 3600, OUTSIDE_A_WEEK), (T0 - 0.5, OUTSIDE_A_WEEK), (T0, OUTSIDE_A_WEEK),
     (T0 + WEEK + 1, OUTSIDE_A_WEEK), ("tomorrow", "send_at must be a number")],
    ids=["an-hour-ago", "just-past", "now", "over-7-days", "not-a-number"],
)
async def test_scheduled_send_at_outside_the_next_7_days_is_400(
    server: ms.MessengerServer, send_at: object, message: str
) -> None:
    (alice,) = await login(server, "alice")

    response = await alice.send("when?", send_at=send_at)

    assert_error(response, 400, {"invalid_field", "bad_request"}, message)
    assert await alice.scheduled() == []
    assert await alice.history() == []


@pytest.mark.asyncio
async def test_scheduled_send_at_exactly_7_days_ahead_is_accepted(
    server: ms.MessengerServer,
) -> None:
    (alice,) = await login(server, "alice")

    response = await alice.send("next week", send_at=T0 + WEEK)

    assert response.status == 202
    assert [record["text"] for record in await alice.scheduled()] == ["next week"]


@pytest.mark.asyncio
async def test_scheduled_list_holds_only_the_callers_pending_messages(
    server: ms.MessengerServer, clock: FakeClock
) -> None:
    alice, bob = await login(server, "alice", "bob")
    first = (await alice.send("a-later", send_at=T0 + 200)).json()["scheduled"]
    second = (await alice.send("a-sooner", send_at=T0 + 100, to="bob")).json()["scheduled"]
    bobs = (await bob.send("b", send_at=T0 + 50)).json()["scheduled"]

    assert await alice.scheduled() == [second, first]
    assert await bob.scheduled() == [bobs]

    clock.advance(100)
    server.messenger.tick()
    assert await alice.scheduled() == [first]
    assert await bob.scheduled() == []


@pytest.mark.asyncio
async def test_scheduled_cancel_answers_204_and_the_message_never_goes_out(
    server: ms.MessengerServer, clock: FakeClock
) -> None:
    alice, bob = await login(server, "alice", "bob")
    record = (await alice.send("never", send_at=T0 + 60)).json()["scheduled"]

    response = await alice.call("DELETE", f"/scheduled/{record['id']}")

    assert (response.status, response.body) == (204, b"")
    assert await alice.scheduled() == []
    clock.advance(120)
    server.messenger.tick()
    assert "never" not in await bob.seen_texts()
    again = await alice.call("DELETE", f"/scheduled/{record['id']}")
    assert_error(again, 404, "not_found", "no pending scheduled message")


@pytest.mark.asyncio
async def test_scheduled_cancel_by_another_user_is_404_and_it_still_goes_out(
    server: ms.MessengerServer, clock: FakeClock
) -> None:
    alice, bob = await login(server, "alice", "bob")
    record = (await alice.send("mine", send_at=T0 + 60)).json()["scheduled"]

    response = await bob.call("DELETE", f"/scheduled/{record['id']}")

    assert_error(response, 404, "not_found", "no pending scheduled message")
    assert await alice.scheduled() == [record]
    clock.advance(60)
    server.messenger.tick()
    assert "mine" in await bob.seen_texts()


@pytest.mark.asyncio
@pytest.mark.parametrize("case", ["already-sent", "unknown-id"])
async def test_scheduled_cancel_of_nothing_pending_is_404(
    server: ms.MessengerServer, clock: FakeClock, case: str
) -> None:
    (alice,) = await login(server, "alice")
    scheduled_id = "no-such-id"
    if case == "already-sent":
        scheduled_id = (await alice.send("gone", send_at=T0 + 10)).json()["scheduled"]["id"]
        clock.advance(10)
        server.messenger.tick()
        assert await alice.history() == ["gone"]

    response = await alice.call("DELETE", f"/scheduled/{scheduled_id}")

    message = f"no pending scheduled message {scheduled_id!r} of yours"
    assert_error(response, 404, "not_found", message)
    assert await alice.history() == (["gone"] if case == "already-sent" else [])


@pytest.mark.asyncio
@pytest.mark.parametrize("reason", ["left-the-chat", "banned"])
async def test_scheduled_message_is_dropped_when_its_sender_may_no_longer_send(
    server: ms.MessengerServer, clock: FakeClock, reason: str
) -> None:
    alice, bob, carol, dave = await login(server, "alice", "bob", "carol", "dave", apart=True)
    await alice.join("lounge")
    await bob.join("lounge")
    assert (await alice.send("too late", chat="lounge", send_at=T0 + 60)).status == 202
    if reason == "left-the-chat":
        assert (await alice.post("/chat/lounge/leave")).status == 200
    else:
        await ban(alice, bob, carol, dave)

    clock.advance(60)
    server.messenger.tick()

    assert "too late" not in await bob.history("lounge")
    assert "too late" not in await bob.seen_texts()
    assert await alice.scheduled() == []


# Private chats ##############################################################


@pytest.mark.asyncio
async def test_private_chat_is_created_with_the_caller_as_owner(
    server: ms.MessengerServer,
) -> None:
    (alice,) = await login(server, "alice")

    response = await alice.join("vault", private=True)

    assert response.status == 201
    chat = response.json()["chat"]
    assert (chat["name"], chat["private"], chat["owner"], chat["members"]) == (
        "vault", True, "alice", 1,
    )
    assert (await alice.status())["chat"] == "vault"


@pytest.mark.asyncio
async def test_private_chat_is_listed_only_for_its_members(server: ms.MessengerServer) -> None:
    alice, bob = await login(server, "alice", "bob")
    await create_private(alice)
    await alice.join("lobby")

    assert await alice.chat_names() == {"general", "lobby", "vault"}
    assert await bob.chat_names() == {"general", "lobby"}
    assert "vault" not in {chat["name"] for chat in (await bob.status())["chats"]}


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/history?chat={chat}", None),
        ("GET", "/messages?chat={chat}", None),
        ("GET", "/messages?chat={chat}&since=0", None),
        ("POST", "/send", {"text": "let me in", "chat": "{chat}"}),
    ],
    ids=["history", "messages", "messages-since", "send"],
)
@pytest.mark.parametrize("chat", ["vault", "lobby"], ids=["private", "public"])
async def test_chat_refuses_a_non_member_read_or_post(
    server: ms.MessengerServer, method: str, path: str, body: dict[str, str] | None, chat: str
) -> None:
    alice, bob = await login(server, "alice", "bob")
    await alice.join(chat, private=chat == "vault")
    await alice.posted("members only", chat=chat)
    if body is not None:
        body = {key: value.format(chat=chat) for key, value in body.items()}

    response = await bob.call(method, path.format(chat=chat), body)

    assert_error(response, 403, "not_a_member", f"you are not a member of {chat}")
    assert await alice.history(chat) == ["members only"]
    assert "members only" not in await bob.seen_texts()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "body",
    [{"chat_name": "vault"}, {"chat_name": "vault", "private": True}],
    ids=["plain", "as-private"],
)
async def test_private_chat_join_without_invitation_is_forbidden(
    server: ms.MessengerServer, body: dict[str, Any]
) -> None:
    alice, bob = await login(server, "alice", "bob")
    await create_private(alice)

    response = await bob.post("/chat", body)

    assert_error(response, 403, "forbidden", "vault is private: ask its owner for an invitation")
    assert "vault" not in await bob.chat_names()
    assert (await bob.status())["chat"] == "general"
    (chat,) = [c for c in (await alice.status())["chats"] if c["name"] == "vault"]
    assert chat["members"] == 1


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("existing_private", "name"),
    [(True, "vault"), (False, "lobby"), (False, "general")],
    ids=["private-then-public", "public-then-private", "general-as-private"],
)
async def test_chat_name_taken_with_the_other_privacy_is_409(
    server: ms.MessengerServer, existing_private: bool, name: str
) -> None:
    alice, bob = await login(server, "alice", "bob")
    if name != "general":
        response = await alice.join(name, private=existing_private)
        assert response.status == 201

    conflict = await bob.join(name, private=not existing_private)

    taken_by = "a private chat" if existing_private else "a public chat"
    assert_error(conflict, 409, "conflict", f"{name} is already taken by {taken_by}")
    assert (await bob.status())["chat"] == "general"


@pytest.mark.asyncio
async def test_private_chat_invite_is_owner_only_and_lets_the_guest_join(
    server: ms.MessengerServer,
) -> None:
    alice, bob, carol = await login(server, "alice", "bob", "carol")
    await create_private(alice)
    await alice.posted("before you came", chat="vault")

    refused = await bob.post("/chat/vault/invite", {"user": "carol"})
    invited = await alice.post("/chat/vault/invite", {"user": "bob"})
    joined = await bob.join("vault")

    assert_error(refused, 403, "forbidden", "only the owner of vault may do that")
    assert invited.status == 200 and invited.json()["chat"]["name"] == "vault"
    assert joined.status == 200
    assert joined.json()["chat"]["members"] == 2
    assert [m["text"] for m in joined.json()["history"]] == ["before you came"]
    assert await bob.history("vault") == ["before you came"]
    member_refused = await bob.post("/chat/vault/invite", {"user": "carol"})
    assert_error(member_refused, 403, "forbidden", "only the owner of vault may do that")
    carol_join = await carol.join("vault")
    assert_error(carol_join, 403, "forbidden", "vault is private: ask its owner for an invitation")


@pytest.mark.asyncio
async def test_private_chat_link_is_owner_only(server: ms.MessengerServer) -> None:
    alice, bob = await login(server, "alice", "bob")
    await create_private(alice)
    await alice.post("/chat/vault/invite", {"user": "bob"})
    await bob.join("vault")

    refused = await bob.post("/chat/vault/link")
    made = await alice.post("/chat/vault/link")

    assert_error(refused, 403, "forbidden", "only the owner of vault may do that")
    assert made.status == 201
    assert re.fullmatch(r"/join/[A-Za-z0-9_-]+", made.json()["link"])


@pytest.mark.asyncio
async def test_join_link_asks_to_join_and_waits_for_the_owner(
    server: ms.MessengerServer, clock: FakeClock
) -> None:
    alice, bob = await login(server, "alice", "bob")
    await create_private(alice)
    link = await make_link(alice)

    first = await bob.post(link)
    clock.advance(5)
    second = await bob.post(link)

    for response in (first, second):
        assert response.status == 202
        assert response.json() == {"status": "pending", "chat": "vault"}
    requests = await alice.get("/chat/vault/requests")
    assert requests.status == 200
    assert requests.json() == {"requests": [{"user": "bob", "ts": T0}]}
    history = await bob.get("/history?chat=vault")
    assert_error(history, 403, "not_a_member", "you are not a member of vault")
    assert "vault" not in await bob.chat_names()


@pytest.mark.asyncio
async def test_join_link_of_a_member_answers_200_member(server: ms.MessengerServer) -> None:
    (alice,) = await login(server, "alice")
    await create_private(alice)
    link = await make_link(alice)

    response = await alice.post(link)

    assert response.status == 200
    assert response.json()["status"] == "member"
    assert (await alice.get("/chat/vault/requests")).json()["requests"] == []


@pytest.mark.asyncio
async def test_new_join_link_revokes_the_old_one(server: ms.MessengerServer) -> None:
    alice, bob, carol = await login(server, "alice", "bob", "carol")
    await create_private(alice)
    old = await make_link(alice)
    assert (await bob.post(old)).status == 202

    new = await make_link(alice)
    revoked = await carol.post(old)
    accepted = await carol.post(new)

    assert new != old
    assert_error(revoked, 404, "not_found", "unknown or revoked join link")
    assert accepted.status == 202
    requests = (await alice.get("/chat/vault/requests")).json()["requests"]
    assert sorted(request["user"] for request in requests) == ["bob", "carol"]
    unknown = await carol.post("/join/no-such-link")
    assert_error(unknown, 404, "not_found", "unknown or revoked join link")


@pytest.mark.asyncio
async def test_join_requests_are_for_the_owner_only(server: ms.MessengerServer) -> None:
    alice, bob, carol = await login(server, "alice", "bob", "carol")
    await create_private(alice)
    await bob.post(await make_link(alice))

    listed = await bob.get("/chat/vault/requests")
    decided = await carol.post("/chat/vault/requests/bob", {"approve": True})

    assert_error(listed, 403, "forbidden", "only the owner of vault may do that")
    assert_error(decided, 403, "forbidden", "only the owner of vault may do that")
    requests = (await alice.get("/chat/vault/requests")).json()["requests"]
    assert [request["user"] for request in requests] == ["bob"]


@pytest.mark.asyncio
async def test_approved_request_makes_a_member_who_can_post(server: ms.MessengerServer) -> None:
    alice, bob = await login(server, "alice", "bob")
    await create_private(alice)
    await alice.posted("welcome", chat="vault")
    await bob.post(await make_link(alice))

    response = await alice.post("/chat/vault/requests/bob", {"approve": True})

    assert response.status == 200
    assert response.json()["chat"]["members"] == 2
    assert (await alice.get("/chat/vault/requests")).json()["requests"] == []
    assert "vault" in await bob.chat_names()
    assert await bob.history("vault") == ["welcome"]
    await bob.posted("thanks", chat="vault")
    assert await alice.history("vault") == ["welcome", "thanks"]


@pytest.mark.asyncio
async def test_declined_request_is_removed_without_membership(
    server: ms.MessengerServer,
) -> None:
    alice, bob = await login(server, "alice", "bob")
    await create_private(alice)
    await bob.post(await make_link(alice))

    response = await alice.post("/chat/vault/requests/bob", {"approve": False})

    assert response.status == 200
    assert response.json()["chat"]["members"] == 1
    assert (await alice.get("/chat/vault/requests")).json()["requests"] == []
    history = await bob.get("/history?chat=vault")
    assert_error(history, 403, "not_a_member", "you are not a member of vault")
    join = await bob.join("vault")
    assert_error(join, 403, "forbidden", "vault is private: ask its owner for an invitation")


@pytest.mark.asyncio
async def test_private_chat_owner_who_leaves_may_rejoin(server: ms.MessengerServer) -> None:
    (alice,) = await login(server, "alice")
    await create_private(alice)
    await alice.posted("note to self", chat="vault")

    left = await alice.post("/chat/vault/leave")
    away = await alice.get("/history?chat=vault")
    back = await alice.join("vault")

    assert left.status == 200
    assert_error(away, 403, "not_a_member", "you are not a member of vault")
    assert back.status == 200
    assert (back.json()["chat"]["owner"], back.json()["chat"]["members"]) == ("alice", 1)
    await alice.posted("back again", chat="vault")
    assert await alice.history("vault") == ["note to self", "back again"]


# Limits and moderation #######################################################


@pytest.mark.asyncio
async def test_chat_message_expires_ttl_after_posting(
    moderated: ms.MessengerServer, clock: FakeClock
) -> None:
    alice, bob = await login(moderated, "alice", "bob")
    parent = await alice.posted("short-lived")
    clock.advance(30)
    comment = await bob.posted("reply", reply_to=parent["id"])

    clock.advance(TTL - 30 - 1)
    assert ids(await bob.seen()) == [parent["id"], comment["id"]]
    assert await bob.history() == ["short-lived", "reply"]
    thread = await bob.get(f"/messages/{parent['id']}")
    assert thread.status == 200 and thread.json()["comments"] == [comment]

    clock.advance(1)
    assert ids(await bob.seen()) == [comment["id"]]
    assert await bob.history() == ["reply"]
    gone = await bob.get(f"/messages/{parent['id']}")
    assert_error(gone, 404, "not_found", "no message 1 that you can see")
    late = await bob.send("too late", reply_to=parent["id"])
    assert_error(late, 404, "not_found", f"no message {parent['id']} that you can see")

    clock.advance(30)
    assert await bob.seen() == []
    assert await alice.history() == []


@pytest.mark.asyncio
async def test_private_message_expires_ttl_after_first_delivery(
    moderated: ms.MessengerServer, clock: FakeClock
) -> None:
    alice, bob = await login(moderated, "alice", "bob")
    message = await alice.posted("for bob", to="bob")

    clock.advance(10 * TTL)  # never delivered: it waits for bob
    moderated.messenger.tick()
    assert ids(await alice.seen()) == [message["id"]]
    assert ids(await bob.seen()) == [message["id"]]  # delivered now

    clock.advance(TTL - 1)
    moderated.messenger.tick()
    assert (await bob.get(f"/messages/{message['id']}")).status == 200

    clock.advance(1)
    moderated.messenger.tick()
    for party in (alice, bob):
        assert await party.seen() == []
        gone = await party.get(f"/messages/{message['id']}")
        assert_error(gone, 404, "not_found", f"no message {message['id']} that you can see")


@pytest.mark.asyncio
async def test_expired_comment_leaves_the_thread_of_a_live_parent(
    moderated: ms.MessengerServer, clock: FakeClock
) -> None:
    alice, bob = await login(moderated, "alice", "bob")
    parent = await alice.posted("first", to="bob")
    comment = await alice.posted("addendum", reply_to=parent["id"])
    received = await bob.get(f"/messages?since={parent['id']}")  # bob receives the comment
    assert ids(received.json()["messages"]) == [comment["id"]]
    clock.advance(30)
    assert ids(await bob.seen()) == [parent["id"], comment["id"]]  # and the parent, later

    clock.advance(TTL - 30 - 1)
    assert (await alice.get(f"/messages/{parent['id']}")).json()["comments"] == [comment]
    clock.advance(1)
    thread = await alice.get(f"/messages/{parent['id']}")

    assert thread.status == 200
    assert thread.json()["comments"] == []
    assert ids(await bob.seen()) == [parent["id"]]


def rate_headers(response: RawResponse) -> tuple[str | None, str | None, str | None]:
    return (
        response.headers.get("x-ratelimit-limit"),
        response.headers.get("x-ratelimit-remaining"),
        response.headers.get("x-ratelimit-reset"),
    )


@pytest.mark.asyncio
async def test_general_rate_limit_refuses_the_send_past_the_limit(
    moderated: ms.MessengerServer, clock: FakeClock
) -> None:
    (alice,) = await login(moderated, "alice")
    reset = str(int(T0 + RATE_WINDOW))
    for remaining in range(RATE_LIMIT - 1, -1, -1):
        response = await alice.send(f"left {remaining}")
        assert response.status == 201
        assert rate_headers(response) == (str(RATE_LIMIT), str(remaining), reset)

    clock.advance(40)
    refused = await alice.send("one too many")

    assert_error(refused, 429, "rate_limited", "at most 3 messages per window in general")
    assert refused.headers["retry-after"] == str(int(RATE_WINDOW - 40))
    assert rate_headers(refused) == (str(RATE_LIMIT), "0", reset)
    assert await alice.history() == ["left 2", "left 1", "left 0"]
    assert (await alice.status())["limits"]["general_left"] == 0


@pytest.mark.asyncio
async def test_general_rate_limit_resets_when_the_window_ends(
    moderated: ms.MessengerServer, clock: FakeClock
) -> None:
    (alice,) = await login(moderated, "alice")
    for _ in range(RATE_LIMIT):
        await alice.posted()
    clock.advance(RATE_WINDOW - 1)
    assert_error(await alice.send("still early"), 429, "rate_limited", RATE_LIMITED)

    clock.advance(1)
    response = await alice.send("new window")

    assert response.status == 201
    reset = str(int(T0 + 2 * RATE_WINDOW))
    assert rate_headers(response) == (str(RATE_LIMIT), str(RATE_LIMIT - 1), reset)
    assert (await alice.history())[-1] == "new window"  # the first three expired (TTL 60)


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["comment", "scheduled", "cancelled-scheduled"])
async def test_general_rate_limit_counts_comments_and_scheduled_messages(
    moderated: ms.MessengerServer, kind: str
) -> None:
    alice, bob = await login(moderated, "alice", "bob")
    parent = await bob.posted("topic")
    for _ in range(RATE_LIMIT - 1):
        await alice.posted()
    if kind == "comment":
        await alice.posted("comment", reply_to=parent["id"])
    else:
        record = (await alice.send("later", send_at=T0 + 50)).json()["scheduled"]
        if kind == "cancelled-scheduled":
            assert (await alice.call("DELETE", f"/scheduled/{record['id']}")).status == 204

    refused = await alice.send("over")
    refused_comment = await alice.send("over", reply_to=parent["id"])
    refused_scheduled = await alice.send("over", send_at=T0 + 50)

    for response in (refused, refused_comment, refused_scheduled):
        assert_error(response, 429, "rate_limited", "at most 3 messages per window in general")
    assert "over" not in await bob.seen_texts()
    assert all(record["text"] != "over" for record in await alice.scheduled())


@pytest.mark.asyncio
async def test_scheduled_message_to_general_counts_once_against_the_limit(
    moderated: ms.MessengerServer, clock: FakeClock
) -> None:
    (alice,) = await login(moderated, "alice")
    accepted = await alice.send("scheduled", send_at=T0 + 10)
    assert accepted.status == 202
    assert rate_headers(accepted) == (str(RATE_LIMIT), str(RATE_LIMIT - 1), str(int(T0 + 100)))

    clock.advance(10)
    moderated.messenger.tick()

    assert await alice.history() == ["scheduled"]
    assert (await alice.status())["limits"]["general_left"] == RATE_LIMIT - 1
    for _ in range(RATE_LIMIT - 1):
        await alice.posted()
    assert_error(await alice.send("over"), 429, "rate_limited", RATE_LIMITED)


@pytest.mark.asyncio
@pytest.mark.parametrize("where", ["private", "other-chat"])
async def test_general_rate_limit_leaves_other_destinations_alone(
    moderated: ms.MessengerServer, where: str
) -> None:
    alice, bob = await login(moderated, "alice", "bob")
    await bob.join("lounge")
    await alice.join("lounge")
    for _ in range(RATE_LIMIT):
        await alice.posted(chat="general")
    fields = {"to": "bob"} if where == "private" else {"chat": "lounge"}

    response = await alice.send("elsewhere", **fields)

    assert response.status == 201
    assert rate_headers(response) == (None, None, None)
    assert "elsewhere" in await bob.seen_texts()


@pytest.mark.asyncio
async def test_status_shows_the_callers_limits(
    moderated: ms.MessengerServer, clock: FakeClock
) -> None:
    alice, bob = await login(moderated, "alice", "bob")
    fresh = {"general_left": 3, "general_reset": None, "reports": 0, "banned_until": None}
    assert (await alice.status())["limits"] == fresh

    await alice.posted()
    clock.advance(10)
    await bob.post("/report", {"user": "alice"})

    assert (await alice.status())["limits"] == {
        "general_left": 2,
        "general_reset": T0 + RATE_WINDOW,
        "reports": 1,
        "banned_until": None,
    }


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("target", "status"), [("alice", 400), ("nobody", 404)], ids=["self", "unknown-user"]
)
async def test_report_of_oneself_or_an_unknown_user_is_refused(
    moderated: ms.MessengerServer, target: str, status: int
) -> None:
    (alice,) = await login(moderated, "alice")

    response = await alice.post("/report", {"user": target, "reason": "?"})

    assert response.status == status
    assert (await alice.status())["limits"]["reports"] == 0


@pytest.mark.asyncio
async def test_report_by_the_same_reporter_counts_once(moderated: ms.MessengerServer) -> None:
    alice, bob, carol = await login(moderated, "alice", "bob", "carol")
    await alice.posted("buy cheap watches")

    answers = [
        await reporter.post("/report", {"user": "alice", "reason": "spam"})
        for reporter in (bob, bob, bob, carol)
    ]

    assert [a.json()["reports"] for a in answers] == [1, 1, 1, 2]
    assert all(a.json()["banned_until"] is None for a in answers)
    assert (await alice.status())["limits"]["reports"] == 2
    await alice.posted("still free")


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["chat", "private", "comment", "scheduled"])
async def test_three_distinct_reporters_ban_every_kind_of_send(
    moderated: ms.MessengerServer, kind: str
) -> None:
    alice, bob, carol, dave = await login(moderated, "alice", "bob", "carol", "dave", apart=True)
    parent = await bob.posted("topic")
    await alice.join("lounge")
    fields: dict[str, Any] = {
        "chat": {"chat": "lounge"},
        "private": {"to": "bob"},
        "comment": {"reply_to": parent["id"]},
        "scheduled": {"send_at": T0 + 10},
    }[kind]

    until = await ban(alice, bob, carol, dave)
    response = await alice.send("banned words", **fields)

    assert until == T0 + BAN_DURATION
    assert_error(
        response, 403, "banned", "you are banned from sending after reports from other users"
    )
    assert response.json()["until"] == until
    assert (await alice.status())["limits"]["banned_until"] == until
    assert "banned words" not in await bob.seen_texts()
    assert await alice.scheduled() == []


@pytest.mark.asyncio
async def test_ban_ends_on_time_and_the_report_count_restarts(
    moderated: ms.MessengerServer, clock: FakeClock
) -> None:
    alice, bob, carol, dave, erin = await login(
        moderated, "alice", "bob", "carol", "dave", "erin", apart=True
    )
    await ban(alice, bob, carol, dave)

    clock.advance(BAN_DURATION - 1)
    assert_error(await alice.send("not yet"), 403, "banned", "you are banned from sending")
    clock.advance(1)
    response = await alice.send("free again")

    assert response.status == 201
    limits = (await alice.status())["limits"]
    assert (limits["reports"], limits["banned_until"]) == (0, None)
    again = await bob.post("/report", {"user": "alice"})  # bob helped ban her: no voice now
    assert (again.status, again.json()["reports"], again.json()["banned_until"]) == (200, 0, None)
    fresh = await erin.post("/report", {"user": "alice"})
    assert (fresh.json()["reports"], fresh.json()["banned_until"]) == (1, None)
    await alice.posted("one report is not a ban")


@pytest.mark.asyncio
async def test_reports_are_rate_limited(tmp_path: Path, clock: FakeClock) -> None:
    rules = dataclasses.replace(SMALL_RULES, report_limit=2)
    async with ms.MessengerServer(make_config(tmp_path, rules=rules), clock) as server:
        alice, bob, carol, dave = await login(server, "alice", "bob", "carol", "dave")
        for spammer in (bob, carol, dave):
            await spammer.posted("buy cheap watches")
        for target in ("bob", "carol"):
            assert (await alice.post("/report", {"user": target})).status == 200

        refused = await alice.post("/report", {"user": "dave"})
        repeated = await alice.post("/report", {"user": "bob"})

        assert_error(refused, 429, "rate_limited", "too many reports: try again later")
        assert int(refused.headers["retry-after"]) == int(RATE_WINDOW)
        assert (await dave.status())["limits"]["reports"] == 0
        assert (repeated.status, repeated.json()["reports"]) == (200, 1)
        clock.advance(RATE_WINDOW)
        later = await alice.post("/report", {"user": "dave"})
        assert (later.status, later.json()["reports"]) == (200, 1)
        assert (await carol.status())["limits"]["reports"] == 1
        assert (await bob.status())["limits"]["reports"] == 1


# Files #####################################################################


@pytest.mark.asyncio
async def test_upload_answers_201_with_the_file_record(files_server: ms.MessengerServer) -> None:
    (alice,) = await login(files_server, "alice")
    data = b"\x89PNG not really"

    response = await alice.upload(data, "pic.png", "image/png")

    assert response.status == 201
    record = response.json()["file"]
    assert isinstance(record["id"], str) and record["id"]
    assert {key: value for key, value in record.items() if key != "id"} == {
        "name": "pic.png",
        "size": len(data),
        "type": "image/png",
        "sha256": hashlib.sha256(data).hexdigest(),
    }


@pytest.mark.asyncio
async def test_an_empty_upload_overlapping_another_is_stored(
    files_server: ms.MessengerServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by review: an empty upload counted 0 bytes under way; when another upload of
    the same user ended first, the count was gone and the empty one's end was a 500, its
    file left on disk unrecorded."""
    (alice,) = await login(files_server, "alice")
    save_upload = files_server.store.save_upload
    empty_saved, other_answered = asyncio.Event(), asyncio.Event()

    async def held_when_empty(chunks: AsyncIterator[bytes]) -> tuple[str, str, int]:
        saved = await save_upload(chunks)
        if saved[2] == 0:  # the empty one ends after the other
            empty_saved.set()
            await other_answered.wait()
        return saved

    monkeypatch.setattr(files_server.store, "save_upload", held_when_empty)
    async with Client(files_server.port) as other:
        await other.send_raw(
            f"POST /files?name=big HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {alice.token}"
            "\r\nContent-Length: 100\r\n\r\n".encode() + b"x" * 99
        )
        empty = asyncio.create_task(alice.upload(b"", "empty.txt"))
        await empty_saved.wait()
        await other.send_raw(b"x")
        assert (await other.response()).status == 201
        other_answered.set()
        assert (await empty).status == 201
    assert files_server.app.uploading == {}
    names = sorted(stored.name for stored in files_server.messenger.files.values())
    assert names == ["big", "empty.txt"]


@pytest.mark.asyncio
async def test_download_round_trips_every_byte_value(files_server: ms.MessengerServer) -> None:
    (alice,) = await login(files_server, "alice")
    data = bytes(range(256))
    record = await alice.uploaded(data, "résumé 1.bin")

    async with Client(files_server.port) as client:
        head = await client.request("HEAD", f"/files/{record['id']}", token=alice.token)
        got = await client.request("GET", f"/files/{record['id']}", token=alice.token)

    assert got.status == 200
    assert got.body == data
    assert hashlib.sha256(got.body).hexdigest() == record["sha256"]
    assert got.headers["content-type"] == "application/octet-stream"
    assert got.headers["content-length"] == "256"
    disposition = got.headers["content-disposition"]
    assert disposition.startswith("attachment")
    assert "filename*=UTF-8''r%C3%A9sum%C3%A9%201.bin" in disposition
    assert got.headers["x-content-type-options"] == "nosniff"
    assert head.status == 200
    assert head.body == b""
    for name in ("content-type", "content-length", "content-disposition"):
        assert head.headers[name] == got.headers[name]


@pytest.mark.asyncio
async def test_upload_of_exactly_the_size_limit_is_accepted_and_one_byte_more_is_413(
    files_server: ms.MessengerServer,
) -> None:
    (alice,) = await login(files_server, "alice")

    exact = await alice.upload(b"x" * MAX_FILE)
    over = await alice.upload(b"x" * (MAX_FILE + 1))

    assert exact.status == 201 and exact.json()["file"]["size"] == MAX_FILE
    assert_error(over, 413, "too_large", "files are limited to 1024 bytes")
    assert stored_blobs(files_server) == [exact.json()["file"]["id"]]


@pytest.mark.asyncio
async def test_upload_over_the_limit_is_413_before_the_body_is_read(
    files_server: ms.MessengerServer,
) -> None:
    (alice,) = await login(files_server, "alice")
    head = (
        "POST /files?name=big.bin HTTP/1.1\r\nHost: test\r\n"
        f"Authorization: Bearer {alice.token}\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Length: {MAX_FILE + 1}\r\nExpect: 100-continue\r\n\r\n"
    )
    async with Client(files_server.port) as client:
        await client.send_raw(head.encode())

        first = await asyncio.wait_for(client.reader.readuntil(b"\r\n\r\n"), 5)
        status_line, *header_lines = first.decode("latin-1").split("\r\n")
        length = next(
            value for name, _, value in (line.partition(":") for line in header_lines)
            if name.lower() == "content-length"
        )
        body = await client.reader.readexactly(int(length))

    assert status_line.startswith("HTTP/1.1 413 "), status_line  # no 100 Continue first
    assert RawResponse(413, {}, body).json()["error"] == "too_large"
    assert stored_blobs(files_server) == []


@pytest.mark.asyncio
async def test_upload_with_expect_100_continue_gets_100_then_201(
    files_server: ms.MessengerServer,
) -> None:
    (alice,) = await login(files_server, "alice")
    data = bytes(range(256)) * 4
    head = (
        "POST /files?name=curl.bin HTTP/1.1\r\nHost: test\r\n"
        f"Authorization: Bearer {alice.token}\r\nContent-Length: {len(data)}\r\n"
        "Expect: 100-continue\r\n\r\n"
    )
    async with Client(files_server.port) as client:
        await client.send_raw(head.encode())
        interim = await asyncio.wait_for(client.reader.readuntil(b"\r\n\r\n"), 5)
        await client.send_raw(data)
        response = await client.response()

    assert interim.startswith(b"HTTP/1.1 100 ")
    assert response.status == 201
    assert response.json()["file"]["sha256"] == hashlib.sha256(data).hexdigest()


@pytest.mark.asyncio
async def test_upload_without_content_length_or_chunked_is_411(
    files_server: ms.MessengerServer,
) -> None:
    (alice,) = await login(files_server, "alice")
    request = (
        "POST /files?name=empty.bin HTTP/1.1\r\nHost: test\r\n"
        f"Authorization: Bearer {alice.token}\r\n\r\n"
    )
    async with Client(files_server.port) as client:
        await client.send_raw(request.encode())
        response = await client.response()

    assert_error(
        response, 411, "length_required", "a file upload needs Content-Length or a chunked body"
    )
    assert stored_blobs(files_server) == []


@pytest.mark.asyncio
async def test_chunked_upload_is_stored_with_its_counted_size(
    files_server: ms.MessengerServer,
) -> None:
    (alice,) = await login(files_server, "alice")
    request = (
        "POST /files?name=chunked.bin HTTP/1.1\r\nHost: test\r\n"
        f"Authorization: Bearer {alice.token}\r\nTransfer-Encoding: chunked\r\n\r\n"
        "5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    )
    async with Client(files_server.port) as client:
        await client.send_raw(request.encode())
        response = await client.response()

    assert response.status == 201
    stored = response.json()["file"]
    assert (stored["size"], stored["sha256"]) == (11, hashlib.sha256(b"hello world").hexdigest())
    blobs = stored_blobs(files_server)
    assert [(files_server.store.files / blob).read_bytes() for blob in blobs] == [b"hello world"]


@pytest.mark.asyncio
async def test_file_is_readable_by_the_uploader_and_the_audience_of_a_message_carrying_it(
    files_server: ms.MessengerServer,
) -> None:
    alice, bob, carol = await login(files_server, "alice", "bob", "carol")
    record = await alice.uploaded(b"for bob only")
    path = f"/files/{record['id']}"
    unusable = f"no file {record['id']!r} that you can use"
    assert_error(await bob.get(path), 404, "not_found", unusable)  # not shared yet

    await alice.posted("", to="bob", file=record["id"])

    assert (await alice.get(path)).body == b"for bob only"
    assert (await bob.get(path)).body == b"for bob only"
    stranger = await carol.get(path)
    assert_error(stranger, 404, "not_found", "no file")
    assert (await carol.call("HEAD", path)).status == 404


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "name",
    ["../../etc/passwd", "..\\..\\boot.ini", "/etc/shadow", "..", ".hidden", 'quo"te;.txt'],
)
async def test_upload_keeps_a_hostile_name_as_metadata_only(
    files_server: ms.MessengerServer, tmp_path: Path, name: str
) -> None:
    (alice,) = await login(files_server, "alice")

    record = await alice.uploaded(b"harmless", name)

    assert record["name"] == name
    assert stored_blobs(files_server) == [record["id"]]
    assert re.fullmatch(r"[A-Za-z0-9_-]+", record["id"])
    assert (files_server.store.files / record["id"]).read_bytes() == b"harmless"
    assert not (tmp_path / "etc").exists()
    got = await alice.get(f"/files/{record['id']}")
    fallback = re.search(r'filename="([^"]*)"', got.headers["content-disposition"])
    assert fallback is not None
    assert not {"/", "\\", '"'} & set(fallback[1])
    assert f"filename*=UTF-8''{quote(name, safe='')}" in got.headers["content-disposition"]


@pytest.mark.asyncio
async def test_upload_cut_short_leaves_no_file(files_server: ms.MessengerServer) -> None:
    (alice,) = await login(files_server, "alice")
    head = (
        "POST /files?name=partial.bin HTTP/1.1\r\nHost: test\r\n"
        f"Authorization: Bearer {alice.token}\r\nContent-Length: 1000\r\n\r\n"
    )
    async with Client(files_server.port) as client:
        await client.send_raw(head.encode() + b"x" * 600)
        client.writer.write_eof()  # the client goes away mid-body
        await asyncio.wait_for(client.reader.read(), 5)  # until the server closes

    assert stored_blobs(files_server) == []
    assert (await alice.status())["user"] == "alice"  # the server serves on


@pytest.mark.asyncio
async def test_message_with_a_file_carries_the_file_object(
    files_server: ms.MessengerServer,
) -> None:
    alice, bob = await login(files_server, "alice", "bob")
    record = await alice.uploaded(b"notes", "notes.txt")

    message = await alice.posted("", file=record["id"])

    shown = {"id": record["id"], "name": "notes.txt", "size": 5, "type": record["type"]}
    assert message["file"] == shown
    assert message["text"] == ""
    (received,) = await bob.seen()
    assert received["file"] == shown
    assert (await bob.get(f"/files/{record['id']}")).body == b"notes"


@pytest.mark.asyncio
@pytest.mark.parametrize("owner", ["someone-else", "nobody"])
async def test_send_with_a_file_not_uploaded_by_the_sender_is_404(
    files_server: ms.MessengerServer, owner: str
) -> None:
    alice, bob = await login(files_server, "alice", "bob")
    file_id = (await alice.uploaded(b"alice's"))["id"] if owner == "someone-else" else "nope"

    response = await bob.send("look", file=file_id)

    assert_error(response, 404, "not_found", f"no file {file_id!r} that you can use")
    assert await bob.history() == []
    unusable = f"no file {file_id!r} that you can use"
    assert_error(await bob.get(f"/files/{file_id}"), 404, "not_found", unusable)


# Restart ###################################################################


@pytest.mark.asyncio
async def test_restart_keeps_sessions_and_read_positions(restartable: Restarter) -> None:
    users = await login(restartable.server, "alice", "bob")
    alice, bob = users
    message = await alice.posted("read before the restart")
    await bob.get(f"/messages?since={message['id']}")
    await alice.join("lounge")

    server = await restartable.restart()

    alice, bob = (api.on(server) for api in users)
    assert (await alice.status())["chat"] == "lounge"  # the old tokens still work
    assert (await bob.status())["unread"]["total"] == 0
    assert (await bob.get("/messages")).json()["messages"] == []  # from the read position
    assert await bob.seen() == [message]


@pytest.mark.asyncio
async def test_restart_keeps_messages_and_comments(restartable: Restarter) -> None:
    users = await login(restartable.server, "alice", "bob")
    alice, bob = users
    first = await alice.posted("first")
    second = await bob.posted("second")
    private = await alice.posted("psst", to="bob")
    comment = await bob.posted("re", reply_to=private["id"])

    server = await restartable.restart()

    alice, bob = (api.on(server) for api in users)
    assert await bob.seen() == [first, second, private, comment]
    thread = await alice.get(f"/messages/{private['id']}")
    assert thread.json() == {"message": private, "comments": [comment]}


@pytest.mark.asyncio
async def test_restart_keeps_private_chats_invites_requests_and_the_link(
    restartable: Restarter,
) -> None:
    users = await login(restartable.server, "alice", "bob", "carol", "dave", "erin")
    alice, bob, carol, dave, erin = users
    await create_private(alice)
    await alice.post("/chat/vault/invite", {"user": "bob"})
    old_link = await make_link(alice)
    link = await make_link(alice)
    assert (await carol.post(link)).status == 202

    server = await restartable.restart()

    alice, bob, carol, dave, erin = (api.on(server) for api in users)
    (chat,) = [c for c in (await alice.status())["chats"] if c["name"] == "vault"]
    assert (chat["private"], chat["owner"], chat["members"]) == (True, "alice", 1)
    assert "vault" not in await dave.chat_names()
    requests = (await alice.get("/chat/vault/requests")).json()["requests"]
    assert requests == [{"user": "carol", "ts": T0}]
    assert_error(await dave.post(old_link), 404, "not_found", "unknown or revoked join link")
    assert (await dave.post(link)).status == 202  # the current link works on
    private = "vault is private: ask its owner for an invitation"
    assert_error(await erin.join("vault"), 403, "forbidden", private)
    assert (await bob.join("vault")).status == 200  # invited
    assert (await carol.post(link)).json()["status"] == "pending"
    approved = await alice.post("/chat/vault/requests/carol", {"approve": True})
    assert approved.json()["chat"]["members"] == 3


@pytest.mark.asyncio
async def test_restart_keeps_pending_scheduled_messages(
    restartable: Restarter, clock: FakeClock
) -> None:
    users = await login(restartable.server, "alice", "bob")
    alice, bob = users
    record = (await alice.send("later", to="bob", send_at=T0 + 500)).json()["scheduled"]

    server = await restartable.restart()

    alice, bob = (api.on(server) for api in users)
    assert await alice.scheduled() == [record]
    assert await bob.seen() == []
    clock.advance(500)
    server.messenger.tick()
    assert await bob.seen_texts() == ["later"]
    assert await alice.scheduled() == []


@pytest.mark.asyncio
async def test_restart_keeps_bans_and_reports(restartable: Restarter) -> None:
    users = await login(restartable.server, "alice", "bob", "carol", "dave", "erin", apart=True)
    alice, bob, carol, dave, erin = users
    until = await ban(alice, bob, carol, dave)
    await erin.posted("buy cheap watches")
    await alice.post("/report", {"user": "erin"})

    server = await restartable.restart()

    alice, bob, carol, dave, erin = (api.on(server) for api in users)
    refused = await alice.send("am I free?")
    assert_error(
        refused, 403, "banned", "you are banned from sending after reports from other users"
    )
    assert refused.json()["until"] == until == T0 + DEFAULT_BAN
    assert (await alice.status())["limits"]["reports"] == 3
    assert (await erin.status())["limits"]["reports"] == 1
    again = await alice.post("/report", {"user": "erin"})  # a reporter still counts once
    assert again.json()["reports"] == 1


@pytest.mark.asyncio
async def test_restart_sends_a_scheduled_message_that_fell_due_while_down_exactly_once(
    tmp_path: Path, clock: FakeClock
) -> None:
    config = make_config(tmp_path)
    async with ms.MessengerServer(config, clock) as first:
        alice, bob = await login(first, "alice", "bob")
        assert (await alice.send("while you were away", send_at=T0 + 100)).status == 202

    clock.advance(300)  # the server is down when the message falls due
    async with ms.MessengerServer(config, clock) as second:
        assert await bob.on(second).history() == ["while you were away"]
        assert await alice.on(second).scheduled() == []

    clock.advance(300)
    async with ms.MessengerServer(config, clock) as third:
        delivered = [m for m in await bob.on(third).seen() if m["text"] == "while you were away"]
        assert len(delivered) == 1
        assert delivered[0]["from"] == "alice"
        assert T0 + 100 <= delivered[0]["ts"] <= T0 + 300
