"""Where to connect or listen: ``ps://host:port``, ``pss://host:port`` (TLS), ``unix:///path``."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlsplit

from ..errors import ConfigError

DEFAULT_PORT = 7400
T = TypeVar("T")


@dataclass(frozen=True)
class Endpoint:
    scheme: str  # "ps", "pss" or "unix"
    host: str = ""
    port: int = DEFAULT_PORT
    path: str = ""

    @property
    def tls(self) -> bool:
        return self.scheme == "pss"

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix://{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def parse_url(url: str) -> Endpoint:
    """Parse a service URL; raise ConfigError naming what is wrong."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        path = parts.path or parts.netloc
        if not path:
            raise ConfigError(f"{url!r}: a unix URL needs a path, as in unix:///run/ps.sock")
        return Endpoint("unix", path=path)
    if parts.scheme not in ("ps", "pss"):
        raise ConfigError(
            f"{url!r}: unknown scheme {parts.scheme!r}; use ps://host:port, "
            "pss://host:port (TLS) or unix:///path"
        )
    try:
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"{url!r}: bad port ({exc})") from exc
    return Endpoint(parts.scheme, parts.hostname or "127.0.0.1", port or DEFAULT_PORT)


def client_ssl_context(
    cafile: str | None = None, certfile: str | None = None, keyfile: str | None = None
) -> ssl.SSLContext:
    """A verifying client context: the system's CAs, or only ``cafile`` when given; with
    ``certfile`` (and ``keyfile``, unless the key is in ``certfile``) it presents that
    client certificate to a service that asks for one (mutual TLS)."""
    context = _loading(lambda: ssl.create_default_context(cafile=cafile), f"CA file {cafile!r}")
    if certfile is not None:
        _load_cert_chain(context, certfile, keyfile)
    return context


def server_ssl_context(
    certfile: str,
    keyfile: str | None = None,
    client_ca: str | None = None,
    client_cert_required: bool = False,
) -> ssl.SSLContext:
    """The service's context; with ``client_ca`` it asks clients for a certificate and
    verifies it against that CA bundle: always required, or optional (token-only clients
    still connect) when not ``client_cert_required``."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    _load_cert_chain(context, certfile, keyfile)
    if client_ca is not None:
        _loading(lambda: context.load_verify_locations(client_ca), f"client CA file {client_ca!r}")
        context.verify_mode = ssl.CERT_REQUIRED if client_cert_required else ssl.CERT_OPTIONAL
    return context


def _loading(load: Callable[[], T], what: str, hint: str = "check the path") -> T:
    """``load()``, with a ConfigError naming ``what`` failed to load when it fails."""
    try:
        return load()
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the TLS {what}: {exc}; {hint}") from exc


def _load_cert_chain(context: ssl.SSLContext, certfile: str, keyfile: str | None) -> None:
    _loading(
        lambda: context.load_cert_chain(certfile, keyfile),
        f"certificate {certfile!r} / key {keyfile!r}",
        "check the paths and that the key matches the certificate",
    )


async def connect(
    endpoint: Endpoint,
    factory: Callable[[], asyncio.Protocol],
    ssl_context: ssl.SSLContext | None = None,
) -> asyncio.BaseTransport:
    loop = asyncio.get_running_loop()
    if endpoint.scheme == "unix":
        transport, _ = await loop.create_unix_connection(factory, endpoint.path)
        return transport
    context = ssl_context if endpoint.tls else None
    if endpoint.tls and context is None:
        context = client_ssl_context()
    transport, _ = await loop.create_connection(
        factory,
        endpoint.host,
        endpoint.port,
        ssl=context,
        server_hostname=endpoint.host if context is not None else None,
    )
    return transport
