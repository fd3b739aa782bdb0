"""The Store conformance suite: what every home of the grid's maps must do.

The grid hands a :class:`~packetstack.storage.Store` its keys and values msgpack-encoded
and expects them back exactly: ``load``, ``load_many`` and ``iterate`` return the encoded
key that was written, byte for byte (the grid partitions by it), and a value that decodes
to what was written. The SQL and MongoDB bridges and the embedded store pass this suite;
so should a backend of your own.

A backend is described by a :class:`StoreBackend`: how to make a new, unopened store on the
database under test, how to drop the tables or collections the suite created (the Store
protocol has no drop), and what the backend does not do. Each check is a :class:`Check`,
a coroutine function of the backend with its own maps (named from a unique prefix, so
checks may share a database and run in any order) that it drops when it ends, failed or
not. :data:`CHECKS` lists every check; :func:`check_store` runs them all.

This module needs no test framework. With pytest and pytest-asyncio::

    import pytest
    from packetstack.testing import CHECKS, Check, StoreBackend

    @pytest.fixture
    async def backend() -> StoreBackend:
        return StoreBackend("mine", make=make_my_store, drop=drop_my_tables)

    @pytest.mark.parametrize("check", CHECKS, ids=str)
    async def test_conformance(backend: StoreBackend, check: Check) -> None:
        reason = check.skip_reason(backend)
        if reason:
            pytest.skip(reason)
        await check(backend)

Without one: ``await check_store(backend)`` raises an ExceptionGroup of the failed checks.
A failed check raises :class:`ConformanceFailure` (an AssertionError) naming the backend,
the map, the key and what differed.
"""

from __future__ import annotations

import datetime
import decimal
import enum
import re
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Annotated, Any

import msgspec

from ..codec import _hooks, encode
from ..errors import BridgeRejected
from ..storage.bridge import Entry, KeyKind, MapSpec, Mode, Store


class ConformanceFailure(AssertionError):
    """A store did not do what the Store protocol asks; the message says what and where."""


@dataclass
class StoreBackend:
    """The backend under test, as the suite needs to know it.

    ``make()``: a new store, not opened yet, on the database under test (the same
    database every time: a check opens a second store to see what a first one wrote).
    ``drop(maps)``: remove what the suite's stores created for these maps (tables,
    collections, rows); called after the stores are closed, also for maps whose table was
    never created. ``exists(map)``: whether the map's table or collection exists, when the
    backend can tell (checks that ``open()`` creates it); None skips that assertion.
    ``typed``: whether the backend supports maps in the typed mode. ``checks_key_kinds``:
    whether it refuses keys that are not of the map's ``key`` kind with BridgeRejected (a
    bridge must; the embedded store keeps any encoded key). ``prefix`` starts every map and
    table name the suite makes: lower-case letters, digits and ``_``.
    """

    name: str
    make: Callable[[], Awaitable[Store]]
    drop: Callable[[Sequence[MapSpec]], Awaitable[None]]
    exists: Callable[[MapSpec], Awaitable[bool]] | None = None
    typed: bool = True
    checks_key_kinds: bool = True
    prefix: str = "ps_"

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9_]{0,19}", self.prefix):
            raise ValueError(
                f"StoreBackend.prefix {self.prefix!r}: 1 to 20 lower-case letters, digits "
                "and '_', starting with a letter (it starts table names)"
            )


CheckFunction = Callable[[StoreBackend], Awaitable[None]]


@dataclass(frozen=True)
class Check:
    """One conformance check: ``await check(backend)`` runs it (ConformanceFailure when the
    backend fails it). ``needs``: the StoreBackend capabilities it tests ("typed",
    "checks_key_kinds"); :meth:`skip_reason` says why a backend without them skips it."""

    name: str
    run: CheckFunction
    needs: frozenset[str] = frozenset()

    def __str__(self) -> str:
        return self.name

    @property
    def description(self) -> str:
        """What the check asks of a store (its function's docstring)."""
        return (self.run.__doc__ or "").strip()

    def skip_reason(self, backend: StoreBackend) -> str | None:
        """Why ``backend`` does not take this check, or None when it does."""
        missing = sorted(need for need in self.needs if not getattr(backend, need))
        if not missing:
            return None
        return f"{backend.name}: {self.name} needs StoreBackend.{' and '.join(missing)}"

    async def __call__(self, backend: StoreBackend) -> None:
        await self.run(backend)


_checks: list[Check] = []


def _check(*needs: str) -> Callable[[CheckFunction], CheckFunction]:
    def register(function: CheckFunction) -> CheckFunction:
        name = function.__name__.removeprefix("check_")
        _checks.append(Check(name, function, frozenset(needs)))
        return function

    return register


async def check_store(
    backend: StoreBackend, checks: Iterable[Check] | None = None
) -> dict[str, str]:
    """Run ``checks`` (every check by default) against ``backend``, one after the other.

    Returns the skipped checks with the reason; raises an ExceptionGroup of every failed
    check's exception (each with a note naming the check) when any failed."""
    skipped: dict[str, str] = {}
    failures: list[Exception] = []
    failed: list[str] = []
    for check in CHECKS if checks is None else checks:
        reason = check.skip_reason(backend)
        if reason is not None:
            skipped[check.name] = reason
            continue
        try:
            await check(backend)
        except Exception as exc:
            exc.add_note(f"conformance check {check.name!r} on {backend.name}")
            failures.append(exc)
            failed.append(check.name)
    if failures:
        names = ", ".join(failed)
        raise ExceptionGroup(f"{backend.name} failed {len(failed)} checks: {names}", failures)
    return skipped


# ------------------------------------------------------------------ value types


class Colour(enum.Enum):
    """An enum field of :class:`AllTypes` (stored by value)."""

    RED = "red"
    GREEN = "green"


class Inner(msgspec.Struct, kw_only=True):
    """A Struct nested in :class:`AllTypes`."""

    name: str
    tags: list[str]
    score: float | None = None


class AllTypes(msgspec.Struct, kw_only=True):
    """A map value with a field of every type the codec and the typed mode handle."""

    count: int
    ratio: float
    text: str
    flag: bool
    blob: bytes
    naive: datetime.datetime
    aware: Annotated[datetime.datetime, msgspec.Meta(tz=True)]
    day: datetime.date
    clock: datetime.time
    amount: decimal.Decimal
    ident: uuid.UUID
    numbers: list[int]
    weights: dict[str, float]
    inner: Inner
    colour: Colour
    maybe_count: int | None
    maybe_text: str | None
    maybe_day: datetime.date | None
    maybe_inner: Inner | None = None


def all_types_values() -> dict[int, AllTypes]:
    """Values of :class:`AllTypes` by int key: ordinary, edge and None-filled ones."""
    plus_five_thirty = datetime.timezone(datetime.timedelta(hours=5, minutes=30))
    return {
        1: AllTypes(
            count=2**62,
            ratio=0.1,
            text="ünïcødé ✓ 日本語 🙂",
            flag=True,
            blob=b"\x00\x01\xfe\xff",
            naive=datetime.datetime(2024, 2, 29, 13, 45, 7, 123456),
            aware=datetime.datetime(2024, 2, 29, 13, 45, 7, 654321, tzinfo=plus_five_thirty),
            day=datetime.date(2024, 2, 29),
            clock=datetime.time(13, 45, 7, 123456),
            amount=decimal.Decimal("12345678901234567890.123456789"),
            ident=uuid.UUID("3f1c9d1e-8a4b-4c2d-9e0f-0123456789ab"),
            numbers=[1, -2, 2**62],
            weights={"a": 0.5, "ü": -1.25},
            inner=Inner(name="in", tags=["x", "y"], score=2.5),
            colour=Colour.GREEN,
            maybe_count=-7,
            maybe_text="set",
            maybe_day=datetime.date(1999, 12, 31),
            maybe_inner=Inner(name="maybe", tags=[]),
        ),
        -2: AllTypes(
            count=-(2**63),
            ratio=-1.5e300,
            text="",
            flag=False,
            blob=b"",
            naive=datetime.datetime(1970, 1, 1),
            aware=datetime.datetime(2038, 1, 19, 3, 14, 8, tzinfo=datetime.UTC),
            day=datetime.date(2000, 1, 1),
            clock=datetime.time(23, 59, 59, 999999),
            amount=decimal.Decimal("-0.001"),
            ident=uuid.UUID(int=0),
            numbers=[],
            weights={},
            inner=Inner(name="", tags=[""]),
            colour=Colour.RED,
            maybe_count=None,
            maybe_text=None,
            maybe_day=None,
        ),
        2**62: AllTypes(
            count=0,
            ratio=0.0,
            text="plain",
            flag=True,
            blob=bytes(range(256)),
            naive=datetime.datetime(2099, 12, 31, 23, 59, 59, 999999),
            aware=datetime.datetime(1990, 6, 15, 12, 0, 0, 1, tzinfo=datetime.UTC),
            day=datetime.date(2099, 12, 31),
            clock=datetime.time(0, 0),
            amount=decimal.Decimal("0"),
            ident=uuid.UUID(int=2**128 - 1),
            numbers=[0],
            weights={"z": 1e-300},
            inner=Inner(name="n", tags=["a"], score=None),
            colour=Colour.GREEN,
            maybe_count=0,
            maybe_text="",
            maybe_day=datetime.date(2024, 1, 1),
        ),
    }


# Document values: the JSON-like data a map without a value type holds.
DOCUMENT_VALUES: list[Any] = [
    {
        "name": "ünïcødé ✓ 日本語 🙂",
        "count": 1,
        "negative": -(2**62),
        "largest": 2**63 - 1,
        "smallest": -(2**63),
        "fraction": 0.1,
        "whole_float": 3.0,
        "negative_float": -1.5,
        "tiny": 2.5e-300,
        "yes": True,
        "no": False,
        "nothing": None,
        "mixed": [1, "two", 3.5, None, [True, {"x": []}]],
        "nested": {"a": {"b": {"c": [1, 2, {"d": None}]}}},
        "empty_list": [],
        "empty_dict": {},
        "empty_text": "",
    },
    {"only": "one field"},
    [1, 2, 3],
    ["a", {"b": [None, False]}],
    "just text",
    "",
    42,
    -7,
    0,
    2.5,
    True,
    False,
    None,
    [],
    {},
]

# Keys of each kind the map's ``key`` setting allows, as the grid's users write them.
KEYS: dict[KeyKind, list[Any]] = {
    "str": ["a", "b", "key with spaces", "ünïcødé", "日本語", "🙂", "", "x" * 200],
    "int": [0, 1, -1, 42, -(2**62), 2**62, 2**63 - 1, -(2**63)],
    "bytes": [b"", b"\x00", b"\x00\x00", b"\x00\x01", b"abc", b"\x80\xfe\xff", bytes(200)],
    "tuple": [("a", 1), ("a", 2), (1, "a"), ("ü", -5), ("nested", ("x", 1)), (), (True, None)],
}

# Keys of another kind than the map's, which a bridge refuses.
WRONG_KEYS: dict[KeyKind, list[Any]] = {
    "str": [1, b"a", ("a", 1)],
    "int": ["1", True, 1.5, b"\x01", (1,)],
    "bytes": ["a", 1, ("a",)],
    "tuple": ["a", 1, b"a"],
}


# ------------------------------------------------------------------ the checks


@_check()
async def check_open_creates_maps_and_is_idempotent(backend: StoreBackend) -> None:
    """open() creates what the maps need (reads of a new map find nothing, writes go in),
    and a second store opened on the same database with the same maps sees what the
    first one wrote."""
    async with _Session(backend) as session:
        document = session.spec("doc")
        maps = [document]
        typed = None
        if backend.typed:
            typed = session.spec("typed", key="int", mode="typed", value_type=AllTypes)
            maps.append(typed)
        first = await session.opened(*maps)
        for spec in maps:
            if backend.exists is not None and not await backend.exists(spec):
                raise _failure(backend, spec, "open() did not create its table or collection")
            await _expect_contents(backend, first, spec, {})
        await first.write(document.name, [(_key("k"), encode({"v": 1}))], [])
        expected_doc = {_key("k"): {"v": 1}}
        expected_typed: dict[bytes, Any] = {}
        if typed is not None:
            value = all_types_values()[1]
            await first.write(typed.name, [(_key(1), encode(value))], [])
            expected_typed = {_key(1): value}
        await first.close()

        second = await session.opened(*maps)
        await _expect_contents(backend, second, document, expected_doc)
        if typed is not None:
            await _expect_contents(backend, second, typed, expected_typed)
        await second.close()
        third = await session.opened(*maps)  # a third time, with rows in the tables
        await _expect_contents(backend, third, document, expected_doc)


@_check()
async def check_write_then_read_back(backend: StoreBackend) -> None:
    """Upserts written are what load, load_many and iterate return: exactly them, each
    key byte for byte, each value decoding to what was written."""
    async with _Session(backend) as session:
        spec = session.spec("rw")
        store = await session.opened(spec)
        expected = {_key(f"key{i}"): {"i": i, "name": f"entry {i}"} for i in range(50)}
        await store.write(spec.name, _entries(expected), [])
        await _expect_contents(backend, store, spec, expected)


@_check()
async def check_upsert_overwrites(backend: StoreBackend) -> None:
    """Writing a key again replaces its value (one entry per key, never two), also when
    the new value has other fields than the old one."""
    async with _Session(backend) as session:
        spec = session.spec("upsert")
        store = await session.opened(spec)
        first = {_key(f"k{i}"): {"version": 1, "old": True} for i in range(10)}
        await store.write(spec.name, _entries(first), [])
        second = {_key(f"k{i}"): {"version": 2, "new": [i]} for i in range(5)}
        await store.write(spec.name, _entries(second), [])
        await _expect_contents(backend, store, spec, {**first, **second})
        await store.write(spec.name, [(_key("k0"), encode("now a string"))], [])
        await _expect_contents(
            backend, store, spec, {**first, **second, _key("k0"): "now a string"}
        )


@_check()
async def check_delete(backend: StoreBackend) -> None:
    """Deletes remove their keys and nothing else; deleting a key that is not there (or
    is deleted twice) is no error."""
    async with _Session(backend) as session:
        spec = session.spec("delete")
        store = await session.opened(spec)
        expected = {_key(f"k{i}"): {"i": i} for i in range(10)}
        await store.write(spec.name, _entries(expected), [])
        gone = [_key("k1"), _key("k5"), _key("k9")]
        await store.write(spec.name, [], [*gone, _key("never written")])
        for key in gone:
            del expected[key]
        await _expect_contents(backend, store, spec, expected)
        await store.write(spec.name, [], gone)  # again: already gone
        await store.write(spec.name, [], list(expected))
        await _expect_contents(backend, store, spec, {})


@_check()
async def check_upserts_and_deletes_in_one_write(backend: StoreBackend) -> None:
    """One write with new keys, overwritten keys, deleted keys and deletes of missing
    keys does all of it."""
    async with _Session(backend) as session:
        spec = session.spec("mixed")
        store = await session.opened(spec)
        expected: dict[bytes, Any] = {_key(f"k{i}"): {"i": i} for i in range(6)}
        await store.write(spec.name, _entries(expected), [])
        upserts = {_key("k0"): {"i": 100}, _key("new1"): {"new": 1}, _key("new2"): [2]}
        deletes = [_key("k1"), _key("k2"), _key("missing")]
        await store.write(spec.name, _entries(upserts), deletes)
        expected.update(upserts)
        del expected[_key("k1")], expected[_key("k2")]
        await _expect_contents(backend, store, spec, expected)


@_check()
async def check_iterate_in_batches(backend: StoreBackend) -> None:
    """iterate() yields every entry exactly once, in non-empty batches of at most
    ``batch`` entries: 2,500 entries with batch 1000, 9 with batch 3 (an exact multiple),
    and nothing at all for an empty map."""
    async with _Session(backend) as session:
        big = session.spec("big")
        exact = session.spec("exact", key="int")
        empty = session.spec("empty")
        store = await session.opened(big, exact, empty)
        many = {_key(f"key{i:05d}"): {"i": i} for i in range(2500)}
        entries = _entries(many)
        for start in range(0, len(entries), 500):
            await store.write(big.name, entries[start : start + 500], [])
        await _expect_iteration(backend, store, big, many, batch=1000)
        nine = {_key(i): i for i in range(-4, 5)}
        await store.write(exact.name, _entries(nine), [])
        await _expect_iteration(backend, store, exact, nine, batch=3)
        await _expect_iteration(backend, store, empty, {}, batch=1000)


@_check()
async def check_missing_keys(backend: StoreBackend) -> None:
    """load() of a missing key is None, load_many() leaves missing keys out (and of no
    keys is empty), and a write of nothing changes nothing."""
    async with _Session(backend) as session:
        spec = session.spec("missing")
        store = await session.opened(spec)
        await store.write(spec.name, [(_key("here"), encode(1))], [])
        await store.write(spec.name, [], [])
        if await store.load(spec.name, _key("not here")) is not None:
            raise _failure(backend, spec, "load() of a missing key is not None")
        found = await store.load_many(spec.name, [_key("not here"), _key("here"), _key("no")])
        if list(found) != [_key("here")]:
            raise _failure(backend, spec, f"load_many() gave keys {_keys(found)}, not ['here']")
        if await store.load_many(spec.name, []) != {}:
            raise _failure(backend, spec, "load_many() of no keys is not {}")
        await _expect_contents(backend, store, spec, {_key("here"): 1})


@_check()
async def check_key_kinds(backend: StoreBackend) -> None:
    """Keys of each kind (str with unicode, int with negatives and the int64 bounds, bytes
    with NULs, tuples) come back byte for byte from load, load_many and iterate, and can
    be deleted."""
    async with _Session(backend) as session:
        specs = {kind: session.spec(f"key_{kind}", key=kind) for kind in KEYS}
        store = await session.opened(*specs.values())
        for kind, spec in specs.items():
            expected = {_key(k): {"n": n} for n, k in enumerate(KEYS[kind])}
            if len(expected) != len(KEYS[kind]):
                raise AssertionError(f"the suite's {kind} keys encode alike")
            await store.write(spec.name, _entries(expected), [])
            await _expect_contents(backend, store, spec, expected)
            half = list(expected)[::2]
            await store.write(spec.name, [], half)
            await _expect_contents(
                backend, store, spec, {k: v for k, v in expected.items() if k not in half}
            )


@_check()
async def check_str_keys_are_exact(backend: StoreBackend) -> None:
    """Str keys that differ only in case, trailing spaces or accents are different keys
    (a case- or accent-insensitive key column merges them)."""
    async with _Session(backend) as session:
        spec = session.spec("exact_keys")
        store = await session.opened(spec)
        keys = ["a", "A", "a ", "u", "ü", "ss", "ß", "é", "e\u0301"]
        expected = {_key(k): {"n": n} for n, k in enumerate(keys)}
        await store.write(spec.name, _entries(expected), [])
        await _expect_contents(backend, store, spec, expected)


@_check()
async def check_document_values(backend: StoreBackend) -> None:
    """A map without a value type keeps JSON-like values exactly: nested dicts and lists,
    None, bools, floats, ints up to the int64 bounds, unicode str, and scalars or lists
    as the whole value. The decoded value is equal and of the same types."""
    async with _Session(backend) as session:
        spec = session.spec("documents")
        store = await session.opened(spec)
        expected = {_key(f"v{n}"): value for n, value in enumerate(DOCUMENT_VALUES)}
        await store.write(spec.name, _entries(expected), [])
        await _expect_contents(backend, store, spec, expected)


@_check()
async def check_document_large_floats(backend: StoreBackend) -> None:
    """Floats written with an exponent (1e20, -1.5e300) stay floats in a map without a
    value type (a store keeping JSON numbers as decimals can give them back as ints)."""
    async with _Session(backend) as session:
        spec = session.spec("floats")
        store = await session.opened(spec)
        values: list[Any] = [1e20, -1.5e300, {"big": 1e16, "list": [2.5e17]}]
        expected = {_key(f"v{n}"): value for n, value in enumerate(values)}
        await store.write(spec.name, _entries(expected), [])
        await _expect_contents(backend, store, spec, expected)


@_check()
async def check_document_values_named_value(backend: StoreBackend) -> None:
    """Dicts whose only field is named "value" come back as those dicts (a store wrapping
    non-dict values as {"value": ...} must not unwrap them)."""
    async with _Session(backend) as session:
        spec = session.spec("lookalike")
        store = await session.opened(spec)
        values: list[Any] = [{"value": 1}, {"value": {"value": None}}, {"value": [1]}]
        expected = {_key(f"v{n}"): value for n, value in enumerate(values)}
        await store.write(spec.name, _entries(expected), [])
        await _expect_contents(backend, store, spec, expected)


@_check("typed")
async def check_typed_values(backend: StoreBackend) -> None:
    """The typed mode keeps a Struct with every codec type (int, float, str, bool, bytes,
    naive and tz-aware datetimes, date, time, Decimal, UUID, list, dict, nested Struct,
    enum, optional fields set and None): the loaded value decodes equal to it."""
    async with _Session(backend) as session:
        spec = session.spec("typed", key="int", mode="typed", value_type=AllTypes)
        store = await session.opened(spec)
        expected = {_key(k): v for k, v in all_types_values().items()}
        await store.write(spec.name, _entries(expected), [])
        await _expect_contents(backend, store, spec, expected)
        replaced = msgspec.structs.replace(all_types_values()[-2], text="replaced", maybe_count=3)
        await store.write(spec.name, [(_key(-2), encode(replaced))], [_key(1)])
        del expected[_key(1)]
        expected[_key(-2)] = replaced
        await _expect_contents(backend, store, spec, expected)


@_check()
async def check_document_values_with_a_type(backend: StoreBackend) -> None:
    """The document mode with a value type keeps that Struct exactly too: JSON-stored
    dates, bytes, decimals and UUIDs are read back as their types."""
    async with _Session(backend) as session:
        spec = session.spec("typed_doc", key="int", value_type=AllTypes)
        store = await session.opened(spec)
        expected = {_key(k): v for k, v in all_types_values().items()}
        await store.write(spec.name, _entries(expected), [])
        await _expect_contents(backend, store, spec, expected)


@_check("checks_key_kinds")
async def check_wrong_key_kind_is_rejected(backend: StoreBackend) -> None:
    """A key of another kind than the map's ``key`` setting raises BridgeRejected from an
    upsert (and that write writes nothing, not even its good entries), load and
    load_many. Deleting such a key (it cannot be in the map) either does nothing or raises
    BridgeRejected; the map's entries stay, and the store takes good writes afterwards."""
    async with _Session(backend) as session:
        specs = {kind: session.spec(f"wrong_{kind}", key=kind) for kind in WRONG_KEYS}
        store = await session.opened(*specs.values())
        for kind, spec in specs.items():
            good = _key(KEYS[kind][0])
            await store.write(spec.name, [(good, encode("good"))], [])
            for wrong in WRONG_KEYS[kind]:
                bad = _key(wrong)
                shown = f"the {type(wrong).__name__} key {wrong!r} (a {kind} map)"
                attempts: list[tuple[str, Callable[[], Awaitable[object]]]] = [
                    ("write([(good, v), (key, v)], [])", _bind_write(store, spec, [good, bad])),
                    ("load(key)", _bind_load(store, spec, bad)),
                    ("load_many([good, key])", _bind_load_many(store, spec, [good, bad])),
                ]
                for what, attempt in attempts:
                    try:
                        await attempt()
                    except BridgeRejected:
                        continue
                    except Exception as exc:
                        raise _failure(
                            backend,
                            spec,
                            f"{what} with {shown} raised {type(exc).__name__}: {exc}, "
                            "not BridgeRejected",
                        ) from exc
                    raise _failure(
                        backend, spec, f"{what} with {shown} did not raise BridgeRejected"
                    )
                try:
                    await store.write(spec.name, [], [bad])
                except BridgeRejected:
                    pass
                except Exception as exc:
                    raise _failure(
                        backend,
                        spec,
                        f"write([], [key]) with {shown} raised {type(exc).__name__}: {exc}; "
                        "expected nothing to happen, or BridgeRejected",
                    ) from exc
            await _expect_contents(backend, store, spec, {good: "good"})
            other = _key(KEYS[kind][1])
            await store.write(spec.name, [(other, encode("other"))], [good])
            await _expect_contents(backend, store, spec, {other: "other"})


@_check()
async def check_close_is_idempotent(backend: StoreBackend) -> None:
    """close() may be called twice, and on a store never opened."""
    async with _Session(backend) as session:
        spec = session.spec("close")
        store = await session.opened(spec)
        await store.write(spec.name, [(_key("k"), encode(1))], [])
        await store.close()
        await store.close()
        never_opened = await backend.make()
        await never_opened.close()
        await never_opened.close()
        reopened = await session.opened(spec)
        await _expect_contents(backend, reopened, spec, {_key("k"): 1})


CHECKS: tuple[Check, ...] = tuple(_checks)
"""Every conformance check, in a sensible order."""


# ------------------------------------------------------------------ machinery


class _Session:
    """One check's maps and stores: unique names; on exit every store closed and every
    map dropped (after a failure too, which cleanup errors do not hide)."""

    def __init__(self, backend: StoreBackend) -> None:
        self.backend = backend
        self.prefix = f"{backend.prefix}{uuid.uuid4().hex[:10]}"
        self.specs: list[MapSpec] = []
        self.stores: list[Store] = []

    def spec(
        self,
        suffix: str,
        *,
        key: KeyKind = "str",
        mode: Mode = "document",
        value_type: type | None = None,
    ) -> MapSpec:
        name = f"{self.prefix}_{suffix}"
        spec = MapSpec(
            name=name,
            table=name,
            mode=mode,
            value_type=value_type,
            key=key,
            key_column="key",
            value_column="value",
            load="none",
        )
        self.specs.append(spec)
        return spec

    async def opened(self, *maps: MapSpec) -> Store:
        store = await self.backend.make()
        self.stores.append(store)
        await store.open(list(maps))
        return store

    async def __aenter__(self) -> _Session:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        problems: list[Exception] = []
        for store in self.stores:
            try:
                await store.close()
            except Exception as failed:
                problems.append(failed)
        try:
            await self.backend.drop(list(self.specs))
        except Exception as failed:
            problems.append(failed)
        if not problems:
            return
        if exc is not None:
            for problem in problems:
                exc.add_note(f"cleaning up after the failure failed too: {problem!r}")
            return
        raise problems[0]


def _key(key: Any) -> bytes:
    """A key as the grid holds it."""
    return encode(key)


def _entries(values: dict[bytes, Any]) -> list[Entry]:
    return [(key, encode(value)) for key, value in values.items()]


def _show(key: bytes) -> str:
    try:
        return repr(msgspec.msgpack.decode(key))
    except msgspec.DecodeError:
        return f"undecodable {key!r}"


def _keys(found: Iterable[bytes]) -> list[str]:
    return sorted(_show(key) for key in found)


def _failure(backend: StoreBackend, spec: MapSpec, problem: str) -> ConformanceFailure:
    return ConformanceFailure(f"{backend.name}: map {spec.name!r} ({spec.mode}): {problem}")


def _decoder(spec: MapSpec) -> Callable[[bytes], Any]:
    if spec.value_type is None:
        return msgspec.msgpack.Decoder().decode
    return msgspec.msgpack.Decoder(spec.value_type, dec_hook=_hooks.dec_hook).decode


def _same(got: Any, want: Any) -> bool:
    """Equal and of the same types all the way down (1 is not 1.0, a list not a str)."""
    if type(got) is not type(want):
        return False
    if isinstance(want, dict):
        return got.keys() == want.keys() and all(_same(got[k], want[k]) for k in want)
    if isinstance(want, list | tuple):
        return len(got) == len(want) and all(_same(g, w) for g, w in zip(got, want, strict=True))
    return bool(got == want)


def _compare(
    backend: StoreBackend, spec: MapSpec, how: str, key: bytes, raw: Any, want: Any
) -> None:
    if not isinstance(raw, bytes):
        raise _failure(backend, spec, f"{how} gave {type(raw).__name__} for key {_show(key)}")
    try:
        got = _decoder(spec)(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise _failure(
            backend, spec, f"{how}: the value of key {_show(key)} does not decode: {exc}"
        ) from exc
    if not _same(got, want):
        raise _failure(
            backend, spec, f"{how}: key {_show(key)} has value {got!r}, expected {want!r}"
        )


async def _expect_contents(
    backend: StoreBackend, store: Store, spec: MapSpec, expected: dict[bytes, Any]
) -> None:
    """The map holds exactly ``expected`` (encoded key -> original value), seen through
    load, load_many and iterate."""
    missing = [_key("no such key \u2603"), _key(-12345), _key(b"\x00no such key")]
    if spec.key in ("int", "str", "bytes"):
        missing = [k for k in missing if type(msgspec.msgpack.decode(k)).__name__ == spec.key]
    else:
        missing = [_key(("no such key", 0))]
    for key in list(expected)[:20]:
        _compare(backend, spec, "load()", key, await store.load(spec.name, key), expected[key])
    for key in missing:
        if await store.load(spec.name, key) is not None:
            raise _failure(backend, spec, f"load() of the missing key {_show(key)} is not None")
    found = await store.load_many(spec.name, [*expected, *missing])
    if set(found) != set(expected):
        raise _failure(
            backend,
            spec,
            f"load_many() gave keys {_keys(found)}, expected {_keys(expected)}"
            if len(found) + len(expected) < 40
            else f"load_many() gave {len(found)} keys, expected {len(expected)}: "
            f"extra {_keys(set(found) - set(expected))[:10]}, "
            f"missing {_keys(set(expected) - set(found))[:10]}",
        )
    for key, raw in found.items():
        _compare(backend, spec, "load_many()", key, raw, expected[key])
    await _expect_iteration(backend, store, spec, expected, batch=1000)


async def _expect_iteration(
    backend: StoreBackend, store: Store, spec: MapSpec, expected: dict[bytes, Any], batch: int
) -> None:
    seen: dict[bytes, bytes] = {}
    batches = 0
    async for page in store.iterate(spec.name, batch):
        batches += 1
        if not 0 < len(page) <= batch:
            raise _failure(
                backend, spec, f"iterate(batch={batch}) yielded a batch of {len(page)} entries"
            )
        for key, raw in page:
            if key in seen:
                raise _failure(backend, spec, f"iterate() yielded key {_show(key)} twice")
            seen[key] = raw
    if set(seen) != set(expected):
        extra = _keys(set(seen) - set(expected))
        lost = _keys(set(expected) - set(seen))
        raise _failure(
            backend,
            spec,
            f"iterate() yielded {len(seen)} entries, expected {len(expected)}: "
            f"extra {extra[:10]}, missing {lost[:10]}",
        )
    for key, raw in seen.items():
        _compare(backend, spec, "iterate()", key, raw, expected[key])
    if expected and batches < -(-len(expected) // batch):
        raise _failure(backend, spec, f"iterate(batch={batch}) yielded only {batches} batches")


def _bind_write(
    store: Store, spec: MapSpec, upsert_keys: list[bytes]
) -> Callable[[], Awaitable[None]]:
    def attempt() -> Awaitable[None]:
        return store.write(spec.name, [(k, encode("bad")) for k in upsert_keys], [])

    return attempt


def _bind_load(store: Store, spec: MapSpec, key: bytes) -> Callable[[], Awaitable[object]]:
    def attempt() -> Awaitable[object]:
        return store.load(spec.name, key)

    return attempt


def _bind_load_many(
    store: Store, spec: MapSpec, keys: list[bytes]
) -> Callable[[], Awaitable[object]]:
    def attempt() -> Awaitable[object]:
        return store.load_many(spec.name, keys)

    return attempt
