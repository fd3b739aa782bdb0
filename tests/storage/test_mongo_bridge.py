"""The MongoDB bridge through the wire stand-in (or PACKETSTACK_MONGO_URL's mongod): the
documents it writes look as documented, refused documents raise BridgeRejected, a server
that is down raises BridgeUnavailable (and writes go in again once it is back), and
settings that cannot work are ConfigError.

What every store does is the conformance suite's job (test_store_conformance.py).
"""

from __future__ import annotations

import datetime
import decimal
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import msgspec
import pytest
from bridge_servers import closed_port, settings
from mongo_standin import (
    BAD_VALUE,
    DOCUMENT_TOO_LARGE,
    DOCUMENT_VALIDATION_FAILURE,
    UNAUTHORIZED,
    MongoServer,
    MongoStandin,
    OwnDatabase,
    mongo_server,
    require_faults,
)

from packetstack.codec import encode
from packetstack.errors import BridgeRejected, BridgeUnavailable, ConfigError
from packetstack.storage import MapBridge, MapSpec, resolve
from packetstack.storage.mongo import MongoStore

PASSWORD = "s3cret"


class Inner(msgspec.Struct):
    name: str
    tags: list[str]


class Reading(msgspec.Struct, kw_only=True):
    sensor: str
    level: float
    count: int
    ok: bool
    raw: bytes
    at: datetime.datetime
    day: datetime.date
    ident: uuid.UUID
    amount: decimal.Decimal
    tags: list[str]
    inner: Inner
    missing: int | None = None


READING = Reading(
    sensor="s-1",
    level=1.5,
    count=7,
    ok=True,
    raw=b"\x00\x01\xff",
    at=datetime.datetime(2024, 5, 6, 7, 8, 9, 123456),
    day=datetime.date(2024, 5, 6),
    ident=uuid.UUID("3f1c9d1e-8a4b-4c2d-9e0f-0123456789ab"),
    amount=decimal.Decimal("1.10"),
    tags=["a", "b"],
    inner=Inner(name="in", tags=[]),
)


def spec(
    name: str, value_type: type | None = None, *, mode: str = "document", key: str = "str"
) -> MapSpec:
    return resolve(name, MapBridge(bridge="b", mode=mode, type=value_type, key=key))  # type: ignore[arg-type]


class Bridge(OwnDatabase):
    """A MongoDB database of the test's own on the server, and the stores opened on it."""

    def __init__(self, server: MongoServer) -> None:
        super().__init__(server)
        self.stores: list[MongoStore] = []

    def store(self, **overrides: Any) -> MongoStore:
        options: dict[str, Any] = {"database": self.database, **overrides}
        made = MongoStore("b", settings(self.server.url, **options))
        self.stores.append(made)
        return made

    async def open(self, *maps: MapSpec, **overrides: Any) -> MongoStore:
        made = self.store(**overrides)
        await made.open(list(maps))
        return made


@pytest.fixture
def server() -> Iterator[MongoServer]:
    with mongo_server() as running:
        yield running


@pytest.fixture
async def bridge(server: MongoServer) -> AsyncIterator[Bridge]:
    made = Bridge(server)
    try:
        yield made
    finally:
        for store in made.stores:
            await store.close()
        if not isinstance(server, MongoStandin) or server.is_up:
            await made.drop()


# ------------------------------------------------------------------ documents


@pytest.mark.parametrize("mode", ["document", "typed"])
async def test_struct_fields_are_the_document(bridge: Bridge, mode: str) -> None:
    store = await bridge.open(spec("readings", Reading, mode=mode))
    await store.write("readings", [(encode("r1"), encode(READING))], [])
    assert bridge.documents("readings") == {
        "r1": {
            "_id": "r1",
            "sensor": "s-1",
            "level": 1.5,
            "count": 7,
            "ok": True,
            "raw": b"\x00\x01\xff",  # BSON binary
            "at": "2024-05-06T07:08:09.123456",  # ISO text: BSON dates keep only milliseconds
            "day": "2024-05-06",
            "ident": "3f1c9d1e-8a4b-4c2d-9e0f-0123456789ab",
            "amount": "1.10",
            "tags": ["a", "b"],
            "inner": {"name": "in", "tags": []},
            "missing": None,
        }
    }
    loaded = await store.load("readings", encode("r1"))
    assert loaded is not None
    assert msgspec.msgpack.decode(loaded, type=Reading) == READING


async def test_values_that_are_not_documents_are_wrapped(bridge: Bridge) -> None:
    store = await bridge.open(spec("things"))
    values: dict[str, Any] = {
        "int": 42,
        "float": 2.5,
        "text": "ünïcødé",
        "list": [1, "two", None],
        "none": None,
        "bool": False,
        "bytes": b"\x00bin",
        "dict": {"a": 1, "nested": {"b": [True]}},
        "empty": {},
    }
    await store.write("things", [(encode(k), encode(v)) for k, v in values.items()], [])
    documents = bridge.documents("things")
    assert documents == {
        "int": {"_id": "int", "value": 42},
        "float": {"_id": "float", "value": 2.5},
        "text": {"_id": "text", "value": "ünïcødé"},
        "list": {"_id": "list", "value": [1, "two", None]},
        "none": {"_id": "none", "value": None},
        "bool": {"_id": "bool", "value": False},
        "bytes": {"_id": "bytes", "value": b"\x00bin"},
        "dict": {"_id": "dict", "a": 1, "nested": {"b": [True]}},  # dicts are the document
        "empty": {"_id": "empty"},
    }
    loaded = await store.load_many("things", [encode(k) for k in values])
    assert {msgspec.msgpack.decode(k): msgspec.msgpack.decode(v) for k, v in loaded.items()} == (
        values
    )


@pytest.mark.parametrize(
    ("key_kind", "key", "stored_id"),
    [
        ("str", "ü-key", "ü-key"),
        ("int", -5, -5),
        ("bytes", b"\x00k", b"\x00k"),
        ("tuple", ("a", 1, ("b",)), '["a",1,["b"]]'),  # tuples as their JSON text
    ],
)
async def test_keys_are_the_id(bridge: Bridge, key_kind: str, key: Any, stored_id: Any) -> None:
    store = await bridge.open(spec("keyed", key=key_kind))
    await store.write("keyed", [(encode(key), encode({"v": 1}))], [])
    assert bridge.documents("keyed") == {stored_id: {"_id": stored_id, "v": 1}}
    assert await store.load_many("keyed", [encode(key)]) == {encode(key): encode({"v": 1})}
    await store.write("keyed", [], [encode(key)])
    assert bridge.documents("keyed") == {}


async def test_64_bit_ints_read_back(bridge: Bridge) -> None:
    """pymongo reads BSON int64 as bson.Int64: keys and values come back as plain ints."""
    store = await bridge.open(spec("big", key="int"))
    value = {"n": 2**40, "list": [-(2**63), 2**63 - 1], "nested": {"m": 2**33}}
    await store.write("big", [(encode(2**40), encode(value)), (encode(-(2**62)), encode(7))], [])
    assert await store.load_many("big", [encode(2**40), encode(-(2**62))]) == {
        encode(2**40): encode(value),
        encode(-(2**62)): encode(7),
    }


async def test_a_dict_whose_only_field_is_value_reads_back_as_that_dict(bridge: Bridge) -> None:
    """It is stored wrapped like a non-dict value, so it cannot be taken for one."""
    store = await bridge.open(spec("things"))
    await store.write("things", [(encode("k"), encode({"value": 1}))], [])
    assert bridge.documents("things") == {"k": {"_id": "k", "value": {"value": 1}}}
    assert await store.load("things", encode("k")) == encode({"value": 1})


# ------------------------------------------------------------------ refused documents


async def test_a_value_with_an_id_field_is_rejected(bridge: Bridge) -> None:
    store = await bridge.open(spec("things"))
    with pytest.raises(BridgeRejected, match="_id"):
        await store.write("things", [(encode("k"), encode({"_id": 1, "a": 2}))], [])
    assert bridge.documents("things") == {}


async def test_a_value_bson_cannot_hold_is_rejected(bridge: Bridge) -> None:
    store = await bridge.open(spec("things"))
    with pytest.raises(BridgeRejected):
        await store.write("things", [(encode("k"), encode({"n": 2**64 - 1}))], [])
    assert bridge.documents("things") == {}


async def test_a_document_over_16_mib_is_rejected(bridge: Bridge) -> None:
    store = await bridge.open(spec("things"))
    huge = encode({"blob": b"x" * (17 * 1024 * 1024)})
    with pytest.raises(BridgeRejected):
        await store.write("things", [(encode("big"), huge)], [])
    await store.write("things", [(encode("small"), encode({"blob": b"x"}))], [])
    assert list(bridge.documents("things")) == ["small"]


@pytest.mark.parametrize("code", [BAD_VALUE, DOCUMENT_VALIDATION_FAILURE, DOCUMENT_TOO_LARGE])
async def test_a_document_the_server_refuses_is_rejected(
    server: MongoServer, bridge: Bridge, code: int
) -> None:
    standin = require_faults(server)
    store = await bridge.open(spec("readings", Reading))
    standin.reject_documents_where(lambda document: document.get("sensor") == "bad", code=code)
    batch = [
        (encode(f"r{n}"), encode(msgspec.structs.replace(READING, sensor=sensor)))
        for n, sensor in enumerate(["good", "bad", "fine"])
    ]
    with pytest.raises(BridgeRejected) as caught:
        await store.write("readings", batch, [])
    assert "'readings'" in str(caught.value)
    assert "1 of 3" in str(caught.value)
    # An unordered bulk write: the others went in (writing them again is harmless).
    assert sorted(bridge.documents("readings")) == ["r0", "r2"]
    standin.accept_all_documents()
    await store.write("readings", batch, [])
    assert sorted(bridge.documents("readings")) == ["r0", "r1", "r2"]


async def test_a_write_error_that_is_not_about_the_data_is_unavailable(
    server: MongoServer, bridge: Bridge
) -> None:
    standin = require_faults(server)
    store = await bridge.open(spec("things"))
    standin.reject_documents_where(lambda document: True, code=UNAUTHORIZED)
    with pytest.raises(BridgeUnavailable):
        await store.write("things", [(encode("k"), encode(1))], [])


# ------------------------------------------------------------------ server down


async def test_server_down_is_unavailable_and_writes_resume_when_it_is_back(
    server: MongoServer, bridge: Bridge
) -> None:
    standin = require_faults(server)
    store = await bridge.open(spec("things"), connect_timeout=1.0)
    await store.write("things", [(encode("before"), encode(1))], [])
    standin.go_down()
    try:
        started = time.monotonic()
        with pytest.raises(BridgeUnavailable):
            await store.write("things", [(encode("during"), encode(2))], [])
        with pytest.raises(BridgeUnavailable):
            await store.load_many("things", [encode("before")])
        with pytest.raises(BridgeUnavailable):
            async for _ in store.iterate("things"):
                pass
        with pytest.raises(BridgeUnavailable):
            await bridge.open(spec("things"), connect_timeout=1.0)
        assert time.monotonic() - started < 20
    finally:
        standin.come_back()
    await store.write("things", [(encode("after"), encode(3))], [])
    assert sorted(bridge.documents("things")) == ["after", "before"]


async def test_closed_port_is_unavailable_without_the_password() -> None:
    url = f"mongodb://user:{PASSWORD}@127.0.0.1:{closed_port()}/db"
    store = MongoStore("b", settings(url, connect_timeout=1.0))
    started = time.monotonic()
    try:
        with pytest.raises(BridgeUnavailable) as caught:
            await store.open([spec("things")])
    finally:
        await store.close()
    assert time.monotonic() - started < 10
    assert PASSWORD not in "".join(traceback.format_exception(caught.value))


# ------------------------------------------------------------------ settings


async def test_missing_database_name_is_a_config_error(server: MongoServer) -> None:
    url = f"mongodb://127.0.0.1:{closed_port()}/"
    with pytest.raises(ConfigError, match="database"):
        MongoStore("b", settings(url))
    with pytest.raises(ConfigError, match="database"):
        MongoStore("b", settings("mongodb://127.0.0.1:27017"))
    # In the URL's path or in database = ...: either names it.
    assert MongoStore("b", settings(f"{url}inpath")).database_name == "inpath"
    assert MongoStore("b", settings(url, database="set")).database_name == "set"


@pytest.mark.parametrize(
    "url",
    [
        f"mongodb://user:{PASSWORD}@127.0.0.1:notaport/db",
        "mongodb://",
        f"mongodb://user:{PASSWORD}@/db",
        "mongodb://127.0.0.1/db?noSuchOption=1",
    ],
)
def test_url_that_is_not_a_mongodb_url_is_a_config_error(url: str) -> None:
    with pytest.raises(ConfigError, match=r"bridges\.b") as caught:
        MongoStore("b", settings(url))
    assert PASSWORD not in str(caught.value)
