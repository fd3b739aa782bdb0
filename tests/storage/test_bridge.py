"""EntryCodec (storage/bridge.py): a batch of grid entries decoded in one call per list
gives what decoding them one by one gives, and an entry that does not decode is refused
with BridgeRejected naming what is wrong, as it is alone."""

from __future__ import annotations

import datetime

import msgspec
import pytest

from packetstack.errors import BridgeRejected
from packetstack.storage import EntryCodec, MapBridge, resolve

enc = msgspec.msgpack.encode


class Item(msgspec.Struct):
    name: str
    count: int
    at: datetime.datetime | None = None


def codec(**settings: object) -> EntryCodec:
    return EntryCodec(resolve("items", MapBridge(bridge="db", **settings)))  # type: ignore[arg-type]


def test_a_batch_decodes_as_its_entries_do_one_by_one() -> None:
    typed = codec(mode="typed", type=Item)
    when = datetime.datetime(2026, 11, 26, 12, 0, tzinfo=datetime.UTC)
    entries = [(enc(f"k{n}"), enc(Item(f"n{n}", n, when if n % 2 else None))) for n in range(50)]

    keys, values = typed.decoded(entries)

    assert keys == [typed.key(k) for k, _ in entries] == [f"k{n}" for n in range(50)]
    assert values == [typed.value(v) for _, v in entries]
    assert values[1] == Item("n1", 1, when)


def test_untyped_values_and_tuple_keys_decode_in_a_batch_too() -> None:
    untyped = codec(key="tuple")
    entries = [(enc(["a", 1]), enc({"x": 1})), (enc(["b", 2]), enc([1, "two"]))]
    assert untyped.decoded(entries) == (['["a",1]', '["b",2]'], [{"x": 1}, [1, "two"]])
    assert untyped.decoded([]) == ([], [])


def test_one_value_that_does_not_decode_refuses_the_batch_naming_the_problem() -> None:
    typed = codec(mode="typed", type=Item)
    entries = [(enc(f"k{n}"), enc(Item("ok", n))) for n in range(10)]
    entries[6] = (enc("k6"), enc({"name": "bad", "count": "not a number"}))
    with pytest.raises(BridgeRejected, match=r"does not decode as .*Item.*count"):
        typed.decoded(entries)


def test_a_key_of_another_kind_refuses_the_batch_naming_the_key() -> None:
    entries = [(enc("k1"), enc(1)), (enc(42), enc(2))]
    with pytest.raises(BridgeRejected, match=r"key 42 of map 'items' is not of the map's key"):
        codec().decoded(entries)
