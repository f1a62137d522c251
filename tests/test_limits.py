"""Safety among strangers: every quota and per-address rule at its edge (the last one allowed,
the first one refused), in the domain without I/O and through real sockets."""

from __future__ import annotations

import asyncio
import errno
import logging
import re
import resource
from pathlib import Path
from typing import Any, BinaryIO

import pytest

import messenger_server as ms
from tests.conftest import (
    TRUSTING,
    Client,
    FakeClock,
    SourceClient,
    assert_error,
    call,
    connect,
    login,
    make_config,
    settle,
    waiting,
)
from tests.proxy import needs_nginx, nginx_in_front
from tests.servers import Spawn
from tests.test_domain import make_messenger, register

HOUR = 3600.0


def upload_head(token: str, *fields: str) -> bytes:
    """The head of a raw ``POST /files`` with ``fields`` (its framing, Expect...)."""
    lines = ["POST /files?name=f HTTP/1.1", "Host: t", f"Authorization: Bearer {token}", *fields]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def send(messenger: ms.Messenger, name: str, text: str = "hi", **fields: Any) -> ms.SendResult:
    return messenger.send(name, ms.Draft(text, **fields))


def replayed(messenger: ms.Messenger, events: list[ms.Event], clock: FakeClock) -> ms.Messenger:
    """A second messenger rebuilt from the journal alone."""
    again = ms.Messenger(messenger.rules, clock)
    for event in events:
        again.replay(event)
    return again


# Flood: every send counts, anywhere ##########################################


def test_flood_limit_counts_chats_private_comments_and_scheduled_alike(clock: FakeClock) -> None:
    messenger, events = make_messenger(clock, flood_limit=4, flood_window=60.0)
    register(messenger, "a", "b")
    messenger.membership.join("a", "room", None)
    first = send(messenger, "a", chat="room").message
    assert first is not None
    send(messenger, "a", to="b")
    send(messenger, "a", reply_to=first.id)
    send(messenger, "a", chat="room", send_at=clock.now + 600)  # the 4th: the last allowed
    recorded = len(events)
    clock.advance(59)
    with pytest.raises(
        ms.RateLimited,
        match="messages, invitations and join requests are limited to 4 per 60 seconds: slow down",
    ) as refused:
        send(messenger, "a", chat="room")
    assert refused.value.retry_after == pytest.approx(1)
    assert len(events) == recorded, "a refused send records nothing"
    send(messenger, "b", chat="general")  # others are not held back
    assert replayed(messenger, events, clock).quotas_left("a")["flood_left"] == 0
    clock.advance(1)
    send(messenger, "a", chat="room")  # the window has ended


def test_scheduled_message_falling_due_is_not_counted_twice(clock: FakeClock) -> None:
    messenger, _ = make_messenger(clock, flood_limit=2, flood_window=60.0)
    register(messenger, "a")
    send(messenger, "a", send_at=clock.now + 30)
    clock.advance(30)
    messenger.tick()
    assert messenger.quotas_left("a")["flood_left"] == 1
    send(messenger, "a")


def test_invitations_count_against_the_inviters_flood_window(clock: FakeClock) -> None:
    """Found by review: an invitation is a notice kept 7 days, and none was counted."""
    messenger, events = make_messenger(clock, flood_limit=3, flood_window=60.0)
    register(messenger, "a", "b", "c", "d")
    messenger.membership.join("a", "den", True)
    send(messenger, "a", chat="den")
    messenger.membership.invite("a", "den", "b")
    messenger.membership.invite("a", "den", "c")  # the 3rd of the window: the last allowed
    messenger.membership.invite("a", "den", "b")  # already invited: no notice, nothing counted
    recorded = len(events)
    clock.advance(59)
    with pytest.raises(ms.RateLimited) as refused:
        messenger.membership.invite("a", "den", "d")
    assert refused.value.retry_after == pytest.approx(1)
    assert len(events) == recorded, "a refused invitation records nothing"
    assert "d" not in messenger.chats["den"].invited
    again = replayed(messenger, events, clock)
    assert again.quotas_left("a")["flood_left"] == 0, "the journal rebuilds the window"
    with pytest.raises(ms.RateLimited, match="are limited to"):
        again.membership.invite("a", "den", "d")
    clock.advance(1)
    messenger.membership.invite("a", "den", "d")  # the window has ended


def test_join_requests_count_against_the_requesters_flood_window(clock: FakeClock) -> None:
    """A stranger with links is slowed like a sender: each request is a notice to an owner."""
    messenger, events = make_messenger(clock, flood_limit=2, flood_window=60.0)
    register(messenger, "owner", "stranger")
    links = []
    for name in ("one", "two", "three"):
        messenger.membership.join("owner", name, True)
        links.append(messenger.membership.make_link("owner", name))
    messenger.membership.request_join("stranger", links[0])
    messenger.membership.request_join("stranger", links[1])  # the last allowed
    messenger.membership.request_join("stranger", links[1])  # pending: nothing new, not counted
    recorded = len(events)
    with pytest.raises(ms.RateLimited) as refused:
        messenger.membership.request_join("stranger", links[2])
    assert refused.value.retry_after == pytest.approx(60)
    assert len(events) == recorded and not messenger.chats["three"].requests
    assert replayed(messenger, events, clock).quotas_left("stranger")["flood_left"] == 0
    clock.advance(60)
    messenger.membership.request_join("stranger", links[2])


def test_a_notice_counts_against_the_quota_of_whoever_caused_it(clock: FakeClock) -> None:
    """Found by review: notices were kept up to 7 days outside every quota, so two accounts
    could hold the server's memory (and fill the global cap, 503 for everyone). A notice
    now counts like a message of the user whose action it tells of: an invitation the
    owner's, a join request and its answer the requester's (found by review too: an owner
    who turned down a stranger again and again paid for it, until it could not send);
    never its recipient's."""
    cost = ms.MESSAGE_COST
    messenger, events = make_messenger(clock, flood_limit=1000, max_kept_text=4 * cost + 200)
    register(messenger, "owner", "stranger", "guest")
    messenger.membership.join("owner", "den", True)
    link = messenger.membership.make_link("owner", "den")
    requested = "stranger asks to join den"
    denied = "owner turned down your request to join den"
    for _ in range(2):
        messenger.membership.request_join("stranger", link)
        messenger.membership.decide("owner", "den", "stranger", False)
    stranger, owner = messenger.users["stranger"], messenger.users["owner"]
    assert stranger.kept_text == 2 * (len(requested) + cost) + 2 * (len(denied) + cost)
    assert owner.kept_text == 0
    recorded = len(events)
    with pytest.raises(ms.QuotaExceeded, match="your messages and notices still kept"):
        messenger.membership.request_join("stranger", link)
    assert len(events) == recorded and not messenger.chats["den"].requests
    messenger.membership.invite("owner", "den", "guest")
    assert owner.kept_text == len("owner invited you to den") + cost
    assert messenger.users["guest"].kept_text == 0
    send(messenger, "guest", "the recipients of notices still send", chat="general")
    again = replayed(messenger, events, clock)
    assert again.users["stranger"].kept_text == stranger.kept_text
    assert again.users["owner"].kept_text == owner.kept_text
    clock.advance(ms.Rules().undelivered_ttl)  # unread notices go after a week
    messenger.expire(clock())
    assert (stranger.kept_text, owner.kept_text) == (0, 0)
    messenger.membership.request_join("stranger", link)


def test_an_invite_event_of_the_previous_version_still_loads(clock: FakeClock) -> None:
    """Journals written before invitations carried their time: (chat, guest) alone."""
    messenger, events = make_messenger(clock)
    register(messenger, "a", "b")
    messenger.membership.join("a", "den", True)
    loaded = replayed(messenger, events, clock)
    old = ("invite", "den", "b")
    ms.check_event(loaded, old)
    assert "den" in ms.describe_event(old)
    loaded.replay(old)
    assert loaded.chats["den"].invited == {"b"}
    assert loaded.quotas_left("a")["flood_left"] == loaded.rules.flood_limit
    with pytest.raises(ms.BadRecord):
        ms.check_event(loaded, ("invite", "den"))
    with pytest.raises(ms.BadRecord):
        ms.check_event(loaded, ("invite", "den", "b", 1.0, "extra"))


@pytest.mark.asyncio
async def test_invitation_flood_over_http_is_429_with_retry_after(
    tmp_path: Path, clock: FakeClock
) -> None:
    rules = ms.Rules(flood_limit=2, flood_window=60.0)
    async with ms.MessengerServer(make_config(tmp_path, rules=rules), clock) as server:
        alice = await connect(server.port, "alice")
        for guest in ("bob", "carol", "dave"):
            await connect(server.port, guest)
        async with Client(server.port) as client:
            await client.request("POST", "/chat", {"chat_name": "den", "private": True},
                                 token=alice)
            for guest in ("bob", "carol"):
                invited = await client.request("POST", "/chat/den/invite", {"user": guest},
                                               token=alice)
                assert invited.status == 200
            refused = await client.request("POST", "/chat/den/invite", {"user": "dave"},
                                           token=alice)
        assert_error(
            refused, 429, "rate_limited", "messages, invitations and join requests are limited to 2"
        )
        assert refused.headers["retry-after"] == "60"


# Answers: their text budget is in bytes as sent ##############################


@pytest.mark.asyncio
@pytest.mark.parametrize("char", ["\x01", "\U0001f600", '"'], ids=["control", "emoji", "quote"])
async def test_an_answer_holds_at_most_the_text_budget_in_bytes_as_sent(
    tmp_path: Path, clock: FakeClock, char: str
) -> None:
    """Found by review: the budget counted characters, but a control character is sent as
    6 bytes (\\u0001), an emoji as 4: 1.4 MB held for a client that reads nothing."""
    async with ms.MessengerServer(make_config(tmp_path), clock) as server:
        alice = await connect(server.port, "alice")
        server.messenger.membership.join("alice", "club", None)
        for _ in range(30):
            send(server.messenger, "alice", char * ms.MAX_TEXT, chat="club")
        since, seen = 0, 0
        while seen < 30:
            answer = await call(server.port, "GET", f"/messages?since={since}&chat=club",
                                token=alice)
            page = answer.json()
            assert page["messages"], "the rest comes next"
            texts = sum(len(ms.encode_json(m["text"])) - 2 for m in page["messages"])
            assert texts <= ms.MAX_ANSWER_TEXT
            assert len(answer.body) < ms.MAX_ANSWER_TEXT + 16 * 1024
            seen += len(page["messages"])
            since = page["next"]
        assert seen == 30


@pytest.mark.parametrize(
    "text", ["plain words", 'a "quote"', "back\\slash", "tab\tand\nnewline", "\x01\x7f",
             "caf\u00e9", "\U0001f600", "/slash", ""],
)
def test_text_size_is_the_bytes_of_the_text_in_an_answer(text: str) -> None:
    """The usual text (printable ASCII) is measured without encoding it: the same figure."""
    assert ms.text_size(text) == len(ms.encode_json(text)) - 2


@pytest.mark.parametrize(("sent", "kept"), [(10, 10), (11, 10)])
def test_messages_that_fit_at_the_most_bytes_a_character_come_unmeasured(
    clock: FakeClock, sent: int, kept: int
) -> None:
    """Ten texts of 4,096 control characters (6 bytes each as sent) fit in the budget even
    counted at the most: they all come, as measuring would say; an eleventh does not."""
    messenger, _ = make_messenger(clock, flood_limit=1000, max_kept_text=ms.MIB)
    register(messenger, "a", "b")
    messenger.membership.join("a", "room", None)
    for _ in range(sent):
        send(messenger, "a", "\x01" * ms.MAX_TEXT, chat="room")
    assert (ms.MOST_BYTES_A_CHAR * ms.MAX_TEXT + ms.MESSAGE_ALLOWANCE) * 10 <= ms.MAX_ANSWER_TEXT
    found, _ = messenger.poll("a", 0, ["room"], 100)
    assert len(found) == kept


@pytest.mark.asyncio
async def test_an_answer_counts_file_names_and_each_messages_other_fields(
    tmp_path: Path, clock: FakeClock
) -> None:
    """Found by review: 1,000 messages of no text, each with a file named by 255 emoji,
    made one answer of 1.2 MB: the budget counted texts only."""
    rules = ms.Rules(flood_limit=10_000)
    async with ms.MessengerServer(make_config(tmp_path, rules=rules), clock) as server:
        alice = await connect(server.port, "alice")
        server.messenger.membership.join("alice", "club", None)
        file_id = "a" * 32
        server.messenger.uploads.add_file("alice", file_id, "\U0001f600" * 255, 1, "a/b", "0" * 64)
        for _ in range(1000):
            send(server.messenger, "alice", "", file=file_id, chat="club")
        answer = await call(server.port, "GET", "/messages?since=0&limit=1000", token=alice)
        assert 0 < len(answer.json()["messages"]) < 1000, "the rest comes next"
        assert len(answer.body) <= ms.MAX_ANSWER_TEXT


# Message text kept: per user, and in all ####################################


def test_text_kept_is_bounded_per_user_and_in_all(clock: FakeClock) -> None:
    """Found by review: quotas per user added up to no bound at all, as accounts are free
    to make. Each user's kept messages are bounded, and so is everyone's: in bytes of text
    and MESSAGE_COST each (the memory a message takes besides its text)."""
    cost = ms.MESSAGE_COST
    messenger, events = make_messenger(
        clock, flood_limit=1000, max_kept_text=10_000 + 2 * cost, max_total_text=25_000 + 4 * cost
    )
    register(messenger, "a", "b", "c", "d")
    for _ in range(2):
        send(messenger, "a", "\u00e9" * 2500, chat="general")  # 5,000 bytes of UTF-8
    recorded = len(events)
    with pytest.raises(ms.QuotaExceeded, match=re.escape(
        f"your messages and notices still kept or scheduled may take at most {10_000 + 2 * cost} "
        f"bytes ({10_000 + 2 * cost} used; each counts its text and {cost}): older ones must "
        "expire first"
    )):
        send(messenger, "a", "x", chat="general")
    send(messenger, "b", "x" * 10_000, chat="general")
    with pytest.raises(ms.Unavailable, match="the server keeps as much message text as it may"):
        send(messenger, "c", "x" * 5_001, chat="general")
    assert len(events) == recorded + 1, "refused sends record nothing"
    send(messenger, "c", "x" * 5_000, chat="general")  # exactly the limit in all
    total = 25_000 + 4 * cost
    assert replayed(messenger, events, clock).kept_text == messenger.kept_text == total
    clock.advance(ms.Rules().message_ttl)
    send(messenger, "a", "x", chat="general")  # the old ones expired: room again
    assert (messenger.kept_text, messenger.users["a"].kept_text) == (1 + cost, 1 + cost)


def test_scheduled_texts_count_as_kept_from_when_they_are_scheduled(clock: FakeClock) -> None:
    """Found by review: a user's 100 scheduled messages of 4,096 characters were kept for
    up to a week outside every text quota. A scheduled text counts from its scheduling,
    once (its sending moves it to the message), and a cancel frees it."""
    cost = ms.MESSAGE_COST
    messenger, events = make_messenger(
        clock, flood_limit=1000, max_kept_text=10_000 + 2 * cost, max_total_text=15_000 + 3 * cost
    )
    register(messenger, "a", "b")
    later = clock() + 60
    first = messenger.send("a", ms.Draft(text="x" * 4_000, chat="general", send_at=later))
    messenger.send("a", ms.Draft(text="x" * 4_000, chat="general", send_at=later + 1))
    used = re.escape(f"({8_000 + 2 * cost} used;")
    with pytest.raises(ms.QuotaExceeded, match=used):
        messenger.send("a", ms.Draft(text="x" * 2_001, chat="general", send_at=later))
    with pytest.raises(ms.QuotaExceeded, match=used):
        send(messenger, "a", "x" * 2_001, chat="general")
    send(messenger, "b", "y" * 7_000, chat="general")
    with pytest.raises(ms.Unavailable, match="the server keeps as much message text as it may"):
        messenger.send("b", ms.Draft(text="y" * 1, chat="general", send_at=later))
    assert first.scheduled is not None
    messenger.cancel("a", first.scheduled.id)
    kept = (4_000 + cost, 11_000 + 2 * cost)
    assert (messenger.users["a"].kept_text, messenger.kept_text) == kept
    clock.advance(61)
    messenger.tick()  # the other one is sent: counted once, as a message now
    assert [m.text for m in messenger.messages.values()] == ["y" * 7_000, "x" * 4_000]
    assert (messenger.users["a"].kept_text, messenger.kept_text) == kept
    assert replayed(messenger, events, clock).kept_text == kept[1]


# Private messages nobody received ###########################################


def test_undelivered_private_messages_are_capped_per_sender(clock: FakeClock) -> None:
    messenger, _ = make_messenger(clock, max_undelivered=2)
    register(messenger, "a", "b", "c")
    send(messenger, "a", to="b")
    send(messenger, "a", to="c")  # the last allowed
    with pytest.raises(
        ms.QuotaExceeded, match="at most 2 of your private messages may wait for recipients"
    ) as refused:
        send(messenger, "a", to="b")
    assert "at most 2" in refused.value.message and refused.value.status == 403
    assert refused.value.code == "quota_exceeded"
    send(messenger, "a", chat="general")  # chats are not concerned
    messenger.poll("b", None, None, 100)  # b receives its message: one place frees
    send(messenger, "a", to="b")
    with pytest.raises(
        ms.QuotaExceeded, match="at most 2 of your private messages may wait for recipients"
    ):
        send(messenger, "a", to="c")


def test_undelivered_private_message_expires_after_its_own_ttl(clock: FakeClock) -> None:
    messenger, events = make_messenger(
        clock, max_undelivered=1, undelivered_ttl=7 * 24 * HOUR, message_ttl=HOUR
    )
    register(messenger, "a", "b")
    sent = send(messenger, "a", "for later", to="b").message
    assert sent is not None
    assert messenger.next_deadline() == sent.ts + 7 * 24 * HOUR
    clock.advance(7 * 24 * HOUR - 1)
    messenger.tick()
    assert sent.id in messenger.messages, "kept until its time"
    clock.advance(1)
    messenger.tick()
    assert sent.id not in messenger.messages
    send(messenger, "a", to="b")  # its place is free again
    again = replayed(messenger, events, clock)
    again.tick()
    assert again.users["a"].undelivered == 1


def test_scheduled_private_message_over_the_quota_when_due_is_dropped(clock: FakeClock) -> None:
    messenger, events = make_messenger(clock, max_undelivered=1)
    register(messenger, "a", "b")
    later = send(messenger, "a", "later", to="b", send_at=clock.now + 60).scheduled
    assert later is not None
    send(messenger, "a", "now", to="b")
    clock.advance(60)
    messenger.tick()
    assert events[-2] == ("cancel", later.id, "a", clock.now)  # then a notice tells "a"
    assert [m.text for m in messenger.messages.values() if m.sender is not None] == ["now"]


# Scheduled, memberships, chats owned #########################################


def test_pending_scheduled_messages_are_capped_per_user(clock: FakeClock) -> None:
    messenger, _ = make_messenger(clock, max_scheduled=2)
    register(messenger, "a", "b")
    first = send(messenger, "a", send_at=clock.now + 60).scheduled
    send(messenger, "a", send_at=clock.now + 30)  # the last allowed
    with pytest.raises(ms.QuotaExceeded, match="at most 2 scheduled messages may be pending"):
        send(messenger, "a", send_at=clock.now + 90)
    send(messenger, "b", send_at=clock.now + 90)  # per user
    assert first is not None
    messenger.cancel("a", first.id)
    send(messenger, "a", send_at=clock.now + 90)
    assert [s.send_at - clock.now for s in messenger.scheduled_of("a")] == [30, 90]
    assert messenger.quotas_left("a")["scheduled_left"] == 0


def test_memberships_are_capped_for_joins_and_approvals(clock: FakeClock) -> None:
    messenger, _ = make_messenger(clock, max_memberships=3)
    register(messenger, "a", "owner")
    messenger.membership.join("a", "one", None)
    messenger.membership.join("a", "two", None)  # general, one, two: the last allowed
    with pytest.raises(ms.QuotaExceeded, match="a may be a member of at most 3 chats"):
        messenger.membership.join("a", "three", None)
    assert "three" not in messenger.chats, "refused before the chat is made"
    messenger.membership.join("a", "one", None)  # a chat one is in already is no new membership
    messenger.membership.join("owner", "den", True)
    messenger.membership.request_join("a", messenger.membership.make_link("owner", "den"))
    with pytest.raises(ms.QuotaExceeded, match="a may be a member of at most 3 chats"):
        messenger.membership.decide("owner", "den", "a", True)
    messenger.membership.leave("a", "two")
    messenger.membership.decide("owner", "den", "a", True)
    assert "den" in messenger.users["a"].chats


def test_chats_created_are_capped_with_quota_exceeded(clock: FakeClock) -> None:
    messenger, _ = make_messenger(clock, max_owned_chats=1)
    register(messenger, "a")
    messenger.membership.join("a", "mine", None)
    with pytest.raises(ms.QuotaExceeded, match="you may create at most 1 chat"):
        messenger.membership.join("a", "another", None)


# Reports need a message to point at ##########################################


def test_report_only_from_someone_who_can_see_a_message_of_the_target(clock: FakeClock) -> None:
    messenger, events = make_messenger(clock, message_ttl=HOUR)
    register(messenger, "target", "member", "outsider", "friend")
    messenger.membership.join("target", "room", None)
    messenger.membership.join("member", "room", None)
    send(messenger, "target", "in the room", chat="room")
    send(messenger, "target", "psst", to="friend")
    recorded = len(events)
    with pytest.raises(
        ms.Forbidden, match="you can report target only for a message of theirs you can see"
    ) as refused:
        messenger.moderation.report("outsider", "target", "made up")
    assert type(refused.value) is ms.Forbidden
    assert len(events) == recorded
    assert messenger.moderation.report("member", "target", "").reports == 1
    assert messenger.moderation.report("friend", "target", "").reports == 2
    clock.advance(HOUR)  # the messages expire: nothing left to point at
    messenger.tick()
    with pytest.raises(
        ms.Forbidden, match="you can report target only for a message of theirs you can see"
    ):
        messenger.moderation.report("outsider", "target", "")
    messenger.membership.join("outsider", "room", None)
    with pytest.raises(
        ms.Forbidden, match="you can report target only for a message of theirs you can see"
    ):
        messenger.moderation.report("outsider", "target", "")


def test_fresh_accounts_cannot_ban_a_stranger(clock: FakeClock) -> None:
    messenger, _ = make_messenger(clock, ban_threshold=3)
    register(messenger, "victim", "sock1", "sock2", "sock3")
    messenger.membership.join("victim", "quiet", None)
    send(messenger, "victim", "only here", chat="quiet")
    for sock in ("sock1", "sock2", "sock3"):
        with pytest.raises(
            ms.Forbidden, match="you can report victim only for a message of theirs you can see"
        ):
            messenger.moderation.report(sock, "victim", "")
    assert messenger.moderation.standing("victim") == ms.Standing(0, None)


def test_accounts_registered_from_one_address_are_one_reporter(clock: FakeClock) -> None:
    """Found by review: three accounts from one address banned anyone with a message in
    general. A ban counts reporters once per address they registered from."""
    messenger, _ = make_messenger(clock, ban_threshold=3)
    for name, address in [("x", "10.0.0.9"), ("s1", "10.0.0.1"), ("s2", "10.0.0.1"),
                          ("s3", "10.0.0.1"), ("b", "10.0.0.2"), ("c", "10.0.0.3")]:
        messenger.accounts.register(name, b"hash", b"salt", 4, f"token-{name}", address)
    send(messenger, "x", "hello", chat="general")
    for sock in ("s1", "s2", "s3", "b"):
        standing = messenger.moderation.report(sock, "x", "")
    assert standing == ms.Standing(4, None), "four reports from two addresses: no ban"
    standing = messenger.moderation.report("c", "x", "")
    assert standing == ms.Standing(5, clock.now + ms.Rules().ban_duration), "a third address"


# Files ########################################################################


def test_upload_quota_counts_stored_files_until_they_go(clock: FakeClock) -> None:
    messenger, _ = make_messenger(clock, upload_quota=10_000, message_ttl=HOUR)
    register(messenger, "a", "b")
    messenger.uploads.add_file("a", "a" * 32, "one", 5_000, "text/plain", "0" * 64)
    messenger.uploads.check_upload("a", 5_000)  # exactly the quota
    with pytest.raises(
        ms.QuotaExceeded, match="your stored files may total at most 10000 bytes"
    ) as refused:
        messenger.uploads.add_file("a", "b" * 32, "two", 5_001, "text/plain", "0" * 64)
    assert "10000 bytes" in refused.value.message
    messenger.uploads.check_upload("b", 10_000)  # per user
    assert messenger.quotas_left("a")["upload_left"] == 5_000
    clock.advance(HOUR)
    messenger.tick()
    messenger.uploads.check_upload("a", 10_000)


# Pages of chats ###############################################################


def test_chat_pages_merge_public_chats_and_ones_private_memberships(clock: FakeClock) -> None:
    messenger, _ = make_messenger(clock)
    register(messenger, "a", "b")
    for name in ("d", "b1", "f"):
        messenger.membership.join("a", name, None)
    messenger.membership.join("b", "c-secret", True)
    messenger.membership.join("a", "e-secret", True)
    names = [c.name for c in messenger.membership.visible_chats("a")]
    assert names == ["b1", "d", "e-secret", "f", "general"]
    assert [c.name for c in messenger.membership.visible_chats("a", "d", 2)] == ["e-secret", "f"]
    assert [c.name for c in messenger.membership.visible_chats("b", "b1", 10)] == [
        "c-secret", "d", "f", "general"
    ]


# Through sockets ###############################################################


@pytest.mark.asyncio
async def test_get_chat_pages_to_the_end_with_next(tmp_path: Path, clock: FakeClock) -> None:
    async with ms.MessengerServer(make_config(tmp_path), clock) as server:
        alice = await connect(server.port, "alice")
        for n in range(5):
            await call(server.port, "POST", "/chat", {"chat_name": f"room{n}"}, token=alice)
        names: list[str] = []
        page = "/chat?limit=2"
        while page:
            listed = await call(server.port, "GET", page, token=alice)
            assert listed.status == 200
            assert len(listed.json()["chats"]) <= 2
            names += [chat["name"] for chat in listed.json()["chats"]]
            after = listed.json()["next"]
            page = after and f"/chat?limit=2&after={after}"
        assert names == ["general", "room0", "room1", "room2", "room3", "room4"]
        whole = (await call(server.port, "GET", "/chat", token=alice)).json()
        assert (len(whole["chats"]), whole["next"]) == (6, None)
        bad = await call(server.port, "GET", "/chat?limit=0", token=alice)
        assert "limit" in assert_error(
            bad, 400, "invalid_field", "limit must be an integer of at least 1"
        )["message"]


@pytest.mark.asyncio
async def test_status_lists_at_most_100_chats_those_with_unread_first(
    tmp_path: Path, clock: FakeClock
) -> None:
    rules = ms.Rules(max_owned_chats=1000, flood_limit=1000)
    async with ms.MessengerServer(make_config(tmp_path, rules=rules), clock) as server:
        server.messenger.accounts.register("alice", b"h", b"s", 4, "alice-token", "here")
        server.messenger.accounts.register("bob", b"h", b"s", 4, "bob-token", "here")
        for n in range(120):
            server.messenger.membership.join("alice", f"r{n:03}", None)
            server.messenger.membership.join("bob", f"r{n:03}", None)
        server.messenger.send("bob", ms.Draft("news", chat="r119"))
        status = (await call(server.port, "GET", "/status", token="alice-token")).json()
        names = [chat["name"] for chat in status["chats"]]
        assert len(names) == 100 and names[0] == "r119"
        assert names[1:] == sorted(names[1:])
        assert status["quotas"]["scheduled_left"] == 100


@pytest.mark.asyncio
async def test_upload_over_the_quota_is_refused_before_its_body(
    tmp_path: Path, clock: FakeClock
) -> None:
    config = make_config(tmp_path, rules=ms.Rules(upload_quota=10_000), min_free_disk=0)
    async with ms.MessengerServer(config, clock) as server:
        alice = await connect(server.port, "alice")
        headers = {"Content-Type": "application/octet-stream"}
        kept = await call(server.port, "POST", "/files?name=a", b"x" * 10_000, token=alice,
                          headers=headers)
        assert kept.status == 201, kept.body
        head = upload_head(alice, "Content-Length: 1", "Expect: 100-continue")
        async with Client(server.port) as client:
            await client.send_raw(head)  # no body: the answer comes without it
            refused = await client.response()
        assert "10000 bytes" in assert_error(
            refused, 403, "quota_exceeded",
            "your stored files may total at most 10000 bytes (10000 used)"
        )["message"]
        assert len(list(server.store.files.iterdir())) == 1


@pytest.mark.asyncio
async def test_chunked_upload_is_refused_as_soon_as_it_passes_the_limit(
    tmp_path: Path, clock: FakeClock
) -> None:
    config = make_config(tmp_path, max_file_size=10, min_free_disk=0)
    async with ms.MessengerServer(config, clock) as server:
        alice = await connect(server.port, "alice")
        head = upload_head(alice, "Transfer-Encoding: chunked")
        async with Client(server.port) as client:
            await client.send_raw(head + b"8\r\n12345678\r\n8\r\n")  # 16 bytes said
            refused = await client.response()
            assert "10 bytes" in assert_error(
                refused, 413, "too_large", "the body is larger than 10 bytes"
            )["message"]
            assert await client.closed()
        assert list(server.store.files.iterdir()) == []


@pytest.mark.asyncio
async def test_an_upload_in_tiny_chunks_is_refused_early_and_small_ones_still_pass(
    tmp_path: Path, clock: FakeClock
) -> None:
    """Found by review: 1 MiB sent as 1-byte chunks took 3.3 s of the server's CPU (64 KiB
    chunks: 0.01 s). Chunks that small are refused once their framing passes its budget;
    chunks of 128 bytes or more, or a small body in any chunks, are served."""
    config = make_config(tmp_path, min_free_disk=0)
    async with ms.MessengerServer(config, clock) as server:
        alice = await connect(server.port, "alice")
        head = upload_head(alice, "Transfer-Encoding: chunked")
        async with Client(server.port) as client:
            await client.send_raw(head + b"1\r\nx\r\n" * 20_000)
            refused = await client.response()
            assert_error(refused, 400, "bad_request", "the chunks are too small")
        assert list(server.store.files.iterdir()) == []
        pieces = b"".join(b"80\r\n" + b"y" * 128 + b"\r\n" for _ in range(8192))
        async with Client(server.port) as client:
            await client.send_raw(head + pieces + b"0\r\n\r\n")
            stored = await client.response()
            assert stored.status == 201 and stored.json()["file"]["size"] == 1024 * 1024
            text = b'{"text": "one byte at a time"}'
            body = b"".join(b"1\r\n%c\r\n" % byte for byte in text) + b"0\r\n\r\n"
            await client.send_raw(
                ("POST /send HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer "
                 f"{alice}\r\nTransfer-Encoding: chunked\r\n\r\n").encode() + body
            )
            assert (await client.response()).status == 201


@pytest.mark.asyncio
async def test_no_upload_while_the_disk_is_nearly_full(tmp_path: Path, clock: FakeClock) -> None:
    config = make_config(tmp_path, min_free_disk=2**62)  # more than any disk has
    async with ms.MessengerServer(config, clock) as server:
        alice = await connect(server.port, "alice")
        refused = await call(server.port, "POST", "/files?name=a", b"x", token=alice,
                             headers={"Content-Type": "text/plain"})
        assert "disk" in assert_error(
            refused, 503, "unavailable", "the server's disk is nearly full: no uploads for now"
        )["message"]
        assert refused.headers["retry-after"] == "60"
        sent = await call(server.port, "POST", "/send", {"text": "still"}, token=alice)
        assert sent.status == 201, "messages still go: the journal has its room"


@pytest.mark.asyncio
async def test_report_of_a_stranger_is_403_through_http(tmp_path: Path, clock: FakeClock) -> None:
    async with ms.MessengerServer(make_config(tmp_path), clock) as server:
        alice, bob = await connect(server.port, "alice"), await connect(server.port, "bob")
        refused = await call(server.port, "POST", "/report", {"user": "bob"}, token=alice)
        assert "bob" in assert_error(
            refused, 403, "forbidden", "you can report bob only for a message of theirs you can see"
        )["message"]
        await call(server.port, "POST", "/send", {"text": "hi all"}, token=bob)
        accepted = await call(server.port, "POST", "/report", {"user": "bob"}, token=alice)
        assert accepted.json()["reports"] == 1


@pytest.mark.asyncio
async def test_flood_over_http_is_429_with_retry_after(tmp_path: Path, clock: FakeClock) -> None:
    rules = ms.Rules(flood_limit=3, flood_window=60.0)
    async with ms.MessengerServer(make_config(tmp_path, rules=rules), clock) as server:
        alice = await connect(server.port, "alice")
        await connect(server.port, "bob")
        async with Client(server.port) as client:
            for text in ("1", "2"):
                await client.request("POST", "/send", {"text": text, "to": "bob"}, token=alice)
            await client.request("POST", "/send", {"text": "3"}, token=alice)
            refused = await client.request("POST", "/send", {"text": "4"}, token=alice)
        assert_error(
            refused, 429, "rate_limited",
            "messages, invitations and join requests are limited to 3 per 60 seconds: slow down",
        )
        assert refused.headers["retry-after"] == "60"


# Per address: registrations, log-in lock-out, behind a trusted proxy ##########


def forwarded(address: str) -> dict[str, str]:
    return {"X-Forwarded-For": address}


@pytest.mark.asyncio
async def test_registrations_per_address_and_lock_out_per_name_and_address(
    tmp_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Through a trusted proxy (the loopback here): each forwarded address has its own count."""
    caplog.set_level(logging.INFO, logger="messenger")
    rules = ms.Rules(registrations_per_ip=2, login_failures=2)
    config = make_config(
        tmp_path, rules=rules, forwarded_allow_ips=ms.parse_networks("127.0.0.1")
    )
    async with ms.MessengerServer(config, clock) as server:
        port = server.port

        async def connect_as(user: str, password: str, address: str) -> Any:
            body = {"user": user, "password": password}
            return await call(port, "POST", "/connect", body, headers=forwarded(address))

        for user in ("a1", "a2"):  # the last one allowed
            assert (await connect_as(user, "pw", "10.0.0.1")).status == 201
        refused = await connect_as("a3", "pw", "10.0.0.1")
        assert "at most 2 new users" in assert_error(
            refused, 429, "rate_limited",
            "at most 2 new users per address and registration window: try again later"
        )["message"]
        assert (await connect_as("b1", "pw", "10.0.0.2")).status == 201, "another address"
        clock.advance(HOUR)
        assert (await connect_as("a3", "pw", "10.0.0.1")).status == 201, "a new window"

        for _ in range(2):
            wrong = await connect_as("a1", "wrong", "10.0.0.9")
            assert_error(wrong, 401, "unauthorized", "wrong password")
        locked = await connect_as("a1", "pw", "10.0.0.9")
        assert_error(locked, 429, "rate_limited", "too many wrong passwords: try again later")
        assert (await connect_as("a1", "pw", "10.0.0.1")).status == 200, "the owner elsewhere"
        assert any("'10.0.0.9'" in line for line in caplog.messages), "logs name the client"


@pytest.mark.asyncio
async def test_forwarded_for_from_an_untrusted_peer_is_ignored(
    tmp_path: Path, clock: FakeClock
) -> None:
    config = make_config(tmp_path, rules=ms.Rules(registrations_per_ip=1))
    async with ms.MessengerServer(config, clock) as server:
        first = await call(server.port, "POST", "/connect", {"user": "u1", "password": "p"},
                           headers=forwarded("10.0.0.1"))
        assert first.status == 201
        second = await call(server.port, "POST", "/connect", {"user": "u2", "password": "p"},
                            headers=forwarded("10.0.0.2"))
        assert_error(
            second, 429, "rate_limited",
            "at most 1 new user per address and registration window: try again later"
        )


def test_client_address_is_the_rightmost_untrusted_entry() -> None:
    trusted = ms.parse_networks("127.0.0.1,10.1.0.0/16")
    assert ms.client_address("127.0.0.1", "6.6.6.6, 1.2.3.4, 10.1.2.3", trusted) == "1.2.3.4"
    assert ms.client_address("127.0.0.1", "1.2.3.4", trusted) == "1.2.3.4"
    assert ms.client_address("127.0.0.1", None, trusted) == "127.0.0.1"
    assert ms.client_address("9.9.9.9", "1.2.3.4", trusted) == "9.9.9.9", "peer not trusted"
    assert ms.client_address("127.0.0.1", "10.1.0.1, 10.1.0.2", trusted) == "10.1.0.1"


# Sessions #####################################################################


@pytest.mark.asyncio
async def test_sessions_are_capped_least_recently_used_first_and_expire_unused(
    tmp_path: Path, clock: FakeClock
) -> None:
    rules = ms.Rules(max_sessions=2, session_ttl=30 * 24 * HOUR)
    async with ms.MessengerServer(make_config(tmp_path, rules=rules), clock) as server:
        port = server.port
        oldest = await connect(port, "alice")
        clock.advance(10)
        middle = await connect(port, "alice")
        clock.advance(ms.SESSION_TOUCH)  # a use is recorded at most this often
        assert (await call(port, "GET", "/status", token=oldest)).status == 200  # now used
        newest = await connect(port, "alice")  # the 3rd: the least recently used goes
        assert (await call(port, "GET", "/status", token=oldest)).status == 200
        gone = await call(port, "GET", "/status", token=middle)
        assert "revoked" in assert_error(
            gone, 401, "unauthorized", "unknown or revoked token: connect again"
        )["message"]
        clock.advance(30 * 24 * HOUR)
        expired = await call(port, "GET", "/status", token=newest)
        assert "expired" in assert_error(
            expired, 401, "unauthorized", "the session expired unused: connect again"
        )["message"]


@pytest.mark.asyncio
async def test_registration_is_503_once_the_server_holds_max_users(
    tmp_path: Path, clock: FakeClock
) -> None:
    """Accounts are free and never expire: their number in all is bounded (memory), and
    those who have one still log in."""
    config = make_config(tmp_path, rules=ms.Rules(max_users=1))
    async with ms.MessengerServer(config, clock) as server:
        await connect(server.port, "alice")
        body = {"user": "bob", "password": "secret"}
        refused = await call(server.port, "POST", "/connect", body)
        assert_error(refused, 503, "unavailable",
                     "registration is closed: the server has as many users as it may hold")
        assert "retry-after" not in refused.headers
        assert await connect(server.port, "alice")
        assert list(server.messenger.users) == ["alice"]


@pytest.mark.asyncio
async def test_password_hash_queue_full_is_503_retry_after_1(
    tmp_path: Path, clock: FakeClock
) -> None:
    """Many addresses connecting at once: beyond the queue, a quick 503 (not a long wait)."""
    config = make_config(tmp_path, hash_queue=1, forwarded_allow_ips=ms.parse_networks("*"))
    async with ms.MessengerServer(config, clock) as server:
        places = server.app._hash_slots * (1 + config.hash_queue)
        bodies = [{"user": f"u{n}", "password": "p"} for n in range(places + 4)]
        answers = await asyncio.gather(*(
            call(server.port, "POST", "/connect", body, headers=forwarded(f"10.0.0.{n}"))
            for n, body in enumerate(bodies)
        ))
        busy = [a for a in answers if a.status == 503]
        assert len(busy) >= 4 and all(a.headers["retry-after"] == "1" for a in busy)
        for answer in busy:
            assert_error(answer, 503, "unavailable", "the server is busy checking passwords")
        assert {a.status for a in answers} <= {201, 503}


# Behind a real reverse proxy ###################################################


@needs_nginx
@pytest.mark.asyncio
async def test_two_clients_behind_nginx_get_their_own_limits_and_log_lines(
    spawn: Spawn, tmp_path: Path
) -> None:
    server = await spawn(
        "--forwarded-allow-ips", "127.0.0.1", "--registrations-per-ip", "1",
        "--login-failures", "1",
    )
    with nginx_in_front(server.port, tmp_path / "nginx") as proxy:

        async def connect_from(source: str, user: str, password: str = "pw") -> Any:
            async with SourceClient(proxy.port, source) as client:
                body = {"user": user, "password": password}
                return await client.request("POST", "/connect", body)

        assert (await connect_from("127.0.0.2", "first")).status == 201
        refused = await connect_from("127.0.0.2", "second")
        assert "at most 1 new user" in assert_error(
            refused, 429, "rate_limited",
            "at most 1 new user per address and registration window: try again later"
        )["message"]
        assert (await connect_from("127.0.0.3", "third")).status == 201, "its own count"

        wrong = await connect_from("127.0.0.2", "third", "wrong")
        assert_error(wrong, 401, "unauthorized", "wrong password")
        locked = await connect_from("127.0.0.2", "third")
        assert_error(locked, 429, "rate_limited", "too many wrong passwords: try again later")
        assert (await connect_from("127.0.0.3", "third")).status == 200, "the owner elsewhere"
    log = "".join(server.log)
    assert re.search(r"user new_user='first' .*address='127\.0\.0\.2'", log)
    assert re.search(r"user new_user='third' .*address='127\.0\.0\.3'", log)
    assert "wrong password for 'third' from '127.0.0.2'" in log
    assert "POST '/connect' from '127.0.0.2' -> 429" in log


@pytest.mark.asyncio
async def test_refused_large_upload_is_answered_before_its_body(
    tmp_path: Path, clock: FakeClock
) -> None:
    """A proxy answers 100 Continue itself: the server must not wait for 5 MiB it refuses."""
    async with ms.MessengerServer(make_config(tmp_path), clock) as server:
        head = upload_head("nope", f"Content-Length: {5 * 1024 * 1024}")
        async with Client(server.port) as client:
            await client.send_raw(head + b"x" * 1000)  # the rest never comes
            refused = await client.response()
            assert_error(refused, 401, "unauthorized", "unknown or revoked token: connect again")
            assert refused.headers["connection"] == "close"


@pytest.mark.asyncio
async def test_connection_cap_behind_a_proxy_counts_each_client_address(
    tmp_path: Path, clock: FakeClock
) -> None:
    """Was: behind nginx, 256 long-polls of one client took every place of the proxy's address."""
    config = make_config(
        tmp_path, max_connections_per_ip=2, forwarded_allow_ips=ms.parse_networks("127.0.0.1")
    )
    async with ms.MessengerServer(config, clock) as server:
        held = [Client(server.port), Client(server.port)]
        for client in held:
            await client.__aenter__()
            answer = await client.request("GET", "/health", headers=forwarded("10.0.0.1"))
            assert answer.status == 200
        try:
            async with Client(server.port) as third:
                refused = await third.request("GET", "/health", headers=forwarded("10.0.0.1"))
                assert "your address" in assert_error(
                    refused, 503, "unavailable", "too many open connections from your address"
                )["message"]
            async with Client(server.port) as other:
                answer = await other.request("GET", "/health", headers=forwarded("10.0.0.2"))
                assert answer.status == 200, "another client behind the same proxy"
        finally:
            for client in held:
                await client.__aexit__(None, None, None)


@pytest.mark.asyncio
async def test_max_connections_in_all_makes_room_from_the_longest_idle(
    tmp_path: Path, clock: FakeClock
) -> None:
    """Found by review: a few addresses' idle sockets kept --max-connections full, and every
    newcomer got 503. At the cap, the connection idle the longest is closed for a new one
    (a client may find an idle connection closed any time); only when every connection is
    busy is a newcomer refused."""
    config = make_config(tmp_path, max_connections=2)
    async with ms.MessengerServer(config, clock) as server:
        port = server.port
        token = await connect(port, "alice")
        await settle(lambda: not server.idle)  # that connection is gone
        poll = f"GET /messages?since=0&wait=30 HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {token}"
        async with (
            SourceClient(port, "127.0.0.2") as first,
            SourceClient(port, "127.0.0.3") as second,
        ):
            for client in (first, second):  # the last ones allowed, from two addresses
                assert (await client.request("GET", "/health")).status == 200
            await second.send_raw(f"{poll}\r\n\r\n".encode())  # busy: a parked long-poll
            assert await settle(waiting(server, "alice"))
            async with SourceClient(port, "127.0.0.4") as third:
                assert (await third.request("GET", "/health")).status == 200
                assert await first.closed(), "idle the longest: closed for the newcomer"
                await third.send_raw(f"{poll}\r\n\r\n".encode())
                assert await settle(lambda: len(server.app.waiters._by_user["alice"]) == 2)
                async with SourceClient(port, "127.0.0.5") as fourth:
                    assert_error(
                        await fourth.response(), 503, "unavailable",
                        "too many open connections: try again later"
                    )


@pytest.mark.asyncio
async def test_a_newcomer_refused_by_its_address_cap_makes_no_room(
    tmp_path: Path, clock: FakeClock
) -> None:
    """Found by review: at the cap, an idle connection was closed before the newcomer was
    found over its own address's cap: each refused attempt closed someone else's."""
    config = make_config(tmp_path, max_connections=2, max_connections_per_ip=1)
    async with (
        ms.MessengerServer(config, clock) as server,
        SourceClient(server.port, "127.0.0.2") as first,
        SourceClient(server.port, "127.0.0.3") as second,
    ):
        for client in (first, second):
            assert (await client.request("GET", "/health")).status == 200
        async with SourceClient(server.port, "127.0.0.2") as again:
            assert_error(await again.response(), 503, "unavailable",
                         "too many open connections: try again later")
        for client in (first, second):
            assert (await client.request("GET", "/health")).status == 200


@pytest.mark.asyncio
async def test_a_connection_idle_after_an_extra_crlf_makes_room_first(
    tmp_path: Path, clock: FakeClock
) -> None:
    """Found by review: a request followed by a stray CRLF (allowed before the next request
    line) left its connection out of the idle ones: a younger idle connection was closed
    in its place."""
    config = make_config(tmp_path, max_connections=2)
    async with (
        ms.MessengerServer(config, clock) as server,
        SourceClient(server.port, "127.0.0.2") as older,
        SourceClient(server.port, "127.0.0.3") as younger,
    ):
        await older.send_raw(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n\r\n")
        assert (await older.response()).status == 200
        assert (await younger.request("GET", "/health")).status == 200
        async with SourceClient(server.port, "127.0.0.4") as newcomer:
            assert (await newcomer.request("GET", "/health")).status == 200
            assert await older.closed()
            assert (await younger.request("GET", "/health")).status == 200


@pytest.mark.parametrize(
    ("entry", "client"),
    [("192.0.2.7:4711", "192.0.2.7"), ("[2001:db8::7]:4711", "2001:db8::7"),
     ("[2001:db8::7]", "2001:db8::7"), ("2001:db8::7", "2001:db8::7"), ("192.0.2.7", "192.0.2.7"),
     ("192.0.2.7:x:y", "127.0.0.1"), ("unknown", "127.0.0.1")],
)
def test_client_address_drops_the_port_some_proxies_add(entry: str, client: str) -> None:
    """Found by review: with ``ip:port`` entries every client was the proxy itself, one
    bucket for all. A malformed entry is still no address (the proxy answers for it)."""
    trusted = ms.parse_networks("127.0.0.1")
    assert ms.client_address("127.0.0.1", entry, trusted) == client


@pytest.mark.parametrize(
    ("address", "prefix", "group"),
    [("2001:db8:1:2:3:4:5:6", 64, "2001:db8:1:2::/64"),
     ("2001:db8:1:2::9", 64, "2001:db8:1:2::/64"),
     ("2001:db8:1:2:3:4:5:6", 56, "2001:db8:1::/56"), ("2001:db8::6", 128, "2001:db8::6/128"),
     ("::ffff:192.0.2.7", 64, "192.0.2.7"), ("192.0.2.7", 64, "192.0.2.7")],
)
def test_ipv6_clients_are_counted_by_network(address: str, prefix: int, group: str) -> None:
    assert ms.address_group(address, prefix) == group


@pytest.mark.asyncio
async def test_one_ipv6_subscriber_is_one_address_for_the_rules(
    tmp_path: Path, clock: FakeClock
) -> None:
    """Found by review: each of a /64's 2**64 addresses had its own registrations,
    lock-outs, connections and password checks."""
    config = make_config(tmp_path, rules=ms.Rules(registrations_per_ip=2), **TRUSTING)
    async with ms.MessengerServer(config, clock) as server:
        for number, user in enumerate(["a1", "a2", "a3"], 1):
            body = {"user": user, "password": "pw"}
            answer = await call(server.port, "POST", "/connect", body,
                                headers=forwarded(f"2001:db8:0:1::{number}"))
        assert_error(answer, 429, "rate_limited", "at most 2 new users per address")
        other = await call(server.port, "POST", "/connect", {"user": "b1", "password": "pw"},
                           headers=forwarded("2001:db8:0:2::1"))
        assert other.status == 201, "another /64"


@pytest.mark.asyncio
async def test_password_checks_are_limited_per_address(tmp_path: Path, clock: FakeClock) -> None:
    """Found by review: logins to one's own account, right password each time, kept every
    password-hashing place busy. Every check counts, right or wrong, known name or not."""
    rules = ms.Rules(password_checks_per_ip=3, login_window=60.0)
    async with ms.MessengerServer(make_config(tmp_path, rules=rules, **TRUSTING), clock) as server:
        for _ in range(3):  # the last one allowed
            await connect(server.port, "alice", address="10.0.0.1")
        refused = await call(server.port, "POST", "/connect",
                             {"user": "alice", "password": "secret"}, headers=forwarded("10.0.0.1"))
        assert_error(refused, 429, "rate_limited", "at most 3 logins per address per 60 seconds")
        assert refused.headers["retry-after"] == "60"
        await connect(server.port, "bob", address="10.0.0.2")  # others still get in
        clock.advance(60)
        await connect(server.port, "alice", address="10.0.0.1")  # a new window


def test_client_address_takes_bracketed_ipv6_entries() -> None:
    trusted = ms.parse_networks("*")
    assert ms.client_address("127.0.0.1", "[::1]", trusted) == "::1"
    assert ms.client_address("127.0.0.1", "[::1], 1.2.3.4", trusted) == "::1"


def test_a_file_gone_from_the_folder_leaves_its_messages_without_it(clock: FakeClock) -> None:
    """Found by review: after a kill -9 the file of an expired message may be gone while the
    state loaded still holds the message; its expiry then crashed every start."""
    messenger, _ = make_messenger(clock, message_ttl=HOUR)
    register(messenger, "a")
    messenger.uploads.add_file("a", "a" * 32, "f", 4, "text/plain", "0" * 64)
    sent = send(messenger, "a", "with a file", file="a" * 32).message
    later = send(messenger, "a", "later", file="a" * 32, send_at=clock.now + 60).scheduled
    assert sent is not None and later is not None
    messenger.uploads.forget_file("a" * 32)
    assert messenger.messages[sent.id].file is None and later.file is None
    clock.advance(60)
    messenger.tick()  # sends the scheduled one
    clock.advance(HOUR)
    messenger.tick()  # both expire, with no file to let go of
    assert messenger.messages == {} and messenger.files == {}


def test_disconnect_of_a_session_revoked_meanwhile_is_401(clock: FakeClock) -> None:
    messenger, _ = make_messenger(clock)
    register(messenger, "a")
    token_hash = ms.hash_token("token-a")
    messenger.accounts.disconnect(token_hash)
    with pytest.raises(ms.Unauthorized, match="unknown or revoked token"):
        messenger.accounts.disconnect(token_hash)


def test_empty_files_count_a_block_against_the_upload_quota(clock: FakeClock) -> None:
    """Found by review: empty uploads were free, 4,913 of them in 5 s."""
    messenger, _ = make_messenger(clock, upload_quota=2 * ms.FILE_BLOCK)
    register(messenger, "a")
    messenger.uploads.add_file("a", "a" * 32, "empty", 0, "text/plain", "0" * 64)
    messenger.uploads.add_file("a", "b" * 32, "empty", 0, "text/plain", "0" * 64)  # the last one
    with pytest.raises(ms.QuotaExceeded, match="your stored files may total at most 8192 bytes"):
        messenger.uploads.add_file("a", "c" * 32, "empty", 0, "text/plain", "0" * 64)


@pytest.mark.asyncio
async def test_uploads_under_way_count_against_the_quota(tmp_path: Path, clock: FakeClock) -> None:
    """Found by review: eight uploads at once held 7 times the quota on disk meanwhile."""
    config = make_config(tmp_path, rules=ms.Rules(upload_quota=10_000), min_free_disk=0)
    async with ms.MessengerServer(config, clock) as server:
        alice = await connect(server.port, "alice")
        head = upload_head(alice, "Content-Length: 8000")
        async with Client(server.port) as slow:
            await slow.send_raw(head + b"x" * 100)  # under way, the rest to come
            assert await settle(lambda: "alice" in server.app.uploading)
            refused = await call(server.port, "POST", "/files?name=other", b"y" * 8000,
                                 token=alice)
            assert_error(
                refused, 403, "quota_exceeded",
                "your stored files may total at most 10000 bytes (0 used)"
            )
            await slow.send_raw(b"x" * 7900)
            assert (await slow.response()).status == 201
        assert server.app.uploading == {}


def test_a_trusted_ipv4_proxy_seen_by_a_dual_stack_socket_is_trusted() -> None:
    trusted = ms.parse_networks("127.0.0.1")
    assert ms.client_address("::ffff:127.0.0.1", "1.2.3.4", trusted) == "1.2.3.4"
    assert ms.client_address("::ffff:127.0.0.2", "1.2.3.4", trusted) == "::ffff:127.0.0.2"


@pytest.mark.asyncio
async def test_since_over_users_without_a_conversation_records_nothing(
    tmp_path: Path, clock: FakeClock
) -> None:
    """Found by review: ``since`` with ``chat=@u1&chat=@u2...`` kept a read position for
    each user named, conversation or not: one per existing user, in memory and snapshots."""
    async with ms.MessengerServer(make_config(tmp_path), clock) as server:
        for n in range(50):
            register(server.messenger, f"u{n}")
            send(server.messenger, f"u{n}", "hello")  # in general: ids for since to pass
        alice = await connect(server.port, "alice")
        changes = server.messenger.changes
        named = "&".join(f"chat=%40u{n}" for n in range(50))
        for since in (10, 30, 50):
            answer = await call(server.port, "GET", f"/messages?since={since}&{named}",
                                token=alice)
            assert answer.json() == {"messages": [], "next": since}
        assert server.messenger.users["alice"].positions == {}
        assert server.messenger.changes == changes, "no event, no journal line"


@pytest.mark.asyncio
async def test_messages_names_at_most_100_conversations(tmp_path: Path, clock: FakeClock) -> None:
    """Found by review: each conversation named with since is a journal record and a log line."""
    async with ms.MessengerServer(make_config(tmp_path), clock) as server:
        alice = await connect(server.port, "alice")
        many = "&".join(f"chat=%40u{n}" for n in range(101))
        refused = await call(server.port, "GET", f"/messages?since=0&{many}", token=alice)
        assert "at most 100" in assert_error(
            refused, 400, "invalid_field", "at most 100 chat values in one request"
        )["message"]
        allowed = "&".join(f"chat=%40u{n}" for n in range(100))
        answer = await call(server.port, "GET", f"/messages?since=0&{allowed}", token=alice)
        assert_error(
            answer, 404, "not_found", "no user named 'u0'"
        )  # the limit passed: now the names are checked


@pytest.mark.asyncio
async def test_a_download_out_of_descriptors_is_503_not_404(
    tmp_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by review: a stored file that could not be opened for lack of descriptors was
    answered 404, as if it did not exist."""
    async with ms.MessengerServer(make_config(tmp_path), clock) as server:
        (alice,) = await login(server, "alice")
        file_id = (await alice.uploaded(b"mine", "a.txt", "text/plain"))["id"]

        def out_of_descriptors(file_id: str) -> BinaryIO:
            raise OSError(errno.EMFILE, "Too many open files")

        monkeypatch.setattr(server.store, "open_file", out_of_descriptors)
        response = await alice.get(f"/files/{file_id}")
        assert_error(response, 503, "unavailable", "the server has too many files open: try again")
        assert response.headers["retry-after"] == "1"
        monkeypatch.undo()
        assert (await alice.get(f"/files/{file_id}")).body == b"mine"


@pytest.mark.parametrize(
    ("soft", "hard", "raised_to", "cap"),
    [(1024, resource.RLIM_INFINITY, 20_000 + ms.FD_RESERVE, 10_000),
     (1024, 4096, 4096, 4096 - ms.FD_RESERVE),
     (1024, 1024, None, 1024 - ms.FD_RESERVE),
     (1024, 15_000, 15_000, 10_000),
     (100, 100, None, 50),
     (20_000, 20_000, None, 10_000)],
)
def test_connection_cap_fits_under_the_open_file_limit(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    soft: int, hard: int, raised_to: int | None, cap: int,
) -> None:
    """Found by review: --max-connections was never set against RLIMIT_NOFILE. The soft limit
    is raised toward the hard one as far as two descriptors a connection (a download holds
    its file too); a cap too high for one each is lowered below it, FD_RESERVE descriptors
    (half the limit at most) kept for the rest, and a warning says so."""
    raised: list[int] = []
    monkeypatch.setattr(resource, "getrlimit", lambda _: (soft, hard))
    monkeypatch.setattr(resource, "setrlimit", lambda _, limits: raised.append(limits[0]))
    with caplog.at_level(logging.WARNING, logger="messenger"):
        assert ms.connection_cap(10_000) == cap
    assert raised == ([] if raised_to is None else [raised_to])
    warnings = [record.getMessage() for record in caplog.records]
    if cap < 10_000:
        assert warnings == [
            f"--max-connections lowered from 10000 to {cap}: the open-file limit (ulimit -n) is "
            f"{raised_to or soft}, hard limit {hard}, and {(raised_to or soft) - cap} "
            "descriptors stay for the journal, snapshots, uploads and the listening socket"
        ]
    else:
        assert warnings == []
