"""The MongoDB stand-in (tests/mongo_standin.py) speaks enough of the wire protocol for
pymongo's AsyncMongoClient: the handshake, bulk upserts/replaces/deletes with exact counts,
finds with $in and cursors over many getMore batches, counts, every BSON type the bridge
stores, refused documents reported as writeErrors, and a server that goes down and comes back.

With PACKETSTACK_MONGO_URL set the same tests run against that real mongod (the fault
injection ones skip)."""

from __future__ import annotations

import contextlib
import datetime
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from bson import Binary, Decimal128, Int64, ObjectId
from mongo_standin import (
    BAD_VALUE,
    COMMAND_NOT_FOUND,
    DOCUMENT_TOO_LARGE,
    DUPLICATE_KEY,
    MAX_WIRE_VERSION,
    MongoServer,
    MongoStandin,
    RealMongo,
    client_options,
    mongo_server,
    require_faults,
    unique_database_name,
)
from pymongo import (
    ASCENDING,
    DESCENDING,
    AsyncMongoClient,
    DeleteOne,
    InsertOne,
    MongoClient,
    ReplaceOne,
    ReturnDocument,
    UpdateOne,
)
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import (
    BulkWriteError,
    ConnectionFailure,
    DuplicateKeyError,
    OperationFailure,
    ServerSelectionTimeoutError,
)
from pymongo.server_type import SERVER_TYPE

Client = AsyncMongoClient[dict[str, Any]]
Collection = AsyncCollection[dict[str, Any]]


@pytest.fixture
def server() -> Iterator[MongoServer]:
    with mongo_server() as running:
        yield running


@pytest.fixture
async def client(server: MongoServer) -> AsyncIterator[Client]:
    opened: Client = AsyncMongoClient(server.url, **client_options())
    yield opened
    await opened.close()


@pytest.fixture
async def db_name(client: Client) -> AsyncIterator[str]:
    name = unique_database_name()
    yield name
    with contextlib.suppress(ConnectionFailure):
        await client.drop_database(name)


@pytest.fixture
def things(client: Client, db_name: str) -> Collection:
    return client[db_name]["things"]


async def test_handshake_answers_as_a_standalone_server(
    server: MongoServer, client: Client
) -> None:
    assert server.url.startswith("mongodb://127.0.0.1:") or not server.supports_faults
    hello = await client.admin.command("hello")
    assert hello["isWritablePrimary"] is True
    assert hello["maxWireVersion"] >= 9
    assert hello["maxBsonObjectSize"] == 16 * 1024 * 1024
    assert (await client.admin.command("ping"))["ok"] == 1.0
    info = await client.server_info()
    assert info["versionArray"][0] >= 4
    if isinstance(server, MongoStandin):
        assert hello["maxWireVersion"] == MAX_WIRE_VERSION
        assert hello["maxMessageSizeBytes"] == 48_000_000
        assert hello["maxWriteBatchSize"] == 100_000
        (description,) = client.topology_description.server_descriptions().values()
        assert description.server_type == SERVER_TYPE.Standalone
        assert server.command_counts["ismaster"] + server.command_counts["isMaster"] >= 1


async def test_legacy_ismaster_and_unknown_commands(server: MongoServer, client: Client) -> None:
    reply = await client.admin.command("isMaster")
    assert reply["ismaster"] is True
    if isinstance(server, MongoStandin):
        with pytest.raises(OperationFailure) as caught:
            await client.admin.command("noSuchCommand")
        assert caught.value.code == COMMAND_NOT_FOUND


async def test_unordered_bulk_write_counts_upserts_replaces_and_deletes(
    server: MongoServer, things: Collection, db_name: str
) -> None:
    await things.insert_many([{"_id": k, "v": k, "tag": "old"} for k in range(1, 6)])
    result = await things.bulk_write(
        [
            UpdateOne({"_id": 1}, {"$set": {"v": 100}}, upsert=True),  # modified
            UpdateOne({"_id": 2}, {"$set": {"v": 2}}, upsert=True),  # matched, unchanged
            UpdateOne({"_id": 10}, {"$set": {"v": 10, "tag": "new"}}, upsert=True),  # upserted
            ReplaceOne({"_id": 3}, {"v": 300}, upsert=True),  # replaced
            ReplaceOne({"_id": 11}, {"v": 11}, upsert=True),  # upserted
            DeleteOne({"_id": 4}),  # removed
            DeleteOne({"_id": 99}),  # nothing to remove
        ],
        ordered=False,
    )
    assert result.matched_count == 3
    assert result.modified_count == 2
    assert result.upserted_count == 2
    assert result.upserted_ids == {2: 10, 4: 11}
    assert result.deleted_count == 1
    assert result.inserted_count == 0

    stored = {d["_id"]: d for d in server.collection(db_name, "things").find({})}
    assert sorted(stored) == [1, 2, 3, 5, 10, 11]
    assert stored[1] == {"_id": 1, "v": 100, "tag": "old"}
    assert stored[3] == {"_id": 3, "v": 300}
    assert stored[10] == {"_id": 10, "v": 10, "tag": "new"}
    assert stored[11] == {"_id": 11, "v": 11}


async def test_ordered_bulk_write_and_many_statements(
    server: MongoServer, things: Collection, db_name: str
) -> None:
    requests: list[Any] = [
        UpdateOne({"_id": k}, {"$set": {"v": k, "s": f"doc {k}"}}, upsert=True) for k in range(3000)
    ]
    result = await things.bulk_write(requests, ordered=True)
    assert result.upserted_count == 3000
    assert result.matched_count == 0
    requests = [ReplaceOne({"_id": k}, {"v": -k}, upsert=True) for k in range(0, 3000, 2)]
    requests += [DeleteOne({"_id": k}) for k in range(1, 3000, 2)]
    requests.append(InsertOne({"_id": "extra"}))
    result = await things.bulk_write(requests, ordered=True)
    assert (result.matched_count, result.modified_count) == (1500, 1500)
    assert (result.deleted_count, result.inserted_count, result.upserted_count) == (1500, 1, 0)
    collection = server.collection(db_name, "things")
    assert collection.count_documents({}) == 1501
    assert collection.find_one({"_id": 2998}) == {"_id": 2998, "v": -2998}


async def test_delete_many_and_update_many(things: Collection) -> None:
    await things.insert_many([{"_id": k, "even": k % 2 == 0} for k in range(20)])
    updated = await things.update_many({"even": True}, {"$inc": {"hits": 1}})
    assert (updated.matched_count, updated.modified_count) == (10, 10)
    deleted = await things.delete_many({"even": False})
    assert deleted.deleted_count == 10
    assert await things.count_documents({"hits": 1}) == 10


async def test_find_with_in_projection_sort_skip_and_limit(things: Collection) -> None:
    await things.insert_many([{"_id": k, "v": k * 10, "other": "x"} for k in range(200)])
    wanted = [5, 17, 42, 99, 150, 1000]
    found = await things.find({"_id": {"$in": wanted}}).to_list()
    assert sorted(d["_id"] for d in found) == [5, 17, 42, 99, 150]

    cursor = things.find(
        {"_id": {"$in": wanted}}, {"v": 1, "_id": 0}, sort=[("v", DESCENDING)], skip=1, limit=3
    )
    assert await cursor.to_list() == [{"v": 990}, {"v": 420}, {"v": 170}]
    assert await things.find_one({"v": 70}) == {"_id": 7, "v": 70, "other": "x"}
    assert await things.find_one({"_id": "missing"}) is None


async def test_iterates_ten_thousand_documents_across_get_more_batches(
    server: MongoServer, things: Collection
) -> None:
    inserted = await things.insert_many([{"_id": k, "payload": "p" * 40} for k in range(10_000)])
    assert len(inserted.inserted_ids) == 10_000
    get_mores = server.command_counts["getMore"] if isinstance(server, MongoStandin) else 0

    seen: list[int] = []
    async for doc in things.find({}, sort=[("_id", ASCENDING)], batch_size=1000):
        seen.append(doc["_id"])
    assert seen == list(range(10_000))

    if isinstance(server, MongoStandin):
        assert server.command_counts["getMore"] - get_mores == 9
        assert server.open_cursors == 0


async def test_a_cursor_closed_early_is_killed(server: MongoServer, things: Collection) -> None:
    await things.insert_many([{"_id": k} for k in range(500)])
    cursor = things.find({}, batch_size=50)
    assert (await cursor.next())["_id"] == 0
    if isinstance(server, MongoStandin):
        assert server.open_cursors == 1
    await cursor.close()
    if isinstance(server, MongoStandin):
        assert server.open_cursors == 0
        assert server.command_counts["killCursors"] == 1


async def test_counts(things: Collection) -> None:
    await things.insert_many([{"_id": k, "v": k % 7} for k in range(700)])
    assert await things.count_documents({}) == 700
    assert await things.count_documents({"v": 3}) == 100
    assert await things.count_documents({"v": {"$gte": 5}}, skip=10, limit=50) == 50
    assert await things.count_documents({"v": 42}) == 0
    assert await things.estimated_document_count() == 700
    pipeline: list[dict[str, Any]] = [{"$match": {"v": 0}}, {"$count": "n"}]
    assert await (await things.aggregate(pipeline)).to_list() == [{"n": 100}]


def _all_types(key: str) -> dict[str, Any]:
    return {
        "_id": key,
        "int64": Int64(2**40),
        "int64_small": Int64(7),
        "int32": -12,
        "float": 3.25,
        "nan_free_big": 1e300,
        "str": "héllo wörld ✓",
        "empty": "",
        "true": True,
        "false": False,
        "none": None,
        "bytes": b"\x00\x01\xff binary",
        "when": datetime.datetime(2024, 2, 29, 23, 59, 58, 123000),
        "nested": {"a": {"b": [1, 2, {"c": None}]}, "list": [[], {}, "x"]},
        "array": [Int64(1), 2.5, "three", None, b"four", [5]],
        "decimal": Decimal128("12345678901234567890.123456789"),
        "uuid": uuid.UUID("6f1c3b9e-2f67-4b6c-9a3e-4c1f4f9d0a11"),
        "oid": ObjectId("65f000000000000000000001"),
    }


def _assert_same_types(got: Any, want: Any) -> None:
    assert type(got) is type(want), (got, want)
    if isinstance(want, dict):
        assert list(got) == list(want)
        for key in want:
            _assert_same_types(got[key], want[key])
    elif isinstance(want, list):
        assert len(got) == len(want)
        for item_got, item_want in zip(got, want, strict=True):
            _assert_same_types(item_got, item_want)
    else:
        assert got == want


async def test_every_bson_type_round_trips(
    server: MongoServer, things: Collection, db_name: str
) -> None:
    inserted = _all_types("inserted")
    await things.insert_one(dict(inserted))
    upserted = _all_types("upserted")
    await things.bulk_write(
        [
            UpdateOne(
                {"_id": "upserted"},
                {"$set": {k: v for k, v in upserted.items() if k != "_id"}},
                upsert=True,
            ),
            ReplaceOne({"_id": "replaced"}, _all_types("replaced"), upsert=True),
        ],
        ordered=False,
    )
    for key in ("inserted", "upserted", "replaced"):
        got = await things.find_one({"_id": key})
        assert got is not None
        _assert_same_types(got, _all_types(key))

    sample = _all_types("x")
    for field in ("int64", "decimal", "uuid", "when", "bytes", "oid", "nested"):
        found = await things.find({field: sample[field]}, {"_id": 1}).to_list()
        assert sorted(d["_id"] for d in found) == ["inserted", "replaced", "upserted"], field

    if isinstance(server, MongoStandin):
        stored = server.collection(db_name, "things").find_one({"_id": "inserted"})
        assert stored is not None
        assert stored["uuid"] == Binary.from_uuid(sample["uuid"])  # subtype 4, standard
        assert type(stored["int64"]) is Int64
        assert stored["decimal"] == sample["decimal"]


async def test_documents_found_and_updated_by_every_kind_of_id(things: Collection) -> None:
    ids: list[Any] = [
        uuid.UUID("0b7c2f3e-8d1a-4e5f-9a6b-1c2d3e4f5a6b"),
        ObjectId("65f0000000000000000000aa"),
        datetime.datetime(2024, 5, 6, 7, 8, 9, 10000),
        b"\x00raw-id",
        Int64(2**50),
        "text",
        0,
        -1.5,
        {"compound": 1, "key": "x"},
    ]
    result = await things.bulk_write(
        [UpdateOne({"_id": i}, {"$set": {"n": n}}, upsert=True) for n, i in enumerate(ids)],
        ordered=False,
    )
    assert result.upserted_count == len(ids)
    result = await things.bulk_write(
        [UpdateOne({"_id": i}, {"$inc": {"n": 100}}, upsert=True) for i in ids], ordered=False
    )
    assert (result.matched_count, result.modified_count, result.upserted_count) == (9, 9, 0)
    for n, i in enumerate(ids):
        assert await things.find_one({"_id": i}) == {"_id": i, "n": n + 100}
    assert await things.count_documents({"_id": {"$in": ids[:4]}}) == 4
    assert await things.find_one({"_id": True}) is None  # bool is not 1 or 0
    deleted = await things.bulk_write([DeleteOne({"_id": i}) for i in ids], ordered=False)
    assert deleted.deleted_count == len(ids)


async def test_unsupported_queries_fail_cleanly(server: MongoServer, things: Collection) -> None:
    standin = require_faults(server)
    await things.insert_one({"_id": 1})
    with pytest.raises(OperationFailure) as caught:
        await things.find_one({"$where": "this._id == 1"})
    assert "mongomock" in str(caught.value) or "not supported" in str(caught.value)
    with pytest.raises(OperationFailure):
        await things.find_one({"a": {"$nosuchop": 1}})
    assert standin.internal_errors == []


def test_a_synchronous_client_works_too(server: MongoServer) -> None:
    client: MongoClient[dict[str, Any]] = MongoClient(server.url, **client_options())
    try:
        assert client.admin.command("ping")["ok"] == 1.0
    finally:
        client.close()


async def test_timezone_aware_datetimes(client: Client, db_name: str) -> None:
    aware = (
        client.get_database(db_name)
        .get_collection("times")
        .with_options(codec_options=client.codec_options.with_options(tz_aware=True))
    )
    when = datetime.datetime(2030, 1, 1, 12, 0, 0, 5000, tzinfo=datetime.UTC)
    await aware.insert_one({"_id": 1, "when": when})
    got = await aware.find_one({"_id": 1})
    assert got is not None
    assert got["when"] == when.replace(microsecond=5000)
    assert got["when"].tzinfo is not None


async def test_duplicate_key_is_a_write_error(things: Collection) -> None:
    await things.insert_one({"_id": 1})
    with pytest.raises(DuplicateKeyError):
        await things.insert_one({"_id": 1})
    with pytest.raises(BulkWriteError) as caught:
        await things.insert_many([{"_id": 2}, {"_id": 1}, {"_id": 3}], ordered=False)
    details = caught.value.details
    assert details["nInserted"] == 2
    assert [(e["index"], e["code"]) for e in details["writeErrors"]] == [(1, DUPLICATE_KEY)]


async def test_refused_documents_are_write_errors_and_the_others_are_written(
    server: MongoServer, things: Collection, db_name: str
) -> None:
    standin = require_faults(server)
    await things.insert_one({"_id": 7, "v": "fine"})
    standin.reject_documents_where(lambda doc: doc.get("bad") is True)

    requests: list[Any] = [
        UpdateOne({"_id": k}, {"$set": {"v": k, "bad": k in (1, 3)}}, upsert=True) for k in range(5)
    ]
    requests.append(UpdateOne({"_id": 7}, {"$set": {"v": "changed", "bad": True}}, upsert=True))
    requests.append(ReplaceOne({"_id": 8}, {"bad": True}, upsert=True))
    requests.append(DeleteOne({"_id": 7}))
    with pytest.raises(BulkWriteError) as caught:
        await things.bulk_write(requests, ordered=False)
    details = caught.value.details
    assert [(e["index"], e["code"]) for e in details["writeErrors"]] == [
        (1, BAD_VALUE),
        (3, BAD_VALUE),
        (5, BAD_VALUE),
        (6, BAD_VALUE),
    ]
    assert all("validation" in e["errmsg"] for e in details["writeErrors"])
    assert details["nUpserted"] == 3
    assert [u["index"] for u in details["upserted"]] == [0, 2, 4]
    assert details["nRemoved"] == 1  # the refused update left _id 7 as it was; then deleted
    stored = server.collection(db_name, "things")
    assert sorted(d["_id"] for d in stored.find({})) == [0, 2, 4]

    # Ordered: stops at the first refused document.
    with pytest.raises(BulkWriteError) as caught:
        await things.bulk_write(
            [UpdateOne({"_id": k}, {"$set": {"bad": k == 11}}, upsert=True) for k in (10, 11, 12)],
            ordered=True,
        )
    details = caught.value.details
    assert [e["index"] for e in details["writeErrors"]] == [1]
    assert details["nUpserted"] == 1
    assert stored.find_one({"_id": 12}) is None


async def test_refused_inserts_with_document_too_large(
    server: MongoServer, things: Collection, db_name: str
) -> None:
    standin = require_faults(server)
    standin.reject_documents_where(
        lambda doc: len(doc.get("blob", b"")) > 1000, code=DOCUMENT_TOO_LARGE
    )
    docs = [{"_id": k, "blob": b"x" * (5000 if k == 2 else 10)} for k in range(4)]
    with pytest.raises(BulkWriteError) as caught:
        await things.insert_many(docs, ordered=False)
    details = caught.value.details
    assert details["nInserted"] == 3
    (error,) = details["writeErrors"]
    assert (error["index"], error["code"]) == (2, DOCUMENT_TOO_LARGE)
    assert "16MB" in error["errmsg"]

    standin.accept_all_documents()
    await things.insert_one(docs[2])
    assert server.collection(db_name, "things").count_documents({}) == 4


async def test_unreachable_while_down_and_working_again_with_the_same_data(
    server: MongoServer, db_name: str
) -> None:
    standin = require_faults(server)
    options = client_options(serverSelectionTimeoutMS=1000, heartbeatFrequencyMS=500)
    client: Client = AsyncMongoClient(standin.url, **options)
    try:
        things = client[db_name]["things"]
        await things.insert_one({"_id": 1})
        port = standin.port
        upsert = [UpdateOne({"_id": 2}, {"$set": {"v": 2}}, upsert=True)]

        standin.go_down()
        assert not standin.is_up
        started = time.monotonic()
        with pytest.raises(ConnectionFailure):  # its pooled connection was closed
            await things.bulk_write(upsert)
        with pytest.raises(ServerSelectionTimeoutError):  # and nothing answers any more
            await things.bulk_write(upsert)
        with pytest.raises(ServerSelectionTimeoutError):
            await things.find_one({"_id": 1})
        assert time.monotonic() - started < 10
        # New connections are refused (checked with a plain socket: closing a second
        # AsyncMongoClient while its monitor is mid-connect leaks a socket in pymongo 4.20).
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()

        standin.come_back()
        assert standin.is_up
        assert standin.port == port
        started = time.monotonic()
        for attempt in range(3):  # the client notices within a heartbeat; retry like a flush
            try:
                await things.bulk_write(upsert)
                break
            except ConnectionFailure:
                if attempt == 2:
                    raise
        assert time.monotonic() - started < 5
        assert sorted(d["_id"] for d in await things.find({}).to_list()) == [1, 2]
        assert standin.collection(db_name, "things").count_documents({}) == 2
    finally:
        await client.close()


async def test_collections_and_indexes(client: Client, db_name: str) -> None:
    db = client[db_name]
    await db.create_collection("made")
    assert "made" in await db.list_collection_names()
    with pytest.raises(OperationFailure):
        await db.command("create", "made")

    things = db["things"]
    name = await things.create_index([("email", ASCENDING)], unique=True)
    indexes = {i["name"]: i async for i in await things.list_indexes()}
    assert set(indexes) == {"_id_", name}
    assert indexes[name]["unique"] is True
    assert dict(indexes[name]["key"]) == {"email": 1}
    await things.insert_one({"email": "a@example.org"})
    with pytest.raises(DuplicateKeyError):
        await things.insert_one({"email": "a@example.org"})
    await things.drop_index(name)
    assert list(await things.index_information()) == ["_id_"]

    assert [i async for i in await db["never"].list_indexes()] == []
    await db.drop_collection("made")
    await db.drop_collection("never")  # dropping a missing collection is fine
    assert await db.list_collection_names() == ["things"]
    assert db_name in await client.list_database_names()
    await client.drop_database(db_name)
    assert db_name not in await client.list_database_names()


async def test_find_one_and_update_and_distinct(things: Collection) -> None:
    await things.insert_many([{"_id": k, "v": k % 3} for k in range(9)])
    before = await things.find_one_and_update({"_id": 4}, {"$set": {"v": 9}})
    assert before == {"_id": 4, "v": 1}
    after = await things.find_one_and_update(
        {"_id": 50}, {"$set": {"v": 50}}, upsert=True, return_document=ReturnDocument.AFTER
    )
    assert after == {"_id": 50, "v": 50}
    removed = await things.find_one_and_delete({"_id": 0})
    assert removed == {"_id": 0, "v": 0}
    assert sorted(await things.distinct("v")) == [0, 1, 2, 9, 50]


def test_mongo_server_uses_a_real_mongod_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PACKETSTACK_MONGO_URL", "mongodb://127.0.0.1:9/")
    with mongo_server() as server:
        assert isinstance(server, RealMongo)
        assert server.url == "mongodb://127.0.0.1:9/"
        assert server.supports_faults is False
        with pytest.raises(pytest.skip.Exception, match="real mongod"):
            require_faults(server)


def test_start_stop_lifecycle() -> None:
    standin = MongoStandin()
    url = standin.start()
    assert url == f"mongodb://127.0.0.1:{standin.port}/"
    assert standin.start() == url
    standin.stop()
    standin.stop()
    with pytest.raises(RuntimeError):
        _ = standin.url
