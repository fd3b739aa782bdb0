"""The databases the bridge tests use, and helpers to make and drop their tables.

PostgreSQL and MariaDB are the machine's real servers on 127.0.0.1 (``sql_url`` skips the
test locally, or fails it under CI=true, when one is not listening); SQLite is a file in
the test's tmp_path. MongoDB is the wire stand-in of tests/mongo_standin.py (a real mongod
when PACKETSTACK_MONGO_URL is set). Import as ``from bridge_servers import ...``.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from conftest import require_server
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from packetstack.storage import BridgeSettings

POSTGRES_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
MARIADB_URL = "mysql+asyncmy://root@127.0.0.1:3306/test"
SERVERS = {"postgresql": ("PostgreSQL", 5432), "mariadb": ("MariaDB", 3306)}
SQL_DATABASES = ("sqlite", "postgresql", "mariadb")


def sql_url(database: str, tmp_path: Path) -> str:
    """The URL of ``database`` ("sqlite", "postgresql" or "mariadb"): a file in tmp_path,
    or the machine's server (skipped locally, failed under CI, when it is not running)."""
    if database == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'bridge.db'}"
    name, port = SERVERS[database]
    require_server(name, "127.0.0.1", port)
    return POSTGRES_URL if database == "postgresql" else MARIADB_URL


def settings(url: str, **overrides: Any) -> BridgeSettings:
    """Bridge settings with a short connect timeout (tests never wait 10 s)."""
    options: dict[str, Any] = {"connect_timeout": 3.0, "retries": 1, "retry_delay": 0.01}
    options.update(overrides)
    return BridgeSettings(url=url, **options)


def unique_name(prefix: str = "ps_test") -> str:
    """A table name no other test (or earlier run) uses: lower case, under 30 characters."""
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def engine(url: str) -> AsyncEngine:
    """An engine of the test's own, to prepare, inspect and drop tables beside the bridge."""
    return create_async_engine(url)


async def drop_tables(url: str, tables: Iterable[str]) -> None:
    """DROP TABLE IF EXISTS each of ``tables``."""
    names = list(tables)
    if not names:
        return
    own = engine(url)
    try:
        async with own.begin() as conn:
            quote = conn.dialect.identifier_preparer.quote
            for name in names:
                await conn.execute(sa.text(f"DROP TABLE IF EXISTS {quote(name)}"))
    finally:
        await own.dispose()


async def table_exists(url: str, table: str) -> bool:
    own = engine(url)
    try:
        async with own.connect() as conn:
            return bool(await conn.run_sync(lambda sync: sa.inspect(sync).has_table(table)))
    finally:
        await own.dispose()


async def execute(url: str, *statements: str) -> None:
    """Run SQL statements in one transaction (to pre-create tables the bridge must check)."""
    own = engine(url)
    try:
        async with own.begin() as conn:
            for statement in statements:
                await conn.execute(sa.text(statement))
    finally:
        await own.dispose()


async def fetch(url: str, query: str) -> list[tuple[Any, ...]]:
    own = engine(url)
    try:
        async with own.connect() as conn:
            return [tuple(row) for row in (await conn.execute(sa.text(query))).all()]
    finally:
        await own.dispose()
