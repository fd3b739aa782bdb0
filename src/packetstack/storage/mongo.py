"""The MongoDB bridge, through pymongo's native async API.

One collection per map; the key is ``_id`` (tuple keys as their JSON text), a Struct's or
a dict's fields are the document, any other value is kept as ``{"_id": key, "value": v}``
(and so is a document whose only field is ``value``, which would read back ambiguously).
A flush is one unordered ``bulk_write`` of ReplaceOne(upsert) and DeleteOne per batch.

Values are stored as JSON-compatible data plus bytes (BSON binary): dates, times, UUIDs
and decimals are ISO / canonical strings, which round-trip exactly (BSON dates keep only
milliseconds), and the map's type reads them back.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from functools import partial
from typing import Any

import msgspec

from ..codec import _hooks
from ..errors import BridgeRejected, BridgeUnavailable, ConfigError
from .bridge import BridgeSettings, Entry, EntryCodec, MapSpec, converted

try:
    from pymongo import AsyncMongoClient, DeleteOne, ReplaceOne
    from pymongo.asynchronous.collection import AsyncCollection
    from pymongo.errors import (
        BulkWriteError,
        ConfigurationError,
        DocumentTooLarge,
        InvalidOperation,
        PyMongoError,
    )
    from pymongo.uri_parser import parse_uri
except ImportError as missing:  # pragma: no cover - depends on the installed extras
    raise ConfigError(
        f"the MongoDB bridge needs pymongo 4.13 or newer ({missing}): "
        "pip install 'packetstack[mongo]'"
    ) from missing

from bson.errors import InvalidDocument
from bson.int64 import Int64

WRAPPED = "value"  # the field holding a value that is not a document
# Codes of write errors caused by the document itself (retrying it would fail again).
_DATA_CODES = frozenset({2, 9, 14, 17, 52, 55, 56, 57, 10334, 11000, 17419, 121})


class MongoStore:
    """``MongoStore(name, settings)``: one database, ``open(maps)`` before use."""

    def __init__(self, name: str, settings: BridgeSettings, shared_loop: bool = True) -> None:
        self.name = name
        self.settings = settings
        self.shared_loop = shared_loop
        try:
            parsed = parse_uri(settings.url)
        except (ConfigurationError, ValueError) as exc:
            raise ConfigError(f"bridges.{name}.url is not a MongoDB URL: {exc}") from exc
        self.database_name = settings.database or parsed.get("database") or ""
        if not self.database_name:
            raise ConfigError(
                f"bridges.{name}: name the MongoDB database in the URL's path "
                "(mongodb://host/DATABASE) or in database = '...'"
            )
        self._client: AsyncMongoClient[dict[str, Any]] | None = None
        self._maps: dict[str, tuple[EntryCodec, str]] = {}

    async def open(self, maps: Sequence[MapSpec]) -> None:
        timeout_ms = int(self.settings.connect_timeout * 1000)
        self._client = AsyncMongoClient(
            self.settings.url,
            serverSelectionTimeoutMS=timeout_ms,
            connectTimeoutMS=timeout_ms,
            socketTimeoutMS=int(self.settings.timeout * 1000),
            uuidRepresentation="standard",
        )
        for spec in maps:
            self._maps[spec.name] = (EntryCodec(spec), spec.table)
        try:
            await self._client.admin.command("ping")
        except PyMongoError as exc:
            await self.close()  # the next open() makes a new client: none left behind
            raise BridgeUnavailable(f"bridge {self.name!r}: {_short(exc)}") from exc

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    def _collection(self, map_name: str) -> tuple[EntryCodec, AsyncCollection[dict[str, Any]]]:
        assert self._client is not None, "open() the bridge first"
        codec, collection = self._maps[map_name]
        return codec, self._client[self.database_name][collection]

    async def write(
        self, map_name: str, upserts: Sequence[Entry], deletes: Sequence[bytes]
    ) -> None:
        codec, collection = self._collection(map_name)
        replaces = await converted(upserts, partial(_replaces, codec), self.shared_loop)
        requests: list[ReplaceOne[dict[str, Any]] | DeleteOne] = [*replaces]
        requests.extend(DeleteOne({"_id": key}) for key in codec.delete_keys(deletes))
        if not requests:
            return
        try:
            await collection.bulk_write(requests, ordered=False)
        except BulkWriteError as exc:
            details = exc.details
            errors = details.get("writeErrors") or []
            if details.get("writeConcernErrors") or not errors:
                raise BridgeUnavailable(f"writing map {map_name!r}: {_short(exc)}") from exc
            codes = {error.get("code") for error in errors}
            first = errors[0].get("errmsg", "")
            if codes <= _DATA_CODES:
                raise BridgeRejected(
                    f"writing map {map_name!r} to bridge {self.name!r}: the database refused "
                    f"{len(errors)} of {len(requests)} documents: {first}"
                ) from exc
            raise BridgeUnavailable(f"writing map {map_name!r}: {first}") from exc
        except (InvalidDocument, DocumentTooLarge, OverflowError, InvalidOperation) as exc:
            raise BridgeRejected(
                f"writing map {map_name!r} to bridge {self.name!r}: {_short(exc)}"
            ) from exc
        except PyMongoError as exc:
            raise _unavailable(exc, f"writing map {map_name!r} to bridge {self.name!r}") from exc

    async def load(self, map_name: str, key: bytes) -> bytes | None:
        return (await self.load_many(map_name, [key])).get(key)

    async def load_many(self, map_name: str, keys: Sequence[bytes]) -> dict[bytes, bytes]:
        codec, collection = self._collection(map_name)
        wanted = [codec.key(key) for key in keys]
        found: dict[bytes, bytes] = {}
        try:
            async for document in collection.find({"_id": {"$in": wanted}}):
                key, value = _entry(codec, document)
                found[key] = value
        except PyMongoError as exc:
            raise _unavailable(exc, f"reading map {map_name!r} from bridge {self.name!r}") from exc
        return found

    async def iterate(self, map_name: str, batch: int = 1000) -> AsyncIterator[list[Entry]]:
        codec, collection = self._collection(map_name)
        page: list[Entry] = []
        try:
            async for document in collection.find({}, batch_size=batch):
                page.append(_entry(codec, document))
                if len(page) >= batch:
                    yield page
                    page = []
        except PyMongoError as exc:
            raise _unavailable(exc, f"reading map {map_name!r} from bridge {self.name!r}") from exc
        if page:
            yield page


def _replaces(codec: EntryCodec, entries: Sequence[Entry]) -> list[ReplaceOne[dict[str, Any]]]:
    return [
        ReplaceOne({"_id": _id}, _document(codec, _id, value), upsert=True)
        for _id, value in zip(*codec.decoded(entries), strict=True)
    ]


def _document(codec: EntryCodec, _id: Any, value: Any) -> dict[str, Any]:
    data = msgspec.to_builtins(value, builtin_types=(bytes,), enc_hook=_hooks.enc_hook)
    if not isinstance(data, dict) or set(data) == {WRAPPED}:
        return {"_id": _id, WRAPPED: data}
    if "_id" in data:
        raise BridgeRejected(
            f"a value of map {codec.spec.name!r} has a field named _id, which MongoDB keeps "
            "for the key"
        )
    return {"_id": _id, **data}


def _entry(codec: EntryCodec, document: dict[str, Any]) -> Entry:
    document = _plain(document)
    key = codec.encoded_key(document.pop("_id"))
    wrapped = set(document) == {WRAPPED}
    return key, codec.encoded_value(document[WRAPPED] if wrapped else document)


def _plain(value: Any) -> Any:
    """BSON's own types as Python's: pymongo reads 64-bit integers as bson.Int64, an int
    subclass msgpack does not take."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, Int64):
        return int(value)
    return value


def _unavailable(exc: PyMongoError, doing: str) -> BridgeUnavailable:
    return BridgeUnavailable(f"{doing}: {_short(exc)}")


def _short(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    return f"{type(exc).__name__}: {text[:300]}"
