"""Typed packets: tag registration, exact round trips, user types and decode errors.

The packet registry is process-wide, so every class here has a tag no other test uses
(class names start with ``Codec``; explicit tags start with ``codec_test.``)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import re
import uuid
from decimal import Decimal
from typing import Any, ClassVar

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import packetstack
from packetstack.codec import Packet, encode, register_type, registry
from packetstack.errors import (
    CodecError,
    DuplicatePacketTag,
    PacketDecodeError,
    UnknownPacketType,
)

# ------------------------------------------------------------- registration


class CodecPlain(Packet):
    x: int


class CodecTagged(Packet):
    packet_tag: ClassVar[str] = "codec_test.tagged.v1"
    text: str


class CodecChild(CodecTagged):
    """A subclass without its own packet_tag gets its own class name, not its parent's."""

    extra: int = 0


class CodecGrandchild(CodecPlain):
    packet_tag: ClassVar[str] = "codec_test.grandchild"


def test_default_tag_is_the_class_name() -> None:
    assert CodecPlain.packet_tag == "CodecPlain"
    assert registry.get("CodecPlain") is CodecPlain


def test_explicit_tag() -> None:
    assert CodecTagged.packet_tag == "codec_test.tagged.v1"
    assert registry.get("codec_test.tagged.v1") is CodecTagged
    assert registry.get("CodecTagged") is None
    assert CodecTagged("hi").packet_tag == "codec_test.tagged.v1"


def test_subclasses_register_under_their_own_tags() -> None:
    assert CodecChild.packet_tag == "CodecChild"
    assert registry.get("CodecChild") is CodecChild
    assert registry.get("codec_test.tagged.v1") is CodecTagged
    assert CodecGrandchild.packet_tag == "codec_test.grandchild"
    assert registry.get("codec_test.grandchild") is CodecGrandchild
    assert registry.get("CodecPlain") is CodecPlain


def test_packet_tag_is_not_a_field() -> None:
    body = encode(CodecTagged("hello"))
    assert msgspec.msgpack.decode(body) == {"text": "hello"}
    assert registry.decode("codec_test.tagged.v1", body) == CodecTagged("hello")


def test_public_packet_and_register_type_are_the_codec_ones() -> None:
    assert packetstack.Packet is Packet
    assert packetstack.register_type is register_type


# ---------------------------------------------------------------- rich types


class CodecColor(enum.StrEnum):
    RED = "red"
    GREEN = "green"


class CodecLevel(enum.IntEnum):
    LOW = 1
    HIGH = 10


class CodecShape(enum.Enum):
    """A plain Enum (neither StrEnum nor IntEnum) with int values."""

    SQUARE = 4
    CIRCLE = 0


@dataclasses.dataclass
class CodecAddress:
    street: str
    number: int
    tags: list[str] = dataclasses.field(default_factory=list)


class CodecInner(msgspec.Struct):
    name: str
    when: dt.datetime | None = None
    address: CodecAddress | None = None


class CodecLeaf(msgspec.Struct, frozen=True):
    value: int


class CodecMiddle(msgspec.Struct):
    inner: CodecInner
    leaves: list[CodecLeaf]


class CodecEverything(Packet):
    packet_tag: ClassVar[str] = "codec_test.everything"
    middle: CodecMiddle
    inners: list[CodecInner]
    by_name: dict[str, CodecInner]
    pair: tuple[CodecLeaf, CodecAddress]
    leaf_set: set[CodecLeaf]
    frozen: frozenset[int]
    addresses: list[CodecAddress]
    aware: dt.datetime
    naive: dt.datetime
    day: dt.date
    clock: dt.time
    span: dt.timedelta
    uid: uuid.UUID
    amount: Decimal
    color: CodecColor
    level: CodecLevel
    shape: CodecShape
    blob: bytes
    raw: bytearray
    big: int
    ratio: float
    maybe_text: str | None = None
    maybe_leaf: CodecLeaf | None = None
    maybe_when: dt.datetime | None = None


def _everything(**overrides: Any) -> CodecEverything:
    plus_five_thirty = dt.timezone(dt.timedelta(hours=5, minutes=30))
    fields: dict[str, Any] = {
        "middle": CodecMiddle(
            CodecInner("in", dt.datetime(2024, 5, 6, tzinfo=dt.UTC), CodecAddress("Main", 3)),
            [CodecLeaf(1), CodecLeaf(2)],
        ),
        "inners": [CodecInner("a"), CodecInner("b", address=CodecAddress("Side", 9, ["x"]))],
        "by_name": {"k": CodecInner("v"), "": CodecInner("empty key")},
        "pair": (CodecLeaf(7), CodecAddress("Pair", 1)),
        "leaf_set": {CodecLeaf(3), CodecLeaf(4)},
        "frozen": frozenset({1, 2, 3}),
        "addresses": [CodecAddress("One", 1), CodecAddress("Two", 2, ["a", "b"])],
        "aware": dt.datetime(2023, 12, 31, 23, 59, 58, 123456, tzinfo=plus_five_thirty),
        "naive": dt.datetime(1999, 1, 2, 3, 4, 5, 678901),
        "day": dt.date(2000, 2, 29),
        "clock": dt.time(12, 30, 15, 5),
        "span": dt.timedelta(days=-3, seconds=7, microseconds=11),
        "uid": uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "amount": Decimal("1.10"),
        "color": CodecColor.GREEN,
        "level": CodecLevel.HIGH,
        "shape": CodecShape.CIRCLE,
        "blob": b"\x00\xff\x10binary",
        "raw": bytearray(b"\x01\x02"),
        "big": 2**64 - 1,
        "ratio": -0.1,
    }
    fields.update(overrides)
    return CodecEverything(**fields)


def _round_trip(packet: Packet) -> Any:
    body = encode(packet)
    assert isinstance(body, bytes)
    return registry.decode(packet.packet_tag, body)


def test_complex_packet_round_trips_exactly() -> None:
    sent = _everything()
    got = _round_trip(sent)
    assert type(got) is CodecEverything
    assert got == sent
    # Structure and types survive, not just equality.
    assert type(got.middle.inner.address) is CodecAddress
    assert type(got.pair) is tuple
    assert type(got.pair[1]) is CodecAddress
    assert type(got.leaf_set) is set
    assert type(got.frozen) is frozenset
    assert type(got.by_name[""]) is CodecInner
    assert type(got.raw) is bytearray
    assert type(got.blob) is bytes
    assert type(got.uid) is uuid.UUID
    assert got.big == 2**64 - 1


def test_aware_datetime_keeps_the_instant_and_stays_aware() -> None:
    sent = _everything()
    got = _round_trip(sent)
    assert got.aware.tzinfo is not None
    assert got.aware.utcoffset() is not None
    assert got.aware == sent.aware  # the same instant (msgpack normalises the offset to UTC)
    assert got.aware.astimezone(dt.UTC) == sent.aware.astimezone(dt.UTC)
    assert got.aware.microsecond == 123456
    assert got.middle.inner.when == dt.datetime(2024, 5, 6, tzinfo=dt.UTC)
    assert got.middle.inner.when.tzinfo is not None


def test_naive_datetime_date_and_time_stay_as_they_were() -> None:
    got = _round_trip(_everything())
    assert got.naive == dt.datetime(1999, 1, 2, 3, 4, 5, 678901)
    assert got.naive.tzinfo is None
    assert type(got.day) is dt.date
    assert got.day == dt.date(2000, 2, 29)
    assert got.clock == dt.time(12, 30, 15, 5)
    assert got.span == dt.timedelta(days=-3, seconds=7, microseconds=11)


@pytest.mark.parametrize(
    "digits", ["1.10", "0.000", "-0", "1E+3", "123456789012345678901234567890.0001", "-7.50"]
)
def test_decimal_keeps_exact_digits(digits: str) -> None:
    got = _round_trip(_everything(amount=Decimal(digits)))
    assert isinstance(got.amount, Decimal)
    assert str(got.amount) == digits
    assert got.amount.as_tuple() == Decimal(digits).as_tuple()


def test_enums_come_back_as_members() -> None:
    got = _round_trip(_everything())
    assert got.color is CodecColor.GREEN
    assert got.level is CodecLevel.HIGH
    assert got.shape is CodecShape.CIRCLE
    got = _round_trip(_everything(color=CodecColor.RED, level=CodecLevel.LOW))
    assert (got.color, got.level) == (CodecColor.RED, CodecLevel.LOW)


def test_enum_value_not_in_the_enum_is_a_decode_error() -> None:
    body = msgspec.msgpack.encode({**msgspec.to_builtins(_everything()), "color": "purple"})
    with pytest.raises(PacketDecodeError):
        registry.decode("codec_test.everything", body)


def test_optional_fields_none_and_set() -> None:
    unset = _round_trip(_everything())
    assert (unset.maybe_text, unset.maybe_leaf, unset.maybe_when) == (None, None, None)
    when = dt.datetime(2020, 1, 1, 12, tzinfo=dt.timezone(dt.timedelta(hours=-8)))
    got = _round_trip(_everything(maybe_text="", maybe_leaf=CodecLeaf(0), maybe_when=when))
    assert got.maybe_text == ""
    assert got.maybe_leaf == CodecLeaf(0)
    assert got.maybe_when == when
    assert got.maybe_when.tzinfo is not None


# ---------------------------------------------------------------- user types


class CodecPoint:
    """A user type the codec does not know by itself (not a Struct, not a dataclass)."""

    def __init__(self, x: float, y: float) -> None:
        self.x = x
        self.y = y

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and (self.x, self.y) == (other.x, other.y)  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((self.x, self.y))


class CodecPoint3(CodecPoint):
    """A subclass of a registered type: it encodes through its base's hook."""


register_type(CodecPoint, encode=lambda p: [p.x, p.y], decode=lambda data: CodecPoint(*data))


class CodecRoute(Packet):
    packet_tag: ClassVar[str] = "codec_test.route"
    start: CodecPoint
    stops: list[CodecPoint]
    named: dict[str, CodecPoint]
    end: CodecPoint | None = None


def test_registered_user_type_round_trips() -> None:
    sent = CodecRoute(
        CodecPoint(0.5, -1.0),
        [CodecPoint(1, 2), CodecPoint(3, 4)],
        {"home": CodecPoint(9, 9)},
        CodecPoint(7, 8),
    )
    got = _round_trip(sent)
    assert type(got.start) is CodecPoint
    assert got == sent
    assert got.stops == [CodecPoint(1, 2), CodecPoint(3, 4)]
    assert got.named["home"] == CodecPoint(9, 9)
    assert _round_trip(CodecRoute(CodecPoint(0, 0), [], {})).end is None


def test_registered_user_type_encodes_subclasses_through_the_base_hook() -> None:
    got = _round_trip(CodecRoute(CodecPoint3(1, 2), [], {}))
    assert got.start == CodecPoint(1, 2)


class CodecStranger:
    pass


class CodecHasStranger(Packet):
    packet_tag: ClassVar[str] = "codec_test.stranger"
    who: CodecStranger | None = None


def test_unregistered_type_fails_at_encode_naming_register_type() -> None:
    with pytest.raises((NotImplementedError, TypeError, CodecError)) as info:
        encode(CodecHasStranger(CodecStranger()))
    message = str(info.value)
    assert "register_type" in message
    assert "CodecStranger" in message


def test_unregistered_type_is_a_decode_error_when_the_body_carries_it() -> None:
    with pytest.raises(PacketDecodeError):
        registry.decode("codec_test.stranger", msgspec.msgpack.encode({"who": [1, 2]}))
    assert registry.decode("codec_test.stranger", b"\x80") == CodecHasStranger()


class CodecGrid:
    def __init__(self, cells: list[int]) -> None:
        self.cells = cells


register_type(CodecGrid, encode=lambda g: g.cells, decode=lambda data: CodecGrid(list(data)))


class CodecBoard(Packet):
    packet_tag: ClassVar[str] = "codec_test.board"
    grid: CodecGrid


class CodecIndexed:
    def __init__(self, first: int, second: int) -> None:
        self.first = first
        self.second = second


# A decode function that indexes into what it is given, as user code often does.
register_type(
    CodecIndexed,
    encode=lambda v: [v.first, v.second],
    decode=lambda data: CodecIndexed(data[0], data[1]),
)


class CodecHasIndexed(Packet):
    packet_tag: ClassVar[str] = "codec_test.indexed"
    value: CodecIndexed


def test_user_decode_failure_on_a_wrong_shaped_body_is_a_decode_error() -> None:
    """Bodies come from the far side: whatever a user decode function raises on a body of
    the wrong shape, decode reports PacketDecodeError (its documented contract)."""
    ok = registry.decode("codec_test.indexed", encode(CodecHasIndexed(CodecIndexed(1, 2))))
    assert (ok.value.first, ok.value.second) == (1, 2)
    for wrong in ([], [1], {"a": 1}, 5):
        body = msgspec.msgpack.encode({"value": wrong})
        with pytest.raises(PacketDecodeError):
            registry.decode("codec_test.indexed", body)


def test_user_decode_raising_value_error_is_a_decode_error() -> None:
    def picky(data: Any) -> CodecGrid:
        raise ValueError("not a grid")

    register_type(CodecGrid, encode=lambda g: g.cells, decode=picky)
    try:
        with pytest.raises(PacketDecodeError, match="not a grid"):
            registry.decode("codec_test.board", encode(CodecBoard(CodecGrid([1]))))
    finally:
        register_type(CodecGrid, encode=lambda g: g.cells, decode=lambda d: CodecGrid(list(d)))
    assert registry.decode("codec_test.board", encode(CodecBoard(CodecGrid([1])))).grid.cells == [1]


# ------------------------------------------------------------------- errors


def test_unknown_tag() -> None:
    with pytest.raises(UnknownPacketType, match=re.escape("codec_test.nobody")):
        registry.decode("codec_test.nobody", b"\x80")
    assert issubclass(UnknownPacketType, CodecError)
    assert registry.get("codec_test.nobody") is None


@pytest.mark.parametrize(
    "body",
    [
        msgspec.msgpack.encode({}),  # missing field
        msgspec.msgpack.encode({"x": "not an int"}),
        msgspec.msgpack.encode({"x": 1.5}),
        msgspec.msgpack.encode([1]),  # an array where a map is expected
        msgspec.msgpack.encode("x"),
        msgspec.msgpack.encode(None),
        msgspec.msgpack.encode({"x": True}),
        msgspec.msgpack.encode({"x": [1]}),
    ],
    ids=["missing", "str", "float", "array", "string", "nil", "bool", "nested"],
)
def test_wrong_shape_is_packet_decode_error(body: bytes) -> None:
    with pytest.raises(PacketDecodeError) as info:
        registry.decode("CodecPlain", body)
    assert not isinstance(info.value, msgspec.MsgspecError)
    assert "CodecPlain" in str(info.value)


@pytest.mark.parametrize(
    "body",
    [b"", b"\xc1", b"\x81", b"\x81\xa1x", b"\x81\xa1x\x01trailing", b"\xdf\xff\xff\xff\xff"],
    ids=["empty", "reserved", "truncated-map", "truncated-value", "trailing", "huge-map"],
)
def test_garbage_is_packet_decode_error(body: bytes) -> None:
    with pytest.raises(PacketDecodeError):
        registry.decode("CodecPlain", body)


def test_decode_accepts_a_memoryview() -> None:
    body = memoryview(b"__" + encode(CodecPlain(5)))[2:]
    assert registry.decode("CodecPlain", body) == CodecPlain(5)


def test_invalid_utf8_in_a_string_field_is_packet_decode_error() -> None:
    body = b"\x81\xa4text\xa2\x80\xff"  # {"text": <two bytes that are not UTF-8>}
    with pytest.raises(PacketDecodeError):
        registry.decode("codec_test.tagged.v1", body)


def test_deeply_nested_body_is_packet_decode_error() -> None:
    # An unknown field, skipped by the decoder, nested past the recursion limit.
    body = b"\x82\xa1x\x01\xa4junk" + b"\x91" * 3000 + b"\x00"
    with pytest.raises(PacketDecodeError):
        registry.decode("CodecPlain", body)


def test_duplicate_tag_from_a_different_class() -> None:
    with pytest.raises(DuplicatePacketTag, match=re.escape("codec_test.tagged.v1")):

        class CodecImpostor(Packet):
            packet_tag: ClassVar[str] = "codec_test.tagged.v1"
            other: int

    assert registry.get("codec_test.tagged.v1") is CodecTagged
    assert issubclass(DuplicatePacketTag, CodecError)
    assert issubclass(DuplicatePacketTag, TypeError)


def test_duplicate_default_tag_from_a_same_named_class_elsewhere() -> None:
    with pytest.raises(DuplicatePacketTag):

        class CodecPlain(Packet):  # same name, different qualified name
            y: str

    assert registry.get("CodecPlain") is globals()["CodecPlain"]


def _define_versioned(as_text: bool) -> type[Packet]:
    """The same class (same module and qualified name) in two versions, as after a reload."""
    if as_text:

        class CodecVersioned(Packet):
            packet_tag: ClassVar[str] = "codec_test.versioned"
            value: str

    else:

        class CodecVersioned(Packet):  # type: ignore[no-redef]
            packet_tag: ClassVar[str] = "codec_test.versioned"
            value: int

    return CodecVersioned


def test_redefining_the_same_qualified_class_is_allowed() -> None:
    first = _define_versioned(as_text=False)
    body = msgspec.msgpack.encode({"value": 3})
    assert type(registry.decode("codec_test.versioned", body)) is first  # caches a decoder

    second = _define_versioned(as_text=True)
    assert second is not first
    assert registry.get("codec_test.versioned") is second
    # The cached decoder was dropped: bodies now validate against the new definition.
    with pytest.raises(PacketDecodeError):
        registry.decode("codec_test.versioned", body)
    got = registry.decode("codec_test.versioned", msgspec.msgpack.encode({"value": "three"}))
    assert type(got) is second


# ----------------------------------------------------------------- property


class CodecKind(enum.IntEnum):
    A = 1
    B = 2
    C = 3


class CodecRecord(Packet):
    packet_tag: ClassVar[str] = "codec_test.record"
    i: int
    f: float
    s: str
    b: bytes
    flag: bool
    when: dt.datetime
    naive: dt.datetime
    day: dt.date
    uid: uuid.UUID
    amount: Decimal
    kind: CodecKind
    color: CodecColor
    words: list[str]
    counts: dict[str, int]
    pair: tuple[int, str]
    unique: set[int]
    leaves: list[CodecLeaf]
    address: CodecAddress
    where: CodecPoint
    maybe: str | None = None
    inner: CodecInner | None = None


offsets = st.integers(-23 * 60 - 59, 23 * 60 + 59).map(
    lambda minutes: dt.timezone(dt.timedelta(minutes=minutes))
)
finite = st.floats(allow_nan=False, allow_infinity=True)
records = st.builds(
    CodecRecord,
    i=st.integers(-(2**63), 2**64 - 1),
    f=finite,
    s=st.text(),
    b=st.binary(max_size=64),
    flag=st.booleans(),
    when=st.datetimes(
        min_value=dt.datetime(2, 1, 1), max_value=dt.datetime(9998, 12, 31), timezones=offsets
    ),
    naive=st.datetimes(),
    day=st.dates(),
    uid=st.uuids(),
    amount=st.decimals(allow_nan=False, allow_infinity=False),
    kind=st.sampled_from(CodecKind),
    color=st.sampled_from(CodecColor),
    words=st.lists(st.text(max_size=8), max_size=5),
    counts=st.dictionaries(st.text(max_size=8), st.integers(-(2**63), 2**63 - 1), max_size=5),
    pair=st.tuples(st.integers(-(2**63), 2**63 - 1), st.text(max_size=8)),
    unique=st.sets(st.integers(-1000, 1000), max_size=8),
    leaves=st.lists(st.builds(CodecLeaf, st.integers(-(2**31), 2**31)), max_size=4),
    address=st.builds(
        CodecAddress, st.text(max_size=10), st.integers(0, 10_000), st.lists(st.text(max_size=3))
    ),
    where=st.builds(CodecPoint, finite, finite),
    maybe=st.none() | st.text(max_size=10),
    inner=st.none()
    | st.builds(
        CodecInner,
        st.text(max_size=10),
        st.none() | st.datetimes(timezones=st.just(dt.UTC)),
        st.none() | st.builds(CodecAddress, st.text(max_size=5), st.integers(0, 99)),
    ),
)


@settings(max_examples=250, deadline=None)
@given(record=records)
def test_round_trip_property(record: CodecRecord) -> None:
    got = registry.decode("codec_test.record", encode(record))
    assert type(got) is CodecRecord
    assert got == record
    assert got.when.tzinfo is not None
    assert got.naive.tzinfo is None
    assert got.amount.as_tuple() == record.amount.as_tuple()  # exact digits, not just value
    assert got.kind is record.kind
    assert got.color is record.color
    assert type(got.where) is CodecPoint
    assert type(got.address) is CodecAddress


@settings(max_examples=250, deadline=None)
@given(body=st.binary(max_size=64))
def test_arbitrary_body_decodes_or_raises_packet_decode_error(body: bytes) -> None:
    try:
        got = registry.decode("codec_test.record", body)
    except PacketDecodeError:
        return
    assert type(got) is CodecRecord
