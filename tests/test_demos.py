"""``python -m lightws echo|countdown|push|chat`` as real subprocesses, driven by the
websockets client and plain HTTP (aiohttp)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support import ROOT, astart, eventually, free_port, run_lightws
from support.demos import Demo, http_get, recv_json, start_demo
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

pytestmark = pytest.mark.asyncio_loop_only  # the servers run in their own processes

TICK = 0.05  # countdown --tick for the tests: 20 numbers a second


@pytest.fixture
async def echo() -> AsyncIterator[Demo]:
    demo = await start_demo("echo")
    yield demo
    await demo.stop()


@pytest.fixture
async def countdown() -> AsyncIterator[Demo]:
    demo = await start_demo("countdown", "--tick", str(TICK))
    yield demo
    await demo.stop()


async def start_push() -> Demo:
    put_port = free_port()
    demo = await start_demo(
        "push", "--put-addr", f"127.0.0.1:{put_port}", ready=f"127.0.0.1:{put_port}"
    )
    demo.put_port = put_port
    return demo


@pytest.fixture
async def push() -> AsyncIterator[Demo]:
    demo = await start_push()
    yield demo
    await demo.stop()


async def recv(ws: ClientConnection, timeout: float = 5) -> str | bytes:
    return await asyncio.wait_for(ws.recv(), timeout)


# -- every demo ---------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["echo", "countdown", "push", "chat"])
async def test_get_root_serves_the_demo_page_as_html(command: str) -> None:
    demo = await start_push() if command == "push" else await start_demo(command)
    try:
        status, content_type, body = await http_get(demo.http + "/")
        assert status == 200
        assert content_type.startswith("text/html")
        assert f"<title>lightws {command}</title>" in body
        assert "new WebSocket(" in body
    finally:
        await demo.stop()


async def test_page_server_answers_404_for_other_paths_and_405_for_other_methods(
    echo: Demo,
) -> None:
    assert (await http_get(echo.http + "/nope"))[0] == 404
    status, _, _ = await http_get(echo.http + "/", method="POST")
    assert status == 405


def test_help_lists_every_demo() -> None:
    result = run_lightws("--help")
    assert result.returncode == 0
    for command in ("echo", "countdown", "push", "chat"):
        assert command in result.stdout


async def test_stats_interval_prints_stats_periodically() -> None:
    demo = await start_demo("echo", "--stats-interval", "0.2")
    try:
        async with connect(demo.ws + "/") as ws:
            await ws.send("x")
            await recv(ws)
            out = await demo.read_until("handshakes=1", timeout=10)
            out += await demo.read_until("frames_out:", timeout=10)
        assert "connections=1" in out
        assert "TEXT=1" in out
    finally:
        await demo.stop()


# -- echo -------------------------------------------------------------------------------


async def test_echo_closes_with_1000_on_exit_message(echo: Demo) -> None:
    async with connect(echo.ws + "/") as ws:
        await ws.send("exit")
        await asyncio.wait_for(ws.wait_closed(), 5)
        assert ws.close_code == 1000


async def test_echo_takes_a_1_mib_message_by_default(echo: Demo) -> None:
    # --max-msg-len defaults to 16 MiB for every demo but chat (64 KiB).
    async with connect(echo.ws + "/", max_size=None) as ws:
        await ws.send(b"x" * (1 << 20))
        assert await recv(ws, 10) == b"x" * (1 << 20)


def test_the_default_max_msg_len_depends_on_the_demo() -> None:
    from lightws.__main__ import _max_msg_len, _parser

    parser = _parser()  # one parser: the subcommands share the common options
    assert _max_msg_len(parser.parse_args(["chat"])) == 64 * 1024
    for command in ("echo", "countdown", "push"):
        assert _max_msg_len(parser.parse_args([command])) == 16 << 20
    assert _max_msg_len(parser.parse_args(["chat", "--max-msg-len", "100"])) == 100
    assert _max_msg_len(parser.parse_args(["echo", "--max-msg-len", "100"])) == 100


# -- countdown --------------------------------------------------------------------------


async def test_countdown_counts_down_then_booms(countdown: Demo) -> None:
    loop = asyncio.get_running_loop()
    async with connect(countdown.ws + "/") as ws:
        started = loop.time()
        await ws.send("3")
        got = [await recv(ws) for _ in range(4)]
        elapsed = loop.time() - started
    assert got == ["3...", "2...", "1...", "boom!"]
    assert elapsed >= 3 * TICK * 0.9  # one tick between messages


async def test_countdown_zero_stops_it(countdown: Demo) -> None:
    async with connect(countdown.ws + "/") as ws:
        await ws.send("500")
        assert await recv(ws) == "500..."
        await ws.send("0")
        while (msg := await recv(ws)) != "stopped":
            assert isinstance(msg, str) and msg.endswith("...")
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(ws.recv(), 10 * TICK)


async def test_countdown_new_number_restarts_it(countdown: Demo) -> None:
    async with connect(countdown.ws + "/") as ws:
        await ws.send("500")
        assert await recv(ws) == "500..."
        await ws.send("2")
        while (msg := await recv(ws)) != "2...":
            # numbers of the first countdown sent before the server read "2"
            assert isinstance(msg, str) and msg.endswith("...") and int(msg[:-3]) > 400
        assert [await recv(ws), await recv(ws)] == ["1...", "boom!"]


@pytest.mark.parametrize("sent", ["abc", "-1", "3601", "1.5"])
async def test_countdown_rejects_what_is_not_a_count(countdown: Demo, sent: str) -> None:
    async with connect(countdown.ws + "/") as ws:
        await ws.send(sent)
        msg = await recv(ws)
        assert isinstance(msg, str) and msg.startswith("error:")


async def test_sigterm_mid_countdown_closes_with_1001_and_exits_0(countdown: Demo) -> None:
    async with connect(countdown.ws + "/") as ws:
        await ws.send("500")
        assert await recv(ws) == "500..."
        countdown.proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(ws.wait_closed(), 10)
        assert ws.close_code == 1001
    assert await countdown.proc.afinish(10) == 0


# -- push -------------------------------------------------------------------------------


async def test_push_delivers_a_message_to_the_registered_client(push: Demo) -> None:
    async with connect(push.ws + "/?id=a") as ws:
        assert await push.put("?id=a&msg=hi") == (200, "ok")
        assert await recv(ws) == "hi"
        assert await push.put("?id=a&msg=h%C3%A9llo%20w") == (200, "ok")
        assert await recv(ws) == "héllo w"


async def test_push_without_id_is_400_no_id(push: Demo) -> None:
    assert await push.put("") == (400, "no_id")
    assert await push.put("?id=&msg=hi") == (400, "no_id")


async def test_push_to_unknown_id_is_404(push: Demo) -> None:
    async with connect(push.ws + "/?id=a"):
        status, _ = await push.put("?id=b&msg=hi")
        assert status == 404

    async def a_is_gone() -> bool:
        status, _ = await push.put("?id=a&msg=hi")
        return status == 404

    # ``a`` is gone once the server has seen its connection close.
    await eventually(a_is_gone, what="a 404 for the closed client's id")


async def test_push_endpoint_serves_only_put(push: Demo) -> None:
    status, _, body = await http_get(f"http://127.0.0.1:{push.put_port}/other")
    assert (status, body) == (404, "not found")


async def test_push_websocket_without_id_is_rejected_with_400(push: Demo) -> None:
    with pytest.raises(InvalidStatus) as excinfo:
        async with connect(push.ws + "/"):
            pass
    assert excinfo.value.response.status_code == 400
    assert excinfo.value.response.body == b"no_id"


async def test_push_reaches_every_client_registered_with_the_id(push: Demo) -> None:
    # An id is a topic: two tabs (or devices) of one id both get what is pushed to it.
    async with (
        connect(push.ws + "/?id=a") as first,
        connect(push.ws + "/?id=a") as second,
        connect(push.ws + "/?id=b") as other,
    ):
        status, _, body = await http_get(f"http://127.0.0.1:{push.put_port}/put/?id=a&msg=both")
        assert (status, body) == (200, "ok")
        assert await recv(first) == "both"
        assert await recv(second) == "both"
        assert await push.put("?id=b&msg=only-b") == (200, "ok")
        assert await recv(other) == "only-b"
        # The second tab leaving does not unregister the first.
        await second.close()
        assert await push.put("?id=a&msg=still") == (200, "ok")
        assert await recv(first) == "still"


async def test_push_reports_how_many_clients_it_reached(push: Demo) -> None:
    async with connect(push.ws + "/?id=a"), connect(push.ws + "/?id=a"):
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{push.put_port}/put/?id=a&msg=x") as response,
        ):
            assert response.status == 200
            assert response.headers["X-Delivered"] == "2"


async def test_push_sigterm_exits_0(push: Demo) -> None:
    async with connect(push.ws + "/?id=a") as ws:
        push.proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(ws.wait_closed(), 10)
        assert ws.close_code == 1001
    assert await push.proc.afinish(10) == 0


def test_push_refuses_a_put_addr_that_is_not_loopback() -> None:
    result = run_lightws("push", "--put-addr", "0.0.0.0:0")
    assert result.returncode == 2
    assert "loopback" in result.stderr


# -- chat -------------------------------------------------------------------------------


@pytest.fixture
async def chat() -> AsyncIterator[Demo]:
    demo = await start_demo("chat")
    yield demo
    await demo.stop()


async def event(ws: ClientConnection) -> dict[str, Any]:
    """The next chat event ``ws`` receives."""
    return await recv_json(ws)


async def say(ws: ClientConnection, text: str) -> None:
    await ws.send(json.dumps({"type": "message", "text": text}))


@contextlib.asynccontextmanager
async def member(chat: Demo, query: str, **kwargs: Any) -> AsyncIterator[ClientConnection]:
    """A client in the room of ``query`` that has seen its own join notice."""
    async with connect(chat.ws + "/" + query, **kwargs) as ws:
        joined = await event(ws)
        assert joined["type"] == "join"
        yield ws


async def test_chat_relays_each_message_to_its_room_only(chat: Demo) -> None:
    async with (
        member(chat, "?room=r1&name=ann") as ann,
        member(chat, "?room=r1&name=bob") as bob,
        member(chat, "?room=r2&name=cat") as cat,
    ):
        assert (await event(ann))["name"] == "bob"  # ann saw bob join
        await say(ann, "hi r1 \u2603")
        expected = {"type": "message", "room": "r1", "name": "ann", "text": "hi r1 \u2603"}
        assert await event(bob) == expected
        assert await event(ann) == expected  # the sender gets its own message too
        await say(cat, "hi r2")
        assert await event(cat) == {"type": "message", "room": "r2", "name": "cat", "text": "hi r2"}
        # Nothing from r2 reached r1: the next thing ann and bob see is r1's.
        await say(bob, "still r1")
        assert (await event(ann))["text"] == "still r1"
        assert (await event(bob))["text"] == "still r1"
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(cat.recv(), 0.3)


async def test_chat_join_and_leave_notices_carry_the_member_count(chat: Demo) -> None:
    async with connect(chat.ws + "/?name=ann") as ann:  # no ?room=: the lobby
        assert await event(ann) == {"type": "join", "room": "lobby", "name": "ann", "members": 1}
        async with connect(chat.ws + "/?room=lobby&name=bob") as bob:
            joined = {"type": "join", "room": "lobby", "name": "bob", "members": 2}
            assert await event(bob) == joined
            assert await event(ann) == joined
            async with connect(chat.ws + "/?room=elsewhere&name=cat") as cat:
                assert (await event(cat))["members"] == 1
        assert await event(ann) == {"type": "leave", "room": "lobby", "name": "bob", "members": 1}


async def test_chat_name_from_the_first_message(chat: Demo) -> None:
    async with member(chat, "?room=r&name=ann") as ann, connect(chat.ws + "/?room=r") as anon:
        # Not in the room until named: a message first is an error, and ann sees nothing.
        await say(anon, "too early")
        assert (await event(anon))["error"] == "join_first"
        await anon.send(json.dumps({"type": "join", "name": "  dan "}))
        joined = {"type": "join", "room": "r", "name": "dan", "members": 2}
        assert await event(anon) == joined
        assert await event(ann) == joined
        await anon.send(json.dumps({"type": "join", "name": "again"}))
        assert (await event(anon))["error"] == "already_joined"
        await say(anon, "now")
        assert (await event(ann))["name"] == "dan"


@pytest.mark.parametrize(
    ("sent", "error"),
    [
        ("not json", "bad_json"),
        ("{", "bad_json"),
        ("[1, 2]", "bad_json"),
        ('{"type": "shout", "text": "x"}', "bad_type"),
        ('{"type": "join", "name": ""}', "already_joined"),
        ('{"type": "message"}', "bad_text"),
        ('{"type": "message", "text": 5}', "bad_text"),
        ('{"type": "message", "text": "   "}', "bad_text"),
        (json.dumps({"type": "message", "text": "x" * 2001}), "too_long"),
        (json.dumps({"type": "message", "text": "x" * 20_000}), "too_long"),
        (b"\x00binary", "text_only"),
    ],
)
async def test_chat_bad_input_gets_an_error_reply_and_the_connection_stays_open(
    chat: Demo, sent: str | bytes, error: str
) -> None:
    async with member(chat, "?room=r&name=ann") as ann, member(chat, "?room=r&name=bob") as bob:
        await event(ann)  # bob's join
        await ann.send(sent)
        reply = await event(ann)
        assert reply["type"] == "error"
        assert reply["error"] == error
        assert isinstance(reply["detail"], str) and reply["detail"]
        # Only ann was told; the room saw nothing, and ann can still talk.
        await say(ann, "fine")
        assert (await event(bob))["text"] == "fine"
        assert (await event(ann))["text"] == "fine"


async def test_chat_closes_a_message_far_over_the_limit_with_1009(chat: Demo) -> None:
    async with member(chat, "?name=ann") as ann:
        await ann.send("x" * (1 << 20))
        await asyncio.wait_for(ann.wait_closed(), 10)
        assert ann.close_code == 1009


@pytest.mark.parametrize(
    ("query", "body"),
    [
        ("?name=", b"bad_name"),
        ("?name=%20%20", b"bad_name"),
        ("?name=" + "n" * 33, b"bad_name"),
        ("?name=a%0Ab", b"bad_name"),
        ("?room=" + "r" * 65, b"bad_room"),
    ],
)
async def test_chat_refuses_a_bad_name_or_room_at_the_handshake(
    chat: Demo, query: str, body: bytes
) -> None:
    with pytest.raises(InvalidStatus) as excinfo:
        async with connect(chat.ws + "/" + query):
            pass
    assert excinfo.value.response.status_code == 400
    assert excinfo.value.response.body == body


async def test_chat_sigterm_closes_with_1001_and_exits_0(chat: Demo) -> None:
    async with member(chat, "?name=ann") as ann:
        chat.proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(ann.wait_closed(), 10)
        assert ann.close_code == 1001
    assert await chat.proc.afinish(10) == 0


# -- the chat of docs/pubsub.md (examples/chat.py) --------------------------------------


def pubsub_doc_chat() -> str:
    """The Python block under "## A complete chat" in docs/pubsub.md."""
    doc = (ROOT / "docs" / "pubsub.md").read_text()
    match = re.search(r"```python\n(.*?)```", doc[doc.index("## A complete chat") :], re.DOTALL)
    assert match, "no python block under 'A complete chat'"
    return match.group(1)


def test_the_chat_of_pubsub_md_is_examples_chat_py() -> None:
    assert pubsub_doc_chat() == (ROOT / "examples" / "chat.py").read_text()


async def test_the_chat_of_pubsub_md_runs(tmp_path: Path) -> None:
    port = free_port()
    source = pubsub_doc_chat()
    assert source.count("127.0.0.1:9001") >= 2
    path = tmp_path / "chat.py"
    path.write_text(source.replace("127.0.0.1:9001", f"127.0.0.1:{port}"))
    app = Demo(await astart([sys.executable, str(path)], ready="listening"), port)
    try:
        status, content_type, _ = await http_get(app.http + "/")
        assert (status, content_type.split(";")[0]) == (200, "text/html")
        async with member(app, "?room=r&name=ann") as ann:
            async with connect(app.ws + "/?room=r") as bob:
                await bob.send("{oops")
                assert await event(bob) == {"type": "error", "error": "bad_json"}
                await bob.send(json.dumps({"type": "join", "name": "bob"}))
                joined = {"type": "join", "room": "r", "name": "bob", "members": 2}
                assert await event(bob) == joined
                assert await event(ann) == joined
                await say(bob, "hi")
                said = {"type": "message", "room": "r", "name": "bob", "text": "hi"}
                assert await event(ann) == said
                assert await event(bob) == said
            assert await event(ann) == {"type": "leave", "room": "r", "name": "bob", "members": 1}
    finally:
        await app.stop()
