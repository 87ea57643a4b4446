"""What the tests share: servers in process, programs in other processes, ports, waiting.

The tests import it as ``support`` (``tests/`` is on ``sys.path``: pytest's default
``prepend`` import mode puts the directory of a rootdir-less test module there, and
tests/ has no ``__init__.py``):

- ``support.server``: ``serve()`` a server on an ephemeral port, ``url()``, and the
  handshakes the tests use (echo, fixed handler, reporting the handler's outcome);
- ``support.rawws``: the one raw WebSocket client, which sends what real clients refuse;
- ``support.process``: ``start()`` a program and wait for its readiness line, ``stop()``
  it (SIGTERM, then kill), ``run_lightws()`` the command line to completion;
- ``support.ports``: ``free_port()`` for servers in other processes;
- ``support.waiting``: ``eventually()``, polling a condition with a deadline.

The most used names are re-exported here.
"""

from __future__ import annotations

from .ports import free_port
from .process import LIGHTWS, ROOT, Process, astart, run_lightws, start
from .server import (
    echo_handler,
    echo_handshake,
    handler_handshake,
    reporting_handshake,
    serve,
    url,
)
from .waiting import eventually

__all__ = [
    "LIGHTWS",
    "ROOT",
    "Process",
    "astart",
    "echo_handler",
    "echo_handshake",
    "eventually",
    "free_port",
    "handler_handshake",
    "reporting_handshake",
    "run_lightws",
    "serve",
    "start",
    "url",
]
