"""A MongoDB stand-in for the test suite: a wire-protocol server on 127.0.0.1, backed by
mongomock, that pymongo's ``AsyncMongoClient`` (and ``MongoClient``) can talk to.

There is no mongod on the development machines, so the tests of the MongoDB bridge start a
``MongoStandin``: MockupDB parses the requests and encodes the replies (OP_MSG, plus the
OP_QUERY handshake), a small threaded socket server of our own carries them, and every command
is executed against an in-memory ``mongomock.MongoClient`` whose data the tests can inspect.
It answers as a standalone MongoDB 7.0 server (wire version 21).

Fault injection: ``reject_documents_where(predicate)`` makes matching documents fail with a
writeError while the others are written, and ``go_down()`` / ``come_back()`` close every
connection and refuse new ones, then answer again on the same port with the same data.

With PACKETSTACK_MONGO_URL set, ``mongo_server()`` yields a real mongod instead (fault
injection is then not available; see ``require_faults``).

Typical use::

    with mongo_server() as server:
        client = AsyncMongoClient(server.url, **client_options())
        ...
        assert server.collection("db", "things").count_documents({}) == 3
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import itertools
import os
import re
import select
import socket
import threading
import uuid
import weakref
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import bson
import mockupdb  # type: ignore[import-untyped]
import mongomock
import pymongo
import pytest
from bson.int64 import Int64
from bson.objectid import ObjectId
from bson.raw_bson import RawBSONDocument
from mongomock import collection as _mongomock_collection
from mongomock.filtering import filter_applies
from pymongo.collection import Collection

MONGO_URL_ENV = "PACKETSTACK_MONGO_URL"

MAX_WIRE_VERSION = 21  # MongoDB 7.0
MIN_WIRE_VERSION = 0
MAX_BSON_OBJECT_SIZE = 16 * 1024 * 1024
MAX_MESSAGE_SIZE_BYTES = 48_000_000
MAX_WRITE_BATCH_SIZE = 100_000
DEFAULT_FIRST_BATCH_SIZE = 101
SERVER_VERSION = "7.0.0"

# Error codes (the ones the stand-in answers with).
INTERNAL_ERROR = 1
BAD_VALUE = 2
FAILED_TO_PARSE = 9
UNAUTHORIZED = 13
ILLEGAL_OPERATION = 20
NAMESPACE_NOT_FOUND = 26
INDEX_NOT_FOUND = 27
CURSOR_NOT_FOUND = 43
INVALID_NAMESPACE = 73
NAMESPACE_EXISTS = 48
COMMAND_NOT_FOUND = 59
COMMAND_NOT_SUPPORTED = 115
DOCUMENT_VALIDATION_FAILURE = 121
DOCUMENT_TOO_LARGE = 10334
DUPLICATE_KEY = 11000

CODE_NAMES: dict[int, str] = {
    INTERNAL_ERROR: "InternalError",
    BAD_VALUE: "BadValue",
    FAILED_TO_PARSE: "FailedToParse",
    UNAUTHORIZED: "Unauthorized",
    ILLEGAL_OPERATION: "IllegalOperation",
    NAMESPACE_NOT_FOUND: "NamespaceNotFound",
    INDEX_NOT_FOUND: "IndexNotFound",
    CURSOR_NOT_FOUND: "CursorNotFound",
    INVALID_NAMESPACE: "InvalidNamespace",
    NAMESPACE_EXISTS: "NamespaceExists",
    COMMAND_NOT_FOUND: "CommandNotFound",
    COMMAND_NOT_SUPPORTED: "CommandNotSupported",
    DOCUMENT_VALIDATION_FAILURE: "DocumentValidationFailure",
    DOCUMENT_TOO_LARGE: "BSONObjectTooLarge",
    DUPLICATE_KEY: "DuplicateKey",
}

_MORE_TO_COME = mockupdb.OP_MSG_FLAGS["moreToCome"]

Document = Mapping[str, Any]
Predicate = Callable[[Document], bool]
Handler = Callable[["MongoStandin", str, Document, int], dict[str, Any]]


# --------------------------------------------------------------------------------------------
# Helpers for tests


def client_options(**overrides: Any) -> dict[str, Any]:
    """Keyword arguments for ``AsyncMongoClient(url, **client_options())``: short timeouts so
    a test never waits long for an unreachable server, and standard UUIDs."""
    options: dict[str, Any] = {
        "serverSelectionTimeoutMS": 2000,
        "connectTimeoutMS": 2000,
        "socketTimeoutMS": 20000,
        "uuidRepresentation": "standard",
    }
    options.update(overrides)
    return options


def unique_database_name(prefix: str = "packetstack_test") -> str:
    """A database name no other test uses (matters against a shared real mongod)."""
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


class MongoServer(Protocol):
    """What ``mongo_server()`` yields: the stand-in, or a real mongod."""

    supports_faults: bool

    @property
    def url(self) -> str: ...

    def collection(self, db: str, name: str) -> Collection[dict[str, Any]]:
        """A synchronous collection (mongomock or pymongo) to inspect what was written."""
        ...


class RealMongo:
    """A real mongod at ``url`` (from PACKETSTACK_MONGO_URL); ``collection`` reads through a
    synchronous pymongo ``MongoClient``. No fault injection."""

    supports_faults = False

    def __init__(self, url: str) -> None:
        self._url = url
        self._client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
            url, serverSelectionTimeoutMS=5000, uuidRepresentation="standard"
        )

    @property
    def url(self) -> str:
        return self._url

    def collection(self, db: str, name: str) -> Collection[dict[str, Any]]:
        return self._client[db][name]

    def close(self) -> None:
        self._client.close()


class OwnDatabase:
    """A test's own database on ``server``, read beside the code under test and dropped at
    the end."""

    def __init__(self, server: MongoServer, prefix: str = "packetstack_test") -> None:
        self.server = server
        self.database = unique_database_name(prefix)

    def collection(self, name: str) -> Collection[dict[str, Any]]:
        return self.server.collection(self.database, name)

    def documents(self, name: str) -> dict[Any, dict[str, Any]]:
        """What collection ``name`` holds, by _id (read between the writes under test)."""
        return {document["_id"]: dict(document) for document in self.collection(name).find({})}

    async def drop(self) -> None:
        client = self.collection("any").database.client
        await asyncio.to_thread(client.drop_database, self.database)


@contextlib.contextmanager
def mongo_server() -> Iterator[MongoServer]:
    """A MongoDB server for one test: the real mongod named by PACKETSTACK_MONGO_URL when it
    is set, otherwise a started ``MongoStandin`` (stopped on exit, after checking, unless
    the block raised, that it met no internal error)."""
    url = os.environ.get(MONGO_URL_ENV)
    if url:
        real = RealMongo(url)
        try:
            yield real
        finally:
            real.close()
    else:
        with MongoStandin() as standin:
            yield standin
            assert standin.internal_errors == []


def require_faults(server: MongoServer) -> MongoStandin:
    """The stand-in behind ``server``; skips the test when it is a real mongod, which cannot
    be made to refuse documents or go down on request."""
    if not isinstance(server, MongoStandin):
        pytest.skip(
            f"fault injection needs the MongoDB stand-in; {MONGO_URL_ENV} points at a real "
            "mongod, which cannot be made to reject documents or go down"
        )
    return server


# --------------------------------------------------------------------------------------------
# The stand-in


class CommandError(Exception):
    """A command (or one write statement) fails with a MongoDB error code."""

    def __init__(self, code: int, errmsg: str) -> None:
        super().__init__(errmsg)
        self.code = code
        self.errmsg = errmsg

    def reply(self) -> dict[str, Any]:
        return {
            "ok": 0.0,
            "errmsg": self.errmsg,
            "code": self.code,
            "codeName": CODE_NAMES.get(self.code, "UnknownError"),
        }

    def write_error(self, index: int) -> dict[str, Any]:
        return {"index": index, "code": self.code, "errmsg": self.errmsg}


@dataclass
class _Rejection:
    predicate: Predicate
    code: int
    errmsg: str | None


@dataclass
class _Cursor:
    ns: str
    docs: deque[RawBSONDocument]


@dataclass
class _Outcome:
    """The result of one update statement."""

    n: int = 0
    modified: int = 0
    upserted_id: Any = None
    upserted: bool = False
    error: CommandError | None = None


class _IdIndexedCollection(mongomock.Collection):  # type: ignore[type-arg]
    """A mongomock collection that finds ``{"_id": <scalar>}`` by a dictionary lookup instead
    of scanning every document (mongomock scans), so writing thousands of documents by _id
    stays linear. The lookup is confirmed by mongomock's own matcher."""

    def _iter_documents(self, filter: Any) -> Iterator[dict[str, Any]]:
        this: Any = self  # mongomock's stubs describe pymongo's Collection, not mongomock's
        if isinstance(filter, Mapping) and len(filter) == 1 and "_id" in filter:
            key = filter["_id"]
            if isinstance(key, _FAST_ID_TYPES) and not isinstance(key, bool):
                store = this._store
                if key in store:
                    doc: dict[str, Any] = store[key]
                    if _matches(filter, doc):
                        return iter([doc])
                return iter([])
        scan: Any = _mongomock_collection.Collection._iter_documents
        documents: Iterator[dict[str, Any]] = scan(this, filter)
        return documents


_FAST_ID_TYPES = (str, ObjectId, int, uuid.UUID, datetime.datetime, bytes)


def _matches(filter: Document, doc: Document) -> bool:
    """mongomock's implementation of MongoDB's query matching."""
    return bool(filter_applies(filter, doc))  # type: ignore[no-untyped-call]


def _is_id_filter(q: Document) -> bool:
    return len(q) == 1 and "_id" in q and not isinstance(q["_id"], Mapping | re.Pattern)


def _is_replacement(u: Any) -> bool:
    return isinstance(u, Mapping) and not any(str(k).startswith("$") for k in u)


def _too_large_message(size: int) -> str:
    return (
        f"BSONObj size: {size} (0x{size:X}) is invalid. "
        f"Size must be between 0 and {MAX_BSON_OBJECT_SIZE}(16MB)"
    )


class MongoStandin:
    """A MongoDB wire-protocol server on 127.0.0.1 backed by mongomock.

    ``start()`` returns ``mongodb://127.0.0.1:PORT/``; ``stop()`` (or leaving the ``with``
    block; at the latest, interpreter exit) shuts it down. Requests are served by one daemon
    thread per connection; commands that touch data run one at a time under a lock.
    """

    supports_faults = True

    def __init__(self, *, port: int = 0) -> None:
        self._port = port
        self.data: mongomock.MongoClient[dict[str, Any]] = mongomock.MongoClient()
        self.command_counts: Counter[str] = Counter()
        self.internal_errors: list[BaseException] = []
        self._lock = threading.RLock()  # the data, the cursors, the rejections
        self._stats_lock = threading.Lock()
        self._rejections: list[_Rejection] = []
        self._cursors: dict[int, _Cursor] = {}
        self._cursor_ids = itertools.count(7_000_000_001)
        self._connection_ids = itertools.count(1)
        self._listener: _Listener | None = None
        self._started = False
        self._finalizer: weakref.finalize[Any, Any] | None = None

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        if not self._started:
            raise RuntimeError("the MongoDB stand-in is not started")
        return f"mongodb://127.0.0.1:{self._port}/"

    @property
    def is_up(self) -> bool:
        return self._listener is not None

    def start(self) -> str:
        """Listen on 127.0.0.1 (a free port unless one was given) and return the URL."""
        if self._started:
            return self.url
        self._listener = _Listener(self, self._port)
        self._port = self._listener.port
        self._started = True
        self._finalizer = weakref.finalize(self, _Listener.close_quietly, self._listener)
        return self.url

    def stop(self) -> None:
        """Close every connection and the listening socket. Safe to call twice."""
        self._close_listener()
        self._started = False

    def __enter__(self) -> MongoStandin:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def go_down(self) -> None:
        """Become unreachable: close every open connection and refuse new ones (the port is
        kept, the data too). Clients see ConnectionFailure / AutoReconnect, then
        ServerSelectionTimeoutError."""
        if not self._started:
            raise RuntimeError("the MongoDB stand-in is not started")
        self._close_listener()

    def come_back(self) -> None:
        """Answer again, on the same port, with the same data (after ``go_down``)."""
        if not self._started:
            raise RuntimeError("the MongoDB stand-in is not started")
        if self._listener is None:
            self._listener = _Listener(self, self._port)
            self._finalizer = weakref.finalize(self, _Listener.close_quietly, self._listener)

    def _close_listener(self) -> None:
        listener, self._listener = self._listener, None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if listener is not None:
            listener.close()

    # -- inspection and fault injection ---------------------------------------------------

    def collection(self, db: str, name: str) -> Collection[dict[str, Any]]:
        """The mongomock collection behind ``db.name`` (read it between client operations)."""
        with self._lock:
            return self._collection(db, name)

    def reject_documents_where(
        self, predicate: Predicate, *, code: int = BAD_VALUE, errmsg: str | None = None
    ) -> None:
        """Refuse every written document for which ``predicate(document)`` is true: inserts
        (the document as sent), updates, replacements and upserts (the document as it would
        be stored, which is then left as it was) get a writeError with ``code`` (BAD_VALUE by
        default, or e.g. DOCUMENT_TOO_LARGE) while the other statements are applied.
        findAndModify fails as a whole. Deletes are never refused. Predicates add up."""
        with self._lock:
            self._rejections.append(_Rejection(predicate, code, errmsg))

    def accept_all_documents(self) -> None:
        """Drop every ``reject_documents_where`` predicate."""
        with self._lock:
            self._rejections.clear()

    @property
    def open_cursors(self) -> int:
        with self._lock:
            return len(self._cursors)

    # -- request handling (called on the connection threads) ------------------------------

    def _record_internal_error(self, exc: BaseException) -> None:
        with self._stats_lock:
            self.internal_errors.append(exc)

    def _next_connection_id(self) -> int:
        with self._stats_lock:
            return next(self._connection_ids)

    def _execute(self, request: mockupdb.Request, connection_id: int) -> dict[str, Any]:
        """Run one command and return the reply document (never raises). Commands that touch
        no data (the handshake, ping, ...) do not wait for the data lock, so pymongo's
        monitor is answered at once even while a long bulk write runs."""
        doc = request.doc
        name = next(iter(doc), "")
        db = request.namespace or "admin"
        if isinstance(request, mockupdb.OpMsg):
            db = doc.get("$db", db)
        with self._stats_lock:
            self.command_counts[name] += 1
        handler = self._handlers.get(name) or self._handlers.get(name.lower())
        try:
            if "txnNumber" in doc or doc.get("startTransaction"):
                raise CommandError(
                    ILLEGAL_OPERATION,
                    "Transaction numbers are only allowed on a replica set member or mongos",
                )
            if handler is None:
                raise CommandError(COMMAND_NOT_FOUND, f"no such command: '{name}'")
            if handler in self._lock_free:
                reply = handler(self, db, doc, connection_id)
            else:
                with self._lock:
                    reply = handler(self, db, doc, connection_id)
        except CommandError as exc:
            return exc.reply()
        except (NotImplementedError, mongomock.OperationFailure, bson.errors.BSONError) as exc:
            return _as_command_error(exc).reply()  # what mongomock refuses or lacks
        except Exception as exc:
            self._record_internal_error(exc)
            return CommandError(INTERNAL_ERROR, f"MongoDB stand-in internal error: {exc!r}").reply()
        reply.setdefault("ok", 1.0)
        return reply

    def _collection(self, db: str, name: str) -> Collection[dict[str, Any]]:
        if not name or "$" in name or "\x00" in name:
            raise CommandError(INVALID_NAMESPACE, f"Invalid collection name: {name!r}")
        database = self.data[db]
        accesses: dict[str, Any] = vars(database)["_collection_accesses"]
        cached = accesses.get(name)
        if isinstance(cached, _IdIndexedCollection):
            return cached
        base = database.get_collection(name)  # validates the name
        fast = _IdIndexedCollection(
            database,
            name,
            _db_store=database._store,
            read_preference=base.read_preference,
            codec_options=base.codec_options,
        )
        accesses[name] = fast
        return fast

    def _exists(self, db: str, name: str) -> bool:
        return bool(name in self.data[db].list_collection_names())

    def _check_stored(self, coll: Collection[dict[str, Any]], _id: Any) -> None:
        stored = coll.find_one({"_id": _id})
        if stored is not None:
            self._check_document(stored)

    def _check_document(self, doc: Document) -> None:
        size = len(bson.encode(doc))
        if size > MAX_BSON_OBJECT_SIZE:
            raise CommandError(DOCUMENT_TOO_LARGE, _too_large_message(size))
        for rejection in self._rejections:
            if rejection.predicate(doc):
                errmsg = rejection.errmsg
                if errmsg is None:
                    if rejection.code == DOCUMENT_TOO_LARGE:
                        errmsg = _too_large_message(MAX_BSON_OBJECT_SIZE + 1)
                    else:
                        errmsg = f"Document failed validation (refused by the stand-in): {doc!r}"
                raise CommandError(rejection.code, errmsg)

    # -- cursors --------------------------------------------------------------------------

    def _cursor_reply(
        self,
        ns: str,
        docs: Iterable[Document],
        batch_size: int | None,
        single_batch: bool = False,
    ) -> dict[str, Any]:
        pending = deque(RawBSONDocument(bson.encode(d)) for d in docs)
        first = _take_batch(pending, DEFAULT_FIRST_BATCH_SIZE if batch_size is None else batch_size)
        cursor_id = 0
        if pending and not single_batch:
            cursor_id = next(self._cursor_ids)
            self._cursors[cursor_id] = _Cursor(ns, pending)
        return {"cursor": {"firstBatch": first, "id": Int64(cursor_id), "ns": ns}}

    def _cmd_get_more(self, db: str, doc: Document, _conn: int) -> dict[str, Any]:
        cursor_id = int(doc["getMore"])
        ns = f"{db}.{doc.get('collection')}"
        cursor = self._cursors.get(cursor_id)
        if cursor is None:
            raise CommandError(CURSOR_NOT_FOUND, f"cursor id {cursor_id} not found")
        if cursor.ns != ns and not cursor.ns.startswith(f"{db}.$cmd"):
            raise CommandError(
                UNAUTHORIZED,
                f"Requested getMore on namespace '{ns}', but cursor belongs to a different "
                f"namespace {cursor.ns}",
            )
        batch_size = doc.get("batchSize")
        batch = _take_batch(cursor.docs, int(batch_size) if batch_size else None)
        if not cursor.docs:
            del self._cursors[cursor_id]
            cursor_id = 0
        return {"cursor": {"nextBatch": batch, "id": Int64(cursor_id), "ns": cursor.ns}}

    def _cmd_kill_cursors(self, db: str, doc: Document, _conn: int) -> dict[str, Any]:
        killed, not_found = [], []
        for cursor_id in doc.get("cursors", []):
            if self._cursors.pop(int(cursor_id), None) is None:
                not_found.append(cursor_id)
            else:
                killed.append(cursor_id)
        return {
            "cursorsKilled": killed,
            "cursorsNotFound": not_found,
            "cursorsAlive": [],
            "cursorsUnknown": [],
        }

    def _forget_cursors(self, prefix: str) -> None:
        for cursor_id in [i for i, c in self._cursors.items() if c.ns.startswith(prefix)]:
            del self._cursors[cursor_id]

    # -- handshake and server commands ----------------------------------------------------

    def _cmd_hello(self, db: str, doc: Document, conn: int) -> dict[str, Any]:
        name = next(iter(doc))
        primary_key = "isWritablePrimary" if name == "hello" else "ismaster"
        return {
            "helloOk": True,
            primary_key: True,
            "maxBsonObjectSize": MAX_BSON_OBJECT_SIZE,
            "maxMessageSizeBytes": MAX_MESSAGE_SIZE_BYTES,
            "maxWriteBatchSize": MAX_WRITE_BATCH_SIZE,
            "localTime": datetime.datetime.now(datetime.UTC),
            "logicalSessionTimeoutMinutes": 30,
            "connectionId": conn,
            "minWireVersion": MIN_WIRE_VERSION,
            "maxWireVersion": MAX_WIRE_VERSION,
            "readOnly": False,
        }

    def _cmd_ok(self, db: str, doc: Document, _conn: int) -> dict[str, Any]:
        return {}

    def _cmd_build_info(self, db: str, doc: Document, _conn: int) -> dict[str, Any]:
        return {
            "version": SERVER_VERSION,
            "gitVersion": "mongo-standin",
            "versionArray": [int(p) for p in SERVER_VERSION.split(".")] + [0],
            "bits": 64,
            "debug": False,
            "maxBsonObjectSize": MAX_BSON_OBJECT_SIZE,
            "storageEngines": ["mongomock"],
        }

    # -- writes ---------------------------------------------------------------------------

    def _cmd_insert(self, db: str, doc: Document, _conn: int) -> dict[str, Any]:
        coll = self._collection(db, doc["insert"])
        n = 0

        def insert(_index: int, document: Document) -> None:
            nonlocal n
            document = dict(document)
            if "_id" not in document:
                document["_id"] = ObjectId()
            self._check_document(document)
            try:
                coll.insert_one(document)
            except mongomock.DuplicateKeyError as exc:
                if coll.find_one({"_id": document["_id"]}, {"_id": 1}) is not None:
                    raise CommandError(
                        DUPLICATE_KEY,
                        f"E11000 duplicate key error collection: {db}.{coll.name} "
                        f"index: _id_ dup key: {{ _id: {document['_id']!r} }}",
                    ) from exc
                raise
            n += 1

        errors = _each_statement(doc, "documents", insert)
        return _write_reply({"n": n}, errors)

    def _cmd_update(self, db: str, doc: Document, _conn: int) -> dict[str, Any]:
        coll = self._collection(db, doc["update"])
        n = modified = 0
        upserted: list[dict[str, Any]] = []

        def update(index: int, statement: Document) -> CommandError | None:
            nonlocal n, modified
            outcome = self._update_statement(coll, statement)
            n += outcome.n
            modified += outcome.modified
            if outcome.upserted:
                upserted.append({"index": index, "_id": outcome.upserted_id})
            return outcome.error

        errors = _each_statement(doc, "updates", update)
        reply: dict[str, Any] = {"n": n, "nModified": modified}
        if upserted:
            reply["upserted"] = upserted
        return _write_reply(reply, errors)

    def _update_statement(self, coll: Collection[dict[str, Any]], statement: Document) -> _Outcome:
        for option in ("arrayFilters", "collation", "sort"):
            if statement.get(option):
                raise CommandError(
                    COMMAND_NOT_SUPPORTED, f"update option {option!r} is not supported"
                )
        q = statement.get("q", {})
        u = statement["u"]
        multi = bool(statement.get("multi", False))
        upsert = bool(statement.get("upsert", False))
        replacement = _is_replacement(u)
        if replacement and multi:
            raise CommandError(FAILED_TO_PARSE, "multi update is not supported for replacement")

        def apply(filter: Document, upsert: bool) -> Any:
            if replacement:
                return coll.replace_one(filter, u, upsert=upsert)
            return coll.update_one(filter, u, upsert=upsert)

        if multi:
            targets = [d["_id"] for d in coll.find(q, {"_id": 1})]
        else:
            first = coll.find_one(q, {"_id": 1})
            targets = [] if first is None else [first["_id"]]

        outcome = _Outcome()
        if not targets:
            if not upsert:
                return outcome
            result = apply(q, True)
            new_id = result.upserted_id
            try:
                self._check_stored(coll, new_id)
            except CommandError as exc:
                coll.delete_one({"_id": new_id})
                outcome.error = exc
                return outcome
            outcome.n, outcome.upserted, outcome.upserted_id = 1, True, new_id
            return outcome

        for target in targets:
            before = coll.find_one({"_id": target})
            if before is None:
                continue
            filter = q if _is_id_filter(q) else {"$and": [q, {"_id": target}]}
            result = apply(filter, False)
            if not result.matched_count:
                continue
            if result.modified_count:
                try:
                    self._check_stored(coll, target)
                except CommandError as exc:
                    coll.replace_one({"_id": target}, before)
                    outcome.error = exc
                    return outcome
            outcome.n += 1
            outcome.modified += result.modified_count
        return outcome

    def _cmd_delete(self, db: str, doc: Document, _conn: int) -> dict[str, Any]:
        coll = self._collection(db, doc["delete"])
        n = 0

        def delete(_index: int, statement: Document) -> None:
            nonlocal n
            if statement.get("collation"):
                raise CommandError(COMMAND_NOT_SUPPORTED, "delete collation is not supported")
            q = statement.get("q", {})
            if statement.get("limit", 0) == 1:
                n += coll.delete_one(q).deleted_count
            else:
                n += coll.delete_many(q).deleted_count

        errors = _each_statement(doc, "deletes", delete)
        return _write_reply({"n": n}, errors)

    def _cmd_find_and_modify(self, db: str, doc: Document, _conn: int) -> dict[str, Any]:
        name = doc.get("findAndModify", doc.get("findandmodify"))
        coll = self._collection(db, name)
        q = doc.get("query") or {}
        sort = list((doc.get("sort") or {}).items()) or None
        fields = doc.get("fields") or None
        if doc.get("arrayFilters") or doc.get("collation"):
            raise CommandError(COMMAND_NOT_SUPPORTED, "arrayFilters/collation not supported")
        existing = coll.find_one(q, sort=sort)
        if doc.get("remove"):
            if existing is None:
                return {"lastErrorObject": {"n": 0}, "value": None}
            value = coll.find_one({"_id": existing["_id"]}, fields)
            coll.delete_one({"_id": existing["_id"]})
            return {"lastErrorObject": {"n": 1}, "value": value}
        if "update" not in doc:
            raise CommandError(FAILED_TO_PARSE, "Either an update or remove=true must be specified")
        statement = {"q": q, "u": doc["update"], "upsert": bool(doc.get("upsert"))}
        if existing is not None:
            statement["q"] = {"_id": existing["_id"]}
            old_value = coll.find_one({"_id": existing["_id"]}, fields)
        outcome = self._update_statement(coll, statement)
        if outcome.error is not None:
            raise outcome.error
        last_error: dict[str, Any] = {"n": outcome.n, "updatedExisting": existing is not None}
        if outcome.upserted:
            last_error["upserted"] = outcome.upserted_id
        value = None
        if doc.get("new"):
            target = existing["_id"] if existing is not None else outcome.upserted_id
            if outcome.n:
                value = coll.find_one({"_id": target}, fields)
        elif existing is not None:
            value = old_value
        return {"lastErrorObject": last_error, "value": value}

    # -- reads ----------------------------------------------------------------------------

    def _cmd_find(self, db: str, doc: Document, _conn: int) -> dict[str, Any]:
        name = doc["find"]
        coll = self._collection(db, name)
        for option in ("collation", "min", "max", "returnKey", "showRecordId", "tailable"):
            if doc.get(option):
                raise CommandError(COMMAND_NOT_SUPPORTED, f"find option {option!r} not supported")
        limit = int(doc.get("limit") or 0)
        single_batch = bool(doc.get("singleBatch")) or limit < 0
        cursor = coll.find(doc.get("filter") or {}, doc.get("projection") or None)
        sort = doc.get("sort")
        if sort:
            cursor = cursor.sort(list(sort.items()))
        if doc.get("skip"):
            cursor = cursor.skip(int(doc["skip"]))
        if limit:
            cursor = cursor.limit(abs(limit))
        batch_size = doc.get("batchSize")
        return self._cursor_reply(
            f"{db}.{name}",
            list(cursor),
            None if batch_size is None else int(batch_size),
            single_batch,
        )

    def _cmd_aggregate(self, db: str, doc: Document, _conn: int) -> dict[str, Any]:
        name = doc["aggregate"]
        if not isinstance(name, str):
            raise CommandError(COMMAND_NOT_SUPPORTED, "database-level aggregate is not supported")
        if doc.get("explain") or doc.get("collation"):
            raise CommandError(COMMAND_NOT_SUPPORTED, "aggregate explain/collation not supported")
        coll = self._collection(db, name)
        results = list(coll.aggregate(list(doc.get("pipeline", []))))
        batch_size = (doc.get("cursor") or {}).get("batchSize")
        return self._cursor_reply(
            f"{db}.{name}", results, None if batch_size is None else int(batch_size)
        )

    def _cmd_count(self, db: str, doc: Document, _conn: int) -> dict[str, Any]:
        coll = self._collection(db, doc["count"])
        kwargs: dict[str, Any] = {}
        if doc.get("skip"):
            kwargs["skip"] = int(doc["skip"])
        if doc.get("limit"):
            kwargs["limit"] = abs(int(doc["limit"]))
        return {"n": coll.count_documents(doc.get("query") or {}, **kwargs)}

    def _cmd_distinct(self, db: str, doc: Document, _conn: int) -> dict[str, Any]:
        coll = self._collection(db, doc["distinct"])
        return {"values": coll.distinct(doc["key"], doc.get("query") or None)}

    # -- namespaces and indexes -----------------------------------------------------------

    def _cmd_create(self, db: str, doc: Document, _conn: int) -> dict[str, Any]:
        name = doc["create"]
        self._collection(db, name)
        if self._exists(db, name):
            raise CommandError(NAMESPACE_EXISTS, f"Collection {db}.{name} already exists.")
        self.data[db].create_collection(name)
        return {}

    def _cmd_drop(self, db: str, doc: Document, _conn: int) -> dict[str, Any]:
        name = doc["drop"]
        if not self._exists(db, name):
            return {}
        indexes = len(self._collection(db, name).index_information())
        self.data[db].drop_collection(name)
        self._forget_cursors(f"{db}.{name}")
        return {"ns": f"{db}.{name}", "nIndexesWas": indexes}

    def _cmd_drop_database(self, db: str, doc: Document, _conn: int) -> dict[str, Any]:
        self.data.drop_database(db)
        self._forget_cursors(f"{db}.")
        return {}

    def _cmd_rename_collection(self, db: str, doc: Document, _conn: int) -> dict[str, Any]:
        source_db, _, source = str(doc["renameCollection"]).partition(".")
        target_db, _, target = str(doc["to"]).partition(".")
        if source_db != target_db:
            raise CommandError(COMMAND_NOT_SUPPORTED, "renaming across databases")
        if not self._exists(source_db, source):
            raise CommandError(NAMESPACE_NOT_FOUND, "Source collection does not exist")
        if self._exists(target_db, target):
            if not doc.get("dropTarget"):
                raise CommandError(NAMESPACE_EXISTS, "target namespace exists")
            self.data[target_db].drop_collection(target)
        self._collection(source_db, source).rename(target)
        self._forget_cursors(f"{source_db}.{source}")
        return {}

    def _cmd_list_collections(self, db: str, doc: Document, _conn: int) -> dict[str, Any]:
        entries: list[dict[str, Any]] = []
        for name in sorted(self.data[db].list_collection_names()):
            entry: dict[str, Any] = {"name": name, "type": "collection"}
            if not doc.get("nameOnly"):
                entry["options"] = {}
                entry["info"] = {"readOnly": False}
                entry["idIndex"] = {"v": 2, "key": {"_id": 1}, "name": "_id_"}
            entries.append(entry)
        entries = [e for e in entries if _matches(doc.get("filter") or {}, e)]
        batch_size = (doc.get("cursor") or {}).get("batchSize")
        return self._cursor_reply(
            f"{db}.$cmd.listCollections", entries, None if batch_size is None else int(batch_size)
        )

    def _cmd_list_databases(self, db: str, doc: Document, _conn: int) -> dict[str, Any]:
        entries: list[dict[str, Any]] = []
        for name in sorted(self.data.list_database_names()):
            entry: dict[str, Any] = {"name": name}
            if not doc.get("nameOnly"):
                entry.update(sizeOnDisk=Int64(0), empty=False)
            entries.append(entry)
        entries = [e for e in entries if _matches(doc.get("filter") or {}, e)]
        reply: dict[str, Any] = {"databases": entries}
        if not doc.get("nameOnly"):
            reply["totalSize"] = Int64(0)
        return reply

    def _cmd_list_indexes(self, db: str, doc: Document, _conn: int) -> dict[str, Any]:
        name = doc["listIndexes"]
        if not self._exists(db, name):
            raise CommandError(NAMESPACE_NOT_FOUND, f"ns does not exist: {db}.{name}")
        entries = [
            {"v": info.get("v", 2), "key": dict(info["key"]), "name": index_name}
            | {k: v for k, v in info.items() if k not in ("v", "key")}
            for index_name, info in self._collection(db, name).index_information().items()
        ]
        batch_size = (doc.get("cursor") or {}).get("batchSize")
        return self._cursor_reply(
            f"{db}.$cmd.listIndexes.{name}",
            entries,
            None if batch_size is None else int(batch_size),
        )

    def _cmd_create_indexes(self, db: str, doc: Document, _conn: int) -> dict[str, Any]:
        name = doc["createIndexes"]
        existed = self._exists(db, name)
        coll = self._collection(db, name)
        if not existed:
            self.data[db].create_collection(name)
        before = len(coll.index_information())
        for spec in doc.get("indexes", []):
            options = {k: v for k, v in spec.items() if k not in ("key", "v", "background")}
            if options.pop("collation", None):
                raise CommandError(COMMAND_NOT_SUPPORTED, "index collation is not supported")
            try:
                coll.create_index(list(spec["key"].items()), **options)
            except mongomock.DuplicateKeyError as exc:
                raise CommandError(DUPLICATE_KEY, f"E11000 duplicate key error: {exc}") from exc
        return {
            "numIndexesBefore": before,
            "numIndexesAfter": len(coll.index_information()),
            "createdCollectionAutomatically": not existed,
        }

    def _cmd_drop_indexes(self, db: str, doc: Document, _conn: int) -> dict[str, Any]:
        name = doc["dropIndexes"]
        if not self._exists(db, name):
            raise CommandError(NAMESPACE_NOT_FOUND, f"ns not found {db}.{name}")
        coll = self._collection(db, name)
        was = len(coll.index_information())
        index = doc.get("index")
        try:
            if index == "*":
                coll.drop_indexes()
            elif isinstance(index, Mapping):
                coll.drop_index(list(index.items()))
            else:
                names: list[str] = [index] if isinstance(index, str) else list(index or [])
                for index_name in names:
                    coll.drop_index(index_name)
        except mongomock.OperationFailure as exc:
            raise CommandError(INDEX_NOT_FOUND, f"index not found: {index!r}") from exc
        return {"nIndexesWas": was}

    _handlers: ClassVar[dict[str, Handler]] = {
        "hello": _cmd_hello,
        "ismaster": _cmd_hello,
        "isMaster": _cmd_hello,
        "ping": _cmd_ok,
        "buildInfo": _cmd_build_info,
        "buildinfo": _cmd_build_info,
        "endSessions": _cmd_ok,
        "killSessions": _cmd_ok,
        "killCursors": _cmd_kill_cursors,
        "getMore": _cmd_get_more,
        "insert": _cmd_insert,
        "update": _cmd_update,
        "delete": _cmd_delete,
        "findAndModify": _cmd_find_and_modify,
        "findandmodify": _cmd_find_and_modify,
        "find": _cmd_find,
        "aggregate": _cmd_aggregate,
        "count": _cmd_count,
        "distinct": _cmd_distinct,
        "create": _cmd_create,
        "drop": _cmd_drop,
        "dropDatabase": _cmd_drop_database,
        "renameCollection": _cmd_rename_collection,
        "listCollections": _cmd_list_collections,
        "listDatabases": _cmd_list_databases,
        "listIndexes": _cmd_list_indexes,
        "createIndexes": _cmd_create_indexes,
        "dropIndexes": _cmd_drop_indexes,
    }
    _lock_free: ClassVar[frozenset[Handler]] = frozenset({_cmd_hello, _cmd_ok, _cmd_build_info})


def _take_batch(pending: deque[RawBSONDocument], limit: int | None) -> list[RawBSONDocument]:
    """Up to ``limit`` documents (all when None) and at most 16 MiB, at least one."""
    batch: list[RawBSONDocument] = []
    size = 0
    while pending and (limit is None or len(batch) < limit):
        length = len(pending[0].raw)
        if batch and size + length > MAX_BSON_OBJECT_SIZE:
            break
        batch.append(pending.popleft())
        size += length
    return batch


def _each_statement(
    doc: Document, key: str, apply: Callable[[int, Document], CommandError | None]
) -> list[dict[str, Any]]:
    """``apply(index, statement)`` to each statement of a write command's ``doc[key]`` in
    turn; the writeErrors of those that failed (raised, or returned an error), stopping at
    the first one when the write is ordered (the default)."""
    ordered = doc.get("ordered", True)
    errors: list[dict[str, Any]] = []
    for index, statement in enumerate(doc.get(key, [])):
        try:
            error = apply(index, statement)
        except Exception as exc:
            error = _as_command_error(exc)
        if error is not None:
            errors.append(error.write_error(index))
            if ordered:
                break
    return errors


def _write_reply(reply: dict[str, Any], errors: list[dict[str, Any]]) -> dict[str, Any]:
    """A write command's ``reply``, with its writeErrors when there are any."""
    if errors:
        reply["writeErrors"] = errors
    return reply


def _as_command_error(exc: Exception) -> CommandError:
    """A write statement's failure as a writeError (mongomock's errors keep their codes)."""
    if isinstance(exc, CommandError):
        return exc
    if isinstance(exc, mongomock.DuplicateKeyError):
        return CommandError(DUPLICATE_KEY, f"E11000 duplicate key error: {exc}")
    if isinstance(exc, mongomock.OperationFailure):
        return CommandError(exc.code or BAD_VALUE, str(exc))
    if isinstance(exc, NotImplementedError):
        return CommandError(COMMAND_NOT_SUPPORTED, f"not supported by the MongoDB stand-in: {exc}")
    if isinstance(exc, ValueError | TypeError | KeyError | bson.errors.BSONError):
        return CommandError(BAD_VALUE, str(exc))
    raise exc


# --------------------------------------------------------------------------------------------
# The socket server: MockupDB parses requests and encodes replies; one thread per connection.


class _Listener:
    """Listens on 127.0.0.1:port until ``close()``; serves each connection on a thread."""

    def __init__(self, standin: MongoStandin, port: int) -> None:
        self._standin = standin
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind(("127.0.0.1", port))
            self._sock.listen(128)
        except OSError:
            self._sock.close()
            raise
        self.port: int = self._sock.getsockname()[1]
        self._closed = threading.Event()
        self._guard = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"mongo-standin-{self.port}", daemon=True
        )
        self._accept_thread.start()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                readable, _, _ = select.select([self._sock], [], [], 0.05)
                if not readable:
                    continue
                conn, _ = self._sock.accept()
            except (OSError, ValueError):
                continue
            conn.setblocking(True)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            thread = threading.Thread(
                target=self._serve,
                args=(conn,),
                name=f"mongo-standin-conn-{self.port}",
                daemon=True,
            )
            with self._guard:
                if self._closed.is_set():
                    conn.close()
                    break
                self._connections.add(conn)
                self._threads.add(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        connection_id = self._standin._next_connection_id()
        try:
            while not self._closed.is_set():
                try:
                    request = mockupdb.mock_server_receive_request(conn, None)
                except Exception:
                    return  # closed by either side, or a message we do not speak
                if not getattr(request, "is_command", False) or len(request.docs) != 1:
                    return  # legacy opcodes (OP_INSERT, ...) are not used by pymongo 4
                if self._closed.is_set():
                    return  # went down while this request was in flight: never answered
                reply = self._standin._execute(request, connection_id)
                if isinstance(request, mockupdb.OpMsg) and request.flags & _MORE_TO_COME:
                    continue  # unacknowledged write: no reply
                try:
                    request.replies(reply)
                except bson.errors.BSONError as exc:
                    request.replies(
                        CommandError(INTERNAL_ERROR, f"cannot encode the reply: {exc}").reply()
                    )
        except OSError:
            return  # the client went away, or go_down()/stop() closed the connection
        except Exception as exc:
            self._standin._record_internal_error(exc)
        finally:
            with self._guard:
                self._connections.discard(conn)
                self._threads.discard(threading.current_thread())
            with contextlib.suppress(OSError):
                conn.close()

    def close(self) -> None:
        """Refuse new connections, close the open ones, wait for the threads."""
        with self._guard:
            if self._closed.is_set():
                return
            self._closed.set()
            connections = list(self._connections)
            threads = list(self._threads)
        self._accept_thread.join(5)
        self._sock.close()
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            thread.join(5)

    @staticmethod
    def close_quietly(listener: _Listener) -> None:
        with contextlib.suppress(Exception):
            listener.close()
