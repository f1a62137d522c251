"""The state folder as input: one server per folder, failed starts that change nothing,
planted records, symlinks and traversal ids refused, and a log line per change."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import pickle
import re
import signal
import socket
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

import messenger_server as ms
from tests.conftest import FakeClock, assert_error, call, connect, login, make_config, opened
from tests.servers import SERVER_SCRIPT, Spawn
from tests.test_domain import fid, make_messenger, scenario
from tests.test_persistence import record, write_journal

SECRET = b"the victim's own bytes"


def folder_bytes(folder: Path) -> dict[str, tuple[int, bytes | str]]:
    """Everything in ``folder``, recursively: each path with its mode and its bytes (or a
    symlink's target), to compare before and after."""
    found: dict[str, tuple[int, bytes | str]] = {}
    if not os.path.lexists(folder):
        return found
    found["."] = (folder.lstat().st_mode, "")
    for path in sorted(folder.rglob("*")):
        mode = path.lstat().st_mode
        if path.is_symlink():
            content: bytes | str = os.readlink(path)
        elif path.is_dir():
            content = ""
        else:
            content = path.read_bytes()
        found[str(path.relative_to(folder))] = (mode, content)
    return found


async def failed_start(state_dir: Path, *flags: str) -> tuple[int, list[str]]:
    """Run ``messenger_server.py`` expecting it to exit: its exit code and stderr lines."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(SERVER_SCRIPT), "--state-dir", str(state_dir),
        "--password-cost", "4", *flags,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        _, stderr = await process.communicate()
    assert process.returncode is not None
    return process.returncode, stderr.decode().splitlines()


# One server per folder ######################################################


@pytest.mark.asyncio
async def test_second_server_on_a_folder_exits_1_changing_nothing(
    spawn: Spawn, tmp_path: Path
) -> None:
    first = await spawn()
    token = await connect(first.port, "alice")
    sent = await call(first.port, "POST", "/send", {"text": "kept"}, token=token)
    assert sent.status == 201
    before = folder_bytes(first.state_dir)

    code, lines = await failed_start(first.state_dir, "--port", "0")

    assert code == 1
    assert len(lines) == 1, lines
    assert repr(str(first.state_dir)) in lines[0]
    assert f"process {first.process.pid}" in lines[0]
    assert folder_bytes(first.state_dir) == before
    await first.kill()  # kill -9: only the journal holds the message
    again = await spawn()
    token = await connect(again.port, "alice")
    read = await call(again.port, "GET", "/history?chat=general", token=token)
    assert [m["text"] for m in read.json()["messages"]] == ["kept"]


@pytest.mark.asyncio
async def test_two_servers_in_one_process_cannot_share_a_folder(
    tmp_path: Path, clock: FakeClock
) -> None:
    config = make_config(tmp_path)
    first = opened(config, clock)
    with pytest.raises(ms.StateLocked, match=f"process {os.getpid()}"):
        opened(config, clock)
    first.close()
    opened(config, clock).close()  # free again once the first let go


@pytest.mark.asyncio
@pytest.mark.parametrize("folder_exists", [True, False])
async def test_start_on_a_port_in_use_leaves_the_folder_as_it_was(
    tmp_path: Path, folder_exists: bool
) -> None:
    state_dir = tmp_path / "state"
    if folder_exists:
        state_dir.mkdir(mode=0o755)
        (state_dir / "note.txt").write_text("the operator's")
    before = folder_bytes(state_dir)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        code, lines = await failed_start(state_dir, "--port", str(taken.getsockname()[1]))
    assert code == 1
    assert any("cannot start" in line and "in use" in line for line in lines), lines
    assert folder_bytes(state_dir) == before


@pytest.mark.asyncio
async def test_start_with_a_bad_flag_touches_no_folder(tmp_path: Path) -> None:
    code, lines = await failed_start(tmp_path / "state", "--port", "eighty")
    assert code == 2
    assert "invalid int value" in lines[-1]
    assert not (tmp_path / "state").exists()


def test_making_a_server_touches_no_folder_and_no_collector(tmp_path: Path) -> None:
    frozen = gc.get_freeze_count()
    ms.MessengerServer(make_config(tmp_path))
    assert not (tmp_path / "state").exists()
    assert gc.get_freeze_count() == frozen  # start freezes the loaded state, not __init__


# Records checked like input #################################################


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A file outside the state folder that nothing may touch or serve."""
    path = tmp_path / "victim.txt"
    path.write_bytes(SECRET)
    return path


def user_event(name: str) -> ms.Event:
    return ("user", name, b"hash", b"salt", 4, "ab" * 32, "10.0.0.1", 1_800_000_000.0)


BAD_EVENTS: list[tuple[str, Any]] = [
    ("traversal file id", ("file", "../../victim.txt", "alice", "v.txt", 22, "text/plain",
                           "ab" * 32, 1.0)),
    ("absolute file id", ("file", "/etc/passwd", "alice", "p", 1, "text/plain", "ab" * 32, 1.0)),
    ("unknown kind", ("format_disk", "now")),
    ("not a tuple", ["user", "mallory"]),
    ("no kind", ()),
    ("a field too many", (*user_event("mallory"), "extra")),
    ("a field of the wrong type", ("join", "club", "alice", "yes", 1.0)),
    ("a bool for an int", ("message", True, "general", None, "alice", "x", 1.0, None, None,
                           None, False, None)),
    ("unknown user", ("join", "club", "nobody", False, 1.0)),
    ("invalid user name", user_event("../../etc")),
    ("unknown chat", ("leave", "nowhere", "alice")),
    ("old message id", ("message", 1, "general", None, "alice", "again", 1.0, None, None,
                        None, False, None)),
    ("unknown file on a message", ("message", 9, "general", None, "alice", "x", 1.0, None,
                                   "../victim.txt", None, False, None)),
    ("bad token hash", ("session", "../../x", "alice", 1.0)),
    ("read in an unknown conversation", ("read_in", "alice", "@nobody", 1)),
    ("read in an unknown chat", ("read_in", "alice", "nowhere", 1)),
    ("a notice of an unknown type", ("notice", 9, "alice", "promoted", None, None, None,
                                     "x", 1.0)),
    ("a notice to nobody", ("notice", 9, "nobody", "banned", None, None, None, "x", 1.0)),
    ("a notice with an old id", ("notice", 1, "alice", "banned", None, None, None, "x", 1.0)),
    ("a notice about an unknown chat", ("notice", 9, "alice", "invited", "nowhere", "alice",
                                        None, "x", 1.0)),
]


@pytest.mark.parametrize(("what", "bad"), BAD_EVENTS, ids=[what for what, _ in BAD_EVENTS])
def test_load_refuses_a_bad_journal_event_and_goes_on(
    tmp_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture, victim: Path,
    what: str, bad: Any,
) -> None:
    config = make_config(tmp_path)
    state = config.state_dir
    state.mkdir()
    good_message = ("message", 1, "general", None, "alice", "hi", 1.0, None, None, None, True,
                    None)
    write_journal(state / "journal-00000001.log", [user_event("alice"), good_message])
    (state / "journal-00000001.log").write_bytes(
        (state / "journal-00000001.log").read_bytes()
        + record(pickle.dumps(bad))
        + record(pickle.dumps(("join", "club", "alice", False, 2.0)))
    )
    with caplog.at_level(logging.INFO, logger="messenger"):
        server = opened(config, clock)
    server.close()
    messenger = server.messenger
    assert list(messenger.users) == ["alice"]
    assert [m.text for m in messenger.messages.values()] == ["hi"]
    assert "club" in messenger.chats  # the record after the bad one was applied
    assert "refused a record" in caplog.text
    assert "replayed 3 journal events (1 refused)" in caplog.text
    assert victim.read_bytes() == SECRET
    assert os.listdir(state / "files") == []


def test_every_event_the_domain_makes_passes_the_load_check(clock: FakeClock) -> None:
    made, events = make_messenger(clock)
    scenario(made, clock)
    loaded = ms.Messenger(ms.Rules(), clock)
    for event in events:
        ms.check_event(loaded, event)
        loaded.replay(event)
    assert {event[0] for event in events} == set(ms.EVENT_KINDS)
    assert loaded.export() == made.export()


def snapshot_rows(clock: FakeClock) -> tuple[dict[str, Any], list[tuple[Any, ...]]]:
    messenger, _ = make_messenger(clock)
    scenario(messenger, clock)
    state, messages = messenger.export()
    return state, [tuple(message) for message in messages]


BAD_STATE_ROWS: list[tuple[str, str, Any]] = [
    ("users", "wrong type", {"name": 5}),
    ("users", "unknown field", {"name": "zed", "is_admin": True}),
    ("users", "not a dict", ["zed"]),
    ("users", "bad name", {"name": "../zed", "password": b"", "salt": b"", "cost": 4,
                           "created": 1.0, "chats": {"general": 0}}),
    ("files", "traversal id", {"id": "../../victim.txt", "owner": "alice", "name": "v",
                               "size": 1, "type": "text/plain", "sha256": "", "ts": 1.0}),
    ("sessions", "unknown user", {"token_hash": "ab" * 32, "user": "nobody", "created": 1.0}),
    ("chats", "bad link", {"name": "den", "private": True, "owner": "alice", "created": 1.0,
                           "link": "../../x"}),
    ("scheduled", "traversal id", {"id": "../s", "sender": "alice", "send_at": 1.0, "text": "",
                                   "chat": "general", "to": None, "reply_to": None,
                                   "file": None, "client_id": None, "created": 1.0}),
]


@pytest.mark.parametrize(
    ("key", "what", "row"), BAD_STATE_ROWS, ids=[f"{k}: {w}" for k, w, _ in BAD_STATE_ROWS]
)
def test_restore_skips_a_bad_snapshot_record_and_keeps_the_rest(
    clock: FakeClock, caplog: pytest.LogCaptureFixture, key: str, what: str, row: Any
) -> None:
    state, rows = snapshot_rows(clock)
    good = ms.Messenger(ms.Rules(), clock)
    good.restore(state, rows)
    state[key] = [*state[key], row]
    with caplog.at_level(logging.ERROR, logger="messenger"):
        planted = ms.Messenger(ms.Rules(), clock)
        planted.restore(state, rows)
    assert planted.export() == good.export()
    assert "state: skipped a" in caplog.text


@pytest.mark.parametrize(
    "row",
    [("x", None), (1, "general", None, "alice", "short"),
     (10**6, "general", None, "alice", "t", 1.0, None, None),
     (999, "nowhere", None, "alice", "t", 1.0, None, None),
     (999, "general", None, "alice", "t", 1.0, None, fid("no such file")),
     (999, None, "alice", None, "t", 1.0, None, None),
     (999, None, "alice", None, "t", 1.0, None, None, {"type": "knighted"}),
     (999, None, "alice", "bob", "t", 1.0, None, None, {"type": "banned"}),
     (999, None, "alice", None, "t", 1.0, None, None, {"type": "banned", "admin": "yes"}),
     (999, None, "alice", None, "t", 1.0, None, None, {"type": "banned"}, "extra")],
    ids=["wrong types", "too short", "id beyond last_id", "unknown chat", "unknown file",
         "from nobody, no notice", "unknown notice type", "a notice from someone",
         "a notice with an unknown field", "too long"],
)
def test_restore_skips_a_bad_message_row(
    clock: FakeClock, caplog: pytest.LogCaptureFixture, row: tuple[Any, ...]
) -> None:
    state, rows = snapshot_rows(clock)
    state["last_id"] = max(state["last_id"], 999)
    with caplog.at_level(logging.ERROR, logger="messenger"):
        planted = ms.Messenger(ms.Rules(), clock)
        planted.restore(state, [*rows, row])
    assert [tuple(m) for m in planted.messages.values()] == rows
    assert "skipped a Message record" in caplog.text


# Symlinks ###################################################################


@pytest.mark.asyncio
async def test_a_symlink_planted_as_a_stored_file_is_never_served(
    tmp_path: Path, clock: FakeClock, victim: Path
) -> None:
    config = make_config(tmp_path)
    async with ms.MessengerServer(config, clock) as server:
        (alice,) = await login(server, "alice")
        file_id = (await alice.uploaded(b"mine", "a.txt", "text/plain"))["id"]
        stored = server.store.files / file_id
        stored.unlink()
        stored.symlink_to(victim)
        response = await alice.get(f"/files/{file_id}")
        assert "no file" in assert_error(response, 404, "not_found", "no file")["message"]
        assert SECRET not in response.body
    again = opened(config, clock)  # at start: dropped, and the link removed
    again.close()
    assert file_id not in again.messenger.files
    assert not await asyncio.to_thread(os.path.lexists, stored)
    assert await asyncio.to_thread(victim.read_bytes) == SECRET


@pytest.mark.asyncio
@pytest.mark.parametrize("name", ["journal-00000001.log", "snapshot-00000001.bin"])
async def test_a_symlinked_journal_or_snapshot_is_not_read(
    tmp_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture, name: str
) -> None:
    outside = tmp_path / "outside.log"
    write_journal(outside, [user_event("mallory")])
    planted = tmp_path / "outside-copy"
    planted.write_bytes(outside.read_bytes())
    config = make_config(tmp_path)
    config.state_dir.mkdir()
    (config.state_dir / name).symlink_to(planted)
    with caplog.at_level(logging.ERROR, logger="messenger"):
        server = opened(config, clock)
    server.close()
    assert "mallory" not in server.messenger.users
    assert planted.read_bytes() == outside.read_bytes()
    assert caplog.records, "the symlink was skipped without a word"


def test_a_symlinked_files_folder_is_moved_aside_not_followed(
    tmp_path: Path, clock: FakeClock, victim: Path
) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / fid("x")).write_bytes(SECRET)
    config = make_config(tmp_path)
    config.state_dir.mkdir()
    (config.state_dir / "files").symlink_to(outside)
    server = opened(config, clock)
    server.close()
    assert (config.state_dir / "files").is_dir() and not (config.state_dir / "files").is_symlink()
    assert [p.name for p in config.state_dir.glob("files.symlink-*")] != []
    assert (outside / fid("x")).read_bytes() == SECRET


def test_file_paths_are_only_made_from_server_ids(tmp_path: Path) -> None:
    store = ms.StateStore(tmp_path)
    assert store.file_path(fid("a")) == tmp_path / "files" / fid("a")
    for bad in ("../../victim.txt", "/etc/passwd", fid("a")[:-1], fid("a").upper()):
        with pytest.raises(ValueError, match="not a file id"):
            store.file_path(bad)


# The log ####################################################################


@pytest.mark.asyncio
async def test_a_client_cannot_forge_a_log_line(spawn: Spawn) -> None:
    server = await spawn("--log-level", "INFO")
    token = await connect(server.port, "alice")
    forged = quote("x\n2030-01-01 00:00:00,000 WARNING messenger: forged", safe="")
    response = await call(server.port, "GET", f"/files/{forged}", token=token)
    assert_error(response, 404, "not_found", "no file 'x\\n2030-01-01")  # quoted, escaped
    response = await call(server.port, "GET", "/status", token=token)  # a line after it
    await server.stop(signal.SIGTERM)
    assert not [line for line in server.log if line.startswith("2030-01-01")]
    quoted = [line for line in server.log if "forged" in line]
    assert len(quoted) == 1 and "\\n2030" in quoted[0], quoted


async def logged_changes(
    caplog: pytest.LogCaptureFixture, port: int, method: str, path: str, body: Any,
    token: str | None,
) -> tuple[int, list[str]]:
    """One request's status and the INFO lines it logged (errors would be WARNING+)."""
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="messenger"):
        response = await call(port, method, path, body, token=token)
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    return response.status, lines


@pytest.mark.asyncio
async def test_every_route_that_changes_state_logs_one_quoted_info_line(
    tmp_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    async with ms.MessengerServer(make_config(tmp_path), clock) as server:
        port = server.port
        (alice_user,) = await login(server, "alice", password="alice's password")
        alice = alice_user.token
        bob = await connect(port, "bob")
        sent = await call(port, "POST", "/send", {"text": "a private text"}, token=alice)
        message_id = sent.json()["message"]["id"]
        link_answer = await call(port, "POST", "/chat", {"chat_name": "den", "private": True},
                                 token=alice)
        assert link_answer.status == 201
        link = (await call(port, "POST", "/chat/den/link", token=alice)).json()["link"]
        file_id = (await alice_user.uploaded(b"bytes", "a.txt", "text/plain"))["id"]
        later = await call(port, "POST", "/send",
                           {"text": "later", "send_at": clock.now + 60}, token=alice)
        scheduled_id = later.json()["scheduled"]["id"]
        carol = await connect(port, "carol")
        steps: list[tuple[str, str, Any, str | None, str, list[str]]] = [
            ("POST", "/connect", {"user": "dave", "password": "p4ss"}, None, "user",
             ["new_user='dave'"]),
            ("POST", "/connect", {"user": "alice", "password": "alice's password"}, None,
             "session", ["name='alice'"]),
            ("POST", "/send", {"text": "secret words", "chat": "general"}, bob, "message",
             ["sender='bob'", "chat='general'"]),
            ("POST", "/send", {"text": "later", "send_at": clock.now + 90}, bob, "schedule",
             ["sender='bob'"]),
            ("DELETE", f"/scheduled/{scheduled_id}", None, alice, "cancel",
             [f"scheduled_id={scheduled_id!r}", "name='alice'"]),
            ("GET", f"/messages?since={message_id}", None, bob, "read",
             ["name='bob'", f"position={message_id}"]),
            ("POST", "/chat", {"chat_name": "club"}, bob, "join",
             ["chat_name='club'", "name='bob'"]),
            ("POST", "/chat/club/leave", None, bob, "leave", ["chat='club'", "name='bob'"]),
            ("POST", "/chat/den/invite", {"user": "bob"}, alice, "invite",
             ["chat='den'", "name='bob'"]),
            ("POST", link, None, carol, "request", ["chat='den'", "name='carol'"]),
            ("POST", "/chat/den/requests/carol", {"approve": True}, alice, "decide",
             ["chat='den'", "name='carol'", "approve=True"]),
            ("POST", "/chat/den/link", None, alice, "link", ["chat='den'"]),
            ("POST", "/report", {"user": "alice", "reason": "rude words"}, bob, "report",
             ["reporter='bob'", "target='alice'"]),
            ("POST", "/send", {"text": "", "file": file_id, "to": "bob"}, alice, "message",
             [f"file_id={file_id!r}", "to='bob'"]),
            ("POST", "/disconnect", None, carol, "revoke", ["name='carol'"]),
        ]
        noticed = {"invite": "invited", "request": "request", "decide": "approved"}
        for method, path, body, token, kind, shown in steps:
            status, lines = await logged_changes(caplog, port, method, path, body, token)
            assert status < 300, (method, path, status)
            if kind in noticed:  # then the notice to whom it concerns: its own event and line
                notice = lines.pop()
                assert notice.startswith("notice message_id=") and "text" not in notice
                assert f"kind={noticed[kind]!r}" in notice, notice
            assert len(lines) == 1, (method, path, lines)
            assert lines[0].split()[0] == kind, lines
            for part in shown:
                assert part in lines[0], (part, lines[0])
            for secret in ("secret words", "rude words", "p4ss", "alice's password", alice, bob):
                assert secret not in lines[0]
        file_lines = await logged_changes(
            caplog, port, "POST", "/files?name=b.txt", b"more", alice
        )
        assert file_lines[0] == 201
        assert re.fullmatch(r"file new_file='[0-9a-f]{32}' owner='alice' file_name='b.txt' "
                            r"size=4 media_type='application/octet-stream' sha256='[0-9a-f]+'",
                            file_lines[1][0]), file_lines[1]
