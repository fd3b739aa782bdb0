"""The SQL bridge on SQLite, PostgreSQL and MariaDB: the column types of its tables, the
check of tables that exist already, data the database refuses, a database that cannot be
reached, passwords kept out of errors, and URLs that are not usable.

What every store does (round trips, deletes, iteration) is the conformance suite's job
(test_store_conformance.py); this file is about what is particular to SQL.
"""

from __future__ import annotations

import asyncio
import datetime
import decimal
import socket
import threading
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Annotated, Any

import msgspec
import pytest
import sqlalchemy as sa
from bridge_servers import (
    MARIADB_URL,
    POSTGRES_URL,
    SERVERS,
    SQL_DATABASES,
    closed_port,
    drop_tables,
    engine,
    fetch,
    settings,
    sql_url,
    unique_name,
)
from conftest import require_server
from sqlalchemy.dialects import mysql, postgresql
from support import TcpProxy, eventually

from packetstack.codec import encode
from packetstack.errors import (
    BridgeRejected,
    BridgeSchemaError,
    BridgeUnavailable,
    ConfigError,
)
from packetstack.storage import MapBridge, MapSpec, make_store, resolve
from packetstack.storage.sql import SQLStore
from packetstack.testing import AllTypes, Colour, Inner

PASSWORD = "s3cret"


class Typed(AllTypes, kw_only=True):
    """The conformance suite's value with a field of every type, and a str of bounded
    length."""

    code: Annotated[str, msgspec.Meta(max_length=12)]


TYPED = Typed(
    count=2**62,
    ratio=0.1,
    code="ABC-123",
    text="ünïcødé",
    flag=True,
    blob=b"\x00\xff",
    naive=datetime.datetime(2024, 5, 6, 7, 8, 9, 123456),
    aware=datetime.datetime(
        2024, 5, 6, 7, 8, 9, 654321, tzinfo=datetime.timezone(datetime.timedelta(hours=2))
    ),
    day=datetime.date(2024, 5, 6),
    clock=datetime.time(7, 8, 9, 123456),
    amount=decimal.Decimal("12345678901234567890.123456789"),
    ident=uuid.UUID("3f1c9d1e-8a4b-4c2d-9e0f-0123456789ab"),
    inner=Inner(name="n", tags=["a", "b"]),
    numbers=[1, 2, 3],
    weights={"w": 0.5},
    colour=Colour.RED,
    maybe_count=None,
    maybe_text=None,
    maybe_day=None,
)


class Small(msgspec.Struct):
    count: int
    text: str


class Named(msgspec.Struct):
    text: str
    n: int


def spec(
    name: str, value_type: type | None = None, *, mode: str = "document", key: str = "str"
) -> MapSpec:
    return resolve(name, MapBridge(bridge="b", mode=mode, type=value_type, key=key))  # type: ignore[arg-type]


class Database:
    """One SQL database for one test: its URL, tables dropped and stores closed at the end."""

    def __init__(self, kind: str, url: str) -> None:
        self.kind = kind
        self.url = url
        self.tables: list[str] = []
        self.stores: list[SQLStore] = []

    def table(self) -> str:
        name = unique_name("ps_sql")
        self.tables.append(name)
        return name

    async def open(self, *maps: MapSpec, **overrides: Any) -> SQLStore:
        store = SQLStore("b", settings(self.url, **overrides))
        self.stores.append(store)
        await store.open(list(maps))
        return store

    async def create(self, name: str, *columns: sa.Column[Any]) -> sa.Table:
        """Create a table the test's own way (before the bridge sees it)."""
        table = sa.Table(name, sa.MetaData(), *columns)
        own = engine(self.url)
        try:
            async with own.begin() as conn:
                await conn.run_sync(table.metadata.create_all)
        finally:
            await own.dispose()
        return table

    async def insert(self, table: sa.Table, *rows: dict[str, Any]) -> None:
        own = engine(self.url)
        try:
            async with own.begin() as conn:
                await conn.execute(sa.insert(table), list(rows))
        finally:
            await own.dispose()

    async def rows(self, table: str) -> list[tuple[Any, ...]]:
        quoted = sa.table(table)
        own = engine(self.url)
        try:
            async with own.connect() as conn:
                result = await conn.execute(sa.select(sa.text("*")).select_from(quoted))
                return sorted(tuple(row) for row in result.all())
        finally:
            await own.dispose()

    async def inspect(self, table: str) -> tuple[dict[str, dict[str, Any]], list[str]]:
        """(columns by name, primary key columns) of a table, through SQLAlchemy."""
        own = engine(self.url)
        try:
            async with own.connect() as conn:

                def read(sync: sa.Connection) -> tuple[dict[str, dict[str, Any]], list[str]]:
                    inspector = sa.inspect(sync)
                    columns = {c["name"]: dict(c) for c in inspector.get_columns(table)}
                    primary = inspector.get_pk_constraint(table)["constrained_columns"]
                    return columns, list(primary)

                return await conn.run_sync(read)
        finally:
            await own.dispose()

    async def shape(self, table: str) -> list[tuple[str, str, bool]]:
        columns, primary = await self.inspect(table)
        return [(n, repr(c["type"]), n in primary) for n, c in columns.items()]


@pytest.fixture(params=SQL_DATABASES)
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    database = Database(request.param, sql_url(request.param, tmp_path))
    try:
        yield database
    finally:
        for store in database.stores:
            await store.close()
        await drop_tables(database.url, database.tables)


# ------------------------------------------------------------------ column types


def expect_type(found: Any, kind: type, **attributes: Any) -> None:
    assert isinstance(found, kind), f"{found!r} is not a {kind.__name__}"
    for name, value in attributes.items():
        assert getattr(found, name) == value, f"{found!r}: {name} is not {value!r}"


# For each dialect: field -> (SQLAlchemy type class, attributes it must have).
COLUMN_TYPES: dict[str, dict[str, tuple[type, dict[str, Any]]]] = {
    "postgresql": {
        "key": (sa.BIGINT, {}),
        "count": (sa.BIGINT, {}),
        "ratio": (postgresql.DOUBLE_PRECISION, {}),
        "text": (sa.TEXT, {}),
        "flag": (sa.BOOLEAN, {}),
        "blob": (postgresql.BYTEA, {}),
        "naive": (postgresql.TIMESTAMP, {"timezone": False}),
        "aware": (postgresql.TIMESTAMP, {"timezone": True}),
        "day": (sa.DATE, {}),
        "clock": (postgresql.TIME, {"timezone": False}),
        "amount": (sa.NUMERIC, {"precision": None, "scale": None}),
        "ident": (sa.UUID, {}),
        "numbers": (postgresql.JSON, {}),  # JSON (or JSONB, a subclass)
        "weights": (postgresql.JSON, {}),
        "inner": (postgresql.JSON, {}),
        "colour": (postgresql.JSON, {}),
        "maybe_count": (sa.BIGINT, {}),
        "maybe_text": (sa.TEXT, {}),
        "maybe_day": (sa.DATE, {}),
        "maybe_inner": (postgresql.JSON, {}),
        "code": (sa.VARCHAR, {"length": 12}),
    },
    "mariadb": {
        "key": (mysql.BIGINT, {}),
        "count": (mysql.BIGINT, {}),
        "ratio": (mysql.DOUBLE, {}),
        "text": (mysql.TEXT, {}),
        "flag": (mysql.TINYINT, {"display_width": 1}),
        "blob": (mysql.LONGBLOB, {}),
        "naive": (mysql.DATETIME, {"fsp": 6}),
        "aware": (mysql.DATETIME, {"fsp": 6}),
        "day": (sa.DATE, {}),
        "clock": (mysql.TIME, {"fsp": 6}),
        "amount": (mysql.VARCHAR, {"length": 100}),
        "ident": (sa.UUID, {}),
        "numbers": (mysql.LONGTEXT, {}),  # MariaDB's JSON: LONGTEXT CHECK (json_valid(...))
        "weights": (mysql.LONGTEXT, {}),
        "inner": (mysql.LONGTEXT, {}),
        "colour": (mysql.LONGTEXT, {}),
        "maybe_count": (mysql.BIGINT, {}),
        "maybe_text": (mysql.TEXT, {}),
        "maybe_day": (sa.DATE, {}),
        "maybe_inner": (mysql.LONGTEXT, {}),
        "code": (mysql.VARCHAR, {"length": 12}),
    },
    "sqlite": {
        "key": (sa.BIGINT, {}),
        "count": (sa.BIGINT, {}),
        "ratio": (sa.DOUBLE, {}),
        "text": (sa.TEXT, {}),
        "flag": (sa.BOOLEAN, {}),
        "blob": (sa.BLOB, {}),
        "naive": (sa.DATETIME, {}),
        "aware": (sa.DATETIME, {}),
        "day": (sa.DATE, {}),
        "clock": (sa.TIME, {}),
        "amount": (sa.VARCHAR, {"length": 100}),
        "ident": (sa.CHAR, {"length": 32}),
        "numbers": (sa.JSON, {}),
        "weights": (sa.JSON, {}),
        "inner": (sa.JSON, {}),
        "colour": (sa.JSON, {}),
        "maybe_count": (sa.BIGINT, {}),
        "maybe_text": (sa.TEXT, {}),
        "maybe_day": (sa.DATE, {}),
        "maybe_inner": (sa.JSON, {}),
        "code": (sa.VARCHAR, {"length": 12}),
    },
}


async def test_typed_table_columns_have_the_right_sql_types(db: Database) -> None:
    name = db.table()
    await db.open(spec(name, Typed, mode="typed", key="int"))
    columns, primary = await db.inspect(name)
    expected = COLUMN_TYPES[db.kind]
    assert list(columns) == list(expected)  # the key column first, then the fields in order
    assert primary == ["key"]
    for column, (kind, attributes) in expected.items():
        expect_type(columns[column]["type"], kind, **attributes)
        assert columns[column]["nullable"] is column.startswith("maybe_"), column
    if db.kind == "mariadb":
        ((_, created),) = await fetch(db.url, f"SHOW CREATE TABLE `{name}`")
        assert "json_valid(`inner`)" in created and "json_valid(`numbers`)" in created


async def test_typed_values_keep_microseconds_decimals_and_zones(db: Database) -> None:
    name = db.table()
    store = await db.open(spec(name, Typed, mode="typed", key="int"))
    await store.write(name, [(encode(1), encode(TYPED))], [])
    loaded = await store.load(name, encode(1))
    assert loaded is not None
    assert msgspec.msgpack.decode(loaded, type=Typed) == TYPED
    ((naive, aware, clock, amount),) = await fetch(
        db.url, f"SELECT naive, aware, clock, amount FROM {name}"
    )
    if db.kind == "sqlite":  # text, as SQLAlchemy writes it (a raw query does not parse it)
        assert (naive, clock) == ("2024-05-06 07:08:09.123456", "07:08:09.123456")
        assert aware == "2024-05-06 05:08:09.654321"  # the instant in UTC
        assert amount == "12345678901234567890.123456789"
        return
    assert naive == TYPED.naive  # microseconds kept (DATETIME(6) on MariaDB)
    if db.kind == "mariadb":  # the driver gives TIME as a timedelta
        assert clock == datetime.timedelta(hours=7, minutes=8, seconds=9, microseconds=123456)
    else:
        assert clock == TYPED.clock
    if db.kind == "postgresql":
        assert aware == TYPED.aware and aware.tzinfo is not None  # timestamptz
        assert amount == TYPED.amount  # NUMERIC, exact
        ((text,),) = await fetch(db.url, f"SELECT amount::text FROM {name}")
        assert text == "12345678901234567890.123456789"
    else:
        # No zone in the column: the instant in UTC, microseconds kept.
        assert aware == TYPED.aware.astimezone(datetime.UTC).replace(tzinfo=None)
        assert amount == "12345678901234567890.123456789"


KEY_TYPES: dict[str, dict[str, tuple[type, dict[str, Any]]]] = {
    "postgresql": {
        "str": (sa.TEXT, {}),
        "int": (sa.BIGINT, {}),
        "bytes": (postgresql.BYTEA, {}),
        "tuple": (sa.TEXT, {}),
    },
    "mariadb": {
        "str": (mysql.VARCHAR, {"length": 255}),
        "int": (mysql.BIGINT, {}),
        "bytes": (mysql.VARBINARY, {"length": 255}),
        "tuple": (mysql.VARCHAR, {"length": 255}),
    },
    "sqlite": {
        "str": (sa.TEXT, {}),
        "int": (sa.BIGINT, {}),
        "bytes": (sa.BLOB, {}),
        "tuple": (sa.TEXT, {}),
    },
}
DOCUMENT_TYPES: dict[str, tuple[type, dict[str, Any]]] = {
    "postgresql": (postgresql.JSON, {}),
    "mariadb": (mysql.LONGTEXT, {"collation": "utf8mb4_bin"}),
    "sqlite": (sa.JSON, {}),
}


@pytest.mark.parametrize("key", ["str", "int", "bytes", "tuple"])
async def test_document_table_is_a_key_and_a_json_column(db: Database, key: str) -> None:
    name = db.table()
    await db.open(spec(name, key=key))
    columns, primary = await db.inspect(name)
    assert list(columns) == ["key", "value"]
    assert primary == ["key"]
    kind, attributes = KEY_TYPES[db.kind][key]
    expect_type(columns["key"]["type"], kind, **attributes)
    kind, attributes = DOCUMENT_TYPES[db.kind]
    expect_type(columns["value"]["type"], kind, **attributes)
    assert not columns["key"]["nullable"] and not columns["value"]["nullable"]


# ------------------------------------------------------------------ existing tables


def key_column(kind: Any = None) -> sa.Column[Any]:
    return sa.Column("key", kind if kind is not None else sa.String(255), primary_key=True)


# case -> (map, the table's columns, a row to put in it, what the message must name)
MISFITS: dict[
    str, tuple[Callable[[str], MapSpec], Callable[[], list[Any]], dict[str, Any], list[str]]
] = {
    "missing column": (
        lambda n: spec(n, Small, mode="typed"),
        lambda: [key_column(), sa.Column("count", sa.BigInteger, nullable=False)],
        {"key": "k", "count": 1},
        ["column 'text' is missing"],
    ),
    "wrong type": (
        lambda n: spec(n, Small, mode="typed"),
        lambda: [key_column(), sa.Column("count", sa.String(20)), sa.Column("text", sa.Text)],
        {"key": "k", "count": "one", "text": "t"},
        ["column 'count' is", "must hold int"],
    ),
    "wrong key type": (
        lambda n: spec(n, Small, mode="typed", key="int"),
        lambda: [key_column(), sa.Column("count", sa.BigInteger), sa.Column("text", sa.Text)],
        {"key": "k", "count": 1, "text": "t"},
        ["column 'key' is", "must hold int"],
    ),
    "wrong primary key": (
        lambda n: spec(n, Small, mode="typed"),
        lambda: [
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
            sa.Column("key", sa.String(255), nullable=False),
            sa.Column("count", sa.BigInteger),
            sa.Column("text", sa.Text),
        ],
        {"id": 1, "key": "k", "count": 1, "text": "t"},
        ["the primary key is ['id']", "not ['key']"],
    ),
    "no primary key": (
        lambda n: spec(n, Small, mode="typed"),
        lambda: [
            sa.Column("key", sa.String(255), nullable=False),
            sa.Column("count", sa.BigInteger),
            sa.Column("text", sa.Text),
        ],
        {"key": "k", "count": 1, "text": "t"},
        ["the primary key is []", "not ['key']"],
    ),
    "extra NOT NULL column": (
        lambda n: spec(n, Small, mode="typed"),
        lambda: [
            key_column(),
            sa.Column("count", sa.BigInteger),
            sa.Column("text", sa.Text),
            sa.Column("owner", sa.String(20), nullable=False),
        ],
        {"key": "k", "count": 1, "text": "t", "owner": "o"},
        ["column 'owner' is NOT NULL without a default"],
    ),
    "document value column missing": (
        lambda n: spec(n),
        lambda: [key_column(), sa.Column("data", sa.Text)],
        {"key": "k", "data": "{}"},
        ["column 'value' is missing"],
    ),
    "several problems": (
        lambda n: spec(n, Small, mode="typed"),
        lambda: [key_column(), sa.Column("count", sa.Date)],
        {"key": "k", "count": datetime.date(2024, 1, 1)},
        ["column 'count' is", "must hold int", "column 'text' is missing"],
    ),
}


@pytest.mark.parametrize("case", MISFITS)
async def test_existing_table_that_does_not_fit_is_refused(db: Database, case: str) -> None:
    make_spec, columns, row, named = MISFITS[case]
    name = db.table()
    table = await db.create(name, *columns())
    await db.insert(table, row)
    shape, rows = await db.shape(name), await db.rows(name)
    with pytest.raises(BridgeSchemaError) as caught:
        await db.open(make_spec(name))
    message = str(caught.value)
    assert isinstance(caught.value, ConfigError)
    assert repr(name) in message
    for part in named:
        assert part in message, f"{part!r} not in {message!r}"
    # Nothing was changed: not the table, not its rows.
    assert await db.shape(name) == shape
    assert await db.rows(name) == rows


async def test_existing_table_that_fits_is_kept_as_it_is(db: Database) -> None:
    """VARCHAR for a str field, INTEGER for an int, extra columns that are nullable or
    have a default: the bridge writes into it and leaves the extra columns alone."""
    name = db.table()
    table = await db.create(
        name,
        key_column(),
        sa.Column("count", sa.Integer, nullable=False),
        sa.Column("text", sa.String(50), nullable=False),
        sa.Column("note", sa.String(20)),
        sa.Column("origin", sa.String(20), nullable=False, server_default="legacy"),
    )
    await db.insert(table, {"key": "old", "count": 1, "text": "t", "note": "kept"})
    store = await db.open(spec(name, Small, mode="typed"))
    await store.write(name, [(encode("new"), encode(Small(2, "u")))], [])
    await store.write(name, [(encode("old"), encode(Small(3, "v")))], [])
    assert await db.rows(name) == [
        ("new", 2, "u", None, "legacy"),
        ("old", 3, "v", "kept", "legacy"),
    ]
    loaded = await store.load_many(name, [encode("old"), encode("new")])
    assert {k: msgspec.msgpack.decode(v, type=Small) for k, v in loaded.items()} == {
        encode("old"): Small(3, "v"),
        encode("new"): Small(2, "u"),
    }


class Aware(msgspec.Struct):
    at: Annotated[datetime.datetime, msgspec.Meta(tz=True)]


class Moment(msgspec.Struct):
    at: datetime.datetime


class Clock(msgspec.Struct):
    at: datetime.time


# Columns of the right kind that would still change the values: dialect, map value type,
# the column's type, and a value that would not come back as it went in.
LOSSY_COLUMNS: dict[str, tuple[str, type, Any, Any]] = {
    "timestamp without zone for a tz-aware field": (
        "postgresql",
        Aware,
        sa.DateTime(timezone=False),
        Aware(datetime.datetime(2024, 1, 1, 12, 0, 0, 5, tzinfo=datetime.UTC)),
    ),
    "timestamptz for a naive field": (
        "postgresql",
        Moment,
        sa.DateTime(timezone=True),
        Moment(datetime.datetime(2024, 1, 1, 12, 0, 0, 5)),
    ),
    "DATETIME without microseconds": (
        "mariadb",
        Moment,
        mysql.DATETIME(),
        Moment(datetime.datetime(2024, 1, 1, 12, 0, 0, 123456)),
    ),
    "TIME without microseconds": (
        "mariadb",
        Clock,
        mysql.TIME(),
        Clock(datetime.time(12, 0, 0, 123456)),
    ),
}


@pytest.mark.parametrize("case", LOSSY_COLUMNS)
async def test_existing_column_that_would_change_values_is_refused(
    case: str, tmp_path: Path
) -> None:
    dialect, value_type, column_type, value = LOSSY_COLUMNS[case]
    database = Database(dialect, sql_url(dialect, tmp_path))
    name = database.table()
    try:
        await database.create(name, key_column(), sa.Column("at", column_type, nullable=False))
        try:
            store = await database.open(spec(name, value_type, mode="typed"))
        except BridgeSchemaError as exc:
            assert repr(name) in str(exc)
            assert "column 'at' is" in str(exc)
            return
        await store.write(name, [(encode("k"), encode(value))], [])
        loaded = await store.load(name, encode("k"))
        got = None if loaded is None else msgspec.msgpack.decode(loaded, type=value_type)
        pytest.fail(f"open() took a {column_type!r} column: {value!r} came back as {got!r}")
    finally:
        for opened in database.stores:
            await opened.close()
        await drop_tables(database.url, database.tables)


async def test_a_struct_field_named_like_the_key_column_is_a_config_error(db: Database) -> None:
    class Clash(msgspec.Struct):
        key: str

    with pytest.raises(ConfigError, match="key_column"):
        await db.open(spec(db.table(), Clash, mode="typed"))


# ------------------------------------------------------------------ refused data


async def require_strict_mode(db: Database) -> None:
    if db.kind == "mariadb":
        ((mode,),) = await fetch(db.url, "SELECT @@sql_mode")
        if "STRICT_TRANS_TABLES" not in mode and "STRICT_ALL_TABLES" not in mode:
            pytest.skip(f"MariaDB is not in strict mode (sql_mode = {mode!r}): it truncates")


async def test_a_value_too_long_for_its_column_is_rejected(db: Database) -> None:
    await require_strict_mode(db)
    name = db.table()
    await db.create(
        name,
        key_column(),
        sa.Column("text", sa.String(5), nullable=False),
        sa.Column("n", sa.BigInteger, nullable=False),
    )
    store = await db.open(spec(name, Named, mode="typed"))  # str field, VARCHAR(5): fits
    batch = [
        (encode("a"), encode(Named("short", 1))),
        (encode("b"), encode(Named("much too long", 2))),
        (encode("c"), encode(Named("ok", 3))),
    ]
    if db.kind == "sqlite":  # SQLite does not enforce lengths: it keeps the whole value
        await store.write(name, batch, [])
        assert await db.rows(name) == [("a", "short", 1), ("b", "much too long", 2), ("c", "ok", 3)]
        loaded = await store.load(name, encode("b"))
        assert loaded is not None
        assert msgspec.msgpack.decode(loaded, type=Named) == Named("much too long", 2)
        return
    with pytest.raises(BridgeRejected) as caught:
        await store.write(name, batch, [])
    assert repr(name) in str(caught.value)
    assert await db.rows(name) == []  # one transaction: none of the batch went in
    await store.write(name, [batch[0], batch[2]], [])  # the others, without the culprit
    assert await db.rows(name) == [("a", "short", 1), ("c", "ok", 3)]


class Count(msgspec.Struct):
    n: int


# case -> (map settings, an entry some databases cannot hold, a good entry, the databases
# that refuse the first; the others must keep it exactly).
Pair = tuple[Any, Any]
UNUSUAL: dict[str, tuple[dict[str, Any], Pair, Pair, set[str]]] = {
    "int over 64 bits in a column": (
        {"value_type": Count, "mode": "typed"},
        ("k", Count(2**64 - 1)),
        ("good", Count(1)),
        {"sqlite", "postgresql", "mariadb"},
    ),
    "int key over 64 bits": (
        {"key": "int"},
        (2**64 - 1, 1),
        (1, 1),
        {"sqlite", "postgresql", "mariadb"},
    ),
    "NUL in a str": (
        {"value_type": Named, "mode": "typed"},
        ("k", Named("a\x00b", 1)),
        ("good", Named("ok", 2)),
        {"postgresql"},
    ),
    "NUL in a str key": ({}, ("a\x00b", 1), ("good", 2), {"postgresql"}),
    "str key over 255 characters": ({}, ("x" * 300, 1), ("good", 2), {"mariadb"}),
}


@pytest.mark.parametrize("case", UNUSUAL)
async def test_data_the_database_cannot_hold_is_rejected(db: Database, case: str) -> None:
    """Refused data is BridgeRejected (set aside, not retried) and its batch writes
    nothing; what a database can hold comes back exactly."""
    await require_strict_mode(db)
    options, (key, value), (good_key, good_value), refusing = UNUSUAL[case]
    name = db.table()
    store = await db.open(spec(name, **options))
    batch = [(encode(good_key), encode(good_value)), (encode(key), encode(value))]
    if db.kind in refusing:
        with pytest.raises(BridgeRejected) as caught:
            await store.write(name, batch, [])
        assert repr(name) in str(caught.value)
        assert await db.rows(name) == []
        return
    await store.write(name, batch, [])
    loaded = await store.load(name, encode(key))
    assert loaded is not None
    assert msgspec.msgpack.decode(loaded, type=type(value)) == value


# ------------------------------------------------------------------ unreachable


DIALECT_URLS = {
    "postgresql": "postgresql+asyncpg://postgres:{password}@127.0.0.1:{port}/test",
    "mariadb": "mysql+asyncmy://root:{password}@127.0.0.1:{port}/test",
}


def assert_no_password(exc: BaseException) -> None:
    """Neither the message nor the whole chain as a log would print it shows the password."""
    assert PASSWORD not in str(exc)
    assert PASSWORD not in repr(exc)
    assert PASSWORD not in "".join(traceback.format_exception(exc))


@pytest.mark.parametrize("dialect", DIALECT_URLS)
async def test_closed_port_is_unavailable_on_open_and_on_write(dialect: str) -> None:
    url = DIALECT_URLS[dialect].format(password=PASSWORD, port=closed_port())
    store = SQLStore("b", settings(url, connect_timeout=1.0))
    name = unique_name()
    started = time.monotonic()
    try:
        with pytest.raises(BridgeUnavailable) as opening:
            await store.open([spec(name)])
        assert_no_password(opening.value)
        assert "bridge 'b'" in str(opening.value)
        assert "***" in str(opening.value)  # the URL is shown, without its password
        with pytest.raises(BridgeUnavailable) as writing:
            await store.write(name, [(encode("k"), encode(1))], [])
        assert_no_password(writing.value)
        with pytest.raises(BridgeUnavailable) as loading:
            await store.load(name, encode("k"))
        assert_no_password(loading.value)
    finally:
        await store.close()
    assert time.monotonic() - started < 10


async def test_sqlite_file_that_cannot_be_opened_is_unavailable(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'no such directory' / 'bridge.db'}"
    store = SQLStore("b", settings(url))
    try:
        with pytest.raises(BridgeUnavailable):
            await store.open([spec("m")])
        with pytest.raises(BridgeUnavailable):
            await store.write("m", [(encode("k"), encode(1))], [])
    finally:
        await store.close()
        # aiosqlite stops the worker thread of a connection that failed to open without
        # waiting for it; the thread then reports to the loop, which must still be open.
        await eventually(lambda: not _aiosqlite_threads(), timeout=5.0)


def _aiosqlite_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if "_connection_worker_thread" in t.name]


class SilentServer:
    """Accepts connections and never says a word (a database host that hangs)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = int(self.sock.getsockname()[1])

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("dialect", DIALECT_URLS)
async def test_a_server_that_never_answers_is_unavailable_in_bounded_time(dialect: str) -> None:
    """A host that accepts connections and never speaks: open() gives up within
    connect_timeout + timeout (asyncmy bounds only the TCP connect by itself), and so do
    writes."""
    silent = SilentServer()
    url = DIALECT_URLS[dialect].format(password=PASSWORD, port=silent.port)
    store = SQLStore("b", settings(url, connect_timeout=1.0, timeout=2.0))
    try:
        async with asyncio.timeout(20):
            started = time.monotonic()
            with pytest.raises(BridgeUnavailable) as opening:
                await store.open([spec("m")])
            assert time.monotonic() - started < 1.0 + 2.0 + 2.0
            assert_no_password(opening.value)
            started = time.monotonic()
            with pytest.raises(BridgeUnavailable) as writing:
                await store.write("m", [(encode("k"), encode(1))], [])
            assert time.monotonic() - started < 2.0 + 2.0
            assert_no_password(writing.value)
    finally:
        await store.close()
        silent.close()


@pytest.mark.parametrize("database", ["postgresql", "mariadb"])
async def test_database_gone_after_open_is_unavailable(database: str) -> None:
    """Through a proxy that is then shut: writes and reads raise BridgeUnavailable."""
    label, port = SERVERS[database]
    require_server(label, "127.0.0.1", port)
    proxy = TcpProxy(port)
    await proxy.start()
    base = POSTGRES_URL if database == "postgresql" else MARIADB_URL
    url = base.replace(f":{port}/", f":{proxy.port}/")
    name = unique_name()
    store = SQLStore("b", settings(url, connect_timeout=2.0))
    try:
        await store.open([spec(name)])
        await store.write(name, [(encode("k"), encode(1))], [])
        await proxy.close()
        async with asyncio.timeout(30):
            with pytest.raises(BridgeUnavailable):
                await store.write(name, [(encode("k2"), encode(2))], [])
            with pytest.raises(BridgeUnavailable):
                await store.load_many(name, [encode("k")])
            with pytest.raises(BridgeUnavailable):
                async for _ in store.iterate(name):
                    pass
    finally:
        await proxy.close()
        await store.close()
        await drop_tables(base, [name])


# ------------------------------------------------------------------ URLs


CONFIG_ERRORS = {
    "not a URL": "not a url",
    "empty": "",
    "unknown dialect": f"oracle://scott:{PASSWORD}@127.0.0.1/db",
    "unknown scheme": "foo://127.0.0.1/db",
    "unknown driver": f"postgresql+nosuchdriver://u:{PASSWORD}@127.0.0.1/test",
    "driver not installed": f"mysql+pymysql://u:{PASSWORD}@127.0.0.1/test",
    "port not a number": f"postgresql+asyncpg://u:{PASSWORD}@127.0.0.1:notaport/test",
    "sync driver": "sqlite:///{tmp_path}/bridge.db",
}


@pytest.mark.parametrize("case", CONFIG_ERRORS)
async def test_unusable_url_is_a_config_error(case: str, tmp_path: Path) -> None:
    url = CONFIG_ERRORS[case].replace("{tmp_path}", str(tmp_path))
    with pytest.raises(ConfigError) as caught:
        store = make_store("b", settings(url))
        try:
            await store.open([spec("m")])  # a driver is loaded only here
        finally:
            await store.close()
    assert "bridges.b" in str(caught.value)
    assert_no_password(caught.value)
