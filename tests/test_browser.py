"""A real browser against ``python -m lightws echo``: headless Chromium loads the echo
demo page (served by the same port through ``http_fallback``), the test drives the page
through the Chrome DevTools Protocol (over a WebSocket, with the websockets client) and
reads the echoed messages back from the page's DOM. The chat page against ``python -m
lightws chat``, in one room with a websockets client. And a page from one origin trying
a server that allows only another (``Config.origins``, cross-site WebSocket hijacking).

Skipped only when no Chromium binary is installed or it cannot start; ``.ci/run``
installs Debian's ``chromium``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import lightws
import pytest
import trustme
from support import Process, echo_handler, eventually, serve
from support.demos import Demo, recv_json, start_demo
from websockets.asyncio.client import ClientConnection, connect

pytestmark = pytest.mark.asyncio_loop_only  # server and browser run in their own processes

CHROMIUM = next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
)


class DevTools:
    """A minimal Chrome DevTools Protocol client: commands and their results."""

    def __init__(self, ws: ClientConnection) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        #: Events (messages without an id) of the domains enabled, in order.
        self.events: list[dict[str, Any]] = []
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for raw in self._ws:
            message = json.loads(raw)
            if "id" not in message:
                self.events.append(message)
                continue
            future = self._waiting.pop(message["id"], None)
            if future is not None and not future.done():
                future.set_result(message)
        for future in self._waiting.values():
            future.set_exception(ConnectionError("DevTools connection closed"))

    async def call(
        self, method: str, params: dict[str, Any] | None = None, session: str | None = None
    ) -> dict[str, Any]:
        command_id = next(self._ids)
        command: dict[str, Any] = {"id": command_id, "method": method, "params": params or {}}
        if session is not None:
            command["sessionId"] = session
        future = asyncio.get_running_loop().create_future()
        self._waiting[command_id] = future
        await self._ws.send(json.dumps(command))
        reply = await asyncio.wait_for(future, 20)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        result: dict[str, Any] = reply["result"]
        return result

    async def evaluate(self, session: str, expression: str) -> Any:
        """Run ``expression`` in the page, await it if it is a promise, return its value."""
        result = await self.call(
            "Runtime.evaluate",
            {"expression": expression, "awaitPromise": True, "returnByValue": True},
            session,
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise AssertionError(details.get("exception", {}).get("description", details))
        return result["result"].get("value")

    async def open_page(self, url: str) -> str:
        """Open ``url`` in a new tab and wait for it to load; return the session id."""
        target = await self.call("Target.createTarget", {"url": url})
        attached = await self.call(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
        )
        session: str = attached["sessionId"]

        async def loaded() -> bool:
            with contextlib.suppress(RuntimeError, AssertionError):  # navigation in flight
                state = await self.evaluate(session, "location.href + ' ' + document.readyState")
                return bool(state == f"{url} complete")
            return False

        await eventually(loaded, 20, f"{url} loading")
        return session

    async def close(self) -> None:
        self._reader.cancel()
        await self._ws.close()


@contextlib.asynccontextmanager
async def chromium(tmp_path: Path, *flags: str) -> AsyncIterator[DevTools]:
    """Headless Chromium with remote debugging on a free loopback port."""
    if CHROMIUM is None:
        pytest.skip("no chromium binary on PATH (.ci/run installs Debian's chromium)")
    profile = tmp_path / "profile"
    proc = Process(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",  # CI runs as root, where the sandbox cannot start
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
            *flags,
            "about:blank",
        ],
        new_session=True,  # its helper processes share the group stop() signals
    )
    try:
        try:
            line = await proc.aread_until("DevTools listening on", 30)
        except AssertionError as exc:
            pytest.skip(f"chromium could not be launched: {str(exc)[-2000:]}")
        match = re.search(r"DevTools listening on (ws://\S+)", line)
        assert match, line
        async with connect(match.group(1), max_size=None) as ws:
            devtools = DevTools(ws)
            try:
                yield devtools
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(devtools.call("Browser.close"), 5)
                await devtools.close()
    finally:
        await proc.astop(grace=5)


# Drives the echo page the way a person would: type, click, wait for the answer.
ROUND_TRIP = """
(async () => {
  const $ = (id) => document.getElementById(id);
  const until = async (what, cond) => {
    for (let i = 0; i < 400; i++) {
      if (cond()) return;
      await new Promise((resolve) => setTimeout(resolve, 25));
    }
    throw new Error("timed out waiting for " + what + "; status: " + $("status").textContent);
  };
  const received = () => document.querySelectorAll("li[data-dir=in]");
  await until("the connection", () => $("status").dataset.state === "open");
  const before = received().length;
  $("text").value = TEXT;
  $("send-text").click();
  await until("the text echo", () => received().length >= before + 1);
  $("send-binary").click();
  await until("the binary echo", () => received().length >= before + 2);
  return Array.from(received(), (li) => [li.dataset.kind, li.querySelector(".data").textContent])
    .slice(before);
})()
"""

REVERSE = """
(async () => {
  const $ = (id) => document.getElementById(id);
  $("reverse").click();  // reconnects with ?reverse=1
  await new Promise((resolve) => setTimeout(resolve, 50));
})()
"""


def round_trip(text: str) -> str:
    return ROUND_TRIP.replace("TEXT", json.dumps(text))


def hex_bytes(data: bytes) -> str:
    return " ".join(f"{b:02x}" for b in data)


@pytest.fixture
async def echo() -> AsyncIterator[Demo]:
    demo = await start_demo("echo")
    yield demo
    await demo.stop()


async def test_browser_echoes_text_and_binary_over_ws(tmp_path: Path, echo: Demo) -> None:
    async with chromium(tmp_path) as browser:
        session = await browser.open_page(f"http://127.0.0.1:{echo.port}/")
        got = await browser.evaluate(session, round_trip("héllo, browser"))
    assert got == [["text", "héllo, browser"], ["binary", hex_bytes("héllo, browser".encode())]]


async def test_browser_reverse_checkbox_reverses(tmp_path: Path, echo: Demo) -> None:
    async with chromium(tmp_path) as browser:
        session = await browser.open_page(f"http://127.0.0.1:{echo.port}/")
        await browser.evaluate(session, REVERSE)
        got = await browser.evaluate(session, round_trip("stressed"))
    assert got == [["text", "desserts"], ["binary", hex_bytes(b"desserts")]]


async def test_browser_echoes_over_wss(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    for pem in cert.cert_chain_pems[1:]:
        pem.write_to_path(str(cert_file), append=True)
    cert.private_key_pem.write_to_path(str(key_file))
    demo = await start_demo("echo", "--cert", str(cert_file), "--key", str(key_file))
    try:
        assert "wss://" in demo.banner
        # The test CA is not in Chromium's trust store; a real deployment has a real cert.
        async with chromium(tmp_path, "--ignore-certificate-errors") as browser:
            session = await browser.open_page(f"https://127.0.0.1:{demo.port}/")
            got = await browser.evaluate(session, round_trip("secure"))
    finally:
        await demo.stop()
    assert got == [["text", "secure"], ["binary", hex_bytes(b"secure")]]


# Helpers for the chat page, prepended to each script below.
CHAT_HELPERS = """
const $ = (id) => document.getElementById(id);
const until = async (what, cond) => {
  for (let i = 0; i < 400; i++) {
    if (cond()) return;
    await new Promise((resolve) => setTimeout(resolve, 25));
  }
  throw new Error("timed out waiting for " + what + "; status: " + $("status").textContent);
};
const lines = () => Array.from($("log").children, (li) => li.dataset.type + " " + li.textContent);
"""


def chat_script(body: str, **values: Any) -> str:
    """An async script for the chat page: ``body`` after the helpers, each ``NAME`` in it
    replaced by ``values[NAME]`` as JSON."""
    for name, value in values.items():
        body = body.replace(name, json.dumps(value))
    return f"(async () => {{{CHAT_HELPERS}{body}}})()"


# Wait until the page is in its room and shows COUNT members.
CHAT_JOINED = """
await until("the join", () => $("status").dataset.state === "joined");
await until(COUNT + " members", () => $("members").dataset.count === String(COUNT));
return $("status").textContent;
"""

# Type TEXT, press Send, wait until the server relayed it back to the page.
CHAT_SAY = """
const before = lines().length;
$("text").value = TEXT;
$("send").click();
const relayed = () => lines().slice(before).some((l) => l.startsWith("message "));
await until("the relayed message", relayed);
return {said: lines().slice(before), input: $("text").value};
"""

# Wait until the page shows a message from WHO.
CHAT_SHOWN = """
const from = (l) => l.startsWith("message " + WHO + ": ");
await until("a message from " + WHO, () => lines().some(from));
return {lines: lines(), members: $("members").textContent};
"""


async def test_browser_chat_page_and_a_websockets_client_in_one_room(tmp_path: Path) -> None:
    demo = await start_demo("chat")
    ws = f"ws://127.0.0.1:{demo.port}"
    try:
        async with chromium(tmp_path) as browser:
            session = await browser.open_page(f"http://127.0.0.1:{demo.port}/?room=r1&name=page")
            # The page names itself in its first message.
            status = await browser.evaluate(session, chat_script(CHAT_JOINED, COUNT=1))
            assert status == "in r1 as page"
            async with (
                connect(ws + "/?room=r1&name=bot") as bot,
                connect(ws + "/?room=r2&name=out") as outsider,
            ):
                assert await recv_json(bot) == {
                    "type": "join",
                    "room": "r1",
                    "name": "bot",
                    "members": 2,
                }
                assert (await recv_json(outsider))["members"] == 1
                await browser.evaluate(session, chat_script(CHAT_JOINED, COUNT=2))
                said = await browser.evaluate(
                    session, chat_script(CHAT_SAY, TEXT="héllo from the page")
                )
                assert said == {"said": ["message page: héllo from the page"], "input": ""}
                assert await recv_json(bot) == {
                    "type": "message",
                    "room": "r1",
                    "name": "page",
                    "text": "héllo from the page",
                }
                # And the other way: the page shows what the client said in the room.
                await bot.send(json.dumps({"type": "message", "text": "hi <b>page</b>"}))
                shown = await browser.evaluate(session, chat_script(CHAT_SHOWN, WHO="bot"))
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(outsider.recv(), 0.3)  # another room
    finally:
        await demo.stop()
    assert shown["members"] == "2"
    assert shown["lines"] == [
        "join page joined (1 here)",
        "join bot joined (2 here)",
        "message page: héllo from the page",
        "message bot: hi <b>page</b>",  # shown as text, not markup
    ]


# Opens a WebSocket to each URL in turn from the page and reports what the page can see:
# the events fired (in order) and the close event's code.
ATTEMPTS = """
(async () => {
  const attempt = (url) => new Promise((resolve) => {
    const seen = [];
    const ws = new WebSocket(url);
    ws.onopen = () => { seen.push("open"); ws.close(1000); };
    ws.onerror = () => seen.push("error");
    ws.onclose = (e) => { seen.push("close"); resolve({seen, code: e.code}); };
  });
  const results = [];
  for (const url of URLS) results.push(await attempt(url));
  return results;
})()
"""


def refusal_reports(events: list[dict[str, Any]], url: str) -> list[str]:
    """What Chromium's DevTools said about the WebSocket to ``url``: the Origin it sent,
    the network layer's error and the console entry."""
    ids = {
        e["params"]["requestId"]
        for e in events
        if e.get("method") == "Network.webSocketCreated" and e["params"]["url"] == url
    }
    reports = []
    for e in events:
        method, params = e.get("method"), e.get("params", {})
        if method == "Log.entryAdded" and url in params["entry"]["text"]:
            entry = params["entry"]
            reports.append(f"console {entry['level']} ({entry['source']}): {entry['text']}")
        elif params.get("requestId") not in ids:
            continue
        elif method == "Network.webSocketWillSendHandshakeRequest":
            origin = params["request"]["headers"].get("Origin")
            reports.append(f"network: handshake request sent with Origin: {origin}")
        elif method == "Network.webSocketHandshakeResponseReceived":
            response = params["response"]
            reports.append(f"network: response {response['status']} {response['statusText']}")
        elif method == "Network.webSocketFrameError":
            reports.append(f"network: webSocketFrameError: {params['errorMessage']}")
    return reports


async def test_browser_cross_origin_upgrade_is_refused_before_the_callable(
    tmp_path: Path,
) -> None:
    """CSWSH: a page from origin A opens a WebSocket to a server that allows only
    another origin. Chromium sends its Origin, the server answers 403 without calling
    the handshake callable, and the page sees only an error and close code 1006."""
    calls: dict[str, list[str | None]] = {"refusing": [], "allowing": []}

    def counting(name: str) -> Any:
        def handshake(request: lightws.Request, response: lightws.Response) -> Any:
            calls[name].append(request.origin)
            return echo_handler

        return handshake

    def page(request: lightws.Request, response: lightws.Response) -> None:
        response.headers["Content-Type"] = "text/html; charset=utf-8"
        response.body = "<!doctype html><title>origin test</title><p>page from origin A"

    async with serve(page, http_fallback=True) as site:
        page_origin = f"http://127.0.0.1:{site.port}"
        async with (
            serve(counting("refusing"), origins=["http://allowed.example"]) as refusing,
            serve(counting("allowing"), origins=[page_origin]) as allowing,
        ):
            urls = [f"ws://127.0.0.1:{s.port}/" for s in (refusing, allowing)]
            async with chromium(tmp_path) as browser:
                session = await browser.open_page(page_origin + "/")
                for domain in ("Log", "Runtime", "Network"):
                    await browser.call(f"{domain}.enable", session=session)
                got = await browser.evaluate(session, ATTEMPTS.replace("URLS", json.dumps(urls)))
                version = (await browser.call("Browser.getVersion"))["product"]
                reports = refusal_reports(browser.events, urls[0])
            failed = refusing.stats().handshakes_failed
    print(f"\n{version} on the refused cross-origin upgrade:")
    print(f"  page saw: {got[0]}")
    for report in reports:
        print(f"  {report}")
    assert got[0] == {"seen": ["error", "close"], "code": 1006}
    assert calls["refusing"] == []  # the callable never ran
    assert failed == 1
    # The control: the same page, a server allowing its origin.
    assert got[1] == {"seen": ["open", "close"], "code": 1000}
    assert calls["allowing"] == [page_origin]  # what Chromium sent as Origin
    assert any("403" in report for report in reports), reports
