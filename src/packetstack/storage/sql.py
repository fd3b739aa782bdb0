"""The SQL bridge: PostgreSQL (asyncpg), MariaDB/MySQL (asyncmy) and SQLite (aiosqlite)
through SQLAlchemy 2's async engine, chosen by the URL.

Per map a table: in the document mode a key column and a JSON (JSONB) value column; in the
typed mode the key column and one column per field of the map's Struct, with SQL types that
round-trip every codec type (see ``_column``). Missing tables are created; an existing table
whose columns do not fit is refused at open() with BridgeSchemaError naming the mismatch.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import decimal
import logging
import types
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Union, get_args, get_origin

import msgspec

from ..errors import BridgeRejected, BridgeSchemaError, BridgeUnavailable, ConfigError
from .bridge import BridgeSettings, Entry, EntryCodec, MapSpec, converted, json_text

try:
    import sqlalchemy as sa
    from sqlalchemy import exc as sa_exc
    from sqlalchemy.dialects import mysql, postgresql, sqlite
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
except ImportError as missing:  # pragma: no cover - depends on the installed extras
    raise ConfigError(
        f"the SQL bridge needs SQLAlchemy and a driver ({missing}): "
        "pip install 'packetstack[postgres]', '[mysql]' or '[sqlite]'"
    ) from missing

log = logging.getLogger("packetstack.bridge")

_UTC = datetime.UTC
DRIVER_SLICE = 250  # rows per executemany on an event loop that also serves packets
Convert = Callable[[Any], Any]


def _same(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class Column:
    """One column of a typed table: its SQL type and the conversions on the way in/out."""

    name: str
    type: sa.types.TypeEngine[Any]
    nullable: bool
    to_db: Convert = _same
    from_db: Convert = _same
    category: str = ""  # what the column must hold, to check an existing table


class SQLStore:
    """``SQLStore(name, settings)``: one database, ``open(maps)`` before use."""

    def __init__(self, name: str, settings: BridgeSettings, shared_loop: bool = True) -> None:
        self.name = name
        self.settings = settings
        self.shared_loop = shared_loop
        # Alone on its loop (the flush worker), a batch goes in one executemany: fewer
        # statements for the database to parse, fewer round trips.
        self._driver_slice = DRIVER_SLICE if shared_loop else max(1, settings.batch)
        try:
            url = sa.make_url(settings.url)
        except (sa_exc.ArgumentError, ValueError) as exc:  # ValueError: a port that is no number
            raise ConfigError(f"bridges.{name}.url is not a database URL: {exc}") from exc
        self.url = url
        self.shown_url = url.render_as_string(hide_password=True)
        self.dialect = url.get_backend_name()
        if self.dialect == "mariadb":
            self.dialect = "mysql"
        if self.dialect not in ("postgresql", "mysql", "sqlite"):
            raise ConfigError(
                f"bridges.{name}.url: {self.dialect!r} is not a supported SQL database "
                "(postgresql+asyncpg, mysql+asyncmy or mariadb+asyncmy, sqlite+aiosqlite)"
            )
        self._engine: AsyncEngine | None = self._create_engine()  # connects on first use
        self._writers: list[AsyncConnection] = []  # idle, held between flush batches
        self._maps: dict[str, _Table] = {}

    def _create_engine(self) -> AsyncEngine:
        timeout = self.settings.connect_timeout
        connect_args: dict[str, Any] = {}
        if self.dialect == "postgresql":
            connect_args["timeout"] = timeout
        elif self.dialect == "mysql":
            connect_args["connect_timeout"] = int(max(1, timeout))
        try:
            return create_async_engine(
                self.url,
                connect_args=connect_args,
                json_serializer=json_text,
                json_deserializer=msgspec.json.decode,
                pool_pre_ping=True,
            )
        except (ImportError, sa_exc.ArgumentError, sa_exc.InvalidRequestError) as exc:
            raise ConfigError(
                f"bridges.{self.name}.url {self.shown_url}: {exc} (use an async driver: "
                "postgresql+asyncpg, mysql+asyncmy or sqlite+aiosqlite, installed by "
                "pip install 'packetstack[postgres]', '[mysql]' or '[sqlite]')"
            ) from exc

    async def open(self, maps: Sequence[MapSpec]) -> None:
        if self._engine is None:
            self._engine = self._create_engine()
        metadata = sa.MetaData()
        limit = self.settings.connect_timeout + self.settings.timeout
        try:
            # Some drivers bound only the TCP connect: a server that accepts and never
            # answers must not hang the service's start.
            async with asyncio.timeout(limit), self._engine.begin() as conn:
                # Known once connected: a mysql:// URL may lead to MariaDB.
                mariadb = bool(getattr(conn.dialect, "is_mariadb", False))
                tables = [_Table(spec, metadata, conn.dialect, mariadb) for spec in maps]
                for table in tables:
                    await conn.run_sync(table.create_or_check, self.name)
            self._maps.update((table.spec.name, table) for table in tables)
        except ConfigError:  # a table that does not fit (BridgeSchemaError), a field clash
            raise
        except Exception as exc:
            raise _classified(exc, f"bridge {self.name!r} ({self.shown_url})", limit) from exc

    async def close(self) -> None:
        writers, self._writers = self._writers, []
        for writer in writers:
            await _discard(writer)
        if self._engine is not None:
            await self._engine.dispose()
            self._engine = None

    def _table(self, map_name: str) -> _Table:
        table = self._maps.get(map_name)
        if table is None:  # its open() did not get through
            raise BridgeUnavailable(
                f"bridge {self.name!r} ({self.shown_url}) has not been opened for map "
                f"{map_name!r}: its database could not be reached, or open() was not called"
            )
        return table

    async def write(
        self, map_name: str, upserts: Sequence[Entry], deletes: Sequence[bytes]
    ) -> None:
        table = self._table(map_name)
        rows = await converted(upserts, table.rows, self.shared_loop)
        keys = table.codec.delete_keys(deletes)
        assert self._engine is not None, "open() the bridge first"
        limit = self.settings.timeout
        # Connections kept between the batches of flushes (a checkout from the pool would
        # cost a ping, a round trip per batch), one per batch being written at once.
        writer = self._writers.pop() if self._writers else None
        try:
            async with asyncio.timeout(limit):
                if writer is None:
                    writer = await self._engine.connect()
                async with writer.begin():
                    # Straight to the driver's executemany: the rows are already what the
                    # driver takes (see Column.to_db); SQLAlchemy's per-row processing would
                    # cost more than the rest of a flush together. In slices: a driver builds
                    # its whole statement at once, and the event loop waits meanwhile.
                    step = self._driver_slice
                    for start in range(0, len(rows), step):
                        await writer.exec_driver_sql(table.upsert_sql, rows[start : start + step])
                    if keys:
                        await writer.execute(table.delete_where(keys))
        except Exception as exc:
            error = _classified(exc, f"writing map {map_name!r} to bridge {self.name!r}", limit)
            if writer is not None:
                if isinstance(error, BridgeRejected):  # rolled back: the connection is fine
                    self._writers.append(writer)
                else:  # its state is unknown
                    await _discard(writer)
            raise error from exc
        except BaseException:  # cancelled: the connection's state is unknown
            if writer is not None:
                await _discard(writer)
            raise
        self._writers.append(writer)

    async def load(self, map_name: str, key: bytes) -> bytes | None:
        return (await self.load_many(map_name, [key])).get(key)

    async def load_many(self, map_name: str, keys: Sequence[bytes]) -> dict[bytes, bytes]:
        table = self._table(map_name)
        wanted = [table.codec.key(key) for key in keys]
        query = sa.select(*table.columns).where(table.key_column.in_(wanted))
        return dict(table.entry(row) for row in await self._raw_rows(query, map_name))

    async def iterate(self, map_name: str, batch: int = 1000) -> AsyncIterator[list[Entry]]:
        """Every row in key order, ``batch`` rows per query (keyset pagination: no long
        transaction, no server-side cursor)."""
        table = self._table(map_name)
        query = sa.select(*table.columns).order_by(table.key_column).limit(batch)
        last: Any = None
        while True:
            page = query if last is None else query.where(table.key_column > last)
            raw = await self._raw_rows(page, map_name)
            if not raw:
                return
            last = raw[-1][0]
            yield [table.entry(row) for row in raw]
            if len(raw) < batch:
                return

    async def _raw_rows(self, query: sa.Select[Any], map_name: str) -> Sequence[sa.Row[Any]]:
        assert self._engine is not None, "open() the bridge first"
        limit = self.settings.timeout
        try:
            async with asyncio.timeout(limit), self._engine.connect() as conn:
                rows: Sequence[sa.Row[Any]] = (await conn.execute(query)).all()
                return rows
        except Exception as exc:
            doing = f"reading map {map_name!r} from bridge {self.name!r}"
            raise _classified(exc, doing, limit) from exc


class _Table:
    """One map's table, its statements and its row conversions."""

    def __init__(
        self, spec: MapSpec, metadata: sa.MetaData, sql_dialect: sa.Dialect, mariadb: bool
    ) -> None:
        self.spec = spec
        self.codec = EntryCodec(spec)
        self.dialect = dialect = "mysql" if sql_dialect.name == "mariadb" else sql_dialect.name
        key = Column(spec.key_column, _key_type(spec, mariadb), False, category=_key_category(spec))
        if spec.mode == "typed":
            assert spec.value_type is not None
            fields = [_column(f, dialect) for f in msgspec.structs.fields(spec.value_type)]
            clash = [f.name for f in fields if f.name == spec.key_column]
            if clash:
                raise ConfigError(
                    f"maps.{spec.name}: the Struct has a field named {spec.key_column!r}, "
                    "the key column's name: set key_column to another name"
                )
        else:
            fields = [Column(spec.value_column, _json_type(), False, category="json")]
        self.fields = fields
        # (index in the row, conversion) of the fields the driver does not take as they are
        self._conversions = [(i + 1, c.to_db) for i, c in enumerate(fields) if c.to_db is not _same]
        self.expected = [key, *fields]
        self.table = sa.Table(
            spec.table,
            metadata,
            sa.Column(key.name, key.type, primary_key=True, autoincrement=False),
            *(sa.Column(c.name, c.type, nullable=c.nullable) for c in fields),
        )
        self.key_column = self.table.c[spec.key_column]
        self.columns = [self.table.c[c.name] for c in self.expected]
        compiled = self._upsert_statement().compile(dialect=sql_dialect)
        # Rows are tuples in the table's column order: the compiled statement's, checked.
        assert list(compiled.positiontup or []) == [c.name for c in self.expected]
        self.upsert_sql = str(compiled)

    def _upsert_statement(self) -> Any:
        names = [c.name for c in self.fields]
        if self.dialect == "mysql":
            on_duplicate = mysql.insert(self.table)
            return on_duplicate.on_duplicate_key_update(
                {n: on_duplicate.inserted[n] for n in names}
            )
        # PostgreSQL and SQLite spell the upsert the same way.
        on_conflict = (postgresql.insert if self.dialect == "postgresql" else sqlite.insert)(
            self.table
        )
        return on_conflict.on_conflict_do_update(
            index_elements=[self.spec.key_column],
            set_={n: on_conflict.excluded[n] for n in names},
        )

    def delete_where(self, keys: list[Any]) -> sa.Delete:
        return sa.delete(self.table).where(self.key_column.in_(keys))

    def rows(self, entries: Sequence[Entry]) -> list[tuple[Any, ...]]:
        """The driver's parameters for upserts: the key, then each column's value."""
        keys, values = self.codec.decoded(entries)
        if self.spec.mode == "document":
            return [(key, json_text(value)) for key, value in zip(keys, values, strict=True)]
        astuple = msgspec.structs.astuple
        if not self._conversions:  # every field as the driver takes it: the common case
            return [(key, *astuple(value)) for key, value in zip(keys, values, strict=True)]
        return [
            self._converted(key, astuple(value)) for key, value in zip(keys, values, strict=True)
        ]

    def _converted(self, key: Any, fields: tuple[Any, ...]) -> tuple[Any, ...]:
        row = [key, *fields]
        for index, to_db in self._conversions:
            field = row[index]
            if field is not None:
                row[index] = to_db(field)
        return tuple(row)

    def entry(self, row: sa.Row[Any]) -> Entry:
        values: tuple[Any, ...] = tuple(row)
        key = self.codec.encoded_key(values[0])
        if self.spec.mode == "document":
            return key, self.codec.encoded_value(values[1])
        fields = {
            column.name: None if raw is None else column.from_db(raw)
            for column, raw in zip(self.fields, values[1:], strict=True)
        }
        return key, self.codec.encoded_value(fields)

    def create_or_check(self, conn: sa.Connection, bridge: str) -> None:
        """Runs in SQLAlchemy's sync shim: create the table, or check the one there."""
        inspector = sa.inspect(conn)
        if not inspector.has_table(self.spec.table):
            self.table.create(conn)
            log.info(
                "bridge %s: created table %s for map %s", bridge, self.spec.table, self.spec.name
            )
            return
        found = {c["name"]: c for c in inspector.get_columns(self.spec.table)}
        problems = []
        for column in self.expected:
            have = found.pop(column.name, None)
            if have is None:
                problems.append(f"column {column.name!r} is missing")
            elif not _fits(have["type"], column.category):
                problems.append(
                    f"column {column.name!r} is {have['type']} but must hold {column.category}"
                )
        for name, extra in found.items():
            if not extra["nullable"] and extra.get("default") is None:
                problems.append(f"column {name!r} is NOT NULL without a default and not in the map")
        primary = inspector.get_pk_constraint(self.spec.table).get("constrained_columns") or []
        if primary != [self.spec.key_column]:
            problems.append(f"the primary key is {primary}, not [{self.spec.key_column!r}]")
        if problems:
            raise BridgeSchemaError(
                f"bridge {bridge!r}: table {self.spec.table!r} does not fit map "
                f"{self.spec.name!r}: " + "; ".join(problems) + ". Alter the table, drop it "
                f"to let PacketStack create it, or set maps.{self.spec.name}.table to another"
            )


# MySQL/MariaDB errors about the data itself: too long, out of range, wrong value, NULL,
# duplicate or foreign key, invalid JSON, a failed CHECK.
_MYSQL_DATA_ERRORS = frozenset({1048, 1062, 1264, 1292, 1366, 1406, 1452, 3140, 3819, 4025})


async def _discard(connection: AsyncConnection) -> None:
    """Close a connection whose state is unknown (a database gone by now cannot answer)."""
    with contextlib.suppress(Exception):
        await connection.invalidate()
    with contextlib.suppress(Exception):
        await connection.close()


def _refused_data(exc: BaseException) -> bool:
    if isinstance(exc, OverflowError):  # SQLite binding an integer past 64 bits
        return True
    if isinstance(exc, sa_exc.DataError | sa_exc.IntegrityError):
        return True
    if isinstance(exc, sa_exc.StatementError) and not isinstance(exc, sa_exc.DBAPIError):
        return True  # a value the driver could not even send
    orig = getattr(exc, "orig", None)
    # PostgreSQL (asyncpg through SQLAlchemy's adapter: often a plain DBAPIError): SQLSTATE
    # class 22 is a data exception, 23 an integrity constraint.
    sqlstate = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if isinstance(sqlstate, str) and sqlstate[:2] in ("22", "23"):
        return True
    args: tuple[Any, ...] = getattr(orig, "args", ())
    return bool(args) and args[0] in _MYSQL_DATA_ERRORS


def _classified(exc: BaseException, doing: str, limit: float) -> Exception:
    """BridgeRejected for errors in the data, BridgeUnavailable for everything else."""
    if isinstance(exc, BridgeRejected | BridgeUnavailable):
        return exc
    if isinstance(exc, TimeoutError):
        return BridgeUnavailable(f"{doing}: no answer within {limit:g} s")
    if _refused_data(exc):
        return BridgeRejected(f"{doing}: the database refused the data: {_short(exc)}")
    return BridgeUnavailable(f"{doing}: {_short(exc)}")


def _short(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


# ------------------------------------------------------------------ types


def _json_type() -> sa.types.TypeEngine[Any]:
    # JSON, not PostgreSQL's JSONB: JSONB rewrites numbers (1e20 comes back as an integer)
    # and key order; JSON keeps the text as written, so values round-trip exactly.
    return sa.JSON()


def _key_type(spec: MapSpec, mariadb: bool) -> sa.types.TypeEngine[Any]:
    if spec.key == "int":
        return sa.BigInteger()
    if spec.key == "bytes":
        return sa.LargeBinary().with_variant(mysql.VARBINARY(255), "mysql", "mariadb")
    # MySQL cannot index TEXT without a length: keys there are up to 255 characters, and
    # compared byte for byte without padding (the default collation makes 'a', 'A' and
    # 'a ' one key; utf8mb4_bin still ignores trailing spaces).
    collation = "utf8mb4_nopad_bin" if mariadb else "utf8mb4_0900_bin"
    return sa.Text().with_variant(sa.String(255, collation=collation), "mysql", "mariadb")


def _key_category(spec: MapSpec) -> str:
    return {"int": "int", "bytes": "bytes"}.get(spec.key, "str")


def _optional(kind: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed)."""
    if get_origin(kind) in (Union, types.UnionType):
        args = [a for a in get_args(kind) if a is not type(None)]
        if len(args) < len(get_args(kind)):
            return (args[0] if len(args) == 1 else Union[tuple(args)]), True  # noqa: UP007
    return kind, kind is None or kind is type(None)


def _column(field: msgspec.structs.FieldInfo, dialect: str) -> Column:
    kind, nullable = _optional(field.type)
    info = msgspec.inspect.type_info(kind)
    name = field.name
    # bool before int: bool is an int subclass in Python, not in SQL.
    if isinstance(info, msgspec.inspect.BoolType):
        return Column(name, sa.Boolean(), nullable, from_db=bool, category="bool")
    if isinstance(info, msgspec.inspect.IntType):
        return Column(name, sa.BigInteger(), nullable, category="int")
    if isinstance(info, msgspec.inspect.FloatType):
        return Column(name, sa.Double(), nullable, category="float")
    if isinstance(info, msgspec.inspect.StrType):
        sql: sa.types.TypeEngine[Any] = (
            sa.String(info.max_length) if info.max_length is not None else sa.Text()
        )
        return Column(name, sql, nullable, category="str")
    if isinstance(info, msgspec.inspect.BytesType | msgspec.inspect.ByteArrayType):
        sql = sa.LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb")
        return Column(name, sql, nullable, from_db=bytes, category="bytes")
    if isinstance(info, msgspec.inspect.DateTimeType):
        return _datetime_column(name, nullable, info.tz is True, dialect)
    # SQLite has no date types: SQLAlchemy keeps them as text, in its format.
    text = _sqlite_text if dialect == "sqlite" else _same
    if isinstance(info, msgspec.inspect.DateType):
        return Column(name, sa.Date(), nullable, text, category="date")
    if isinstance(info, msgspec.inspect.TimeType):
        sql = sa.Time().with_variant(mysql.TIME(fsp=6), "mysql", "mariadb")
        return Column(name, sql, nullable, text, category="time")
    if isinstance(info, msgspec.inspect.DecimalType):
        if dialect == "postgresql":
            return Column(name, sa.Numeric(), nullable, category="numeric")
        # NUMERIC elsewhere has a fixed scale (MySQL) or is a float (SQLite): exact as text.
        return Column(name, sa.String(100), nullable, str, decimal.Decimal, category="str")
    if isinstance(info, msgspec.inspect.UUIDType):
        # Native on PostgreSQL; elsewhere SQLAlchemy keeps 32 hex digits (CHAR(32)).
        to_db = _same if dialect == "postgresql" else _uuid_hex
        return Column(name, sa.Uuid(), nullable, to_db, category="uuid")
    return Column(name, _json_type(), nullable, json_text, category="json")


def _uuid_hex(value: uuid.UUID) -> str:
    return value.hex


def _sqlite_text(value: datetime.date | datetime.time) -> str:
    """A date, time or (naive) datetime as SQLAlchemy's SQLite types store them."""
    if isinstance(value, datetime.datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S.%f")
    if isinstance(value, datetime.date):
        return value.strftime("%Y-%m-%d")
    return value.strftime("%H:%M:%S.%f")


def _datetime_column(name: str, nullable: bool, aware: bool, dialect: str) -> Column:
    if dialect == "postgresql" and aware:
        return Column(name, sa.DateTime(timezone=True), nullable, category="datetime_tz")
    # Elsewhere the column keeps no zone: aware values go in as UTC and come back as UTC.
    sql = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")

    def to_db(value: datetime.datetime) -> datetime.datetime | str:
        if value.tzinfo is not None:
            value = value.astimezone(_UTC).replace(tzinfo=None)
        return _sqlite_text(value) if dialect == "sqlite" else value

    def from_db(value: datetime.datetime) -> datetime.datetime:
        return value.replace(tzinfo=_UTC) if aware and value.tzinfo is None else value

    return Column(name, sql, nullable, to_db, from_db, category="datetime")


_CATEGORIES: dict[str, tuple[type[Any], ...]] = {
    "int": (sa.Integer,),
    "bool": (sa.Boolean, sa.Integer),  # MySQL's BOOLEAN is TINYINT(1)
    "float": (sa.Float, sa.Numeric),
    "str": (sa.String,),
    "bytes": (sa.LargeBinary, sa.types._Binary),
    "datetime": (sa.DateTime,),
    "date": (sa.Date,),
    "time": (sa.Time,),
    "numeric": (sa.Numeric,),
    "uuid": (sa.Uuid, sa.String),
    "json": (sa.JSON, sa.String),  # MariaDB's JSON is LONGTEXT with a check
}


def _fits(found: sa.types.TypeEngine[Any], category: str) -> bool:
    if category == "datetime_tz":  # PostgreSQL keeps the zone only in timestamptz
        return isinstance(found, sa.DateTime) and bool(found.timezone)
    if category == "datetime" and isinstance(found, sa.DateTime) and found.timezone:
        return False  # timestamptz would hand back aware values for a naive field
    if category == "datetime" and isinstance(found, mysql.DATETIME | mysql.TIMESTAMP):
        return (found.fsp or 0) >= 6  # DATETIME without (6) drops the microseconds
    if category == "time" and isinstance(found, mysql.TIME):
        return (found.fsp or 0) >= 6
    return isinstance(found, _CATEGORIES[category])
