"""A free TCP port on the loopback interface, for the servers and databases the tests start."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port nobody listens on now (the kernel's choice); the caller binds it soon after."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
