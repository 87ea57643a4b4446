"""Free loopback ports for servers started in other processes."""

from __future__ import annotations

import socket

__all__ = ["free_port"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now.

    The port is released before it is returned, so another process could take it before
    the server under test binds it; that is rare enough on a test machine. Servers in
    this process bind port 0 instead (``support.serve``) and read ``server.port``.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
