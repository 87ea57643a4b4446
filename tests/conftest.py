"""Pytest hooks and fixtures: both event loops, and an echo server.

Every async test runs once on the default asyncio loop and once on uvloop (through
pytest-asyncio's ``pytest_asyncio_loop_factories`` hook), unless it is marked
``asyncio_loop_only``. The helpers the tests import live in the ``support`` package.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import lightws
import pytest
from support import echo_handshake, serve

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is Unix only
    uvloop = None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "asyncio_loop_only: run on the default asyncio loop only, not uvloop"
    )


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    factories: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
        "asyncio": asyncio.new_event_loop
    }
    if uvloop is not None and item.get_closest_marker("asyncio_loop_only") is None:
        factories["uvloop"] = uvloop.new_event_loop
    return factories


@pytest.fixture
async def echo_server() -> AsyncIterator[lightws.Server]:
    async with serve(echo_handshake, max_msg_len=4 << 20) as server:
        yield server
