"""The demo pages and the plain-HTTP answers that serve them."""

from __future__ import annotations

import functools
from importlib import resources

from ..http import Request, Response

__all__ = ["answer_http", "page"]


@functools.cache
def page(name: str) -> bytes:
    """The HTML page of demo ``name`` (``"echo"``, ``"countdown"``, ``"push"`` or
    ``"chat"``)."""
    return resources.files(__package__ or "lightws.demos").joinpath(f"{name}.html").read_bytes()


def answer_http(
    name: str,
    request: Request,
    response: Response,
    substitutions: dict[str, str] | None = None,
    *,
    path: str = "/",
) -> None:
    """Answer a plain HTTP request (``request.upgrade`` is False): ``GET path`` is the
    demo page (whose WebSocket connects to that same path), other paths 404 and other
    methods 405.

    ``substitutions`` replaces placeholders in the page (each key, as written in the
    HTML, by its value).
    """
    response.headers["Content-Type"] = "text/plain; charset=utf-8"
    if request.method != "GET":
        response.status = 405
        response.headers["Allow"] = "GET"
        response.body = b"method not allowed"
    elif request.path != path:
        response.status = 404
        response.body = b"not found"
    else:
        body = page(name)
        for placeholder, value in (substitutions or {}).items():
            body = body.replace(placeholder.encode(), value.encode())
        response.status = 200
        response.headers["Content-Type"] = "text/html; charset=utf-8"
        response.headers["Cache-Control"] = "no-store"
        response.body = body
