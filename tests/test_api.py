"""The core of the HTTP contract (API.md) over real sockets against a real server.

Identity, messages, long-polls, history, chats, status, routing and body errors. Every
request goes through the raw HTTP/1.1 ``Client``; domain time comes from the ``FakeClock``.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

import messenger_server as ms
from tests.conftest import (
    JSON_TYPE,
    Client,
    FakeClock,
    assert_error,
    call,
    connect,
    json_body,
    login,
    make_config,
    settle,
    waiting,
)

MESSAGE_KEYS = {"id", "chat", "to", "from", "text", "ts", "reply_to", "file", "notice"}
CHAT_KEYS = {"name", "private", "owner", "members", "unread"}
USER_NAME_RULE = "user must match [A-Za-z0-9_-]{1,32}"
PASSWORD_RULE = "password must be 1 to 1024 characters"
CHAT_NAME_RULE = "chat_name must match [A-Za-z0-9_-]{1,64}"
NOT_JSON = "the body is not valid JSON"
NOT_AN_OBJECT = "the body must be a JSON object"
SINCE_RULE = "since must be an integer of at least 0"
LIMIT_RULE = "limit must be an integer of at least 1"
TEXT_RULE = "text must be 1 to 4096 characters, or empty with a file"
REPLY_TO_RULE = "reply_to must be an integer of at least 1"
SEND_AT_RULE = "send_at must be in the future, at most 7 days ahead"
FINITE_SEND_AT = "send_at must be a finite number of at least 0"


# Identity ###################################################################


@pytest.mark.asyncio
async def test_connect_registers_then_logs_in(server: ms.MessengerServer) -> None:
    first = await call(server.port, "POST", "/connect", {"user": "alice", "password": "pw"})
    assert first.status == 201
    body = first.json()
    assert set(body) == {"token", "user", "chat", "history", "unread"}
    assert (body["user"], body["chat"], body["history"], body["unread"]) == (
        "alice", "general", [], 0,
    )
    assert isinstance(body["token"], str) and body["token"]
    again = await call(server.port, "POST", "/connect", {"user": "alice", "password": "pw"})
    assert again.status == 200
    assert again.json()["user"] == "alice"
    assert again.json()["token"] != body["token"]


@pytest.mark.asyncio
async def test_connect_new_user_is_member_of_general(server: ms.MessengerServer) -> None:
    (alice,) = await login(server, "alice")
    chats = (await alice.status())["chats"]
    assert [c["name"] for c in chats] == ["general"]


@pytest.mark.asyncio
async def test_connect_names_are_case_sensitive(server: ms.MessengerServer) -> None:
    lower = await call(server.port, "POST", "/connect", {"user": "alice", "password": "a"})
    upper = await call(server.port, "POST", "/connect", {"user": "Alice", "password": "b"})
    assert (lower.status, upper.status) == (201, 201)


@pytest.mark.asyncio
async def test_connect_answers_history_and_unread(server: ms.MessengerServer) -> None:
    (bob,) = await login(server, "bob")
    await connect(server.port, "alice")
    for text in ("one", "two"):
        await bob.posted(text)
    again = await call(server.port, "POST", "/connect", {"user": "alice", "password": "secret"})
    body = again.json()
    assert [m["text"] for m in body["history"]] == ["one", "two"]
    assert body["unread"] == 2


@pytest.mark.asyncio
async def test_connect_history_is_the_last_n_oldest_first(
    tmp_path: Path, clock: FakeClock
) -> None:
    config = make_config(tmp_path, rules=ms.Rules(history=3))
    async with ms.MessengerServer(config, clock) as server:
        (alice,) = await login(server, "alice")
        for n in range(5):
            await alice.posted(f"m{n}")
        again = await call(server.port, "POST", "/connect", {"user": "alice", "password": "secret"})
        assert [m["text"] for m in again.json()["history"]] == ["m2", "m3", "m4"]


@pytest.mark.asyncio
async def test_connect_wrong_password_401_with_www_authenticate(
    server: ms.MessengerServer,
) -> None:
    await connect(server.port, "alice", "right")
    response = await call(server.port, "POST", "/connect", {"user": "alice", "password": "wrong"})
    assert_error(response, 401, "unauthorized", "wrong password")
    assert response.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"user": "bad name", "password": "x"}, USER_NAME_RULE),
        ({"user": "a" * 33, "password": "x"}, USER_NAME_RULE),
        ({"user": "", "password": "x"}, USER_NAME_RULE),
        ({"user": "alice", "password": ""}, PASSWORD_RULE),
        ({"user": "alice", "password": "x" * 1025}, PASSWORD_RULE),
        ({"user": "alice"}, "password is required"),
        ({"password": "x"}, "user is required"),
    ],
    ids=["space", "33-chars", "empty-user", "empty-password", "long-password", "no-password",
         "no-user"],
)
async def test_connect_invalid_fields_400(
    server: ms.MessengerServer, body: Any, message: str
) -> None:
    response = await call(server.port, "POST", "/connect", body)
    assert_error(response, 400, "invalid_field", message)


@pytest.mark.asyncio
async def test_connect_limits_are_inclusive(server: ms.MessengerServer) -> None:
    response = await call(
        server.port, "POST", "/connect", {"user": "a" * 32, "password": "é" * 1024}
    )
    assert response.status == 201, response.body


@pytest.mark.asyncio
async def test_connect_lock_out_after_wrong_passwords(tmp_path: Path, clock: FakeClock) -> None:
    config = make_config(tmp_path, rules=ms.Rules(login_failures=3))
    async with ms.MessengerServer(config, clock) as server:
        port = server.port
        await connect(port, "alice", "right")
        await connect(port, "bob", "right")
        for _ in range(3):
            wrong = await call(port, "POST", "/connect", {"user": "alice", "password": "nope"})
            assert_error(wrong, 401, "unauthorized", "wrong password")
        locked = await call(port, "POST", "/connect", {"user": "alice", "password": "right"})
        assert_error(locked, 429, "rate_limited", "too many wrong passwords: try again later")
        assert locked.headers["retry-after"] == "60"
        # Another name is not locked out.
        other = await call(port, "POST", "/connect", {"user": "bob", "password": "right"})
        assert other.status == 200
        clock.advance(45)
        still = await call(port, "POST", "/connect", {"user": "alice", "password": "right"})
        assert_error(still, 429, "rate_limited", "too many wrong passwords: try again later")
        assert still.headers["retry-after"] == "15"
        clock.advance(15)
        after = await call(port, "POST", "/connect", {"user": "alice", "password": "right"})
        assert after.status == 200, after.body


@pytest.mark.asyncio
async def test_connect_failures_outside_the_window_do_not_lock(
    tmp_path: Path, clock: FakeClock
) -> None:
    config = make_config(tmp_path, rules=ms.Rules(login_failures=3))
    async with ms.MessengerServer(config, clock) as server:
        port = server.port
        await connect(port, "alice", "right")
        for _ in range(2):
            await call(port, "POST", "/connect", {"user": "alice", "password": "nope"})
        clock.advance(61)
        for _ in range(2):
            await call(port, "POST", "/connect", {"user": "alice", "password": "nope"})
        response = await call(port, "POST", "/connect", {"user": "alice", "password": "right"})
        assert response.status == 200, response.body


@pytest.mark.asyncio
async def test_connect_lock_out_counts_concurrent_guesses(
    tmp_path: Path, clock: FakeClock
) -> None:
    config = make_config(tmp_path, rules=ms.Rules(login_failures=1))
    async with ms.MessengerServer(config, clock) as server:
        await connect(server.port, "alice", "right")
        guesses = [{"user": "alice", "password": f"guess{n}"} for n in range(10)]
        answers = await asyncio.gather(
            *(call(server.port, "POST", "/connect", guess) for guess in guesses)
        )
        statuses = sorted(answer.status for answer in answers)
        places = server.app._hash_slots
        # An address holds one hashing place per core, the rest is refused at once; of the
        # guesses hashed together, those finishing after the first failure are refused.
        assert statuses == [401] + [429] * (places - 1) + [503] * (10 - places)
        errors = {
            401: ("unauthorized", "wrong password"),
            429: ("rate_limited", "too many wrong passwords: try again later"),
            503: ("unavailable", "the server is busy checking passwords: try again"),
        }
        for answer in answers:
            assert_error(answer, answer.status, *errors[answer.status])


@pytest.mark.asyncio
async def test_sessions_share_state(server: ms.MessengerServer) -> None:
    port = server.port
    first, second = await login(server, "alice", "alice")
    assert first.token != second.token
    assert (await first.join("room")).status == 201
    assert (await second.status())["chat"] == "room"
    message = await second.posted("from the phone")
    assert message["chat"] == "room"
    assert await first.seen_texts() == ["from the phone"]
    third = await call(port, "POST", "/connect", {"user": "alice", "password": "secret"})
    assert third.json()["chat"] == "room"
    assert [m["text"] for m in third.json()["history"]] == ["from the phone"]
    assert (await first.status())["sessions"] == 3


@pytest.mark.asyncio
async def test_disconnect_revokes_only_that_token(server: ms.MessengerServer) -> None:
    first, second = await login(server, "alice", "alice")
    response = await first.call("POST", "/disconnect")
    assert response.status == 204
    assert response.body == b""
    refused = await first.get("/status")
    assert_error(refused, 401, "unauthorized", "unknown or revoked token: connect again")
    assert refused.headers["www-authenticate"].startswith("Bearer")
    assert_error(
        await first.call("POST", "/disconnect"), 401, "unauthorized",
        "unknown or revoked token: connect again"
    )
    assert (await second.status())["sessions"] == 1


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer garbage", "Bearer ", "Basic YWxpY2U6c2VjcmV0", "garbage"],
    ids=["missing", "unknown", "empty", "basic", "no-scheme"],
)
async def test_token_missing_or_garbage_401(
    server: ms.MessengerServer, authorization: str | None
) -> None:
    message = (
        "unknown or revoked token: connect again" if authorization == "Bearer garbage"
        else "this route needs Authorization: Bearer <token>"
    )
    await connect(server.port, "alice")
    headers = {} if authorization is None else {"Authorization": authorization}
    for method, path in [("GET", "/status"), ("GET", "/messages"), ("POST", "/send")]:
        body = {"text": "hi"} if method == "POST" else None
        response = await call(server.port, method, path, body, headers=headers)
        assert_error(response, 401, "unauthorized", message)
        assert response.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.asyncio
async def test_token_scheme_is_case_insensitive(server: ms.MessengerServer) -> None:
    (alice,) = await login(server, "alice")
    response = await call(
        server.port, "GET", "/status", headers={"Authorization": f"bearer {alice.token}"}
    )
    assert response.status == 200


# Sending ####################################################################


@pytest.mark.asyncio
async def test_send_to_active_chat(server: ms.MessengerServer, clock: FakeClock) -> None:
    (alice,) = await login(server, "alice")
    response = await alice.post("/send", {"text": "hello"})
    assert response.status == 201
    message = response.json()["message"]
    assert set(message) == MESSAGE_KEYS
    assert message == {
        "id": message["id"], "chat": "general", "to": None, "from": "alice", "text": "hello",
        "ts": clock.now, "reply_to": None, "file": None, "notice": None,
    }
    assert isinstance(message["id"], int)


@pytest.mark.asyncio
async def test_send_ids_grow_strictly_across_chats_and_users(
    server: ms.MessengerServer,
) -> None:
    alice, bob = await login(server, "alice", "bob")
    await alice.join("room")
    ids = [
        (await alice.posted("a"))["id"],
        (await bob.posted("b"))["id"],
        (await alice.posted("c", to="bob"))["id"],
        (await bob.posted("d", chat="general"))["id"],
    ]
    assert ids == sorted(set(ids))


@pytest.mark.asyncio
async def test_send_to_named_chat(server: ms.MessengerServer) -> None:
    (alice,) = await login(server, "alice")
    await alice.join("room")
    message = await alice.posted("hi", chat="general")
    assert (message["chat"], message["to"]) == ("general", None)
    assert (await alice.status())["chat"] == "room"


@pytest.mark.asyncio
async def test_send_private(server: ms.MessengerServer) -> None:
    port = server.port
    (alice,) = await login(server, "alice")
    await connect(port, "bob")
    message = await alice.posted("psst", to="bob")
    assert (message["chat"], message["to"], message["from"]) == (None, "bob", "alice")


@pytest.mark.asyncio
async def test_send_with_chat_and_to_400(server: ms.MessengerServer) -> None:
    port = server.port
    (alice,) = await login(server, "alice")
    await connect(port, "bob")
    response = await alice.post("/send", {"text": "x", "chat": "general", "to": "bob"})
    assert_error(response, 400, "invalid_field", "give chat or to, not both")
    assert await alice.seen_texts() == []


@pytest.mark.asyncio
async def test_send_to_unknown_user_404(server: ms.MessengerServer) -> None:
    (alice,) = await login(server, "alice")
    response = await alice.post("/send", {"text": "x", "to": "nobody"})
    assert_error(response, 404, "not_found", "no user named 'nobody'")


@pytest.mark.asyncio
async def test_send_to_unknown_chat_404(server: ms.MessengerServer) -> None:
    (alice,) = await login(server, "alice")
    response = await alice.post("/send", {"text": "x", "chat": "nowhere"})
    assert_error(response, 404, "not_found", "no chat named 'nowhere'")


@pytest.mark.asyncio
async def test_send_to_chat_not_a_member_403(server: ms.MessengerServer) -> None:
    alice, bob = await login(server, "alice", "bob")
    await alice.join("room")
    response = await bob.post("/send", {"text": "x", "chat": "room"})
    assert_error(response, 403, "not_a_member", "you are not a member of room")
    assert await alice.seen_texts() == []


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("text", "message"),
    [("", TEXT_RULE),
     ("x" * 4097, "text must be at most 4096 characters")],
    ids=["empty", "4097"],
)
async def test_send_text_length_400(server: ms.MessengerServer, text: str, message: str) -> None:
    (alice,) = await login(server, "alice")
    response = await alice.post("/send", {"text": text})
    assert_error(response, 400, "invalid_field", message)


@pytest.mark.asyncio
async def test_send_text_without_text_400(server: ms.MessengerServer) -> None:
    (alice,) = await login(server, "alice")
    response = await alice.post("/send", {"chat": "general"})
    assert_error(
        response, 400, "invalid_field", "text must be 1 to 4096 characters, or empty with a file"
    )


@pytest.mark.asyncio
@pytest.mark.parametrize("text", ["x", "x" * 4096, "é" * 4096, "😀" * 4096])
async def test_send_text_length_counts_characters(server: ms.MessengerServer, text: str) -> None:
    (alice,) = await login(server, "alice")
    assert (await alice.posted(text))["text"] == text


@pytest.mark.asyncio
async def test_send_client_id_retry_returns_the_first(server: ms.MessengerServer) -> None:
    alice, phone = await login(server, "alice", "alice")
    first = await alice.post("/send", {"text": "once", "client_id": "k1"})
    assert first.status == 201
    retry = await alice.post("/send", {"text": "once", "client_id": "k1"})
    assert retry.status == 200
    assert retry.json()["message"] == first.json()["message"]
    # The key is the user's: another session of the same user gets the same answer.
    other = await phone.post("/send", {"text": "once", "client_id": "k1"})
    assert other.status == 200
    assert other.json()["message"]["id"] == first.json()["message"]["id"]
    assert await alice.seen_texts() == ["once"]


@pytest.mark.asyncio
async def test_send_client_id_concurrent_retries_create_one(server: ms.MessengerServer) -> None:
    (alice,) = await login(server, "alice")
    body = {"text": "once", "client_id": "k"}
    answers = await asyncio.gather(
        *(alice.post("/send", body) for _ in range(5))
    )
    assert sorted(a.status for a in answers) == [200, 200, 200, 200, 201]
    assert len({a.json()["message"]["id"] for a in answers}) == 1
    assert await alice.seen_texts() == ["once"]


@pytest.mark.asyncio
async def test_send_refused_does_not_use_up_the_client_id(server: ms.MessengerServer) -> None:
    alice, bob = await login(server, "alice", "bob")
    await alice.join("room")
    body = {"text": "hi", "chat": "room", "client_id": "k"}
    assert_error(await bob.post("/send", body), 403, "not_a_member", "you are not a member of room")
    await bob.join("room")
    assert (await bob.post("/send", body)).status == 201


@pytest.mark.asyncio
async def test_send_client_id_retry_is_not_rate_limited(tmp_path: Path, clock: FakeClock) -> None:
    config = make_config(tmp_path, rules=ms.Rules(rate_limit=2))
    async with ms.MessengerServer(config, clock) as server:
        (alice,) = await login(server, "alice")
        for key in ("k1", "k2"):
            body = {"text": key, "client_id": key}
            assert (await alice.post("/send", body)).status == 201
        retry = await alice.post("/send", {"text": "k1", "client_id": "k1"})
        assert retry.status == 200
        fresh = await alice.post("/send", {"text": "k3"})
        assert_error(fresh, 429, "rate_limited", "at most 2 messages per window in general")


@pytest.mark.asyncio
async def test_send_client_id_is_per_user(server: ms.MessengerServer) -> None:
    alice, bob = await login(server, "alice", "bob")
    first = await alice.post("/send", {"text": "a", "client_id": "k"})
    second = await bob.post("/send", {"text": "b", "client_id": "k"})
    assert (first.status, second.status) == (201, 201)
    assert await alice.seen_texts() == ["a", "b"]


@pytest.mark.asyncio
async def test_send_client_id_remembered_for_an_hour(
    server: ms.MessengerServer, clock: FakeClock
) -> None:
    (alice,) = await login(server, "alice")
    first = await alice.post("/send", {"text": "a", "client_id": "k"})
    clock.advance(3599)
    retry = await alice.post("/send", {"text": "a", "client_id": "k"})
    assert retry.status == 200
    assert retry.json()["message"]["id"] == first.json()["message"]["id"]


@pytest.mark.asyncio
async def test_send_client_id_over_64_characters_400(server: ms.MessengerServer) -> None:
    (alice,) = await login(server, "alice")
    body = {"text": "x", "client_id": "k" * 65}
    assert_error(
        await alice.post("/send", body), 400, "invalid_field",
        "client_id must be at most 64 characters"
    )
    body = {"text": "x", "client_id": "k" * 64}
    assert (await alice.post("/send", body)).status == 201


@pytest.mark.asyncio
async def test_send_empty_client_id_is_no_key(server: ms.MessengerServer) -> None:
    """Found by review: the contract allows any client_id up to 64 characters, and "" was
    refused. It is taken as no key: two sends are two messages, not a retry."""
    (alice,) = await login(server, "alice")
    first = await alice.posted("one", client_id="")
    second = await alice.posted("two", client_id="")
    assert (first["text"], second["text"]) == ("one", "two")


# Reading: /messages ##########################################################


@pytest.mark.asyncio
async def test_messages_since_and_next(server: ms.MessengerServer) -> None:
    (alice,) = await login(server, "alice")
    ids = [(await alice.posted(f"m{n}"))["id"] for n in range(4)]
    answer = await alice.json(f"/messages?since={ids[0]}")
    assert [m["id"] for m in answer["messages"]] == ids[1:]
    assert answer["next"] == ids[-1]
    assert all(set(m) == MESSAGE_KEYS for m in answer["messages"])
    limited = await alice.json(f"/messages?since={ids[0]}&limit=2")
    assert [m["id"] for m in limited["messages"]] == ids[1:3]
    assert limited["next"] == ids[2]
    empty = await alice.json(f"/messages?since={ids[-1]}")
    assert empty == {"messages": [], "next": ids[-1]}


@pytest.mark.asyncio
async def test_messages_next_is_the_start_when_empty(server: ms.MessengerServer) -> None:
    (alice,) = await login(server, "alice")
    assert await alice.json("/messages") == {"messages": [], "next": 0}
    assert await alice.json("/messages?since=500") == {"messages": [], "next": 500}


@pytest.mark.asyncio
async def test_messages_come_as_the_bytes_of_their_json(server: ms.MessengerServer) -> None:
    """A message is encoded once for all its readers (``RenderedMessages``): the answers
    that carry it (a send, a poll, a history, a thread), to the sender and to others, are
    byte for byte the compact UTF-8 JSON of what they say, whatever the text, and say what
    the send answered."""
    alice, bob = await login(server, "alice", "bob")
    stored = await alice.uploaded(b"data", name='caf\u00e9 "q".txt')
    texts = ["plain", 'a "quote" and a back\\slash', "caf\u00e9 \u2713 \U0001f600",
             "\x01\x1f tab\t newline\n", "\u2028\u2029 \ud7ff"]
    sends = [await alice.send(text) for text in texts]
    sends += [await alice.send("", file=stored["id"]), await alice.send("psst", to="bob")]
    for response in sends:
        assert response.status == 201, response.body
        assert response.body == ms.encode_json(response.json())
    sent = [response.json()["message"] for response in sends]
    assert [m["text"] for m in sent] == [*texts, "", "psst"]
    assert sent[-2]["file"] == {key: stored[key] for key in ("id", "name", "size", "type")}
    thread = await bob.get(f"/messages/{sent[0]['id']}")
    assert thread.body == ms.encode_json(thread.json()) and thread.json()["message"] == sent[0]
    for path in ["/messages?since=0", "/messages", "/history?chat=general&limit=100"]:
        for reader in (alice, bob):
            response = await reader.get(path)
            assert response.status == 200, response.body
            assert response.body == ms.encode_json(response.json())
        assert [m for m in response.json()["messages"] if m["from"] == "alice"] == [
            m for m in sent if path != "/history?chat=general&limit=100" or m["chat"]
        ]


@pytest.mark.asyncio
async def test_messages_include_own(server: ms.MessengerServer) -> None:
    port = server.port
    (alice,) = await login(server, "alice")
    await connect(port, "bob")
    await alice.posted("mine")
    await alice.posted("private mine", to="bob")
    assert await alice.seen_texts() == ["mine", "private mine"]


@pytest.mark.asyncio
async def test_messages_read_position(server: ms.MessengerServer) -> None:
    bob, phone, laptop = await login(server, "bob", "alice", "alice")
    ids = [(await bob.posted(f"m{n}"))["id"] for n in range(3)]
    # Without since: from the read position, nothing marked.
    for _ in range(2):
        answer = await phone.json("/messages")
        assert [m["id"] for m in answer["messages"]] == ids
        assert answer["next"] == ids[-1]
    assert (await laptop.status())["unread"]["total"] == 3
    # With since: everything up to it is read, on every session.
    await phone.json(f"/messages?since={ids[1]}")
    assert [m["id"] for m in (await laptop.json("/messages"))["messages"]] == ids[2:]
    assert (await laptop.status())["unread"]["total"] == 1
    # The read position never moves back.
    answer = await laptop.json(f"/messages?since={ids[0]}")
    assert [m["id"] for m in answer["messages"]] == ids[1:]
    assert [m["id"] for m in (await phone.json("/messages"))["messages"]] == ids[2:]
    await laptop.json(f"/messages?since={ids[2]}")
    assert await phone.json("/messages") == {"messages": [], "next": ids[2]}
    assert (await phone.status())["unread"]["total"] == 0


@pytest.mark.asyncio
async def test_messages_since_beyond_the_end_keeps_later_messages_unread(
    server: ms.MessengerServer,
) -> None:
    alice, bob = await login(server, "alice", "bob")
    await alice.json("/messages?since=1000")
    await bob.posted("later")
    assert await alice.texts("/messages") == ["later"]


@pytest.mark.asyncio
async def test_messages_private_visible_only_to_the_two(server: ms.MessengerServer) -> None:
    alice, bob, eve = await login(server, "alice", "bob", "eve")
    await alice.posted("for bob", to="bob")
    await bob.posted("for alice", to="alice")
    assert await alice.seen_texts() == ["for bob", "for alice"]
    assert await bob.seen_texts() == ["for bob", "for alice"]
    assert await eve.seen_texts() == []


@pytest.mark.asyncio
async def test_messages_of_a_chat_only_since_joining(server: ms.MessengerServer) -> None:
    alice, bob = await login(server, "alice", "bob")
    await alice.join("room")
    await alice.posted("before")
    await bob.join("room")
    await alice.posted("after")
    assert await bob.seen_texts() == ["after"]
    assert await bob.texts("/messages?since=0&chat=room") == ["after"]
    assert await alice.seen_texts() == ["before", "after"]


@pytest.mark.asyncio
async def test_messages_after_leaving_and_rejoining(server: ms.MessengerServer) -> None:
    alice, bob = await login(server, "alice", "bob")
    await alice.join("room")
    await bob.join("room")
    await alice.posted("first")
    await bob.call("POST", "/chat/room/leave")
    await alice.posted("while away", chat="room")
    await bob.join("room")
    await alice.posted("back", chat="room")
    seen = await bob.seen_texts()
    assert "while away" not in seen
    assert seen[-1] == "back"
    assert await bob.history("room") == ["first", "while away", "back"]


@pytest.mark.asyncio
async def test_messages_limit_and_wait_above_max_are_clamped(
    server: ms.MessengerServer,
) -> None:
    (alice,) = await login(server, "alice")
    await alice.posted("one")
    answer = await alice.json("/messages?since=0&limit=5000&wait=100000")
    assert [m["text"] for m in answer["messages"]] == ["one"]


@pytest.mark.asyncio
async def test_messages_chat_filter(server: ms.MessengerServer) -> None:
    (alice,) = await login(server, "alice")
    await alice.join("room")
    await alice.posted("in room")
    await alice.posted("in general", chat="general")
    assert await alice.texts("/messages?since=0&chat=room") == ["in room"]
    assert await alice.texts("/messages?since=0&chat=general") == ["in general"]


@pytest.mark.asyncio
async def test_messages_chat_filter_refuses_non_members(server: ms.MessengerServer) -> None:
    alice, bob = await login(server, "alice", "bob")
    await alice.join("room")
    response = await bob.get("/messages?chat=room")
    assert_error(response, 403, "not_a_member", "you are not a member of room")
    response = await bob.get("/messages?chat=nowhere")
    assert_error(response, 404, "not_found", "no chat named 'nowhere'")


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("target", "message"),
    [("/messages?since=-1", SINCE_RULE), ("/messages?since=x", SINCE_RULE),
     ("/messages?since=1.5", SINCE_RULE),
     ("/messages?limit=0", LIMIT_RULE), ("/messages?limit=x", LIMIT_RULE),
     ("/messages?wait=-1", "wait must be between 0 and 60"),
     ("/messages?wait=x", "wait must be a number"),
     ("/messages?wait=nan", "wait must be a number"),
     ("/messages?wait=inf", "wait must be a number"),
     ("/history?chat=general&before=0", "before must be an integer of at least 1"),
     ("/history?chat=general&before=x", "before must be an integer of at least 1"),
     ("/history?chat=general&limit=0", LIMIT_RULE),
     ("/history?chat=general&limit=-3", LIMIT_RULE)],
)
async def test_messages_and_history_bad_query_400(
    server: ms.MessengerServer, target: str, message: str
) -> None:
    (alice,) = await login(server, "alice")
    response = await alice.get(target)
    assert_error(response, 400, "invalid_field", message)


# Long-polls #################################################################


@pytest.mark.asyncio
async def test_messages_wait_woken_by_another_session(server: ms.MessengerServer) -> None:
    port = server.port
    phone, laptop = await login(server, "alice", "alice")
    async with Client(port) as poller:
        poll = asyncio.create_task(
            poller.request("GET", "/messages?since=0&wait=30", token=phone.token)
        )
        assert await settle(waiting(server, "alice"))
        assert not poll.done()
        message = await laptop.posted("wake up")
        answer = await asyncio.wait_for(poll, 5)  # woken by the send: the poll waits 30 s
    assert answer.status == 200
    assert answer.json() == {"messages": [message], "next": message["id"]}


@pytest.mark.asyncio
async def test_messages_wait_woken_by_another_user(server: ms.MessengerServer) -> None:
    port = server.port
    alice, bob = await login(server, "alice", "bob")
    async with Client(port) as poller:
        poll = asyncio.create_task(poller.request("GET", "/messages?wait=30", token=alice.token))
        assert await settle(waiting(server, "alice"))
        message = await bob.posted("psst", to="alice")
        answer = await asyncio.wait_for(poll, 5)  # woken by the send: the poll waits 30 s
    assert answer.json()["messages"] == [message]


@pytest.mark.asyncio
async def test_messages_wait_wakes_every_waiting_session(server: ms.MessengerServer) -> None:
    port = server.port
    phone, laptop, bob = await login(server, "alice", "alice", "bob")
    async with Client(port) as first, Client(port) as second:
        polls = [
            asyncio.create_task(c.request("GET", "/messages?since=0&wait=30", token=t))
            for c, t in ((first, phone.token), (second, laptop.token))
        ]
        assert await settle(lambda: len(server.app.waiters._by_user.get("alice", ())) == 2)
        message = await bob.posted("to all of you")
        answers = await asyncio.wait_for(asyncio.gather(*polls), 5)
    assert [a.json()["messages"] for a in answers] == [[message], [message]]


@pytest.mark.asyncio
async def test_messages_wait_times_out_empty(server: ms.MessengerServer) -> None:
    (alice,) = await login(server, "alice")
    loop = asyncio.get_running_loop()
    started = loop.time()
    answer = await alice.json("/messages?since=0&wait=0.2")
    elapsed = loop.time() - started
    assert answer == {"messages": [], "next": 0}
    assert 0.15 <= elapsed < 2


@pytest.mark.asyncio
async def test_messages_wait_ignores_what_the_caller_cannot_see(
    server: ms.MessengerServer,
) -> None:
    port = server.port
    alice, bob, eve = await login(server, "alice", "bob", "eve")
    await alice.join("room")
    async with Client(port) as poller:
        poll = asyncio.create_task(
            poller.request("GET", "/messages?since=0&wait=0.4", token=eve.token)
        )
        assert await settle(waiting(server, "eve"))
        await alice.posted("for bob", to="bob")
        await alice.posted("in room")
        answer = await asyncio.wait_for(poll, 5)
    assert answer.json() == {"messages": [], "next": 0}
    assert await bob.seen_texts() == ["for bob"]


@pytest.mark.asyncio
async def test_messages_wait_with_chat_filter_waits_for_that_chat(
    server: ms.MessengerServer,
) -> None:
    port = server.port
    alice, bob = await login(server, "alice", "bob")
    await alice.join("room")
    await bob.join("room")
    async with Client(port) as poller:
        poll = asyncio.create_task(
            poller.request("GET", "/messages?since=0&chat=room&wait=30", token=alice.token)
        )
        assert await settle(waiting(server, "alice"))
        await bob.posted("elsewhere", chat="general")
        message = await bob.posted("here", chat="room")
        answer = await asyncio.wait_for(poll, 5)
    assert answer.json()["messages"] == [message]


# Reading: /history and /messages/<id> #######################################


@pytest.mark.asyncio
async def test_history_before_and_limit(server: ms.MessengerServer) -> None:
    (alice,) = await login(server, "alice")
    ids = [(await alice.posted(f"m{n}"))["id"] for n in range(5)]

    async def history(query: str) -> list[int]:
        answer = await alice.json(f"/history?{query}")
        assert set(answer) == {"messages"}
        return [m["id"] for m in answer["messages"]]

    assert await history("chat=general") == ids
    assert await history("") == ids  # the active chat
    assert await history("chat=general&limit=2") == ids[3:]
    assert await history(f"chat=general&before={ids[3]}&limit=2") == ids[1:3]
    assert await history(f"chat=general&before={ids[0]}") == []


@pytest.mark.asyncio
async def test_history_default_limit_is_20(server: ms.MessengerServer) -> None:
    (alice,) = await login(server, "alice")
    await alice.join("room")
    ids = [(await alice.posted(f"m{n}"))["id"] for n in range(22)]
    answer = await alice.json("/history?chat=room")
    assert [m["id"] for m in answer["messages"]] == ids[2:]


@pytest.mark.asyncio
async def test_history_members_see_before_they_joined(server: ms.MessengerServer) -> None:
    alice, bob = await login(server, "alice", "bob")
    await alice.join("room")
    await alice.posted("old")
    joined = await bob.join("room")
    assert [m["text"] for m in joined.json()["history"]] == ["old"]
    assert await bob.history("room") == ["old"]


@pytest.mark.asyncio
async def test_history_non_member_403(server: ms.MessengerServer) -> None:
    alice, bob = await login(server, "alice", "bob")
    await alice.join("room")
    await alice.posted("hidden")
    refused = await bob.get("/history?chat=room")
    assert_error(refused, 403, "not_a_member", "you are not a member of room")
    unknown = await bob.get("/history?chat=nowhere")
    assert_error(unknown, 404, "not_found", "no chat named 'nowhere'")


@pytest.mark.asyncio
async def test_message_by_id_with_comments(server: ms.MessengerServer) -> None:
    alice, bob = await login(server, "alice", "bob")
    parent = await alice.posted("question")
    first = await bob.posted("answer", reply_to=parent["id"])
    second = await alice.posted("thanks", reply_to=parent["id"])
    assert (first["chat"], first["reply_to"]) == ("general", parent["id"])
    answer = await bob.json(f"/messages/{parent['id']}")
    assert answer == {"message": parent, "comments": [first, second]}


@pytest.mark.asyncio
async def test_message_by_id_private_only_for_the_two(server: ms.MessengerServer) -> None:
    alice, bob, eve = await login(server, "alice", "bob", "eve")
    secret = await alice.posted("secret", to="bob")
    assert (await bob.json(f"/messages/{secret['id']}"))["message"] == secret
    assert (await alice.json(f"/messages/{secret['id']}"))["message"] == secret
    assert_error(
        await eve.get(f"/messages/{secret['id']}"), 404, "not_found",
        "no message 1 that you can see"
    )


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "message_id", ["999", "0", "-1", "abc", "1.0", "1e3", "%FF", "9" * 30, "+1", "01x"]
)
async def test_message_by_id_garbage_404(server: ms.MessengerServer, message_id: str) -> None:
    (alice,) = await login(server, "alice")
    await alice.posted("one")
    response = await alice.get(f"/messages/{message_id}")
    unreadable = message_id == "%FF"  # refused by the router, before any message is looked up
    message = "a path segment is not valid UTF-8" if unreadable else (
        f"no message {message_id} that you can see"
    )
    assert_error(response, 404, "not_found", message)


# Chats ######################################################################


@pytest.mark.asyncio
async def test_chat_list_public_and_own_private(server: ms.MessengerServer) -> None:
    alice, bob = await login(server, "alice", "bob")
    await alice.join("open")
    await alice.join("closed", private=True)
    listed = {c["name"]: c for c in (await alice.json("/chat"))["chats"]}
    assert set(listed) == {"general", "open", "closed"}
    assert all(set(c) >= CHAT_KEYS for c in listed.values())
    general = listed["general"]
    assert (general["private"], general["owner"], general["members"]) == (False, None, 2)
    assert (listed["closed"]["private"], listed["closed"]["owner"]) == (True, "alice")
    seen_by_bob = {c["name"] for c in (await bob.json("/chat"))["chats"]}
    assert seen_by_bob == {"general", "open"}


@pytest.mark.asyncio
async def test_chat_create_join_and_activate(server: ms.MessengerServer) -> None:
    alice, bob = await login(server, "alice", "bob")
    created = await alice.join("room")
    assert created.status == 201
    body = created.json()
    assert set(body) == {"chat", "history"}
    chat = body["chat"]
    assert set(chat) >= CHAT_KEYS
    assert (chat["name"], chat["private"], chat["owner"], chat["members"], chat["unread"]) == (
        "room", False, "alice", 1, 0,
    )
    assert body["history"] == []
    await alice.posted("hello room")
    joined = await bob.join("room")
    assert joined.status == 200
    assert joined.json()["chat"]["members"] == 2
    assert joined.json()["chat"]["owner"] == "alice"
    assert [m["text"] for m in joined.json()["history"]] == ["hello room"]
    # The joined chat became bob's active chat: a send without chat goes there.
    assert (await bob.posted("hi"))["chat"] == "room"
    assert (await bob.status())["chat"] == "room"
    # Joining again (or switching back) is a plain 200.
    assert (await bob.join("general")).status == 200
    assert (await bob.posted("back"))["chat"] == "general"
    assert (await bob.join("room")).status == 200


@pytest.mark.asyncio
async def test_chat_create_private_and_conflicting_privacy_409(
    server: ms.MessengerServer,
) -> None:
    (alice,) = await login(server, "alice")
    created = await alice.join("closed", private=True)
    assert created.status == 201
    assert created.json()["chat"]["private"] is True
    await alice.join("open")
    assert_error(
        await alice.join("open", private=True), 409, "conflict",
        "open is already taken by a public chat"
    )
    assert_error(
        await alice.join("closed", private=False), 409, "conflict",
        "closed is already taken by a private chat"
    )


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("body", "message"),
    [({"chat_name": "bad name"}, CHAT_NAME_RULE), ({"chat_name": "c" * 65}, CHAT_NAME_RULE),
     ({"chat_name": ""}, CHAT_NAME_RULE), ({"chat_name": 5}, "chat_name must be a string"),
     ({}, "chat_name is required"),
     ({"chat_name": "ok", "private": "yes"}, "private must be true or false")],
    ids=["space", "65-chars", "empty", "number", "missing", "private-string"],
)
async def test_chat_create_invalid_400(
    server: ms.MessengerServer, body: Any, message: str
) -> None:
    (alice,) = await login(server, "alice")
    response = await alice.post("/chat", body)
    assert_error(response, 400, "invalid_field", message)


@pytest.mark.asyncio
async def test_chat_name_64_characters_and_case_sensitive(server: ms.MessengerServer) -> None:
    (alice,) = await login(server, "alice")
    assert (await alice.join("c" * 64)).status == 201
    assert (await alice.join("Room")).status == 201
    assert (await alice.join("room")).status == 201


@pytest.mark.asyncio
async def test_chat_leave(server: ms.MessengerServer) -> None:
    alice, bob = await login(server, "alice", "bob")
    await alice.join("room")
    await bob.join("room")
    left = await bob.call("POST", "/chat/room/leave")
    assert left.status == 200
    assert set(left.json()["chat"]) >= CHAT_KEYS
    assert left.json()["chat"]["members"] == 1
    status = await bob.status()
    assert status["chat"] == "general"
    assert [c["name"] for c in status["chats"]] == ["general"]
    assert (await bob.posted("where am i"))["chat"] == "general"
    not_a_member = "you are not a member of room"
    assert_error(await bob.get("/history?chat=room"), 403, "not_a_member", not_a_member)
    assert_error(
        await bob.post("/send", {"text": "x", "chat": "room"}), 403, "not_a_member", not_a_member
    )


@pytest.mark.asyncio
async def test_chat_leave_not_the_active_keeps_the_active(server: ms.MessengerServer) -> None:
    (alice,) = await login(server, "alice")
    await alice.join("one")
    await alice.join("two")
    assert (await alice.call("POST", "/chat/one/leave")).status == 200
    assert (await alice.status())["chat"] == "two"


@pytest.mark.asyncio
async def test_chat_owner_who_leaves_stays_owner_and_may_rejoin(
    server: ms.MessengerServer,
) -> None:
    (alice,) = await login(server, "alice")
    await alice.join("closed", private=True)
    assert (await alice.call("POST", "/chat/closed/leave")).status == 200
    back = await alice.join("closed")
    assert back.status == 200, back.body
    assert back.json()["chat"]["owner"] == "alice"


@pytest.mark.asyncio
async def test_chat_leave_general_400(server: ms.MessengerServer) -> None:
    (alice,) = await login(server, "alice")
    response = await alice.call("POST", "/chat/general/leave")
    assert_error(response, 400, "bad_request", "nobody leaves general: every user stays a member")


@pytest.mark.asyncio
async def test_chat_leave_not_a_member_403(server: ms.MessengerServer) -> None:
    alice, bob = await login(server, "alice", "bob")
    await alice.join("room")
    assert_error(
        await bob.call("POST", "/chat/room/leave"), 403, "not_a_member",
        "you are not a member of room"
    )
    assert_error(
        await bob.call("POST", "/chat/nowhere/leave"), 404, "not_found", "no chat named 'nowhere'"
    )


# Status, health, OpenAPI ####################################################


@pytest.mark.asyncio
async def test_status_shape_and_counts(server: ms.MessengerServer, clock: FakeClock) -> None:
    port = server.port
    (alice,) = await login(server, "alice")
    await connect(port, "alice")
    bob, carol = await login(server, "bob", "carol")
    await alice.join("room")
    await bob.join("room")
    await alice.join("general")
    await alice.posted("mine", chat="general")  # one's own messages are not unread
    await alice.posted("mine too", to="bob")
    await bob.posted("g1", chat="general")
    await bob.posted("g2", chat="general")
    await bob.posted("r1", chat="room")
    await bob.posted("p1", to="alice")
    await carol.posted("p2", to="alice")
    await carol.posted("p3", to="alice")
    clock.advance(5)
    assert await settle(lambda: not server.app.online)  # the connections above have closed
    async with Client(port) as alice_online:
        response = await alice_online.request("GET", "/status", token=alice.token)
    assert response.status == 200
    status = response.json()
    assert set(status) >= {"user", "chat", "sessions", "chats", "unread", "limits", "server"}
    assert (status["user"], status["chat"], status["sessions"]) == ("alice", "general", 2)
    chats = {c["name"]: c for c in status["chats"]}
    assert set(chats) == {"general", "room"}
    assert all(set(c) >= CHAT_KEYS for c in chats.values())
    assert (chats["general"]["unread"], chats["room"]["unread"]) == (2, 1)
    assert (chats["room"]["owner"], chats["room"]["members"]) == ("alice", 2)
    assert status["unread"] == {
        "total": 6,
        "chats": {"general": 2, "room": 1},
        "private": {"bob": 1, "carol": 2},
        "notices": 0,
    }
    limits = status["limits"]
    assert set(limits) >= {"general_left", "general_reset", "reports", "banned_until"}
    assert limits["general_left"] == 19
    assert isinstance(limits["general_reset"], float)
    assert limits["general_reset"] > clock.now
    assert (limits["reports"], limits["banned_until"]) == (0, None)
    info = status["server"]
    assert set(info) >= {"version", "uptime", "users", "online"}
    assert isinstance(info["version"], str) and info["version"]
    assert info["uptime"] == pytest.approx(5)
    assert info["users"] == 3
    assert info["online"] == 1  # alice on the connection that asked


@pytest.mark.asyncio
async def test_status_new_user_has_no_reset(server: ms.MessengerServer) -> None:
    (alice,) = await login(server, "alice")
    limits = (await alice.status())["limits"]
    assert limits == {
        "general_left": 20, "general_reset": None, "reports": 0, "banned_until": None,
    }


@pytest.mark.asyncio
async def test_status_unread_goes_to_zero_when_read(server: ms.MessengerServer) -> None:
    alice, bob = await login(server, "alice", "bob")
    await bob.posted("g")
    last = await bob.posted("p", to="alice")
    await alice.json(f"/messages?since={last['id']}")
    unread = (await alice.status())["unread"]
    assert unread["total"] == 0
    assert unread["chats"].get("general", 0) == 0
    assert unread["private"].get("bob", 0) == 0


@pytest.mark.asyncio
async def test_status_online_counts_users_with_an_open_connection(
    server: ms.MessengerServer,
) -> None:
    port = server.port
    alice, bob = await login(server, "alice", "bob")
    async with Client(port) as alice_conn:
        first = await alice_conn.request("GET", "/status", token=alice.token)
        assert first.json()["server"]["online"] == 1
        async with Client(port) as bob_conn:
            await bob_conn.request("GET", "/health")  # no token: not online by this
            assert (await alice_conn.request("GET", "/status", token=alice.token)).json()[
                "server"
            ]["online"] == 1
            await bob_conn.request("GET", "/status", token=bob.token)
            again = await alice_conn.request("GET", "/status", token=alice.token)
            assert again.json()["server"]["online"] == 2
        assert await settle(lambda: "bob" not in server.app.online)
        last = await alice_conn.request("GET", "/status", token=alice.token)
        assert last.json()["server"]["online"] == 1


@pytest.mark.asyncio
async def test_health_needs_no_token(server: ms.MessengerServer) -> None:
    response = await call(server.port, "GET", "/health")
    assert response.status == 200
    assert response.headers["content-type"] == JSON_TYPE
    assert response.json() == {"status": "ok"}


@pytest.mark.asyncio
async def test_openapi_needs_no_token(server: ms.MessengerServer) -> None:
    document = json_body(await call(server.port, "GET", "/openapi.json"))
    assert document["openapi"].startswith("3.1")
    assert "paths" in document


@pytest.mark.asyncio
async def test_openapi_is_a_valid_document(server: ms.MessengerServer) -> None:
    validator = pytest.importorskip("openapi_spec_validator")
    validator.validate(json_body(await call(server.port, "GET", "/openapi.json")))


CONTRACT_ROUTES = [
    ("post", "/connect"), ("post", "/disconnect"), ("post", "/send"), ("get", "/messages"),
    ("get", "/messages/{id}"), ("get", "/history"), ("get", "/scheduled"),
    ("delete", "/scheduled/{id}"), ("get", "/chat"), ("post", "/chat"),
    ("post", "/chat/{name}/leave"), ("post", "/chat/{name}/invite"),
    ("post", "/chat/{name}/link"), ("post", "/join/{token}"), ("get", "/chat/{name}/requests"),
    ("post", "/chat/{name}/requests/{user}"), ("get", "/status"), ("post", "/report"),
    ("post", "/files"), ("get", "/files/{id}"), ("get", "/health"), ("get", "/openapi.json"),
]


@pytest.mark.asyncio
async def test_openapi_documents_every_route_and_no_other(server: ms.MessengerServer) -> None:
    paths = json_body(await call(server.port, "GET", "/openapi.json"))["paths"]
    documented = {(method, path) for path, operations in paths.items() for method in operations}
    assert documented == set(CONTRACT_ROUTES)


# Routing errors and the order of checks #####################################


@pytest.mark.asyncio
@pytest.mark.parametrize("path", ["/nope", "/", "/messages/", "/chat/room/nope", "/health/x"])
async def test_route_unknown_404_json(server: ms.MessengerServer, path: str) -> None:
    assert_error(
        await call(server.port, "GET", path), 404, "not_found", f"no such resource: {path}"
    )


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", "/send", {"POST"}),
        ("DELETE", "/send", {"POST"}),
        ("POST", "/health", {"GET", "HEAD"}),
        ("PUT", "/chat", {"GET", "HEAD", "POST"}),
        ("GET", "/connect", {"POST"}),
        ("POST", "/status", {"GET", "HEAD"}),
        ("DELETE", "/messages/1", {"GET", "HEAD"}),
        ("OPTIONS", "/health", {"GET", "HEAD"}),
        ("TRACE", "/status", {"GET", "HEAD"}),
    ],
)
async def test_route_wrong_method_405_with_allow(
    server: ms.MessengerServer, method: str, path: str, allow: set[str]
) -> None:
    response = await call(server.port, method, path)  # no token: the route is checked first
    assert_error(response, 405, "method_not_allowed", f"{path} does not take {method}")
    assert {m.strip() for m in response.headers["allow"].split(",")} == allow


@pytest.mark.asyncio
async def test_head_of_messages_and_a_thread_changes_nothing(server: ms.MessengerServer) -> None:
    """Found by review: HEAD ran GET's handler, so HEAD /messages?since=N marked read and
    delivered. HEAD is safe (RFC 9110 §9.2.1, §9.3.2): the head GET would have, no change."""
    alice, bob = await login(server, "alice", "bob")
    private = await bob.posted("psst", to="alice")
    changes = server.messenger.changes
    async with Client(server.port) as client:
        heads = [
            await client.request("HEAD", f"/messages?since={private['id']}", token=alice.token),
            await client.request("HEAD", "/messages?since=0&chat=%40bob", token=alice.token),
            await client.request("HEAD", f"/messages/{private['id']}", token=alice.token),
        ]
        assert [head.status for head in heads] == [200, 200, 200]
        assert all(head.body == b"" for head in heads)
        assert server.messenger.changes == changes, "no read position, no delivery"
        assert private["id"] not in server.messenger.delivered
        unread = await client.request("GET", "/status", token=alice.token)
        assert unread.json()["unread"]["private"] == {"bob": 1}
        get = await client.request("GET", "/messages?since=0&chat=%40bob", token=alice.token)
        assert heads[1].headers["content-length"] == get.headers["content-length"]
        assert private["id"] in server.messenger.delivered, "GET still delivers"


@pytest.mark.asyncio
@pytest.mark.parametrize("method", ["FOO", "get", "Post", "PATCHX"])
async def test_route_unknown_method_501(server: ms.MessengerServer, method: str) -> None:
    refused = await call(server.port, method, "/health")
    assert_error(refused, 501, "not_implemented", f"the method {method} is not implemented")


@pytest.mark.asyncio
async def test_route_checked_before_token_before_body(server: ms.MessengerServer) -> None:
    port = server.port
    (alice,) = await login(server, "alice")
    assert_error(await call(port, "GET", "/nope"), 404, "not_found", "no such resource: /nope")
    assert_error(
        await call(port, "POST", "/nope", b"{bad"), 404, "not_found", "no such resource: /nope"
    )
    assert_error(
        await call(port, "GET", "/send"), 405, "method_not_allowed", "/send does not take GET"
    )
    needs_token = "this route needs Authorization: Bearer <token>"
    assert_error(await call(port, "POST", "/send", b"{bad"), 401, "unauthorized", needs_token)
    assert_error(
        await call(port, "POST", "/send", b"x" * 70_000), 401, "unauthorized",
        "this route needs Authorization: Bearer <token>"
    )
    assert_error(await alice.post("/send", b"{bad"), 400, "bad_json", "the body is not valid JSON")


@pytest.mark.asyncio
async def test_json_body_parsed_whatever_the_content_type(server: ms.MessengerServer) -> None:
    response = await call(
        server.port,
        "POST",
        "/connect",
        {"user": "alice", "password": "pw"},
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status == 201


# Bad bodies #################################################################

NESTED = b"[" * 32_000 + b"]" * 32_000  # under 64 KiB, far deeper than any parser recurses

BAD_JSON_BODIES = {
    "not-json": b"hello",
    "empty": b"",
    "truncated": b'{"user": "alice", "password": ',
    "trailing-comma": b'{"user": "alice", "password": "x",}',
    "single-quotes": b"{'user': 'alice'}",
    "array": b'["alice", "x"]',
    "string": b'"alice"',
    "number": b"42",
    "null": b"null",
    "invalid-utf8": b'{"user": "al\xffice", "password": "x"}',
    "nested": NESTED,
    "nested-object": b'{"a":' * 10_000 + b"1" + b"}" * 10_000,
    "nan": b'{"user": "alice", "password": NaN}',
    "infinity": b'{"user": "alice", "password": Infinity}',
    "minus-infinity": b'{"user": "alice", "password": -Infinity}',
    "two-values": b'{"user": "alice"} {"password": "x"}',
}


def bad_json_message(name: str) -> str:
    """What the server says of ``BAD_JSON_BODIES[name]``: JSON that is not an object, or none."""
    return NOT_AN_OBJECT if name in {"array", "string", "number", "null"} else NOT_JSON


@pytest.mark.asyncio
@pytest.mark.parametrize(("name", "body"), BAD_JSON_BODIES.items(), ids=BAD_JSON_BODIES.keys())
async def test_connect_bad_json_400(server: ms.MessengerServer, name: str, body: bytes) -> None:
    async with Client(server.port) as client:
        response = await client.request("POST", "/connect", body)
        assert_error(response, 400, "bad_json", bad_json_message(name))
        # The server read the whole body: the connection still serves.
        assert (await client.request("GET", "/health")).status == 200


@pytest.mark.asyncio
@pytest.mark.parametrize(("name", "body"), BAD_JSON_BODIES.items(), ids=BAD_JSON_BODIES.keys())
async def test_send_bad_json_400(server: ms.MessengerServer, name: str, body: bytes) -> None:
    (alice,) = await login(server, "alice")
    response = await alice.post("/send", body)
    assert_error(response, 400, "bad_json", bad_json_message(name))


BAD_SEND_FIELDS = {
    "text-number": ({"text": 5}, "text must be a string"),
    "text-list": ({"text": ["a"]}, "text must be a string"),
    "text-null": ({"text": None}, TEXT_RULE),
    "text-lone-surrogate": ({"text": "\ud800"}, "text holds a lone surrogate"),
    "chat-number": ({"text": "x", "chat": 5}, "chat must be a string"),
    "chat-bool": ({"text": "x", "chat": True}, "chat must be a string"),
    "to-list": ({"text": "x", "to": ["bob"]}, "to must be a string"),
    "reply_to-string": ({"text": "x", "reply_to": "1"}, REPLY_TO_RULE),
    "reply_to-bool": ({"text": "x", "reply_to": True}, REPLY_TO_RULE),
    "reply_to-float": ({"text": "x", "reply_to": 1.5}, REPLY_TO_RULE),
    "reply_to-zero": ({"text": "x", "reply_to": 0}, REPLY_TO_RULE),
    "reply_to-negative": ({"text": "x", "reply_to": -1}, REPLY_TO_RULE),
    "reply_to-huge-float": ({"text": "x", "reply_to": 1e300}, REPLY_TO_RULE),
    "client_id-number": ({"text": "x", "client_id": 5}, "client_id must be a string"),
    "send_at-string": ({"text": "x", "send_at": "soon"}, "send_at must be a number"),
    "send_at-past": ({"text": "x", "send_at": 1.0}, SEND_AT_RULE),
}


@pytest.mark.asyncio
@pytest.mark.parametrize(("body", "message"), BAD_SEND_FIELDS.values(), ids=BAD_SEND_FIELDS.keys())
async def test_send_invalid_field_400(server: ms.MessengerServer, body: Any, message: str) -> None:
    (alice,) = await login(server, "alice")
    response = await alice.post("/send", body)
    assert_error(response, 400, "invalid_field", message)
    assert await alice.seen_texts() == []


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b'{"text": "x", "send_at": 1e999}', FINITE_SEND_AT),
        (b'{"text": "x", "reply_to": -1e999}', REPLY_TO_RULE),
        (b'{"text": "x", "reply_to": 1' + b"0" * 5000 + b"}", REPLY_TO_RULE),
        (b'{"text": "x", "send_at": 1' + b"0" * 400 + b"}", FINITE_SEND_AT),
        (b'{"text": "x", "send_at": 1' + b"0" * 5000 + b"}", FINITE_SEND_AT),
        (b'{"text": "x", "send_at": 1' + b"0" * 5000 + b".5}", FINITE_SEND_AT),
        (b'{"text": "x", "send_at": 0.' + b"0" * 5000 + b"1}", SEND_AT_RULE),
        (b'{"user": 1' + b"0" * 5000 + b', "password": "x"}', "user must be a string"),
    ],
    ids=["send_at-1e999", "reply_to-minus-1e999", "reply_to-5000-digits", "send_at-400-digits",
         "send_at-5000-digits", "send_at-5000-digit-float", "send_at-tiny", "user-5000-digits"],
)
async def test_send_huge_numbers_400(
    server: ms.MessengerServer, raw: bytes, message: str
) -> None:
    (alice,) = await login(server, "alice")
    path = "/connect" if raw.startswith(b'{"user"') else "/send"
    response = await alice.post(path, raw)
    # Valid JSON with a number out of range, however many its digits: one field's refusal.
    assert_error(response, 400, "invalid_field", message)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/connect", {"user": 5, "password": "x"}, "user must be a string"),
        ("/connect", {"user": "alice", "password": ["x"]}, "password must be a string"),
        ("/connect", {"user": "alice", "password": {"p": 1}}, "password must be a string"),
        ("/connect", {"user": True, "password": "x"}, "user must be a string"),
        ("/connect", {"user": None, "password": "x"}, "user is required"),
        ("/connect", {"user": "alice", "password": 12345678901234567890},
         "password must be a string"),
        ("/chat", {"chat_name": ["room"]}, "chat_name must be a string"),
        ("/chat", {"chat_name": "room", "private": 1}, "private must be true or false"),
        ("/report", {"user": 5}, "user must be a string"),
    ],
)
async def test_wrong_field_types_400(
    server: ms.MessengerServer, path: str, body: Any, message: str
) -> None:
    (alice,) = await login(server, "alice")
    response = await alice.post(path, body)
    assert_error(response, 400, "invalid_field", message)


@pytest.mark.asyncio
async def test_body_over_64_kib_413(server: ms.MessengerServer) -> None:
    limit = 64 * 1024
    prefix = b'{"user": "alice", "password": "x"}'
    fits = prefix + b" " * (limit - len(prefix))
    response = await call(server.port, "POST", "/connect", fits)
    assert response.status == 201, response.body
    async with Client(server.port) as client:
        too_big = await client.request("POST", "/connect", fits + b" ")
        assert_error(too_big, 413, "too_large", "the body is larger than 65536 bytes")
        assert await client.closed()
    deep = b"[" * 100_000 + b"]" * 100_000
    assert_error(
        await call(server.port, "POST", "/connect", deep), 413, "too_large",
        "the body is larger than 65536 bytes"
    )
    (alice,) = await login(server, "alice", password="x")
    big_text = {"text": "x" * 70_000}
    assert_error(
        await alice.post("/send", big_text), 413, "too_large", "the body is larger than 65536 bytes"
    )


# Privacy ####################################################################


@pytest_asyncio.fixture
async def private_world(
    server: ms.MessengerServer,
) -> AsyncIterator[dict[str, Any]]:
    """alice and bob share a private chat, a private thread and a file; eve is outside."""
    alice, bob, eve = await login(server, "alice", "bob", "eve")
    await alice.join("secret", private=True)
    invite = await alice.post("/chat/secret/invite", {"user": "bob"})
    assert invite.status == 200, invite.body
    assert (await bob.join("secret")).status == 200
    await alice.join("club")  # a public chat eve is not in
    file_id = (await alice.uploaded(b"the plan", "plan.txt", "text/plain"))["id"]
    world = {
        "alice": alice, "bob": bob, "eve": eve, "file": file_id,
        "in_secret": await alice.posted("secret plan", chat="secret"),
        "in_club": await alice.posted("club talk", chat="club"),
        "private": await alice.posted("dm", to="bob", file=file_id),
    }
    world["comment"] = await bob.posted("re: dm", reply_to=world["private"]["id"])
    world["chat_comment"] = await bob.posted("re", reply_to=world["in_secret"]["id"])
    yield world


@pytest.mark.asyncio
async def test_privacy_outsider_reads_nothing(
    server: ms.MessengerServer, private_world: dict[str, Any]
) -> None:
    eve = private_world["eve"]
    assert await eve.json("/messages?since=0") == {"messages": [], "next": 0}
    assert (await eve.json("/messages"))["messages"] == []
    for key in ("in_secret", "in_club", "private", "comment", "chat_comment"):
        message_id = private_world[key]["id"]
        unseen = f"no message {message_id} that you can see"
        assert_error(await eve.get(f"/messages/{message_id}"), 404, "not_found", unseen)
        reply = await eve.post("/send", {"text": "me too", "reply_to": message_id})
        assert_error(reply, 404, "not_found", unseen)
    for chat in ("secret", "club"):
        for path in (f"/history?chat={chat}", f"/messages?chat={chat}"):
            assert_error(await eve.get(path), 403, "not_a_member", f"not a member of {chat}")
        sent = await eve.post("/send", {"text": "hi", "chat": chat})
        assert_error(sent, 403, "not_a_member", f"you are not a member of {chat}")
    joined = await eve.join("secret")
    assert_error(joined, 403, "forbidden", "secret is private: ask its owner for an invitation")
    download = await eve.get(f"/files/{private_world['file']}")
    assert_error(download, 404, "not_found", f"no file {private_world['file']!r} that you can use")
    requests = await eve.get("/chat/secret/requests")
    assert_error(requests, 403, "forbidden", "only the owner of secret may do that")
    chats = {c["name"] for c in (await eve.json("/chat"))["chats"]}
    assert "secret" not in chats
    status = await eve.status()
    assert {c["name"] for c in status["chats"]} == {"general"}
    assert status["unread"]["total"] == 0
    assert status["unread"]["private"] == status["unread"]["chats"] == {}


@pytest.mark.asyncio
async def test_privacy_the_two_parties_see_it_all(
    server: ms.MessengerServer, private_world: dict[str, Any]
) -> None:
    bob = private_world["bob"]
    expected = ["alice invited you to secret", "secret plan", "dm", "re: dm", "re"]
    assert await bob.seen_texts() == expected
    thread = await bob.json(f"/messages/{private_world['private']['id']}")
    assert [m["text"] for m in thread["comments"]] == ["re: dm"]
    comment = private_world["comment"]
    assert (comment["chat"], comment["to"]) == (None, "alice")
    assert private_world["chat_comment"]["chat"] == "secret"
    download = await bob.get(f"/files/{private_world['file']}")
    assert (download.status, download.body) == (200, b"the plan")


# Found by review ############################################################


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/chat/room/leave"), ("POST", "/disconnect"), ("GET", "/messages?since=1")],
)
async def test_a_malformed_body_on_a_route_without_body_changes_nothing(
    server: ms.MessengerServer, method: str, path: str
) -> None:
    """The body is judged before the handler runs: a 400 leaves everything as it was."""
    (alice,) = await login(server, "alice")
    await alice.join("room")
    await alice.posted("hello", chat="room")
    before = server.messenger.export()
    async with Client(server.port) as client:
        await client.send_raw(
            f"{method} {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {alice.token}\r\n"
            "Transfer-Encoding: chunked\r\n\r\nzz\r\n".encode()
        )
        assert_error(await client.response(), 400, "bad_request", "malformed chunk size line")
    assert server.messenger.export() == before
    assert (await alice.get("/status")).status == 200


@pytest.mark.asyncio
async def test_a_retried_send_to_general_carries_the_rate_headers(
    server: ms.MessengerServer,
) -> None:
    (alice,) = await login(server, "alice")
    body = {"text": "once", "client_id": "k1"}
    first = await alice.post("/send", body)
    retry = await alice.post("/send", body)
    assert (first.status, retry.status) == (201, 200)
    for name in ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset"):
        assert retry.headers[name] == first.headers[name]


@pytest.mark.asyncio
async def test_a_cancelled_scheduled_message_frees_its_client_id(
    server: ms.MessengerServer, clock: FakeClock
) -> None:
    (alice,) = await login(server, "alice")
    later = {"text": "later", "send_at": clock.now + 60, "client_id": "k2"}
    scheduled = (await alice.post("/send", later)).json()
    path = f"/scheduled/{scheduled['scheduled']['id']}"
    assert (await alice.call("DELETE", path)).status == 204
    again = await alice.post("/send", later)
    assert again.status == 202 and again.json()["scheduled"]["id"] != scheduled["scheduled"]["id"]


@pytest.mark.asyncio
async def test_connect_method_follows_the_route_checks(server: ms.MessengerServer) -> None:
    known = await call(server.port, "CONNECT", "/health")
    assert_error(known, 405, "method_not_allowed", "/health does not take CONNECT")
    assert known.headers["allow"] == "GET, HEAD"
    unknown = await call(server.port, "CONNECT", "/nowhere")
    assert_error(unknown, 404, "not_found", "no such resource: /nowhere")


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("query", "message"),
    [("wait=-1", "wait must be between 0 and 60"), ("wait=abc", "wait must be a number"),
     ("wait=-1e400", "wait must be between 0 and 60")],
)
async def test_messages_wait_out_of_range_says_what_is_wrong(
    server: ms.MessengerServer, query: str, message: str
) -> None:
    (alice,) = await login(server, "alice")
    refused = await alice.get(f"/messages?{query}")
    assert assert_error(refused, 400, "invalid_field", message)["message"] == message


@pytest.mark.asyncio
async def test_messages_wait_in_exponent_form_is_a_number(server: ms.MessengerServer) -> None:
    (alice,) = await login(server, "alice")
    await alice.posted("one")
    answer = await alice.json("/messages?since=0&wait=1e2")
    assert [m["text"] for m in answer["messages"]] == ["one"]


@pytest.mark.asyncio
@pytest.mark.parametrize("wait", ["1e400", "1e999", "9" * 18 + "e999"])
async def test_messages_wait_beyond_a_float_is_clamped_like_any_large_one(
    server: ms.MessengerServer, wait: str
) -> None:
    """Found by review: 1e400 (a float's +inf) got a 400, though the contract clamps any
    wait above 60; only NaN, and what is not a number, are refused."""
    (alice,) = await login(server, "alice")
    await alice.posted("one")
    answer = await alice.json(f"/messages?since=0&wait={wait}")
    assert [m["text"] for m in answer["messages"]] == ["one"]


def test_optional_float_clamps_infinity_and_refuses_nan() -> None:
    fields = ms.Fields({"big": math.inf, "nan": math.nan, "low": -math.inf})
    assert fields.optional_float("big", clamp_to=60.0) == 60.0
    assert ms.Fields({"q": "1e400"}, from_query=True).optional_float("q", clamp_to=60.0) == 60.0
    with pytest.raises(ms.InvalidField, match="nan must be between 0 and 60"):
        fields.optional_float("nan", clamp_to=60.0)
    with pytest.raises(ms.InvalidField, match="low must be between 0 and 60"):
        fields.optional_float("low", clamp_to=60.0)
    with pytest.raises(ms.InvalidField, match="big must be a finite number of at least 0"):
        fields.optional_float("big")  # no clamp: infinity is refused


@pytest.mark.asyncio
async def test_query_method_on_a_known_path_is_405_with_allow(server: ms.MessengerServer) -> None:
    answer = await call(server.port, "QUERY", "/messages", b"{}")
    assert_error(answer, 405, "method_not_allowed", "/messages does not take QUERY")
    assert answer.headers["allow"] == "GET, HEAD"
