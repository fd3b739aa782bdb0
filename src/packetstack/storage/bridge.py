"""What every database bridge shares: the Store protocol, the per-map settings, and the
conversion between the grid's encoded entries and a database's keys and values.

The grid holds keys and values msgpack-encoded (it never needs the user's types); a bridge
needs Python values it can put in columns or documents. :class:`EntryCodec` turns one into
the other for one map, using the map's value type when it is configured.
"""

from __future__ import annotations

import asyncio
import importlib
import struct
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Literal, Protocol, TypeVar

import msgspec

from ..codec import _hooks
from ..errors import BridgeRejected, ConfigError

Load = Literal["none", "eager", "lazy"]
Mode = Literal["document", "typed"]
KeyKind = Literal["str", "int", "bytes", "tuple"]
Entry = tuple[bytes, bytes]  # (encoded key, encoded value), as the grid holds them
T = TypeVar("T")
R = TypeVar("R")


class MapBridge(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """How one grid map reaches its database (``[maps.NAME]`` in the config file).

    ``type``: the value type, a class or ``"module:Name"``; required by the typed mode,
    where its fields become columns, optional in the document mode, where it only decides
    how loaded values are read back. ``key``: what the map's keys are, which decides the
    key column's type (tuples are stored as JSON text)."""

    bridge: str
    table: str = ""  # table or collection; the map's name when empty
    mode: Mode = "document"
    type: Any = None
    key: KeyKind = "str"
    key_column: str = "key"  # SQL only; MongoDB keeps the key in _id
    value_column: str = "value"  # SQL document mode only
    load: Load = "none"


class BridgeSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One database (``[bridges.NAME]``): where it is and how flushes treat it."""

    url: str
    database: str = ""  # MongoDB: the database; the URL's path when empty
    batch: int = 1000  # entries per write
    retries: int = 8  # attempts per batch while the database is unreachable
    retry_delay: float = 0.5  # seconds before the first retry; doubles each time
    retry_max_delay: float = 30.0
    connect_timeout: float = 10.0
    timeout: float = 60.0  # seconds one batch or read may take before it is retried


class MapSpec(msgspec.Struct, kw_only=True):
    """A map's bridge settings resolved: its name, table and value type."""

    name: str
    table: str
    mode: Mode
    value_type: type | None
    key: KeyKind
    key_column: str
    value_column: str
    load: Load


def resolve(name: str, settings: MapBridge) -> MapSpec:
    """The spec of map ``name``; ConfigError naming the problem when it is not usable."""
    value_type = settings.type
    if isinstance(value_type, str):
        value_type = import_type(value_type, f"maps.{name}.type")
    elif value_type is not None and not isinstance(value_type, type):
        raise ConfigError(f"maps.{name}.type must be a class or 'module:Name', not {value_type!r}")
    if settings.mode == "typed" and not (
        isinstance(value_type, type) and issubclass(value_type, msgspec.Struct)
    ):
        raise ConfigError(
            f"maps.{name}: mode 'typed' makes columns of a msgspec.Struct's fields: set "
            "type = 'module:StructName', or use mode = 'document'"
        )
    return MapSpec(
        name=name,
        table=settings.table or name,
        mode=settings.mode,
        value_type=value_type,
        key=settings.key,
        key_column=settings.key_column,
        value_column=settings.value_column,
        load=settings.load,
    )


def import_type(path: str, setting: str) -> type:
    module_name, _, attribute = path.partition(":")
    try:
        found = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(
            f"{setting} = {path!r} cannot be imported ({exc}): give 'module:Name' of a class "
            "importable where the service runs"
        ) from exc
    if not isinstance(found, type):
        raise ConfigError(f"{setting} = {path!r} is not a class")
    return found


_encode = msgspec.msgpack.Encoder(enc_hook=_hooks.enc_hook).encode
_decode_any = msgspec.msgpack.Decoder().decode
_json_encode = msgspec.json.Encoder(enc_hook=_hooks.enc_hook).encode
_json_decode = msgspec.json.Decoder().decode
# Strict: an int key is not taken for a str map, nor a bool for an int one.
_KEY_DECODERS: dict[str, Callable[[bytes], Any]] = {
    "str": msgspec.msgpack.Decoder(str).decode,
    "int": msgspec.msgpack.Decoder(int).decode,
    "bytes": msgspec.msgpack.Decoder(bytes).decode,
    "tuple": msgspec.msgpack.Decoder(list).decode,
}
_KEY_LIST_DECODERS: dict[str, Callable[[bytes], list[Any]]] = {
    "str": msgspec.msgpack.Decoder(list[str]).decode,
    "int": msgspec.msgpack.Decoder(list[int]).decode,
    "bytes": msgspec.msgpack.Decoder(list[bytes]).decode,
    "tuple": msgspec.msgpack.Decoder(list[list[Any]]).decode,
}


# Entries converted between two chances for the event loop to serve traffic: a batch is
# converted in slices, so a packet that arrives meanwhile waits for one slice, not a batch.
SLICE = 100


async def converted(
    items: Sequence[T], convert: Callable[[Sequence[T]], list[R]], shared_loop: bool = True
) -> list[R]:
    """``convert(items)``, in slices of SLICE with a yield to the event loop in between
    when the loop is shared (not in the flush worker, whose loop serves nothing else)."""
    if not shared_loop:
        return convert(items)
    out: list[R] = []
    for start in range(0, len(items), SLICE):
        if start:
            await asyncio.sleep(0)
        out.extend(convert(items[start : start + SLICE]))
    return out


_ARRAY32 = struct.Struct(">BI")


def _msgpack_array(items: Sequence[bytes]) -> bytes:
    """Encoded msgpack items as one encoded array of them (what one decode call takes)."""
    return b"".join([_ARRAY32.pack(0xDD, len(items)), *items])


def json_text(value: Any) -> str:
    """``value`` as JSON text, as drivers take it for a JSON column."""
    return _json_encode(value).decode()


class EntryCodec:
    """Between one map's encoded grid entries and the Python values a database takes."""

    def __init__(self, spec: MapSpec) -> None:
        self.spec = spec
        value_type = spec.value_type
        self.typed_decode: Callable[[bytes], Any] | None = (
            msgspec.msgpack.Decoder(value_type, dec_hook=_hooks.dec_hook).decode
            if value_type is not None
            else None
        )
        self._decode_key = _KEY_DECODERS[spec.key]
        self._decode_keys = _KEY_LIST_DECODERS[spec.key]
        values_type: Any = list[value_type] if value_type is not None else list[Any]  # type: ignore[valid-type]
        self._decode_values = msgspec.msgpack.Decoder(values_type, dec_hook=_hooks.dec_hook).decode

    def key(self, encoded: bytes) -> Any:
        """The database key of an encoded grid key. BridgeRejected when it is not of the
        map's key kind (that entry cannot be written; the others can)."""
        try:
            key = self._decode_key(encoded)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise BridgeRejected(
                f"key {_decode_any(encoded)!r} of map {self.spec.name!r} is not of the map's "
                f"key kind (maps.{self.spec.name}.key = {self.spec.key!r})"
            ) from exc
        if self.spec.key == "tuple":
            return json_text(key)
        return key

    def decoded(self, entries: Sequence[Entry]) -> tuple[list[Any], list[Any]]:
        """The database keys and the Python values of ``entries`` (as :meth:`key` and
        :meth:`value` give them), each list decoded in one call: a flush's rows cost less.
        BridgeRejected, from the first entry at fault, when one does not decode."""
        try:
            keys = self._decode_keys(_msgpack_array([key for key, _ in entries]))
            values = self._decode_values(_msgpack_array([value for _, value in entries]))
        except (msgspec.DecodeError, msgspec.ValidationError):
            # One by one: the error names the entry at fault.
            return [self.key(key) for key, _ in entries], [self.value(v) for _, v in entries]
        if self.spec.key == "tuple":
            keys = [json_text(key) for key in keys]
        return keys, values

    def delete_keys(self, encoded: Sequence[bytes]) -> list[Any]:
        """The database keys of keys to delete; a key of another kind than the map's can
        never have been written, so there is nothing to delete for it."""
        keys = []
        for key in encoded:
            try:
                keys.append(self.key(key))
            except BridgeRejected:
                continue
        return keys

    def encoded_key(self, key: Any) -> bytes:
        """The grid key of a database key (the reverse of :meth:`key`)."""
        if self.spec.key == "tuple":
            return _encode(_json_decode(key))
        if self.spec.key == "bytes" and not isinstance(key, bytes):
            return _encode(bytes(key))  # memoryview, bytearray from some drivers
        return _encode(key)

    def value(self, encoded: bytes) -> Any:
        """The Python value of an encoded grid value: of the map's type when it has one."""
        try:
            if self.typed_decode is not None:
                return self.typed_decode(encoded)
            return _decode_any(encoded)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise BridgeRejected(
                f"a value of map {self.spec.name!r} does not decode as "
                f"{self.spec.value_type!r}: {exc}"
            ) from exc

    def encoded_value(self, value: Any) -> bytes:
        """The grid value of a value loaded from the database (converted to the map's type
        when it has one: JSON gives dates and bytes back as strings)."""
        if self.spec.value_type is not None:
            try:
                value = msgspec.convert(
                    value, self.spec.value_type, strict=False, dec_hook=_hooks.dec_hook
                )
            except msgspec.ValidationError as exc:
                raise BridgeRejected(
                    f"a stored value of map {self.spec.name!r} is not a "
                    f"{self.spec.value_type.__qualname__}: {exc}"
                ) from exc
        return _encode(value)


class Store(Protocol):
    """A database the grid's maps are written to on flush and loaded from.

    Keys and values are the grid's encoded ones; each store converts them (with an
    :class:`EntryCodec`) to what it keeps. ``write`` raises BridgeUnavailable when the
    database could not be reached (worth retrying) and BridgeRejected when it refused
    the data (the caller narrows the batch down to the entries at fault)."""

    name: str

    async def open(self, maps: Sequence[MapSpec]) -> None:
        """Connect, create missing tables, and check existing ones fit (BridgeSchemaError)."""
        ...

    async def load(self, map_name: str, key: bytes) -> bytes | None: ...

    async def load_many(self, map_name: str, keys: Sequence[bytes]) -> dict[bytes, bytes]: ...

    def iterate(self, map_name: str, batch: int = 1000) -> AsyncIterator[list[Entry]]:
        """Every entry of the map, ``batch`` at a time."""
        ...

    async def write(
        self, map_name: str, upserts: Sequence[Entry], deletes: Sequence[bytes]
    ) -> None:
        """Upsert and delete in one go (one transaction where the database has them)."""
        ...

    async def close(self) -> None: ...
