"""The handshake's view of HTTP: :class:`Headers`, :class:`Request`, :class:`Response`."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from typing import Union
from urllib.parse import parse_qs

__all__ = ["Headers", "Request", "Response"]

HeadersLike = Union["Headers", Mapping[str, str], Iterable[tuple[str, str]]]


def _check(name: object, value: object) -> tuple[str, str]:
    if not isinstance(name, str):
        raise TypeError(f"header name must be str, not {type(name).__name__}")
    if not isinstance(value, str):
        raise TypeError(f"header {name!r} value must be str, not {type(value).__name__}")
    if not name or any(c in name for c in " \t\r\n:"):
        raise ValueError(f"invalid header name {name!r}")
    if any(c in value for c in "\r\n\0"):
        raise ValueError(f"header {name!r} value must not contain CR, LF or NUL")
    return name, value


class Headers(MutableMapping[str, str]):
    """HTTP headers: a case-insensitive multi-dict that keeps order and spelling.

    ``headers["X"]`` and ``headers.get("x")`` return the first value; ``get_all``
    returns every value; assignment replaces every value of a name; ``add`` appends one.
    """

    __slots__ = ("_items",)

    def __init__(self, items: HeadersLike | None = None) -> None:
        self._items: list[tuple[str, str]] = []
        if items is not None:
            pairs = items.items() if isinstance(items, Mapping) else items
            if isinstance(items, Headers):
                pairs = items.raw_items()
            for name, value in pairs:
                self.add(name, value)

    def __getitem__(self, name: str) -> str:
        key = name.lower()
        for n, v in self._items:
            if n.lower() == key:
                return v
        raise KeyError(name)

    def __setitem__(self, name: str, value: str) -> None:
        name, value = _check(name, value)
        key = name.lower()
        self._items = [(n, v) for n, v in self._items if n.lower() != key]
        self._items.append((name, value))

    def __delitem__(self, name: str) -> None:
        key = name.lower()
        kept = [(n, v) for n, v in self._items if n.lower() != key]
        if len(kept) == len(self._items):
            raise KeyError(name)
        self._items = kept

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        key = name.lower()
        return any(n.lower() == key for n, _ in self._items)

    def __iter__(self) -> Iterator[str]:
        seen: set[str] = set()
        for n, _ in self._items:
            if n.lower() not in seen:
                seen.add(n.lower())
                yield n

    def __len__(self) -> int:
        return len({n.lower() for n, _ in self._items})

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Headers):
            return [(n.lower(), v) for n, v in self._items] == [
                (n.lower(), v) for n, v in other._items
            ]
        if isinstance(other, Mapping):
            return dict(self.items()) == dict(other.items())
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def get_all(self, name: str) -> list[str]:
        """Every value of ``name``, in order (empty list if absent)."""
        key = name.lower()
        return [v for n, v in self._items if n.lower() == key]

    def add(self, name: str, value: str) -> None:
        """Append a header line, keeping existing ones (e.g. several Set-Cookie)."""
        self._items.append(_check(name, value))

    def raw_items(self) -> list[tuple[str, str]]:
        """Every header line as ``(name, value)``, in order, duplicates included."""
        return list(self._items)

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"


def _parse_cookies(headers: Headers) -> dict[str, str]:
    cookies: dict[str, str] = {}
    for line in headers.get_all("Cookie"):
        for part in line.split(";"):
            name, sep, value = part.strip().partition("=")
            if sep and name and name not in cookies:
                value = value.strip()
                if len(value) >= 2 and value[0] == value[-1] == '"':
                    value = value[1:-1]
                cookies[name] = value
    return cookies


class Request:
    """The client's upgrade request, as seen by the handshake callable.

    Attributes:
        method: ``"GET"`` for upgrades.
        target: the request target as sent, e.g. ``"/echo?reverse=1"``.
        path: the target up to ``?``.
        query: first value of each query parameter.
        query_all: every value of each query parameter.
        headers: case-insensitive :class:`Headers`.
        cookies: cookies from the ``Cookie`` header.
        remote_address: the peer's ``(host, port)``; behind a proxy listed in
            ``Config.trusted_proxies``, the client's address from ``X-Forwarded-For``
            with port 0.
        origin: the ``Origin`` header (sent by browsers), or None.
        subprotocols: subprotocols offered in ``Sec-WebSocket-Protocol``, in order.
        upgrade: False for a plain HTTP request shown because of ``http_fallback``.

    ``headers``, ``query``, ``query_all`` and ``cookies`` are parsed on first use. A
    request stays reachable as ``conn.request`` for the connection's life, so after the
    handshake lightws keeps only the raw head and drops those parsed forms (they are
    parsed again if used): an idle connection carries no header objects.
    """

    __slots__ = (
        "_cookies",
        "_headers",
        "_query_all",
        "_raw_headers",
        "_subprotocols",
        "method",
        "remote_address",
        "target",
        "upgrade",
    )

    def __init__(
        self,
        method: str,
        target: str,
        headers: HeadersLike | str,
        remote_address: tuple[str, int],
        subprotocols: list[str] | tuple[str, ...] | None = None,
        upgrade: bool = True,
    ) -> None:
        self.method = method
        self.target = target
        self.remote_address = remote_address
        self.upgrade = upgrade
        self._subprotocols = tuple(subprotocols or ())
        self._raw_headers: str | None = None
        self._headers: Headers | None = None
        self._query_all: dict[str, list[str]] | None = None
        self._cookies: dict[str, str] | None = None
        if isinstance(headers, str):
            self._raw_headers = headers
        elif isinstance(headers, Headers):
            self._headers = headers
        else:
            self._headers = Headers(headers)

    @property
    def path(self) -> str:
        """The target up to ``?``."""
        return self.target.partition("?")[0]

    @property
    def headers(self) -> Headers:
        """Request headers (case-insensitive; ``get``/``get_all``)."""
        if self._headers is None:
            self._headers = _parse_raw_headers(self._raw_headers or "")
        return self._headers

    @property
    def origin(self) -> str | None:
        """The ``Origin`` header, e.g. ``"https://app.example"``; None if absent.

        Browsers send it with every WebSocket handshake and scripts cannot change it;
        other clients may send anything. ``Config.origins`` checks it before the
        handshake callable runs.
        """
        return self.headers.get("Origin")

    @property
    def query_all(self) -> dict[str, list[str]]:
        """Every value of each query parameter."""
        if self._query_all is None:
            self._query_all = parse_qs(self.target.partition("?")[2], keep_blank_values=True)
        return self._query_all

    @property
    def query(self) -> dict[str, str]:
        """The first value of each query parameter."""
        return {k: v[0] for k, v in self.query_all.items()}

    @property
    def cookies(self) -> dict[str, str]:
        """Cookies from the ``Cookie`` header(s)."""
        if self._cookies is None:
            self._cookies = _parse_cookies(self.headers)
        return self._cookies

    @property
    def subprotocols(self) -> list[str]:
        """Subprotocols the client offered, in order."""
        return list(self._subprotocols)

    def _compact(self) -> None:
        """Drop parsed forms that can be rebuilt from the raw head."""
        if self._raw_headers is not None:
            self._headers = None
            self._cookies = None
        self._query_all = None

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.target} from {self.remote_address}>"


def _parse_raw_headers(raw: str) -> Headers:
    headers = Headers()
    items = headers._items
    for line in raw.split("\r\n"):
        name, sep, value = line.partition(": ")
        if sep:
            items.append((name, value))
    return headers


class Response:
    """What the handshake callable answers with.

    On accept (the callable returns a handler), ``headers`` are added to the 101
    response and ``subprotocol`` (one of ``request.subprotocols``) is confirmed to the
    client. On reject (it returns ``None``), ``status`` (default 403), ``headers`` and
    ``body`` are sent and the connection is closed.
    """

    __slots__ = ("_body", "headers", "status", "subprotocol")

    def __init__(self) -> None:
        self.status: int | None = None
        self.headers = Headers()
        self._body = b""
        self.subprotocol: str | None = None

    @property
    def body(self) -> bytes:
        """Response body for a rejection (a ``str`` is stored UTF-8 encoded)."""
        return self._body

    @body.setter
    def body(self, value: bytes | bytearray | memoryview | str) -> None:
        if isinstance(value, str):
            value = value.encode()
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise TypeError(f"response.body must be bytes or str, not {type(value).__name__}")
        self._body = bytes(value)

    def __repr__(self) -> str:
        return f"<Response status={self.status} headers={self.headers.raw_items()!r}>"
