"""asyncio transport: frames over TCP, TLS and Unix sockets, with write batching,
backpressure and heartbeats."""

from .endpoints import (
    DEFAULT_PORT,
    Endpoint,
    client_ssl_context,
    connect,
    parse_url,
    server_ssl_context,
)
from .link import Link, LinkOwner
from .loop import run

__all__ = [
    "DEFAULT_PORT",
    "Endpoint",
    "Link",
    "LinkOwner",
    "client_ssl_context",
    "connect",
    "parse_url",
    "run",
    "server_ssl_context",
]
