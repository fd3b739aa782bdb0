"""Typed packets: the ``Packet`` base, the tag registry, and reusable msgspec codecs.

A packet's *tag* travels in the envelope; its *body* is the msgpack encoding of the
struct. The service routes bodies opaquely; only the receiving side decodes them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import msgspec

from .errors import DuplicatePacketTag, PacketDecodeError, PacketEncodeError, UnknownPacketType


class Packet(msgspec.Struct):
    """Base class of every packet.

    Subclasses register themselves under ``packet_tag`` (default: the class name)::

        class Move(Packet):
            x: int
            y: int

        class Chat(Packet):
            packet_tag: ClassVar[str] = "chat.v1"
            text: str
    """

    packet_tag: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        tag = cls.__dict__.get("packet_tag", cls.__name__)
        cls.packet_tag = tag
        registry.register(cls, tag)


_EncodeHook = Callable[[Any], Any]
_DecodeHook = Callable[[Any], Any]


class _Hooks:
    """User types that msgspec does not know, with their encode/decode functions."""

    def __init__(self) -> None:
        self.encoders: dict[type, _EncodeHook] = {}
        self.decoders: dict[type, _DecodeHook] = {}

    def enc_hook(self, obj: Any) -> Any:
        for kind in type(obj).__mro__:
            encode = self.encoders.get(kind)
            if encode is not None:
                return encode(obj)
        raise NotImplementedError(
            f"cannot encode {type(obj).__qualname__}: register it with "
            "packetstack.register_type(cls, encode=..., decode=...)"
        )

    def dec_hook(self, kind: type, obj: Any) -> Any:
        decode = self.decoders.get(kind)
        if decode is None:
            raise NotImplementedError(
                f"cannot decode {kind!r}: register it with packetstack.register_type"
            )
        try:
            return decode(obj)
        except Exception as exc:
            # msgspec turns a ValueError into a validation error naming the field.
            raise ValueError(f"{kind.__qualname__} decode hook failed: {exc!r}") from exc


_hooks = _Hooks()


def register_type(kind: type, *, encode: _EncodeHook, decode: _DecodeHook) -> None:
    """Teach the codec a user type: ``encode(obj)`` returns msgpack-able data, ``decode(data)``
    rebuilds the object. Registering after packets were decoded is fine: hooks are looked up
    on each use."""
    _hooks.encoders[kind] = encode
    _hooks.decoders[kind] = decode


# One encoder for every body in the process: msgspec encoders are reusable and thread-safe.
_encoder = msgspec.msgpack.Encoder(enc_hook=_hooks.enc_hook)


ENCODE_ERRORS = (NotImplementedError, TypeError, ValueError, OverflowError)


def encode_failed(body: Any, exc: Exception) -> PacketEncodeError:
    return PacketEncodeError(f"cannot encode {type(body).__qualname__}: {exc}")


def encode(body: Any) -> bytes:
    """Encode a packet body (its tag travels separately, in the envelope).

    Raise PacketEncodeError for a value the codec cannot encode."""
    try:
        return _encoder.encode(body)
    except ENCODE_ERRORS as exc:
        raise encode_failed(body, exc) from exc


# The hot path's encoder (encoder.encode_into(body, buffer, offset)), unwrapped to save a
# call per packet: its caller maps ENCODE_ERRORS through encode_failed().
encode_body_into = _encoder.encode_into


class PacketRegistry:
    """Tag -> packet class, each with its own decoder built once."""

    def __init__(self) -> None:
        self._classes: dict[str, type[Packet]] = {}
        self._decoders: dict[str, Decode] = {}

    def register(self, cls: type[Packet], tag: str) -> None:
        known = self._classes.get(tag)
        if known is not None and _qualified(known) != _qualified(cls):
            raise DuplicatePacketTag(
                f"packet tag {tag!r} is used by {_qualified(known)} and {_qualified(cls)}; "
                "give one of them its own `packet_tag: ClassVar[str] = ...`"
            )
        self._classes[tag] = cls
        self._decoders.pop(tag, None)

    def get(self, tag: str) -> type[Packet] | None:
        return self._classes.get(tag)

    def decode(self, tag: str, body: bytes | memoryview) -> Packet:
        """Decode a body; raise UnknownPacketType or PacketDecodeError, nothing else."""
        decode = self._decoders.get(tag)
        if decode is None:
            cls = self._classes.get(tag)
            if cls is None:
                raise UnknownPacketType(f"no packet class is registered under tag {tag!r}")
            decode = self._decoders[tag] = decoder_for(cls)
        try:
            return decode(body)
        except DECODE_ERRORS as exc:
            raise decode_failed(tag, exc) from exc


Decode = Callable[[bytes | memoryview], Packet]

# What a msgspec decoder raises for a body that does not fit: DecodeError (and its
# ValidationError), ValueError (bad UTF-8, a failing user hook), NotImplementedError (a
# type with no hook), RecursionError (absurdly nested data).
DECODE_ERRORS = (msgspec.DecodeError, NotImplementedError, ValueError, RecursionError)


def decoder_for(cls: type[Packet]) -> Decode:
    """A reusable decoder for one packet class (raises DECODE_ERRORS on bad bodies)."""
    decoder: msgspec.msgpack.Decoder[Packet] = msgspec.msgpack.Decoder(
        cls, dec_hook=_hooks.dec_hook
    )
    return decoder.decode


def decode_failed(tag: str, exc: BaseException) -> PacketDecodeError:
    return PacketDecodeError(f"body of packet {tag!r} does not validate: {exc}")


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


registry = PacketRegistry()
