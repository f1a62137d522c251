"""The state folder: journal, snapshots, their damage, a full disk, and real restarts."""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import errno
import functools
import itertools
import logging
import os
import pickle
import re
import signal
import stat
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

import messenger_server as ms
from tests.conftest import (
    Client,
    FakeClock,
    assert_error,
    call,
    connect,
    make_config,
    opened,
)
from tests.servers import ServerProcess, Spawn
from tests.test_domain import post, register, scenario

EVENTS: list[ms.Event] = [
    ("user", "alice", b"\x00hash", b"salt", 4, 1_800_000_000.0),
    ("message", 1, "general", None, "alice", "h\xe9llo \U0001f600", 1.5, None, None, "c1", True,
     None),
    ("deliver", "alice", [1, 2, 3], 1_800_000_001.25),
    ("join", "club", "alice", False, 2.0),
    ("report", "bob", "alice", "", 3.0),
]


def write_journal(path: Path, events: list[ms.Event]) -> None:
    journal = ms.Journal(always=False)
    journal.switch(path)
    for event in events:
        journal.append(event)
    journal.close()


def record(payload: bytes) -> bytes:
    """A journal record around ``payload``, with a correct checksum."""
    return ms.RECORD_HEADER.pack(len(payload), zlib.crc32(payload)) + payload


async def saved_with_one_post(config: ms.ServerConfig, clock: FakeClock) -> ms.MessengerServer:
    """A server on ``config`` (not listening) where alice has posted "one", saved once."""
    server = opened(config, clock)
    register(server.messenger, "alice")
    post(server.messenger, "alice", "one")
    await server.save()
    return server


def flip(path: Path, position: int) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 0xFF
    path.write_bytes(bytes(data))


# Journal ####################################################################


def test_journal_records_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "journal.log"
    write_journal(path, EVENTS)
    assert list(ms.read_journal(path)) == EVENTS


def test_read_journal_ignores_a_torn_last_record_at_every_cut(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    full = tmp_path / "full.log"
    write_journal(full, EVENTS)
    write_journal(tmp_path / "head.log", EVENTS[:-1])
    data = full.read_bytes()
    last_start = (tmp_path / "head.log").stat().st_size
    cut = tmp_path / "cut.log"
    for end in range(last_start, len(data)):
        cut.write_bytes(data[:end])
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="messenger"):
            assert list(ms.read_journal(cut)) == EVENTS[:-1], f"cut at {end}"
        torn = [r for r in caplog.records if "torn last record" in r.getMessage()]
        assert len(torn) == (1 if end > last_start else 0), f"cut at {end}"


def test_read_journal_ignores_a_damaged_last_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "journal.log"
    write_journal(path, EVENTS)
    flip(path, path.stat().st_size - 1)
    with caplog.at_level(logging.WARNING, logger="messenger"):
        assert list(ms.read_journal(path)) == EVENTS[:-1]
    assert "torn last record" in caplog.text


def test_journal_file_is_private(tmp_path: Path) -> None:
    path = tmp_path / "journal.log"
    write_journal(path, EVENTS)
    assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0


# Full disk ##################################################################


@pytest.fixture
def full_disk(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], None]:
    """Make the disk full for one descriptor: half a record gets written, then ENOSPC."""

    def fill(fd: int) -> None:
        real_write = os.write
        written: list[int] = []

        def write(target: int, data: Any) -> int:
            if target != fd:
                return real_write(target, data)
            if not written:
                written.append(real_write(target, bytes(data)[: max(1, len(data) // 2)]))
                return written[0]
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "write", write)

    return fill


def test_journal_append_on_a_full_disk_leaves_no_half_record(
    tmp_path: Path,
    full_disk: Callable[[int], None],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / "journal.log"
    journal = ms.Journal(always=False)
    journal.switch(path)
    journal.append(EVENTS[0])
    size = path.stat().st_size
    full_disk(journal._fd)
    with pytest.raises(ms.Unavailable, match="the state cannot be written: nothing was stored"):
        journal.append(EVENTS[1])
    assert path.stat().st_size == size
    monkeypatch.undo()
    journal.append(EVENTS[2])
    journal.close()
    with caplog.at_level(logging.WARNING, logger="messenger"):
        assert list(ms.read_journal(path)) == [EVENTS[0], EVENTS[2]]
    assert "torn" not in caplog.text


def test_journal_append_to_an_unwritable_file_fails_and_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "journal.log"
    journal = ms.Journal(always=False)
    journal.switch(path)
    journal.append(EVENTS[0])
    writable, journal._fd = journal._fd, os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(ms.Unavailable, match="the state cannot be written: nothing was stored"):
            journal.append(EVENTS[1])
    finally:
        os.close(journal._fd)
        journal._fd = writable
    journal.close()
    assert list(ms.read_journal(path)) == [EVENTS[0]]


@pytest.mark.asyncio
async def test_send_answers_503_and_stores_nothing_when_the_disk_is_full(
    tmp_path: Path,
    clock: FakeClock,
    full_disk: Callable[[int], None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = make_config(tmp_path)
    async with ms.MessengerServer(config, clock) as server:
        token = await connect(server.port, "alice")
        full_disk(server.journal._fd)
        async with Client(server.port) as client:
            refused = await client.request("POST", "/send", {"text": "lost"}, token=token)
            monkeypatch.undo()
            assert_error(
                refused, 503, "unavailable", "the state cannot be written: nothing was stored"
            )
            assert server.messenger.messages == {}
            polled = await client.request("GET", "/messages?since=0", token=token)
            assert polled.json()["messages"] == []
            sent = await client.request("POST", "/send", {"text": "kept"}, token=token)
            assert (sent.status, sent.json()["message"]["id"]) == (201, 1)
    async with ms.MessengerServer(config, clock) as again:
        assert [m.text for m in again.messenger.messages.values()] == ["kept"]


# Snapshots ##################################################################


@pytest.mark.asyncio
async def test_snapshot_round_trip(
    tmp_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ms, "SNAPSHOT_FRAME_BYTES", 300)  # several frames of each kind
    messenger = ms.Messenger(ms.Rules(), clock)
    scenario(messenger, clock)
    for text in "abcde":
        post(messenger, "bob", text, chat="secret")
    state, messages = messenger.export()
    store = ms.StateStore(tmp_path / "state")
    store.open()
    size = await store.write_snapshot(7, state, messages)
    path = store.snapshot_path(7)
    assert path.stat().st_size == size
    assert list(store.folder.glob("*.tmp")) == []
    loaded_state, loaded_messages = ms.read_snapshot(path)
    rows = list(loaded_messages)
    assert rows == [tuple(message) for message in messages]
    restored = ms.Messenger(ms.Rules(), clock)
    restored.restore(loaded_state, rows)
    assert restored.export() == messenger.export()


SNAPSHOT_DAMAGES: list[tuple[str, str]] = [
    ("magic", f"not a format {ms.SNAPSHOT_FORMAT} snapshot"),
    ("format", f"not a format {ms.SNAPSHOT_FORMAT} snapshot"),
    ("length", "size or checksum mismatch"),
    ("digest", "size or checksum mismatch"),
    ("first payload byte", "size or checksum mismatch"),
    ("last byte", "size or checksum mismatch"),
    ("cut", "size or checksum mismatch"),
    ("empty", "shorter than its header"),
]


@pytest.mark.parametrize(
    ("damage", "message"), SNAPSHOT_DAMAGES, ids=[case[0] for case in SNAPSHOT_DAMAGES]
)
def test_read_snapshot_refuses_a_damaged_file(
    tmp_path: Path, clock: FakeClock, damage: str, message: str
) -> None:
    messenger = ms.Messenger(ms.Rules(), clock)
    scenario(messenger, clock)
    store = ms.StateStore(tmp_path / "state")
    store.open()
    asyncio.run(store.write_snapshot(1, *messenger.export()))
    path = store.snapshot_path(1)
    positions = {"magic": 0, "format": 11, "length": 19, "digest": 20,
                 "first payload byte": ms.SNAPSHOT_HEADER.size, "last byte": -1}
    if damage in positions:
        flip(path, positions[damage] % path.stat().st_size)
    else:
        path.write_bytes(path.read_bytes()[: path.stat().st_size - 1 if damage == "cut" else 0])
    with pytest.raises(ms.DamagedState, match=re.escape(message)):
        ms.read_snapshot(path)


@pytest.mark.asyncio
@pytest.mark.parametrize("damage", ["flipped byte", "cut short", "names a class"])
async def test_load_falls_back_to_the_previous_snapshot_and_replays_its_journals(
    tmp_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    config = make_config(tmp_path)
    first = opened(config, clock)
    register(first.messenger, "alice", "bob")
    post(first.messenger, "alice", "before the first snapshot")
    await first.save()
    post(first.messenger, "bob", "between the snapshots")
    await first.save()
    post(first.messenger, "alice", "after the last snapshot")
    first.close()
    expected = first.messenger.export()
    store = first.store
    assert sorted(p.name for p in store.folder.glob("*-*")) == [
        "journal-00000002.log", "journal-00000003.log",
        "snapshot-00000002.bin", "snapshot-00000003.bin",
    ]
    newest = store.snapshot_path(3)
    if damage == "flipped byte":
        flip(newest, newest.stat().st_size // 2)
    elif damage == "cut short":
        newest.write_bytes(newest.read_bytes()[:-10])
    else:
        await store.write_snapshot(3, {"x": collections.OrderedDict(a=1)}, [])
    with caplog.at_level(logging.INFO, logger="messenger"):
        second = opened(config, clock)
    second.close()
    assert second.messenger.export() == expected
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "snapshot-00000003.bin is damaged" in errors[0]
    assert "loaded snapshot-00000002.bin" in caplog.text


@pytest.mark.asyncio
async def test_save_that_fails_leaves_everything_in_the_journals(
    tmp_path: Path,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = make_config(tmp_path)
    first = await saved_with_one_post(config, clock)

    async def disk_full(*args: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ms.StateStore, "write_snapshot", disk_full)
    post(first.messenger, "alice", "two")
    with caplog.at_level(logging.ERROR, logger="messenger"):
        await first.save()
    assert "snapshot 3 failed" in caplog.text
    monkeypatch.undo()
    post(first.messenger, "alice", "three")
    first.close()
    second = opened(config, clock)
    second.close()
    assert second.messenger.export() == first.messenger.export()


def test_restarts_without_a_snapshot_replay_every_journal(
    tmp_path: Path, clock: FakeClock
) -> None:
    config = make_config(tmp_path)
    texts = []
    for round_ in range(3):  # each run is killed: no snapshot, only its journal
        server = opened(config, clock)
        if round_ == 0:
            register(server.messenger, "alice")
        texts.append(post(server.messenger, "alice", f"run {round_}").text)
        server.close()
    last = opened(config, clock)
    last.close()
    assert [m.text for m in last.messenger.messages.values()] == texts
    assert sorted(p.name for p in tmp_path.glob("state/journal-*")) == [
        f"journal-0000000{n}.log" for n in (1, 2, 3, 4)
    ]
    assert list(tmp_path.glob("state/snapshot-*")) == []


@pytest.mark.asyncio
async def test_load_falls_back_again_after_saving_on_a_fallback(
    tmp_path: Path, clock: FakeClock
) -> None:
    config = make_config(tmp_path)
    first = await saved_with_one_post(config, clock)
    post(first.messenger, "alice", "two")
    await first.save()
    first.close()
    flip(first.store.snapshot_path(3), -1)
    second = opened(config, clock)  # falls back to snapshot 2
    post(second.messenger, "alice", "three")
    await second.save()  # the newest snapshot is good again; the previous must be too
    second.close()
    flip(max(second.store.folder.glob("snapshot-*.bin")), -1)
    third = opened(config, clock)
    third.close()
    assert third.messenger.export() == second.messenger.export()


# Plain builtins only ########################################################

SPRUNG: list[str] = []


def spring(value: str) -> None:
    SPRUNG.append(value)


class Trap:
    """Unpickling it would call ``spring``: a stand-in for ``os.system``."""

    def __reduce__(self) -> tuple[Callable[[str], None], tuple[str]]:
        return spring, ("sprung",)


CLASS_INSTANCES: list[object] = [
    Trap(),
    ms.Message(1, "general", None, "alice", "hi", 1.0, None, None),
    collections.OrderedDict(a=1),
    dt.date(2030, 1, 1),
]


@pytest.mark.parametrize("instance", CLASS_INSTANCES, ids=lambda i: type(i).__name__)
def test_read_journal_stops_at_a_class_instance(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, instance: object
) -> None:
    path = tmp_path / "journal.log"
    path.write_bytes(
        record(pickle.dumps(EVENTS[0]))
        + record(pickle.dumps(("x", instance)))
        + record(pickle.dumps(EVENTS[1]))
    )
    assert list(ms.read_journal(path)) == [EVENTS[0]]
    assert "plain builtins only" in caplog.text
    assert SPRUNG == []


@pytest.mark.asyncio
@pytest.mark.parametrize("instance", CLASS_INSTANCES, ids=lambda i: type(i).__name__)
async def test_read_snapshot_refuses_a_class_instance(tmp_path: Path, instance: object) -> None:
    store = ms.StateStore(tmp_path / "state")
    store.open()
    await store.write_snapshot(1, {"x": instance}, [])  # checksum and framing are right
    with pytest.raises(pickle.UnpicklingError, match="plain builtins"):
        ms.read_snapshot(store.snapshot_path(1))
    assert SPRUNG == []


PLAIN_TYPES = (dict, list, tuple, str, bytes, int, float, bool, type(None), set, frozenset)


def assert_plain(value: object, where: str) -> None:
    assert type(value) in PLAIN_TYPES, f"{where}: {type(value)}"
    if isinstance(value, dict):
        for key, item in value.items():
            assert_plain(key, where)
            assert_plain(item, f"{where}[{key!r}]")
    elif isinstance(value, list | tuple | set | frozenset):
        for item in value:
            assert_plain(item, where)


@pytest.mark.asyncio
async def test_state_files_hold_plain_builtins(tmp_path: Path, clock: FakeClock) -> None:
    server = opened(make_config(tmp_path), clock)
    scenario(server.messenger, clock)
    await server.save()
    post(server.messenger, "bob", "after the snapshot", to="alice")
    server.messenger.poll("alice", 5, None, 100)
    server.close()
    snapshot = server.store.snapshot_path(2)
    state, rows = ms.read_snapshot(snapshot)  # its unpickler refuses classes
    assert_plain((state, list(rows)), snapshot.name)
    journal = server.store.journal_path(2)
    events = list(ms.read_journal(journal))
    assert [event[0] for event in events] == ["message", "deliver", "read"]
    for event in events:
        assert_plain(event, journal.name)


@pytest.mark.parametrize("existing_mode", [None, 0o755, 0o777])
def test_state_folder_is_mode_0700(tmp_path: Path, existing_mode: int | None) -> None:
    folder = tmp_path / "nested" / "state"
    if existing_mode is not None:
        folder.mkdir(parents=True)
        folder.chmod(existing_mode)
    ms.StateStore(folder).open()
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700


# Restarts ###################################################################


@pytest.mark.asyncio
@pytest.mark.parametrize("shutdown", ["graceful", "killed"])
async def test_scheduled_message_due_while_down_goes_out_at_start(
    tmp_path: Path, clock: FakeClock, shutdown: str
) -> None:
    config = make_config(tmp_path)
    if shutdown == "graceful":
        async with ms.MessengerServer(config, clock) as server:
            register(server.messenger, "alice")
            server.messenger.send("alice", ms.Draft("later", send_at=clock.now + 60))
    else:
        server = opened(config, clock)  # never started: nothing but the journal
        register(server.messenger, "alice")
        server.messenger.send("alice", ms.Draft("later", send_at=clock.now + 60))
        server.close()
    clock.advance(600)
    async with ms.MessengerServer(config, clock) as again:
        delivered = list(again.messenger.messages.values())
        assert [(m.text, m.ts) for m in delivered] == [("later", clock.now)]
        assert again.messenger.scheduled == {}


@pytest.fixture
def server_process(spawn: Spawn) -> Callable[[], Awaitable[ServerProcess]]:
    """Starts real server processes on one state folder, snapshots only at shutdown."""
    return functools.partial(spawn, "--snapshot-interval", "3600")


async def send_many(
    port: int, token: str, prefix: str, count: int, chat: str = "general"
) -> list[dict[str, Any]]:
    """Send ``count`` messages on one keep-alive connection; the acknowledged ones."""
    acknowledged = []
    async with Client(port) as client:
        for index in range(count):
            body = {"text": f"{prefix}{index}", "client_id": f"{prefix}{index}", "chat": chat}
            response = await client.request("POST", "/send", body, token=token)
            assert response.status == 201, response.body
            acknowledged.append(response.json()["message"])
    return acknowledged


@pytest.mark.asyncio
async def test_server_keeps_every_acknowledged_message_after_sigkill(
    server_process: Callable[[], Awaitable[ServerProcess]],
) -> None:
    first = await server_process()
    token = await connect(first.port, "alice")
    async with Client(first.port) as client:
        joined = await client.request("POST", "/chat", {"chat_name": "club"}, token=token)
        assert joined.status == 201
    acknowledged: list[dict[str, Any]] = []
    enough = asyncio.Event()
    killed = False

    async def keep_sending(prefix: str) -> None:
        """Send until the server dies; only answered sends count as acknowledged."""
        async with Client(first.port) as client:
            for index in itertools.count():
                body = {"text": f"{prefix}{index}", "client_id": f"{prefix}{index}", "chat": "club"}
                try:
                    response = await client.request("POST", "/send", body, token=token)
                except Exception:
                    if killed:
                        return
                    raise
                assert response.status == 201, response.body
                acknowledged.append(response.json()["message"])
                if len(acknowledged) >= 40:
                    enough.set()

    senders = [asyncio.create_task(keep_sending(prefix)) for prefix in "abc"]
    async with asyncio.timeout(15):
        await enough.wait()
        killed = True  # the senders are still busy: the kill lands among their requests
        assert await first.stop(signal.SIGKILL) == -signal.SIGKILL
        await asyncio.gather(*senders)

    second = await server_process()
    history = await call(second.port, "GET", "/history?chat=club&limit=1000", token=token)
    assert history.status == 200, "the session survives a restart"
    stored = history.json()["messages"]
    assert [m for m in stored if m in acknowledged] == sorted(acknowledged, key=lambda m: m["id"])
    texts = [m["text"] for m in stored]
    assert len(texts) == len(set(texts)), "no message is stored twice"
    async with Client(second.port) as client:
        for message in acknowledged:
            body = {"text": message["text"], "client_id": message["text"], "chat": "club"}
            retry = await client.request("POST", "/send", body, token=token)
            assert (retry.status, retry.json()["message"]) == (200, message)
        new = await client.request("POST", "/send", {"text": "new", "chat": "club"}, token=token)
        assert new.json()["message"]["id"] > max(m["id"] for m in stored)
        again = await client.request("POST", "/connect", {"user": "alice", "password": "secret"})
        assert again.status == 200


@pytest.mark.asyncio
async def test_server_sigterm_saves_exits_0_and_restores(
    server_process: Callable[[], Awaitable[ServerProcess]], tmp_path: Path
) -> None:
    first = await server_process()
    token = await connect(first.port, "alice")
    acknowledged = await send_many(first.port, token, "m", 5)
    assert await first.stop(signal.SIGTERM) == 0
    assert any("stopped" in line for line in first.log)
    snapshots = sorted((tmp_path / "state").glob("snapshot-*.bin"))
    assert snapshots, "a snapshot is written at shutdown"
    _, messages = ms.read_snapshot(snapshots[-1])
    assert [row[4] for row in messages] == [m["text"] for m in acknowledged]

    second = await server_process()
    assert any(f"loaded {snapshots[-1].name}" in line for line in second.log)
    history = await call(second.port, "GET", "/history?chat=general", token=token)
    assert history.json()["messages"] == acknowledged
    assert await second.stop(signal.SIGTERM) == 0


@pytest.mark.asyncio
async def test_an_expired_message_leaves_every_state_file(tmp_path: Path, clock: FakeClock) -> None:
    """Snapshots go on until both kept hold the current state: then the expired text is
    in no snapshot and no journal, though the server has been quiet since."""
    config = make_config(tmp_path, rules=ms.Rules(message_ttl=60.0))
    server = opened(config, clock)
    server.messenger.accounts.register("alice", b"hash", b"salt", 4, "token", "10.0.0.1")
    server.messenger.send("alice", ms.Draft("SECRET-EXPIRING-TEXT"))
    await server.save()
    clock.advance(61)
    server.messenger.tick()
    saves = 0
    while server.snapshot_due():
        await server.save()
        saves += 1
    server.close()
    assert saves == 2
    for path in server.store.folder.iterdir():
        if path.is_file():
            assert b"SECRET-EXPIRING-TEXT" not in path.read_bytes(), path.name
