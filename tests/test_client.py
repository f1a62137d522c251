"""The command-line client, run with CliRunner against a real server in a background thread
(and as a real process where a terminal, a signal or its memory matter), directly or through
nginx."""

from __future__ import annotations

import contextlib
import datetime as dt
import http.client
import io
import itertools
import json
import os
import pty
import queue
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from click.testing import CliRunner, Result

import messenger_client as mc
import messenger_server as ms
from tests.proxy import Nginx, needs_nginx, nginx_in_front
from tests.servers import ServerThread, thread_servers

PASSWORD = "correct horse battery"
CLIENT = Path(mc.__file__).resolve()
MiB = 1024 * 1024


class Cli:
    """The client's commands against one server, as a user types them."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.runner = CliRunner()

    def __call__(
        self,
        *args: str,
        user: str | None = None,
        json_output: bool = False,
        input: str | None = None,
        code: int = 0,
    ) -> Result:
        options = ["--server", self.url]
        if user is not None:
            options += ["--user", user]
        if json_output:
            options.append("--json")
        result = self.runner.invoke(mc.cli, [*options, *args], input=input, catch_exceptions=False)
        assert result.exit_code == code, result.output
        return result

    def json(self, *args: str, user: str | None = None) -> Any:
        return json.loads(self(*args, user=user, json_output=True).stdout)

    def login(self, user: str) -> str:
        """Connect ``user`` (registering it the first time); its token."""
        token: str = self.json("connect", user, "--password", PASSWORD)["token"]
        return token


def error_line(result: Result) -> str:
    """The one line a failed command shows, checked to be exactly one line, no traceback."""
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    return lines[0]


@pytest.fixture(autouse=True)
def config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Saved logins go to a temporary folder; the user's environment is ignored."""
    folder = tmp_path / "config"
    monkeypatch.setenv("MESSENGER_CONFIG_DIR", str(folder))
    for name in ("MESSENGER_SERVER", "MESSENGER_USER", "MESSENGER_PASSWORD", "MESSENGER_JSON"):
        monkeypatch.delenv(name, raising=False)
    return folder


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., ServerThread]]:
    """Start servers with test settings (cheap passwords, quick shutdown) plus ``overrides``."""
    with thread_servers(tmp_path, password_cost=10) as start:
        yield start


@pytest.fixture
def live_server(serve: Callable[..., ServerThread]) -> ServerThread:
    return serve()


@pytest.fixture
def cli(live_server: ServerThread) -> Cli:
    return Cli(live_server.url)


@pytest.fixture
def down_url() -> str:
    """The address of a port nobody listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# connect, disconnect, saved logins ###########################################


def test_connect_registers_then_logs_in(cli: Cli) -> None:
    first = cli("connect", "alice", "--password", PASSWORD)
    assert f"Connected to {cli.url} as alice (new account)." in first.stdout
    assert "Active chat: general" in first.stdout
    again = cli("connect", "alice", "--password", PASSWORD)
    assert f"Connected to {cli.url} as alice." in again.stdout


def test_connect_saves_token_in_a_private_file(cli: Cli, config_dir: Path) -> None:
    token = cli.login("alice")
    saved = config_dir / "config.json"
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    assert token in saved.read_text()
    assert list(config_dir.iterdir()) == [saved]  # no temporary file left behind


def test_connect_a_new_account_prints_the_last_messages_of_general(cli: Cli) -> None:
    for sender in ("bob", "carol"):  # 20 messages each: the most general takes
        cli.login(sender)
        for number in range(20):
            cli("send", f"{sender} {number}", user=sender)
    lines = cli("connect", "alice", "--password", PASSWORD).stdout.splitlines()
    assert lines[:2] == [f"Connected to {cli.url} as alice (new account).", "Active chat: general"]
    assert [line.rpartition(": ")[2] for line in lines[2:-1]] == [
        f"carol {number}" for number in range(20)
    ]
    assert lines[-1] == "No unread messages."  # that history is not unread


def test_connect_an_existing_account_prints_unread_counts_not_history(cli: Cli) -> None:
    bob_posts_in_general_and_books(cli)
    cli("send", "--to", "alice", "psst", user="bob")
    cli("send", "--to", "alice", "again", user="bob")
    lines = cli("connect", "alice", "--password", PASSWORD).stdout.splitlines()
    assert lines == [
        f"Connected to {cli.url} as alice.",
        "Active chat: books",
        "Unread: books 1, general 1, @bob 2",
        "Read them with: read (books and private ones), read --chat NAME, or read --all",
    ]


def test_connect_asks_for_the_password_without_echo(cli: Cli) -> None:
    result = cli("connect", "alice", input=PASSWORD + "\n")
    assert "Password:" in result.output
    assert PASSWORD not in result.output
    assert "as alice (new account)" in result.stdout


def test_connect_takes_the_password_from_the_environment(
    cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    cli.login("alice")
    monkeypatch.setenv("MESSENGER_PASSWORD", PASSWORD)
    assert "as alice." in cli("connect", "alice").stdout


def test_connect_with_a_wrong_password_fails(cli: Cli) -> None:
    cli.login("alice")
    line = error_line(cli("connect", "alice", "--password", "wrong", code=1))
    assert line == "Error: wrong password"
    assert cli.json("status")["user"] == "alice"  # the saved login still works


@pytest.mark.parametrize(
    "args",
    [
        ["connect", "alice", "--password", PASSWORD],
        ["chats"],
        ["send", "hello"],
        ["download", "abc"],
    ],
)
def test_server_down_is_one_clear_line(args: list[str], down_url: str, config_dir: Path) -> None:
    mc.Config(config_dir / "config.json").remember(down_url, "alice", "some-token")
    result = CliRunner().invoke(mc.cli, ["--server", down_url, *args], catch_exceptions=False)
    assert error_line(result) == f"Error: cannot reach {down_url}: connection refused"


def test_not_logged_in_says_how_to_log_in(cli: Cli) -> None:
    line = error_line(cli("chats", code=1))
    assert line == f"Error: not logged in to {cli.url}; log in with: connect USER"


def test_user_option_picks_a_saved_login(cli: Cli) -> None:
    cli.login("alice")
    cli.login("bob")
    assert cli.json("status")["user"] == "bob"  # the last one connected
    assert cli.json("status", user="alice")["user"] == "alice"
    line = error_line(cli("status", user="carol", code=1))
    assert line == f"Error: no saved login for carol on {cli.url}; run: connect carol"


def test_revoked_token_suggests_connecting_again(cli: Cli) -> None:
    token = cli.login("alice")
    mc.MessengerClient(cli.url, token).disconnect()
    assert error_line(cli("chats", code=1)) == (
        "Error: unknown or revoked token: connect again (log in again with: connect USER)"
    )


def test_connect_again_revokes_the_previous_session(cli: Cli, tmp_path: Path) -> None:
    first = cli.login("alice")
    bob = cli.login("bob")
    cli.login("alice")
    with pytest.raises(mc.ApiError, match="unknown or revoked token") as raised:
        mc.MessengerClient(cli.url, first).status()
    assert raised.value.status == 401
    assert cli.json("status", user="alice")["sessions"] == 1
    assert mc.MessengerClient(cli.url, bob).status()["user"] == "bob"  # others keep theirs
    # A login saved in another config (another device) is not this config's to revoke.
    cli("--config-dir", str(tmp_path / "laptop"), "connect", "alice", "--password", PASSWORD)
    assert cli.json("status", user="alice")["sessions"] == 2


def test_connect_again_after_the_session_was_revoked_elsewhere(cli: Cli) -> None:
    first = cli.login("alice")
    mc.MessengerClient(cli.url, first).disconnect()
    assert "as alice." in cli("connect", "alice", "--password", PASSWORD).stdout
    assert cli.json("status")["sessions"] == 1


def test_disconnect_revokes_and_forgets_the_token(cli: Cli, config_dir: Path) -> None:
    token = cli.login("alice")
    assert cli("disconnect").stdout == f"Disconnected alice from {cli.url}.\n"
    assert token not in (config_dir / "config.json").read_text()
    line = error_line(cli("chats", code=1))
    assert line == f"Error: not logged in to {cli.url}; log in with: connect USER"
    with pytest.raises(mc.ApiError, match="unknown or revoked token") as raised:
        mc.MessengerClient(cli.url, token).chats()
    assert raised.value.status == 401


# chats ######################################################################


def test_chats_lists_public_chats_and_own_private_ones(cli: Cli) -> None:
    cli.login("alice")
    cli("join", "books", user="alice")
    cli("join", "secret", "--private", user="alice")
    cli.login("bob")
    lines = sorted(cli("chats", user="bob").stdout.splitlines())
    assert [line.split() for line in lines] == [
        ["books", "public", "1", "member", "owner", "alice"],
        ["general", "public", "2", "members"],
    ]
    names = [chat["name"] for chat in cli.json("chats", user="alice")["chats"]]
    assert sorted(names) == ["books", "general", "secret"]


def test_chats_lists_every_page(serve: Callable[..., ServerThread]) -> None:
    """The server answers 100 chats a page; the client follows ``next`` to the end."""
    cli = Cli(serve(rules=ms.Rules(max_owned_chats=150, max_memberships=150)).url)
    token = cli.login("alice")
    client = mc.MessengerClient(cli.url, token)
    names = [f"room{number:03}" for number in range(120)]
    for name in names:
        client.join(name)
    assert client.chats()["next"] is not None, "more than one page"
    listed = [line.split()[0] for line in cli("chats", user="alice").stdout.splitlines()]
    assert listed == sorted(["general", *names])
    as_json = cli.json("chats", user="alice")
    assert [chat["name"] for chat in as_json["chats"]] == listed and as_json["next"] is None


def test_join_creates_a_chat_then_joins_it(cli: Cli) -> None:
    cli.login("alice")
    cli.login("bob")
    created = cli("join", "books", user="alice")
    assert created.stdout.startswith("Created public chat books; it is now your active chat.")
    cli("send", "a good read", user="alice")  # to the active chat: books
    joined = cli("join", "books", user="bob").stdout.splitlines()
    assert joined[0] == "Joined public chat books; it is now your active chat."
    assert joined[1].endswith(" books alice: a good read")


def test_join_a_private_chat_without_invitation_fails(cli: Cli) -> None:
    cli.login("alice")
    cli.login("bob")
    cli("join", "secret", "--private", user="alice")
    line = error_line(cli("join", "secret", user="bob", code=1))
    assert line == "Error: secret is private: ask its owner for an invitation"


def test_leave_a_chat(cli: Cli) -> None:
    cli.login("alice")
    cli("join", "books")
    assert cli("leave", "books").stdout == "Left books.\n"
    assert error_line(cli("leave", "books", code=1)) == "Error: you are not a member of books"
    line = error_line(cli("leave", "general", code=1))
    assert line == "Error: nobody leaves general: every user stays a member"


def test_invite_lets_a_user_join_a_private_chat(cli: Cli) -> None:
    cli.login("alice")
    cli.login("bob")
    cli("join", "secret", "--private", user="alice")
    invited = cli("invite", "secret", "bob", user="alice").stdout
    assert invited == "Invited bob to secret; they can now run: join secret\n"
    assert cli("join", "secret", user="bob").stdout.startswith("Joined private chat secret")
    line = error_line(cli("invite", "secret", "alice", user="bob", code=1))
    assert line == "Error: only the owner of secret may do that"


@pytest.mark.parametrize("form", ["url", "path", "token"])
def test_join_link_request_then_approve(cli: Cli, form: str) -> None:
    cli.login("alice")
    cli.login("bob")
    cli("join", "secret", "--private", user="alice")
    url = cli("link", "secret", user="alice").stdout.strip()
    assert url.startswith(f"{cli.url}/join/")
    link = {"url": url, "path": url.removeprefix(cli.url), "token": url.rpartition("/")[2]}[form]
    asked = cli("request", link, user="bob").stdout
    assert asked == "Asked to join secret; its owner must approve.\n"
    assert cli("requests", "secret", user="alice").stdout.startswith("bob (asked ")
    approved = cli("approve", "secret", "bob", user="alice").stdout
    assert approved == "Approved: bob is now a member of secret.\n"
    assert cli("requests", "secret", user="alice").stdout == "No pending requests for secret.\n"
    cli("history", "secret", user="bob")  # a member now
    assert cli("request", link, user="bob").stdout == "You are already a member of that chat.\n"


def test_deny_keeps_a_user_out(cli: Cli) -> None:
    cli.login("alice")
    cli.login("bob")
    cli("join", "secret", "--private", user="alice")
    link = cli("link", "secret", user="alice").stdout.strip()
    cli("request", link, user="bob")
    denied = cli("deny", "secret", "bob", user="alice").stdout
    assert denied == "Denied bob's request to join secret.\n"
    line = error_line(cli("join", "secret", user="bob", code=1))
    assert line == "Error: secret is private: ask its owner for an invitation"


def test_request_with_an_unknown_link_fails(cli: Cli) -> None:
    cli.login("bob")
    line = error_line(cli("request", f"{cli.url}/join/nosuchtoken", code=1))
    assert line == "Error: unknown or revoked join link"


# send, read, history, show ###################################################


def test_send_then_read_marks_read(cli: Cli) -> None:
    cli.login("alice")
    cli.login("bob")
    sent = cli("send", "hello alice", user="bob").stdout
    assert sent.startswith("#") and sent.endswith(" general bob: hello alice\n")
    read = cli("read", user="alice").stdout.splitlines()
    assert len(read) == 1 and read[0].endswith(" general bob: hello alice")
    assert cli("read", user="alice").stdout == "No unread messages.\n"


def bob_posts_in_general_and_books(cli: Cli) -> None:
    """alice and bob join "books"; bob posts "in general" to general, then "in books" to books."""
    cli.login("alice")
    cli("join", "books", user="alice")
    cli.login("bob")
    cli("join", "books", user="bob")
    cli("send", "--chat", "general", "in general", user="bob")
    cli("send", "--chat", "books", "in books", user="bob")


def test_read_chat_shows_only_that_chat(cli: Cli) -> None:
    bob_posts_in_general_and_books(cli)
    shown = cli("read", "--chat", "books", user="alice").stdout
    assert "in books" in shown and "in general" not in shown


def test_read_chat_marks_that_conversation_only(cli: Cli) -> None:
    """Each conversation has its read position: reading one must not hide the others."""
    bob_posts_in_general_and_books(cli)
    cli("send", "--to", "alice", "psst", user="bob")
    cli("read", "--chat", "books", user="alice")
    assert cli("read", "--chat", "books", user="alice").stdout.splitlines() == [
        "No unread messages.",
        "Unread elsewhere: general 1, @bob 1 (read --chat NAME, or read --all)",
    ]
    shown = cli("read", "--chat", "@bob", user="alice").stdout.splitlines()
    assert shown[0].endswith(" @bob bob: psst")
    assert shown[1] == "Unread elsewhere: general 1 (read --chat NAME, or read --all)"
    general = cli("read", "--chat", "general", user="alice").stdout
    assert general.endswith(" general bob: in general\n")


def test_read_shows_the_active_chat_and_private_ones_then_one_line_for_the_rest(
    cli: Cli,
) -> None:
    bob_posts_in_general_and_books(cli)  # alice's active chat is books
    cli("send", "--to", "alice", "psst", user="bob")
    lines = cli("read", user="alice").stdout.splitlines()
    assert [line.split(" ", 2)[2] for line in lines[:2]] == [
        "books bob: in books", "@bob bob: psst"
    ]
    assert lines[2:] == ["Unread elsewhere: general 1 (read --chat NAME, or read --all)"]
    assert cli("read", user="alice").stdout.splitlines()[1:] == [
        "Unread elsewhere: general 1 (read --chat NAME, or read --all)"
    ]
    assert cli("read", "--all", user="alice").stdout.endswith(" general bob: in general\n")
    assert cli("read", "--all", user="alice").stdout == "No unread messages.\n"
    both = cli("read", "--all", "--chat", "books", user="alice", code=2).output
    assert "give --chat or --all, not both" in both


def test_read_never_shows_ones_own_messages(cli: Cli) -> None:
    cli.login("alice")
    cli.login("bob")
    cli("send", "hello", user="bob")
    cli("send", "mine", user="alice")  # moves alice's position in general past bob's too
    cli("send", "--to", "bob", "to bob", user="alice")
    assert cli("read", "--all", user="alice").stdout == "No unread messages.\n"


def test_read_prints_notices_with_the_command_that_acts_on_them(cli: Cli) -> None:
    cli.login("alice")
    cli.login("bob")
    cli("join", "--private", "plans", user="alice")
    cli("invite", "plans", "bob", user="alice")
    invited = cli("read", user="bob").stdout
    assert re.fullmatch(r"#\d+ \d\d:\d\d notice: alice invited you to plans: join plans\n", invited)
    cli("join", "plans", user="bob")
    cli("leave", "plans", user="bob")
    cli("request", cli("link", "plans", user="alice").stdout.strip(), user="bob")
    asks = cli("read", user="alice").stdout
    assert asks.endswith(" notice: bob asks to join plans: approve plans bob\n")
    cli("deny", "plans", "bob", user="alice")
    denied = cli("read", "--chat", "@", user="bob").stdout
    assert denied.endswith(" notice: alice turned down your request to join plans\n")


def test_join_prints_the_recent_history_once(cli: Cli) -> None:
    bob_posts_in_general_and_books(cli)
    cli("join", "general", user="alice")
    lines = cli("join", "books", user="alice").stdout.splitlines()
    assert lines[0] == "Joined public chat books; it is now your active chat."
    assert lines[1].endswith(" books bob: in books")
    assert cli("read", user="alice").stdout.splitlines()[0] == "No unread messages."


def test_send_private_comment_and_show(cli: Cli) -> None:
    cli.login("alice")
    cli.login("bob")
    sent = cli.json("send", "--to", "bob", "psst", user="alice")["message"]
    assert cli("read", user="bob").stdout.endswith(" @alice alice: psst\n")
    comment = cli("send", "--reply-to", str(sent["id"]), "got it", user="bob").stdout
    assert comment.endswith(f" @alice bob (on #{sent['id']}): got it\n")
    thread = cli("show", str(sent["id"]), user="alice").stdout.splitlines()
    assert thread[0].startswith(f"#{sent['id']} ") and thread[0].endswith(" @bob alice: psst")
    assert thread[1].startswith("    #") and thread[1].endswith(
        f" @bob bob (on #{sent['id']}): got it"
    )


def test_send_shows_text_from_others_without_terminal_escapes(cli: Cli) -> None:
    cli.login("alice")
    cli.login("bob")
    cli("send", "\x1b[2Jgone\nsecond line", user="bob")
    shown = cli("read", user="alice").stdout
    assert "\x1b" not in shown
    assert shown.endswith(" general bob: \\x1b[2Jgone\n    second line\n")


def test_send_shows_bidi_overrides_from_others_as_codes(cli: Cli) -> None:
    cli.login("alice")
    cli.login("bob")
    cli("send", "pay \u202egnp.exe", user="bob")
    shown = cli("read", user="alice").stdout
    assert "\u202e" not in shown and shown.endswith(" general bob: pay \\u202egnp.exe\n")


@pytest.mark.parametrize(
    ("server", "complaint"),
    [
        ("http://h:abc", "not a server address: http://h:abc (Port could not be cast to integer"
         " value as 'abc')"),
        ("http://h:99999", "not a server address: http://h:99999 (Port out of range 0-65535)"),
        ("http://h:0", "not a server address: http://h:0 (port 0)"),
        ("http://[::1", "not a server address: http://[::1 (Invalid IPv6 URL)"),
        ("ftp://h", "not an http:// server address: ftp://h"),
        ("http://", "not a server address: http:// (no host)"),
        ("http://ex ample", "not a server address: http://ex ample ('ex ample' is not a host"
         " name)"),
        ("http://me@h", "not a server address: http://me@h (a user, query or fragment in it)"),
        ("http://h/?x=1", "not a server address: http://h/?x=1 (a user, query or fragment in it)"),
    ],
)
def test_a_malformed_server_address_is_one_clear_line(server: str, complaint: str) -> None:
    result = CliRunner().invoke(mc.cli, ["--server", server, "status"])
    assert error_line(result) == f"Error: {complaint}"


@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        ("127.0.0.1:8000", "http://127.0.0.1:8000"),
        ("HTTP://LocalHost:80/", "http://localhost"),
        ("https://Chat.Example.ORG:443/messenger/", "https://chat.example.org/messenger"),
        ("https://chat.example.org:8443", "https://chat.example.org:8443"),
        ("http://[0:0::1]:8000/", "http://[::1]:8000"),
        ("http://bücher.example", "http://xn--bcher-kva.example"),
    ],
)
def test_server_addresses_are_normalised(given: str, canonical: str) -> None:
    assert mc.server_url(given) == canonical


def test_one_server_spelled_two_ways_is_one_saved_login(cli: Cli, config_dir: Path) -> None:
    port = urlsplit(cli.url).port
    Cli(f"127.0.0.1:{port}").login("alice")
    assert Cli(f"HTTP://127.0.0.1:{port}/").json("status")["user"] == "alice"
    saved = json.loads((config_dir / mc.CONFIG_FILE).read_text())
    assert list(saved["servers"]) == [cli.url]


def test_a_login_saved_under_another_spelling_still_works(cli: Cli, config_dir: Path) -> None:
    """Config files written before addresses were normalised."""
    token = cli.login("alice")
    spelled = cli.url.replace("http://", "HTTP://") + "/"
    servers = {spelled: {"tokens": {"alice": token}, "last_user": "alice"}}
    (config_dir / mc.CONFIG_FILE).write_text(json.dumps({"servers": servers}))
    assert cli.json("status")["user"] == "alice"


@pytest.mark.parametrize(
    ("target", "complaint"),
    [
        (["--chat", "nowhere"], "no chat named 'nowhere'"),
        (["--to", "nobody"], "no user named 'nobody'"),
        (["--reply-to", "99999"], "no message 99999 that you can see"),
    ],
)
def test_send_to_an_unknown_target_fails(cli: Cli, target: list[str], complaint: str) -> None:
    cli.login("alice")
    assert error_line(cli("send", *target, "hello", code=1)) == f"Error: {complaint}"


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["send", "--in", "soon", "hi"], "Invalid value for '--in'"),
        (["send", "--in", "10x", "hi"], "Invalid value for '--in'"),
        (["send", "--at", "25:00", "hi"], "Invalid value for '--at'"),
        (["send", "--at", "tomorrow", "hi"], "Invalid value for '--at'"),
        (["send", "--at", "18:30", "--in", "1h", "hi"], "give --at or --in, not both"),
        (["send", "--to", "bob", "--chat", "general", "hi"], "give --to or --chat, not both"),
        (["send"], "give a TEXT, a --file, or both"),
        (["request", "/join/"], "is not a join link"),
    ],
)
def test_bad_arguments_are_usage_errors(args: list[str], complaint: str) -> None:
    result = CliRunner().invoke(mc.cli, args, catch_exceptions=False)
    assert result.exit_code == 2
    assert complaint in result.stderr


def test_send_retries_a_dropped_answer_without_doubling(
    cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    cli.login("alice")
    original = http.client.HTTPConnection.getresponse
    dropped: list[bool] = []

    def drop_first_answer(connection: http.client.HTTPConnection) -> http.client.HTTPResponse:
        response = original(connection)
        if not dropped:  # the server has stored the message; its answer is lost
            dropped.append(True)
            raise http.client.RemoteDisconnected("Remote end closed connection without response")
        return response

    monkeypatch.setattr(http.client.HTTPConnection, "getresponse", drop_first_answer)
    sent = cli("send", "only once").stdout
    assert dropped and sent.endswith(" general alice: only once\n")
    texts = [m["text"] for m in cli.json("history", "general", user="alice")["messages"]]
    assert texts.count("only once") == 1


def test_send_over_the_rate_limit_says_when_to_try_again(
    serve: Callable[..., ServerThread],
) -> None:
    cli = Cli(serve(rules=ms.Rules(rate_limit=1)).url)
    cli.login("alice")
    cli("send", "one")
    line = error_line(cli("send", "two", code=1))
    assert re.fullmatch(
        r"Error: at most 1 message per window in general \(try again in \d+ s\)", line
    ), line


def test_send_later_list_and_cancel(cli: Cli) -> None:
    cli.login("alice")
    before = time.time()
    scheduled = cli("send", "--in", "10m", "later").stdout
    assert (
        scheduled.startswith("Scheduled ") and " to general; cancel it with: cancel " in scheduled
    )
    [item] = cli.json("scheduled")["scheduled"]
    assert before + 600 <= item["send_at"] <= time.time() + 600
    assert (
        cli("scheduled").stdout
        == f"{item['id']} {mc.format_time(item['send_at'])} general: later\n"
    )
    assert cli("cancel", item["id"]).stdout == f"Cancelled {item['id']}.\n"
    assert cli("scheduled").stdout == "No scheduled messages.\n"
    line = error_line(cli("cancel", item["id"], code=1))
    assert line == f"Error: no pending scheduled message {item['id']!r} of yours"


def test_send_at_a_clock_time_or_an_iso_datetime(cli: Cli) -> None:
    cli.login("alice")
    soon = dt.datetime.now() + dt.timedelta(hours=2)
    cli("send", "--at", soon.strftime("%H:%M"), "at a clock time")
    cli("send", "--at", soon.isoformat(timespec="seconds"), "at a datetime")
    times = {s["text"]: s["send_at"] for s in cli.json("scheduled")["scheduled"]}
    assert time.time() < times["at a clock time"] <= time.time() + 24 * 3600
    assert times["at a datetime"] == soon.replace(microsecond=0).timestamp()


def test_history_shows_messages_from_before_joining(cli: Cli) -> None:
    cli.login("alice")
    cli("send", "old news", user="alice")
    cli.login("bob")
    assert cli("history", "general", user="bob").stdout.endswith(" general alice: old news\n")
    cli("join", "books", user="bob")
    assert cli("history", "books", user="bob").stdout == "No messages in books.\n"
    line = error_line(cli("history", "nowhere", user="bob", code=1))
    assert line == "Error: no chat named 'nowhere'"


def test_show_an_unknown_message_fails(cli: Cli) -> None:
    cli.login("alice")
    assert error_line(cli("show", "99999", code=1)) == "Error: no message 99999 that you can see"


# files ######################################################################


def test_send_a_file_then_download_it(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cli.login("alice")
    cli.login("bob")
    notes = tmp_path / "notes.txt"
    notes.write_bytes(b"line one\nline two\n")
    sent = cli.json("send", "--to", "bob", "--file", str(notes), user="alice")["message"]
    file = sent["file"]
    assert (sent["text"], file["name"], file["size"]) == ("", "notes.txt", 18)
    assert file["type"] == "text/plain"
    assert cli("read", user="bob").stdout.endswith(
        f" @alice alice: [file {file['id']}: notes.txt, 18 B]\n"
    )
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    monkeypatch.chdir(downloads)
    saved = cli("download", file["id"], user="bob").stdout
    assert saved == "Saved notes.txt (18 B, text/plain).\n"
    assert (downloads / "notes.txt").read_bytes() == notes.read_bytes()
    line = error_line(cli("download", file["id"], user="bob", code=1))
    assert line == "Error: notes.txt exists; add --force to overwrite it"
    (downloads / "notes.txt").write_bytes(b"changed")
    cli("download", file["id"], "--force", user="bob")
    assert (downloads / "notes.txt").read_bytes() == notes.read_bytes()
    cli("download", file["id"], "-o", "copy.txt", user="bob")
    assert (downloads / "copy.txt").read_bytes() == notes.read_bytes()


def test_send_a_file_over_the_limit_shows_the_server_message(
    serve: Callable[..., ServerThread], tmp_path: Path
) -> None:
    cli = Cli(serve(max_file_size=1024).url)
    cli.login("alice")
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(4 * 1024 * 1024))  # refused before it is all sent
    line = error_line(cli("send", "--file", str(big), code=1))
    assert line == "Error: files are limited to 1024 bytes"


def test_download_keeps_only_the_base_name(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = cli.login("alice")
    data = b"echo hi\n"
    client = mc.MessengerClient(cli.url, token)
    uploaded = client.upload("../../evil.sh", io.BytesIO(data), len(data))
    monkeypatch.chdir(tmp_path)
    cli("download", uploaded["file"]["id"])
    assert (tmp_path / "evil.sh").read_bytes() == b"echo hi\n"


@pytest.mark.parametrize(
    ("filename", "saved"),
    [
        ("report.pdf", "report.pdf"),
        ("../../evil.sh", "evil.sh"),
        ("C:\\Users\\evil.bat", "evil.bat"),
        (".bashrc", "bashrc"),
        ("..", "file-f1"),
        ("  ", "file-f1"),
        (None, "file-f1"),
        (" . spaced out . ", "spaced out ."),
        ("pay\u202egnp.exe", "pay_gnp.exe"),
        ("line\nbreak\x00.txt", "line_break_.txt"),
        ("caf\u00e9 \U0001f600.txt", "caf\u00e9 \U0001f600.txt"),
    ],
)
def test_a_download_is_saved_under_a_plain_visible_name(filename: str | None, saved: str) -> None:
    """Found by review: the uploader's name was saved as it came, control characters and
    text reversing marks included, and a leading dot made a hidden file."""
    assert mc.saved_name(filename, "f1") == saved


def test_download_an_unknown_file_fails(cli: Cli) -> None:
    cli.login("alice")
    line = error_line(cli("download", "nosuchfile", code=1))
    assert line == "Error: no file 'nosuchfile' that you can use"


# status, report ##############################################################


def test_status_shows_user_unread_and_server(cli: Cli) -> None:
    cli.login("alice")
    cli.login("bob")
    cli("send", "--to", "alice", "hi", user="bob")
    lines = cli("status", user="alice").stdout.splitlines()
    assert lines[0] == f"alice on {cli.url}, 1 session, active chat general"
    assert lines[1] == "Unread: 1 (@bob 1)"
    assert lines[2] == "Chats: general"
    assert lines[-1].startswith("Server 1.0.0, up ")


def test_report_counts_and_bans(serve: Callable[..., ServerThread]) -> None:
    # Every user here comes from 127.0.0.1, and a ban counts reporters once per address.
    cli = Cli(serve(rules=ms.Rules(ban_threshold=2)).url)
    for name in ("alice", "bob", "dave"):
        cli.login(name)
    cli("send", "buy cheap watches", user="dave")  # reports need a message to point at
    assert cli("report", "dave", "--reason", "spam", user="alice").stdout == (
        "Reported dave (1 report).\n"
    )
    assert cli("report", "dave", user="bob").stdout == "Reported dave (2 reports).\n"
    cli = Cli(serve(rules=ms.Rules(ban_threshold=1)).url)
    for name in ("alice", "dave"):
        cli.login(name)
    cli("send", "buy cheap watches", user="dave")
    banned = cli("report", "dave", user="alice").stdout.splitlines()
    assert banned[0] == "Reported dave (1 report)."
    assert banned[1].startswith("dave is banned until ")
    line = error_line(cli("send", "hello", user="dave", code=1))
    assert re.fullmatch(
        r"Error: you are banned from sending after reports from other users \(until \d\d:\d\d\)",
        line,
    ), line
    line = error_line(cli("report", "alice", user="alice", code=1))
    assert line == "Error: you cannot report yourself"
    line = error_line(cli("report", "nobody", user="alice", code=1))
    assert line == "Error: no user named 'nobody'"


# JSON output ##################################################################


def test_json_prints_the_server_answer(cli: Cli) -> None:
    cli.login("alice")
    answer = cli.json("chats")
    assert [chat["name"] for chat in answer["chats"]] == ["general"]
    sent = cli.json("send", "hi")["message"]
    assert (sent["chat"], sent["from"], sent["text"]) == ("general", "alice", "hi")
    assert cli("disconnect", json_output=True).stdout == ""  # 204: nothing to say


# read --follow ################################################################


class Follower:
    """``read --follow`` in a thread, watched: Ctrl-C comes after the first messages."""

    def __init__(self, cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
        self.cli = cli
        self.errors: queue.Queue[mc.ClientError] = queue.Queue()  # how polls failed
        self.options: list[str] = []  # of read --follow
        self.stopping = threading.Event()
        self.following = threading.Event()  # the long polls have begun
        self.results: list[Result] = []
        original = mc.MessengerClient.messages

        def messages(client: mc.MessengerClient, **query: Any) -> mc.MessagesPage:
            if self.stopping.is_set():  # Ctrl-C during the next poll, once it has started
                with contextlib.suppress(mc.ServerUnreachable):
                    original(client, **{**query, "wait": 0})
                raise KeyboardInterrupt
            if query.get("wait"):
                self.following.set()
            try:
                page = original(client, **query)
            except mc.ClientError as exc:
                self.errors.put(exc)
                raise
            if page["messages"]:
                self.stopping.set()
            return page

        monkeypatch.setattr(mc.MessengerClient, "messages", messages)
        monkeypatch.setattr(mc, "FOLLOW_WAIT", 5)  # bounds a failed test's teardown
        monkeypatch.setattr(mc, "RETRY_FIRST", 0.01)
        monkeypatch.setattr(mc, "RETRY_MAX", 0.05)
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.results.append(
            self.cli("read", "--follow", *self.options, user="alice", code=mc.INTERRUPTED)
        )

    def result(self) -> Result:
        self.thread.join(timeout=20)
        assert not self.thread.is_alive()
        [result] = self.results
        return result

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=20)


def wait_until_parked(watcher: mc.MessengerClient, follower: Follower | None = None) -> None:
    """Until the follower's long poll waits in the server: /status then counts 2 users online,
    the watcher (during its own request) and the follower (whose poll is parked). With the
    ``follower`` watched, its first reads (unread ones, /status) are over first: they too
    count it online."""
    deadline = time.monotonic() + 10
    if follower is not None:
        assert follower.following.wait(10), "read --follow never began to long-poll"
    while watcher.status()["server"]["online"] < 2:
        assert time.monotonic() < deadline, "read --follow never started waiting"
        time.sleep(0.01)


@pytest.fixture
def follower(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> Iterator[Follower]:
    following = Follower(cli, monkeypatch)
    yield following
    following.close()


def test_read_follow_prints_a_message_sent_while_waiting(cli: Cli, follower: Follower) -> None:
    cli.login("alice")
    bob = mc.MessengerClient(cli.url, cli.login("bob"))
    follower.thread.start()
    wait_until_parked(bob, follower)
    bob.send("are you there?", to="alice")
    result = follower.result()
    assert result.stderr == "\n"  # Ctrl-C: the shell's prompt on a line of its own
    assert result.stdout.endswith(" @bob bob: are you there?\n")
    assert cli.json("status", user="alice")["unread"]["total"] == 0  # marked read


def test_read_follow_shows_ones_own_messages_from_another_client(
    cli: Cli, follower: Follower
) -> None:
    phone = mc.MessengerClient(cli.url, cli.login("alice"))
    bob = mc.MessengerClient(cli.url, cli.login("bob"))
    follower.thread.start()
    wait_until_parked(bob, follower)
    phone.send("from my phone")
    assert follower.result().stdout.endswith(" general alice: from my phone\n")


def test_read_follow_chat_prints_and_marks_that_chat_only(cli: Cli, follower: Follower) -> None:
    cli.login("alice")
    cli("join", "books", user="alice")
    cli("join", "general", user="alice")
    bob = mc.MessengerClient(cli.url, cli.login("bob"))
    bob.join("books")
    follower.options = ["--chat", "books"]
    follower.thread.start()
    wait_until_parked(bob, follower)
    bob.send("in general", chat="general")
    bob.send("in books", chat="books")
    assert follower.result().stdout.splitlines()[-1].endswith(" books bob: in books")
    assert cli.json("status", user="alice")["unread"]["chats"] == {"general": 1}


def test_read_follow_reconnects_after_a_server_restart(
    cli: Cli, live_server: ServerThread, follower: Follower
) -> None:
    cli.login("alice")
    bob = mc.MessengerClient(cli.url, cli.login("bob"))
    follower.thread.start()
    wait_until_parked(bob, follower)
    live_server.stop()
    follower.errors.get(timeout=10)
    live_server.start_again()
    bob.send("back again", to="alice")
    result = follower.result()
    assert result.stderr.splitlines() == [
        f"cannot reach {cli.url}: connection refused; waiting for it (Ctrl-C to stop)",
        f"Reconnected to {cli.url}.",
        "",
    ]
    assert result.stdout.endswith(" @bob bob: back again\n")


@pytest.mark.parametrize("options", [[], ["--chat", "@"]], ids=["status first", "unread first"])
def test_read_follow_waits_for_a_server_down_from_the_start(
    cli: Cli, live_server: ServerThread, follower: Follower, monkeypatch: pytest.MonkeyPatch,
    options: list[str],
) -> None:
    """Found by review: the first reads (the active chat from /status, the unread ones) of
    ``read --follow`` failed at once while the server was down; they wait like the rest."""
    cli.login("alice")
    mc.MessengerClient(cli.url, cli.login("bob")).send("while you were away", to="alice")
    live_server.stop()
    retrying = threading.Event()
    sleep = time.sleep

    def retry_sleep(seconds: float) -> None:
        retrying.set()
        sleep(seconds)

    monkeypatch.setattr(time, "sleep", retry_sleep)  # the client's waits between attempts
    follower.options = options
    follower.thread.start()
    assert retrying.wait(10), "read --follow never retried"
    live_server.start_again()
    result = follower.result()
    assert result.stdout.endswith(" @bob bob: while you were away\n")
    assert result.stderr.splitlines() == [
        f"cannot reach {cli.url}: connection refused; waiting for it (Ctrl-C to stop)",
        f"Reconnected to {cli.url}.",
        "",
    ]


@pytest.mark.parametrize(
    "content",
    ['{"servers": {"http://h": []}}', '{"servers": {"http://h": {"tokens": []}}}',
     '{"servers": {"http://h": {"last_user": 3}}}', "[]", "not json"],
)
def test_a_damaged_config_file_is_one_clear_line(content: str, config_dir: Path) -> None:
    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / mc.CONFIG_FILE).write_text(content)
    result = CliRunner().invoke(mc.cli, ["status"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.startswith("Error: cannot read ")


# -h, Ctrl-C, dates, errors under --json ########################################


@pytest.mark.parametrize("command", ["", *sorted(mc.cli.commands)])
def test_every_command_takes_h_for_help(command: str) -> None:
    result = CliRunner().invoke(mc.cli, [*filter(None, [command]), "-h"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("Usage: ")
    assert "-h, --help" in result.stdout


def client_process(*args: str, stderr: int = subprocess.PIPE) -> subprocess.Popen[str]:
    """``python messenger_client.py ARGS`` as a child process, with the test's config folder."""
    return subprocess.Popen(
        [sys.executable, str(CLIENT), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )


def test_ctrl_c_ends_read_follow_on_a_new_line_with_status_130(
    cli: Cli, live_server: ServerThread
) -> None:
    cli.login("alice")
    process = client_process("--server", cli.url, "--user", "alice", "read", "--follow")
    try:
        # Its long poll parked (counting it online could be its first reads still).
        deadline = time.monotonic() + 10
        while not live_server.server.app.waiters._by_user.get("alice"):
            assert time.monotonic() < deadline, "read --follow never started waiting"
            time.sleep(0.01)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=20)
    finally:
        process.kill()
    assert (process.returncode, stdout, stderr) == (130, "", "\n")


class CtrlC(io.RawIOBase):
    """A terminal where the user presses Ctrl-C."""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        raise KeyboardInterrupt


def test_ctrl_c_at_the_password_prompt_exits_130(cli: Cli) -> None:
    ctrl_c = io.BufferedReader(CtrlC())
    result = CliRunner().invoke(mc.cli, ["--server", cli.url, "connect", "alice"], input=ctrl_c)
    assert (result.exit_code, result.stderr) == (130, "")  # no "Aborted!"
    assert result.stdout.startswith("Password: ") and result.stdout.endswith("\n")


def a_message(moment: dt.datetime) -> mc.Message:
    return {
        "id": 7, "chat": "general", "to": None, "from": "bob", "text": "hi",
        "ts": moment.timestamp(), "reply_to": None, "file": None, "notice": None,
    }


def test_messages_not_from_today_show_their_date() -> None:
    noon = dt.datetime.combine(dt.date.today(), dt.time(12, 30))
    assert mc.format_message(a_message(noon), "alice") == "#7 12:30 general bob: hi"
    for other_day in (noon - dt.timedelta(days=1), noon - dt.timedelta(days=400)):
        shown = mc.format_message(a_message(other_day), "alice")
        assert shown == f"#7 {other_day:%Y-%m-%d} 12:30 general bob: hi"


def json_error(result: Result, code: int = 1) -> Any:
    """The one JSON object a command run with --json shows for an error, stdout left empty."""
    assert result.exit_code == code, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return json.loads(lines[0])


def test_json_errors_are_one_object_on_stderr(cli: Cli, down_url: str) -> None:
    assert json_error(cli("chats", json_output=True, code=1)) == {
        "error": "not_logged_in",
        "message": f"not logged in to {cli.url}; log in with: connect USER",
    }
    cli.login("alice")
    assert json_error(cli("show", "99999", json_output=True, code=1)) == {
        "error": "not_found", "message": "no message 99999 that you can see", "status": 404
    }
    assert json_error(cli("send", json_output=True, code=2), code=2) == {
        "error": "usage", "message": "give a TEXT, a --file, or both"
    }
    assert json_error(Cli(down_url)("connect", "alice", "--password", "x", json_output=True,
                                    code=1)) == {
        "error": "unreachable", "message": f"cannot reach {down_url}: connection refused"
    }
    assert json_error(Cli("ftp://h")("status", json_output=True, code=1)) == {
        "error": "client_error", "message": "not an http:// server address: ftp://h"
    }


def test_json_errors_carry_the_hint_and_retry_after(serve: Callable[..., ServerThread]) -> None:
    cli = Cli(serve(rules=ms.Rules(rate_limit=1)).url)
    cli.login("alice")
    cli("send", "one")
    error = json_error(cli("send", "two", json_output=True, code=1))
    assert (error["error"], error["status"]) == ("rate_limited", 429)
    assert error["message"] == "at most 1 message per window in general"
    assert error["hint"] == f"try again in {error['retry_after']} s"


# Errors that are not the messenger's: a proxy's pages ###########################


PROXY_PAGE = b"<html><body><h1>502 Bad Gateway</h1></body></html>"


@contextlib.contextmanager
def answering(status: int, body: bytes = PROXY_PAGE, length: int | None = None) -> Iterator[str]:
    """A server that answers every request with ``status`` and ``body`` (an HTML page, as a
    proxy's) said to be ``length`` bytes long, then closes; its URL."""
    listener = socket.create_server(("127.0.0.1", 0))
    answer = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: text/html\r\n"
        f"Content-Length: {length or len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body

    def serve() -> None:
        with contextlib.suppress(OSError):  # the listener is shut: the test is over
            while True:
                connection, _ = listener.accept()
                with connection:
                    head = b""
                    while b"\r\n\r\n" not in head and (data := connection.recv(65536)):
                        head += data
                    connection.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.shutdown(socket.SHUT_RDWR)  # wakes the accept
        listener.close()
        thread.join(timeout=10)


@pytest.mark.parametrize(
    ("status", "args", "hint"),
    [
        (413, ["send", "--file", "notes.txt"], "a proxy in front may limit bodies, see README"),
        (502, ["chats"], "a proxy in front got no answer from the server, is it running?"),
        (503, ["chats"], "a proxy in front finds the server unavailable"),
        (504, ["read"], "a proxy in front gave up waiting for the server, see README"),
        (404, ["status"], "not the messenger's answer, check --server or the proxy in front"),
    ],
)
def test_a_proxy_error_page_names_the_status_and_a_hint(
    status: int, args: list[str], hint: str, config_dir: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("notes.txt").write_text("notes")
    with answering(status) as url:
        mc.Config(config_dir / mc.CONFIG_FILE).remember(url, "alice", "a-token")
        line = error_line(Cli(url)(*args, code=1))
    assert line == f"Error: the server answered {status}: {hint}"


# files: in chunks, refused early, with a progress bar, in flat memory ##########


def test_a_refused_upload_sends_no_body(serve: Callable[..., ServerThread]) -> None:
    """The client waits for 100 Continue: the server's refusal comes first."""
    server = serve(max_file_size=1024)
    alice = mc.MessengerClient(server.url, Cli(server.url).login("alice"))
    stranger = mc.MessengerClient(server.url, "not-a-token")
    for client, size, status, message in (
        (alice, 4 * MiB, 413, "files are limited to 1024 bytes"),
        (stranger, 100, 401, "unknown or revoked token: connect again"),
    ):
        sent: list[int] = []
        with pytest.raises(mc.ApiError, match=message) as raised:
            client.upload("big.bin", io.BytesIO(bytes(size)), size, sent.append)
        assert (raised.value.status, sent) == (status, [])


def test_upload_sends_the_file_in_chunks(cli: Cli, tmp_path: Path) -> None:
    client = mc.MessengerClient(cli.url, cli.login("alice"))
    data = os.urandom(MiB + 5)
    sent: list[int] = []
    answer = client.upload("data.bin", io.BytesIO(data), len(data), sent.append)
    assert answer["file"]["size"] == len(data)
    assert sum(sent) == len(data) and max(sent) == mc.CHUNK


def test_download_checks_its_target_before_fetching(
    cli: Cli, live_server: ServerThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cli.login("alice")
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    Path("notes.txt").write_text("the file")
    file_id = cli.json("send", "--file", "notes.txt")["message"]["file"]["id"]
    mine = Path("mine.txt")
    mine.write_text("keep me")
    line = error_line(cli("download", file_id, "-o", "mine.txt", code=1))
    assert line == "Error: mine.txt exists; add --force to overwrite it"
    assert ("GET", f"/files/{file_id}") not in live_server.requests  # nothing asked
    # The name comes from the server: refused after the answer's head, before its body.
    line = error_line(cli("download", file_id, code=1))
    assert line == "Error: notes.txt exists; add --force to overwrite it"
    assert sorted(os.listdir()) == ["mine.txt", "notes.txt"]
    assert mine.read_text() == "keep me"
    cli("download", file_id, "-o", "mine.txt", "--force")
    assert mine.read_text() == "the file"
    assert sorted(os.listdir()) == ["mine.txt", "notes.txt"]  # no temporary file left


def test_a_download_cut_short_leaves_no_file(
    config_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    with answering(200, b"only this", length=1000) as url:
        mc.Config(config_dir / mc.CONFIG_FILE).remember(url, "alice", "a-token")
        for force in ([], ["--force"]):
            line = error_line(Cli(url)("download", "abc", "-o", "cut.bin", *force, code=1))
            assert line == f"Error: cannot reach {url}: the answer stopped 991 bytes short"
            assert os.listdir() == []


def on_a_terminal(*args: str) -> tuple[int, str]:
    """Run the client with stderr on a pseudo-terminal: its exit status and what the
    terminal showed."""
    controller, terminal = pty.openpty()
    process = client_process(*args, stderr=terminal)
    os.close(terminal)
    shown = b""
    with contextlib.suppress(OSError):  # EIO: the client exited, the terminal is closed
        while data := os.read(controller, 65536):
            shown += data
    os.close(controller)
    process.communicate(timeout=20)
    return process.returncode, shown.decode()


def test_files_show_a_progress_bar_on_a_terminal_only(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cli.login("alice")
    monkeypatch.chdir(tmp_path)
    Path("big.bin").write_bytes(os.urandom(2 * MiB))
    status, shown = on_a_terminal("--server", cli.url, "--json", "send", "--file", "big.bin")
    assert status == 0, shown
    assert re.search(r"Sending big\.bin +\[#+\] +100%", shown), shown
    piped = client_process("--server", cli.url, "--json", "send", "--file", "big.bin")
    stdout, stderr = piped.communicate(timeout=20)
    assert (piped.returncode, stderr) == (0, "")
    file_id = json.loads(stdout)["message"]["file"]["id"]
    status, shown = on_a_terminal("--server", cli.url, "download", file_id, "-o", "copy.bin")
    assert status == 0, shown
    assert re.search(r"Receiving copy\.bin +\[#+\] +100%", shown), shown
    piped = client_process("--server", cli.url, "download", file_id, "-o", "piped.bin")
    assert piped.communicate(timeout=20) == ("Saved piped.bin (2.0 MiB, application/octet-stream)."
                                             "\n", "")


# The client, run so that its interpreter reports its peak RSS as it exits. (The kernel's
# ru_maxrss of a child counts the memory of the process it was forked from, here pytest's.)
REPORT_PEAK_RSS = """
import atexit, re, runpy, sys

def report() -> None:
    status = open("/proc/self/status").read()
    print("peak RSS KiB", re.search(r"VmHWM:\\s+(\\d+)", status)[1], file=sys.stderr)

atexit.register(report)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def peak_rss_kib(*args: str) -> int:
    """Run the client to its end; its peak resident set size (VmHWM), in KiB."""
    done = subprocess.run(
        [sys.executable, "-c", REPORT_PEAK_RSS, str(CLIENT), *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    peak = re.fullmatch(r"peak RSS KiB (\d+)\n", done.stderr)
    assert peak is not None, done.stderr
    return int(peak[1])


def test_client_memory_stays_flat_while_moving_5_mib(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Uploading and downloading 5 MiB costs the client well under 5 MiB more than 1 KiB."""
    cli.login("alice")
    monkeypatch.chdir(tmp_path)
    Path("small.bin").write_bytes(os.urandom(1024))
    Path("big.bin").write_bytes(os.urandom(5 * MiB))
    peaks: dict[str, int] = {}
    for name in ("small.bin", "big.bin"):
        send = ("--server", cli.url, "send", "--file", name)
        peaks[f"send {name}"] = peak_rss_kib(*send)
        file_id = cli.json("history", "general")["messages"][-1]["file"]["id"]
        peaks[f"download {name}"] = peak_rss_kib(
            "--server", cli.url, "download", file_id, "-o", f"copy-{name}"
        )
        assert Path(f"copy-{name}").read_bytes() == Path(name).read_bytes()
    print(f"client peak RSS, KiB: {peaks}")
    for verb in ("send", "download"):
        grown = peaks[f"{verb} big.bin"] - peaks[f"{verb} small.bin"]
        assert grown < 2 * 1024, (verb, peaks)  # holding the file would be 5 MiB or more


# read --follow: what it waits through ##########################################


def test_read_follow_waits_through_502_503_504_with_capped_backoff(
    down_url: str, config_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mc.Config(config_dir / mc.CONFIG_FILE).remember(down_url, "alice", "a-token")
    bad_gateway = mc.ApiError(502, "http_error", "the server answered 502: a proxy...")
    failures: list[Exception] = [
        bad_gateway, mc.ApiError(504, "http_error", "the server answered 504: a proxy..."),
        mc.ServerUnreachable(down_url, ConnectionRefusedError()),
        mc.ApiError(503, "unavailable", "the server is shutting down"),
        bad_gateway, bad_gateway, bad_gateway,
    ]
    message = a_message(dt.datetime.now())
    answers: list[BaseException | mc.MessagesPage] = [
        {"messages": [], "next": 6},  # nothing unread: then it follows
        *failures, {"messages": [message], "next": 7},
        mc.ApiError(503, "unavailable", "busy", retry_after=3), {"messages": [], "next": 7},
        KeyboardInterrupt(),
    ]

    def messages(client: mc.MessengerClient, **query: Any) -> mc.MessagesPage:
        answer = answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    pauses: list[float] = []
    monkeypatch.setattr(mc.MessengerClient, "messages", messages)
    monkeypatch.setattr(time, "sleep", pauses.append)
    result = Cli(down_url)("read", "--follow", "--all", code=mc.INTERRUPTED)
    assert pauses == [0.5, 1, 2, 4, 8, 15, 15, 3]
    assert result.stderr.splitlines() == [
        "the server answered 502: a proxy...; waiting for it (Ctrl-C to stop)",
        f"Reconnected to {down_url}.",
        "busy; waiting for it (Ctrl-C to stop)",
        f"Reconnected to {down_url}.",
        "",
    ]
    assert result.stdout == mc.format_message(message, "alice") + "\n"


@pytest.mark.parametrize("status", [401, 404, 500])
def test_read_follow_stops_at_other_errors(status: int, cli: Cli) -> None:
    cli.login("alice")
    with answering(status) as url:
        mc.Config(Path(os.environ["MESSENGER_CONFIG_DIR"]) / mc.CONFIG_FILE).remember(
            url, "alice", "a-token"
        )
        line = error_line(Cli(url)("read", "--follow", code=1))
    hint = mc.PROXY_HINTS.get(status, mc.PROXY_HINT)
    assert line == f"Error: the server answered {status}: {hint}"


# Behind nginx ###################################################################


@pytest.fixture
def proxy(live_server: ServerThread, tmp_path: Path) -> Iterator[Nginx]:
    """nginx in front of the live server, configured as the README shows."""
    with nginx_in_front(live_server.port, tmp_path / "nginx") as running:
        yield running


@needs_nginx
def test_read_follow_through_nginx_waits_through_its_502(
    cli: Cli, live_server: ServerThread, proxy: Nginx, monkeypatch: pytest.MonkeyPatch
) -> None:
    bob = mc.MessengerClient(cli.url, cli.login("bob"))
    proxied = Cli(proxy.url)
    proxied.login("alice")
    follower = Follower(proxied, monkeypatch)
    try:
        follower.thread.start()
        wait_until_parked(bob, follower)
        live_server.stop()
        while getattr(follower.errors.get(timeout=10), "status", None) != 502:
            pass  # until nginx answers 502: it cannot reach the server
        live_server.start_again()
        bob.send("back again", to="alice")
        result = follower.result()
    finally:
        follower.close()
    assert 502 in proxy.statuses("/messages")
    lines = result.stderr.splitlines()
    assert len(lines) == 3 and lines[0].endswith("; waiting for it (Ctrl-C to stop)"), lines
    assert lines[1:] == [f"Reconnected to {proxy.url}.", ""]
    assert result.stdout.endswith(" @bob bob: back again\n")


@needs_nginx
def test_5_mib_round_trip_through_nginx(
    cli: Cli, proxy: Nginx, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Cli(proxy.url).login("alice")
    monkeypatch.chdir(tmp_path)
    Path("big.bin").write_bytes(os.urandom(5 * MiB))  # exactly --max-file-size
    sent = client_process("--server", proxy.url, "--json", "send", "--file", "big.bin")
    stdout, stderr = sent.communicate(timeout=60)
    assert sent.returncode == 0, stderr
    file_id = json.loads(stdout)["message"]["file"]["id"]
    got = client_process("--server", proxy.url, "download", file_id, "-o", "copy.bin")
    assert got.communicate(timeout=60)[0] == (
        "Saved copy.bin (5.0 MiB, application/octet-stream).\n"
    )
    cmp = shutil.which("cmp")
    if cmp is None:
        assert Path("copy.bin").read_bytes() == Path("big.bin").read_bytes()
    else:
        assert subprocess.run([cmp, "big.bin", "copy.bin"], check=False).returncode == 0
    assert proxy.statuses("/files") == [201, 200]


@needs_nginx
def test_uploads_refused_through_nginx(
    cli: Cli, live_server: ServerThread, proxy: Nginx, tmp_path: Path
) -> None:
    token = Cli(proxy.url).login("alice")
    client = mc.MessengerClient(proxy.url, token)
    size = 5 * MiB + 1  # one byte over the server's limit: the server refuses it
    with pytest.raises(mc.ApiError) as raised:
        client.upload("big.bin", io.BytesIO(bytes(size)), size)
    assert raised.value.format_message() == "files are limited to 5242880 bytes"
    # With nginx's default limit (1 MiB), nginx refuses it before a byte is sent.
    with nginx_in_front(live_server.port, tmp_path / "nginx-1m",
                        client_max_body_size="1m") as default_limit:
        sent: list[int] = []
        with pytest.raises(mc.ApiError) as raised:
            mc.MessengerClient(default_limit.url, token).upload(
                "big.bin", io.BytesIO(bytes(2 * MiB)), 2 * MiB, sent.append
            )
    assert raised.value.format_message() == (
        "the server answered 413: a proxy in front may limit bodies, see README"
    )
    assert sent == []
    with pytest.raises(mc.ApiError, match="unknown or revoked token") as raised:
        mc.MessengerClient(proxy.url, "not-a-token").upload("x", io.BytesIO(b"x"), 1)
    assert raised.value.status == 401


@needs_nginx
def test_nginx_passes_the_client_address_to_a_server_that_trusts_it(
    serve: Callable[..., ServerThread], tmp_path: Path
) -> None:
    """The README's X-Forwarded-For and --forwarded-allow-ips: per-address rules count the
    client's address, not the proxy's (here: one registration per address)."""
    server = serve(
        forwarded_allow_ips=ms.parse_networks("127.0.0.1"),
        rules=ms.Rules(registrations_per_ip=1),
    )
    with nginx_in_front(server.port, tmp_path / "nginx") as proxy:

        def register(user: str, address: str) -> int:
            connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
            body = json.dumps({"user": user, "password": PASSWORD})
            connection.request("POST", "/connect", body, {"X-Forwarded-For": address})
            status = connection.getresponse().status
            connection.close()
            return status

        assert register("alice", "203.0.113.9") == 201
        assert register("bob", "203.0.113.9") == 429
        assert register("carol", "198.51.100.7") == 201


# A server not to trust: crafted answers ############################################


@contextlib.contextmanager
def fake_server(answer: Callable[[str], Iterable[bytes]], pace: float = 0.0) -> Iterator[str]:
    """A server that answers each request with what ``answer`` gives for its target (path and
    query): pieces of bytes sent one at a time, ``pace`` seconds apart, until they end or the
    client hangs up; then it closes. Its URL."""
    listener = socket.create_server(("127.0.0.1", 0))
    closing = threading.Event()

    def serve() -> None:
        with contextlib.suppress(OSError):  # the listener is shut: the test is over
            while True:
                connection, _ = listener.accept()
                with connection, contextlib.suppress(OSError):  # OSError: the client hung up
                    head = b""
                    while b"\r\n\r\n" not in head and (data := connection.recv(65536)):
                        head += data
                    for piece in answer(head.split(b" ")[1].decode()):
                        connection.sendall(piece)
                        if closing.wait(pace):
                            return

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        closing.set()
        listener.shutdown(socket.SHUT_RDWR)  # wakes the accept
        listener.close()
        thread.join(timeout=10)


def answer_json(value: object, status: int = 200) -> list[bytes]:
    """A whole answer of ``value`` as JSON, or of ``value`` itself if it is bytes."""
    body = value if isinstance(value, bytes) else json.dumps(value).encode()
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return [head.encode() + body]


def by_path(answers: dict[str, Any]) -> Callable[[str], list[bytes]]:
    """``answer`` for ``fake_server``: the JSON of ``answers`` by the request's path."""
    return lambda target: answer_json(answers[urlsplit(target).path])


@pytest.fixture
def logged_in(config_dir: Path) -> Callable[[str], Cli]:
    """A Cli for the server at a URL with a saved login of alice's there."""

    def cli_for(url: str) -> Cli:
        mc.Config(config_dir / mc.CONFIG_FILE).remember(url, "alice", "a-token")
        return Cli(url)

    return cli_for


# An OSC sequence that sets the terminal's title, a C1 CSI (colours on some terminals), a
# bidi override: none may reach the terminal.
ROGUE = "\x1b]0;pwned\x07\x9b31m\u202e"
UNSAFE = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def rogue_message(message_id: int, **fields: Any) -> dict[str, Any]:
    file = {"id": ROGUE, "name": ROGUE, "size": 3, "type": ROGUE}
    return {"id": message_id, "chat": ROGUE, "to": None, "from": ROGUE, "text": ROGUE,
            "ts": time.time(), "reply_to": None, "file": file, "notice": None, **fields}


ROGUE_CHAT = {"name": ROGUE, "private": False, "owner": ROGUE, "members": 2, "unread": 1,
              "requests": 0}
ROGUE_NOTICE = rogue_message(2, **{"from": None, "file": None,
                                   "notice": {"type": "request", "chat": ROGUE, "user": ROGUE}})
ROGUE_ANSWERS: dict[str, dict[str, Any]] = {
    "/history": {"messages": [rogue_message(1), ROGUE_NOTICE]},
    "/messages/1": {"message": rogue_message(1), "comments": [rogue_message(3)]},
    "/chat": {"chats": [ROGUE_CHAT], "next": None},
    "/chat/general/leave": {"chat": ROGUE_CHAT},
    "/scheduled": {"scheduled": [{"id": ROGUE, "send_at": time.time(), "text": ROGUE,
                                  "chat": ROGUE, "to": None, "reply_to": None, "file": ROGUE}]},
    "/chat/general/requests": {"requests": [{"user": ROGUE, "ts": time.time()}]},
    "/status": {
        "user": ROGUE, "chat": ROGUE, "sessions": 1, "chats": [ROGUE_CHAT],
        "unread": {"total": 2, "chats": {ROGUE: 1}, "private": {ROGUE: 1}, "notices": 0},
        "limits": {"general_left": 5, "general_reset": None, "reports": 0,
                   "banned_until": None},
        "quotas": {"flood_left": 1, "scheduled_left": 1, "upload_left": 1},
        "server": {"version": ROGUE, "uptime": 5.0, "users": 2, "online": 1},
    },
}


@pytest.mark.parametrize(
    "args",
    [["history", "general"], ["show", "1"], ["chats"], ["leave", "general"], ["scheduled"],
     ["requests", "general"], ["status"], ["--json", "history", "general"]],
)
def test_strings_from_the_server_reach_the_terminal_cleaned(
    args: list[str], logged_in: Callable[[str], Cli]
) -> None:
    """Found by review: sender and chat names (and notice fields, file names...) were printed
    as they came, and a server's escape sequence changed the terminal's title."""
    with fake_server(by_path(ROGUE_ANSWERS)) as url:
        result = logged_in(url)(*args)
    assert not UNSAFE.search(result.output), result.output
    if "--json" in args:  # the same JSON, its characters escaped
        assert json.loads(result.stdout) == ROGUE_ANSWERS["/history"]
    else:
        assert "\\x1b]0;pwned\\x07\\x9b31m\\u202e" in result.stdout


def test_error_messages_from_the_server_are_cleaned_and_one_line(
    logged_in: Callable[[str], Cli]
) -> None:
    error = {"error": ROGUE, "message": f"no\n{ROGUE}"}
    with fake_server(lambda target: answer_json(error, 404)) as url:
        line = error_line(logged_in(url)("status", code=1))
        assert line == "Error: no\\x0a\\x1b]0;pwned\\x07\\x9b31m\\u202e"
        result = logged_in(url)("status", json_output=True, code=1)
    assert not UNSAFE.search(result.stderr.rstrip("\n")), result.stderr
    assert json_error(result) == {"error": ROGUE, "message": f"no\n{ROGUE}", "status": 404}


def test_a_downloads_type_and_name_from_the_server_are_cleaned(
    logged_in: Callable[[str], Cli], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    head = (f"HTTP/1.1 200 OK\r\nContent-Type: text/{ROGUE[:-1]}\r\nContent-Length: 2\r\n"
            f"Content-Disposition: attachment; filename=\"a{ROGUE[:-1]}\"\r\n\r\nhi")
    with fake_server(lambda target: [head.encode("latin-1")]) as url:
        result = logged_in(url)("download", "f1")
    shown = "\\x1b]0;pwned\\x07\\x9b31m"
    assert result.stdout == f"Saved a_]0;pwned__31m (2 B, text/{shown}).\n"
    assert (tmp_path / "a_]0;pwned__31m").read_bytes() == b"hi"


def test_a_huge_answer_is_refused_after_16_mib(logged_in: Callable[[str], Cli]) -> None:
    """Found by review: the client read an answer whole, however big (a MemoryError)."""
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n"
    # No length: it ends when the client hangs up. At most 20 MiB: a client without its
    # limit fails the test (not JSON) rather than reading forever.
    endless = itertools.chain([head, b"["], itertools.repeat(b"0," * 32768, 20 * 16))
    with fake_server(lambda target: endless) as url:
        line = error_line(logged_in(url)("chats", code=1))
    assert line == ("Error: the server sent an answer this client does not understand:"
                    " longer than 16.0 MiB")


def test_a_download_is_not_limited_like_an_answer(
    logged_in: Callable[[str], Cli], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(mc, "MAX_ANSWER", 1024)
    data = os.urandom(100 * 1024)
    head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(data)}\r\n\r\n".encode()
    with fake_server(lambda target: [head, data]) as url:
        logged_in(url)("download", "f1", "-o", "got.bin")
    assert Path("got.bin").read_bytes() == data


# A head that never ends, or a body that never does: a byte every 0.05 s, while the
# client's timeout (0.5 s, each read's too) is far longer than that.
TRICKLES = {
    "head": [b"HTTP/1.1 200 OK\r\nX-Slow: "],
    "body": [b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 999\r\n"
             b"\r\n["],
}
PACE = 0.05
TRICKLE_BYTES = 400  # 20 s at most: a client without a deadline fails the test, never hangs it


@pytest.mark.parametrize("part", TRICKLES)
def test_an_answer_trickling_in_times_out(
    part: str, logged_in: Callable[[str], Cli], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by review: a server sending a byte every 5 s held ``read`` forever."""
    monkeypatch.setattr(mc, "REQUEST_TIMEOUT", 0.5)
    trickle = itertools.chain(TRICKLES[part], itertools.repeat(b" ", TRICKLE_BYTES))
    with fake_server(lambda target: trickle, pace=PACE) as url:
        started = time.monotonic()
        line = error_line(logged_in(url)("read", "--all", code=1))
    assert line == f"Error: cannot reach {url}: timed out"
    assert time.monotonic() - started < 10  # the deadline's 0.5 s, and generous slack


def test_read_follow_waits_through_an_answer_trickling_in(
    logged_in: Callable[[str], Cli], monkeypatch: pytest.MonkeyPatch
) -> None:
    """As through a server that cannot be reached: say so, wait, try again."""
    monkeypatch.setattr(mc, "REQUEST_TIMEOUT", 0.5)

    def ctrl_c(seconds: float) -> None:  # the wait before trying again
        raise KeyboardInterrupt

    monkeypatch.setattr(time, "sleep", ctrl_c)
    trickle = itertools.chain(TRICKLES["head"], itertools.repeat(b" ", TRICKLE_BYTES))
    with fake_server(lambda target: trickle, pace=PACE) as url:
        result = logged_in(url)("read", "--follow", "--all", code=mc.INTERRUPTED)
    assert result.stderr.splitlines() == [
        f"cannot reach {url}: timed out; waiting for it (Ctrl-C to stop)", ""
    ]


def bad(**fields: Any) -> dict[str, Any]:
    """A page of one message, with ``fields`` instead of the good ones."""
    return {"messages": [{**rogue_message(7, chat="general", text="hi"), **fields}], "next": 7}


@pytest.mark.parametrize(
    ("answer", "complaint"),
    [
        (bad(**{"from": 5}), "answer.messages[0].from is not a string"),
        (bad(id=True), "answer.messages[0].id is not an integer"),
        (bad(ts="noon"), "answer.messages[0].ts is not a number"),
        (bad(ts=1e300), "a time out of range: 1e+300"),
        (bad(file={"id": "f", "name": "n", "size": "3", "type": "t"}),
         "answer.messages[0].file.size is not an integer"),
        (bad(notice={"chat": "c"}), "answer.messages[0].notice has no 'type'"),
        (b'{"messages": [], "next": 1e999}', "answer.next is not an integer"),
        (b'{"messages": [], "next": NaN}', "answer.next is not an integer"),
        ({"messages": {}, "next": 1}, "answer.messages is not an array"),
        ({"messages": []}, "answer has no 'next'"),
        ([], "answer is not an object"),
    ],
)
def test_an_answer_of_another_shape_is_one_clear_line(
    answer: Any, complaint: str, logged_in: Callable[[str], Cli]
) -> None:
    """Found by review: wrong field types, or a huge ``ts``, gave a Python traceback."""
    with fake_server(lambda target: answer_json(answer)) as url:
        line = error_line(logged_in(url)("read", "--all", code=1))
    assert line == f"Error: the server sent an answer this client does not understand: {complaint}"


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ({"server": {"version": "1", "uptime": 1e300, "users": 1, "online": 1}},
         "an uptime out of range: 1e+300"),
        ({"unread": {"total": 1, "chats": {"x": "1"}, "private": {}, "notices": 0}},
         'answer.unread.chats["x"] is not an integer'),
        ({"chats": [{**ROGUE_CHAT, "private": "no"}]},
         "answer.chats[0].private is not true or false"),
    ],
)
def test_status_of_another_shape_is_one_clear_line(
    change: dict[str, Any], complaint: str, logged_in: Callable[[str], Cli]
) -> None:
    answers = {**ROGUE_ANSWERS, "/status": {**ROGUE_ANSWERS["/status"], **change}}
    with fake_server(by_path(answers)) as url:
        line = error_line(logged_in(url)("status", code=1))
    assert line == f"Error: the server sent an answer this client does not understand: {complaint}"


def test_an_answer_of_another_shape_under_json_is_a_bad_answer_error(
    logged_in: Callable[[str], Cli]
) -> None:
    with fake_server(lambda target: answer_json(bad(ts="noon"))) as url:
        error = json_error(logged_in(url)("read", "--all", json_output=True, code=1))
    assert error == {
        "error": "bad_answer",
        "message": "the server sent an answer this client does not understand:"
                   " answer.messages[0].ts is not a number",
    }


def test_an_error_answer_with_a_time_out_of_range_is_one_clear_line(
    logged_in: Callable[[str], Cli]
) -> None:
    error = {"error": "banned", "message": "banned", "until": 1e300}
    with fake_server(lambda target: answer_json(error, 403)) as url:
        line = error_line(logged_in(url)("send", "hi", code=1))
    assert line == ("Error: the server sent an answer this client does not understand:"
                    " a time out of range: 1e+300")


def same_page_again(first_next: int, page: dict[str, Any]) -> Callable[[str], list[bytes]]:
    """``/messages`` of a server stuck on ``page``: the unread ones first (none, and
    ``first_next``), then ``page`` whatever is asked."""
    return lambda target: answer_json(
        page if "since=" in target else {"messages": [], "next": first_next}
    )


@pytest.mark.parametrize(
    ("first_next", "page", "printed", "complaint"),
    [
        (6, bad(), 1, "message 7 when asked for those after 7"),  # next 7 again and again
        (7, bad(), 0, "message 7 when asked for those after 7"),
        (6, {**bad(), "next": 6}, 0, "next 6 is before 7"),
        (6, {"messages": [], "next": 5}, 0, "next 5 is before 6"),  # backwards
    ],
)
def test_read_follow_stops_at_a_next_that_does_not_advance(
    first_next: int, page: dict[str, Any], printed: int, complaint: str,
    logged_in: Callable[[str], Cli],
) -> None:
    """Found by review: a ``next`` that never advanced had ``read --follow`` print the same
    message forever. No message is printed twice: the page is checked first."""
    with fake_server(same_page_again(first_next, page)) as url:
        result = logged_in(url)("read", "--follow", "--all", code=1)
    assert result.stdout.count(" general ") == printed
    assert error_line(result) == (
        f"Error: the server sent an answer this client does not understand: {complaint}"
    )


def test_read_stops_at_unread_ones_that_do_not_go_away(logged_in: Callable[[str], Cli]) -> None:
    """Marked read, the same message comes back as unread: printed once, then an error."""
    with fake_server(lambda target: answer_json(bad())) as url:
        result = logged_in(url)("read", "--all", code=1)
    assert result.stdout.count(" general ") == 1
    assert error_line(result).endswith(": message 7 when asked for those after 7")


def test_chats_stops_at_pages_that_do_not_advance(logged_in: Callable[[str], Cli]) -> None:
    stuck = {"chats": [{**ROGUE_CHAT, "name": "b"}], "next": "b"}
    with fake_server(lambda target: answer_json(stuck)) as url:
        result = logged_in(url)("chats", code=1)
    assert result.stdout.count("b ") == 2  # the first page and the second, then no more
    assert error_line(result).endswith(": the chats after 'b' go on after 'b'")


def test_number_headers_that_are_not_plain_numbers_are_ignored(
    logged_in: Callable[[str], Cli], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Retry-After of ``²`` (a digit to ``str.isdigit``, not to ``int``) and a Content-Length
    of 5000 digits (past ``int``'s limit on digits) gave a traceback."""
    monkeypatch.chdir(tmp_path)
    error = json.dumps({"error": "rate_limited", "message": "slow down"})
    busy = (f"HTTP/1.1 429 Too Many Requests\r\nRetry-After: \xb2\r\n"
            f"Content-Length: {len(error)}\r\n\r\n{error}")
    with fake_server(lambda target: [busy.encode("latin-1")]) as url:
        assert error_line(logged_in(url)("chats", code=1)) == "Error: slow down (try again in ² s)"
    file = f"HTTP/1.1 200 OK\r\nContent-Length: {'9' * 5000}\r\nConnection: close\r\n\r\nhi"
    with fake_server(lambda target: [file.encode()]) as url:
        logged_in(url)("download", "f1", "-o", "got.bin")
    assert Path("got.bin").read_bytes() == b"hi"
