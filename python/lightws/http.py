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
        remote_address: the peer's ``(host, port)``.
        subprotocols: subprotocols offered in ``Sec-WebSocket-Protocol``, in order.
        upgrade: False for a plain HTTP request shown because of ``http_fallback``.
    """

    __slots__ = (
        "cookies",
        "headers",
        "method",
        "path",
        "query",
        "query_all",
        "remote_address",
        "subprotocols",
        "target",
        "upgrade",
    )

    def __init__(
        self,
        method: str,
        target: str,
        headers: HeadersLike,
        remote_address: tuple[str, int],
        subprotocols: list[str] | None = None,
        upgrade: bool = True,
    ) -> None:
        self.method = method
        self.target = target
        path, _, query = target.partition("?")
        self.path = path
        self.query_all: dict[str, list[str]] = parse_qs(query, keep_blank_values=True)
        self.query: dict[str, str] = {k: v[0] for k, v in self.query_all.items()}
        self.headers = headers if isinstance(headers, Headers) else Headers(headers)
        self.cookies = _parse_cookies(self.headers)
        self.remote_address = remote_address
        self.subprotocols = list(subprotocols or [])
        self.upgrade = upgrade

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.target} from {self.remote_address}>"


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
