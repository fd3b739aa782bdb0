"""The sans-I/O connection: bytes in, events out; calls in, bytes out.

Nothing here touches sockets, clocks or asyncio, so it is tested by feeding bytes, one at a
time or all at once, and fuzzed with "parse or raise ProtocolError, nothing else".
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from typing import Any

import msgspec

from ..errors import CloseCode, FrameTooLarge, PayloadTooLarge, ProtocolError
from .events import (
    AckReceived,
    CloseReceived,
    ErrorReceived,
    Event,
    GroupChange,
    HelloReceived,
    OversizedPacket,
    PacketReceived,
    PingReceived,
    WelcomeReceived,
)
from .frames import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_MAX_FRAME,
    DEFAULT_MAX_PAYLOAD,
    DELIVER_PREFIX,
    DELIVER_PREFIX_SIZE,
    EMPTY_HEADER,
    KIND_AND_HLEN,
    LENGTH,
    MAX_HEADER,
    PREFIX,
    PREFIX_SIZE,
    SEQ,
    AckHeader,
    ChunkHeader,
    CloseHeader,
    ErrorHeader,
    Flag,
    FrameKind,
    GroupHeader,
    Hello,
    PacketHeader,
    Welcome,
)

_encoder = msgspec.msgpack.Encoder()
_packet_header = msgspec.msgpack.Decoder(PacketHeader)
_chunk_header = msgspec.msgpack.Decoder(ChunkHeader)
_ack_header = msgspec.msgpack.Decoder(AckHeader)
_error_header = msgspec.msgpack.Decoder(ErrorHeader)
_close_header = msgspec.msgpack.Decoder(CloseHeader)
_group_header = msgspec.msgpack.Decoder(GroupHeader)
_hello = msgspec.msgpack.Decoder(Hello)
_welcome = msgspec.msgpack.Decoder(Welcome)

_CHUNKED = int(Flag.CHUNKED)
_PREFIX_PLACEHOLDER = bytes(PREFIX_SIZE)
_FOREVER = 365 * 24 * 3600.0  # longer heartbeats are nonsense (and NaN fails every test)

# encode_into(obj, buffer, offset): msgspec's Encoder.encode_into shape.
BodyEncoder = Callable[[Any, bytearray, int], None]
_PACKET = int(FrameKind.PACKET)
_DELIVER = int(FrameKind.DELIVER)
_SEQ_SIZE = SEQ.size

# Incoming chunked packets one connection may have in flight at once.
MAX_OPEN_STREAMS = 64


class Role(enum.Enum):
    CLIENT = "client"
    SERVICE = "service"


class State(enum.Enum):
    HANDSHAKE = "handshake"
    OPEN = "open"
    CLOSED = "closed"


# An enum member costs a class attribute lookup (~60 ns on 3.11): receive_data, called
# for every read, compares against these instead.
_OPEN = State.OPEN
_CLOSED = State.CLOSED
_CLIENT = Role.CLIENT


class _InStream:
    __slots__ = ("buffer", "discard", "header", "remaining", "seq")

    def __init__(self, header: PacketHeader, discard: bool, seq: int) -> None:
        self.header = header
        self.buffer = bytearray()
        self.remaining = header.size
        self.discard = discard  # over max_payload: count the bytes, keep none
        self.seq = seq


class _OutStream:
    __slots__ = ("id", "offset", "payload")

    def __init__(self, stream_id: int, payload: bytes | memoryview) -> None:
        self.id = stream_id
        self.payload = memoryview(payload)
        self.offset = 0


# A large packet waiting for a free stream: (header, payload, seq).
_Queued = tuple[PacketHeader, bytes | memoryview, int]


def _kind_name(kind: int) -> str:
    try:
        return FrameKind(kind).name
    except ValueError:
        return f"kind-{kind}"


def _frame_too_large(length: int, max_frame: int) -> FrameTooLarge:
    return FrameTooLarge(f"frame of {length} bytes is over the maximum of {max_frame}")


def frame(kind: int, header: bytes, payload: bytes | memoryview = b"", seq: int = 0) -> bytes:
    """Assemble one frame (a DELIVER frame carries ``seq``)."""
    hlen = len(header)
    if hlen > MAX_HEADER:
        raise ProtocolError(f"frame header of {hlen} bytes is over {MAX_HEADER}")
    if kind == _DELIVER:
        prefix = DELIVER_PREFIX.pack(hlen + len(payload) + 3 + _SEQ_SIZE, kind, hlen, seq)
    else:
        prefix = PREFIX.pack(hlen + len(payload) + 3, kind, hlen)
    return b"".join((prefix, header, payload))


def packet_frame(header: PacketHeader, payload: bytes | memoryview) -> bytes:
    """A whole PACKET frame, whatever the payload's size: the form a packet is stored in
    (sending it may still chunk it). Chunking fields of a reassembled header are cleared."""
    if header.flags & _CHUNKED:
        header = msgspec.structs.replace(header, flags=header.flags & ~_CHUNKED, size=0, stream=0)
    return frame(_PACKET, _encoder.encode(header), payload)


class Connection:
    """One side of a PacketStack connection.

    ``receive_data`` parses whatever bytes arrived into events; the ``*_frame`` methods and
    ``send_packet`` return the bytes to write. Large payloads become outgoing streams whose
    CHUNK frames the transport pulls with ``next_chunks`` between small frames.
    """

    def __init__(
        self,
        role: Role,
        *,
        max_frame: int = DEFAULT_MAX_FRAME,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        self.role = role
        self.state = State.HANDSHAKE
        self.max_frame = max_frame
        self.max_payload = max_payload
        self.chunk_size = chunk_size
        self._buffer = bytearray()
        self._needed = 0  # bytes the buffered partial frame needs before parsing helps
        self._hello_seen = False
        self._in_streams: dict[int, _InStream] = {}
        self._out_streams: deque[_OutStream] = deque()
        # Large packets waiting for a free stream (the peer accepts MAX_OPEN_STREAMS).
        self._queued_streams: deque[_Queued] = deque()
        self._queued_deliveries = 0  # of them, deliveries (seq > 0)
        self._next_stream = 1
        # Deliveries are handed up in sequence order: while a chunked one is arriving,
        # later whole ones wait here (sequence numbers of the open chunked ones).
        self._open_seqs: list[int] = []
        self._held: deque[PacketReceived] = deque()

    # ----------------------------------------------------------------- limits

    def apply_limits(self, *, max_frame: int, max_payload: int, chunk_size: int) -> None:
        """Adopt the limits the service announced in WELCOME."""
        self.max_frame = max_frame
        self.max_payload = max_payload
        self.chunk_size = chunk_size

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    # ---------------------------------------------------------------- receive

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Parse bytes into events. Raise ProtocolError (with the events parsed before the
        fault in ``error.events``) when the peer breaks the protocol."""
        if self.state is _CLOSED:
            return []
        buffer = self._buffer
        if buffer:
            buffer += data
            if len(buffer) < self._needed:
                return []  # still inside one large frame: no re-parse, no copy
            source = bytes(buffer)
        else:
            source = data if type(data) is bytes else bytes(data)
        events: list[Event] = []
        total = len(source)
        pos = 0
        kind = 0
        max_frame = self.max_frame
        is_open = self.state is _OPEN
        takes_deliveries = is_open and self.role is _CLIENT
        decode_header = _packet_header.decode
        unpack_prefix = PREFIX.unpack_from
        unpack_seq = SEQ.unpack_from
        append = events.append
        try:
            while total - pos >= PREFIX_SIZE:
                length, kind, hlen = unpack_prefix(source, pos)
                if length > max_frame:
                    raise _frame_too_large(length, max_frame)
                if length < KIND_AND_HLEN:
                    raise ProtocolError(f"frame length {length} is shorter than its prefix")
                end = pos + 4 + length
                if end > total:
                    break
                raw = source[pos:end]
                pos = end
                header_end = PREFIX_SIZE + hlen
                if hlen > length - KIND_AND_HLEN:
                    raise ProtocolError(f"header length {hlen} runs past the end of its frame")
                if kind == _PACKET and is_open:
                    # The hot path: one small header decode, the payload stays a view.
                    header = decode_header(raw[PREFIX_SIZE:header_end])
                    if not header.flags & _CHUNKED:
                        append(PacketReceived(header, raw, header_end))
                        continue
                    self._open_stream(header, memoryview(raw)[header_end:], events, 0)
                    continue
                if kind == _DELIVER and takes_deliveries:
                    header_end += _SEQ_SIZE
                    if hlen > length - KIND_AND_HLEN - _SEQ_SIZE:
                        raise ProtocolError(f"header length {hlen} runs past the end of its frame")
                    header = decode_header(raw[DELIVER_PREFIX_SIZE:header_end])
                    seq = unpack_seq(raw, PREFIX_SIZE)[0]
                    if header.flags & _CHUNKED:
                        self._open_stream(header, memoryview(raw)[header_end:], events, seq)
                    elif self._open_seqs:
                        self._held.append(PacketReceived(header, raw, header_end, seq))
                    else:
                        append(PacketReceived(header, raw, header_end, seq))
                    continue
                self._parse_frame(raw, kind, header_end, events)
                if self.closed:
                    self._buffer = bytearray()  # nothing after CLOSE counts
                    return events
                is_open = self.state is _OPEN
                takes_deliveries = is_open and self.role is _CLIENT
                max_frame = self.max_frame  # a WELCOME may have just set it
            if pos < total or buffer:  # else every byte is parsed and none was buffered
                self._keep_partial(source, pos)
        except ProtocolError as exc:
            self._fault()
            exc.events = events  # type: ignore[attr-defined]
            raise
        except (msgspec.DecodeError, ValueError, RecursionError) as exc:
            # ValueError: bad UTF-8 in a string; RecursionError: absurdly nested msgpack.
            self._fault()
            error = ProtocolError(f"malformed {_kind_name(kind)} frame header: {exc}")
            error.events = events  # type: ignore[attr-defined]
            raise error from exc
        return events

    def _keep_partial(self, source: bytes, pos: int) -> None:
        """Buffer the start of a frame that has not fully arrived."""
        if pos == len(source):
            self._buffer = bytearray()
            return
        self._needed = 4  # the length alone is enough to refuse an oversized frame
        if len(source) - pos >= 4:
            (length,) = LENGTH.unpack_from(source, pos)
            if length > self.max_frame:  # refuse now, never buffer towards a huge frame
                raise _frame_too_large(length, self.max_frame)
            self._needed = 4 + length
        self._buffer = bytearray(source[pos:])

    def _fault(self) -> None:
        self.state = State.CLOSED
        self._buffer = bytearray()

    def _parse_frame(self, raw: bytes, kind: int, header_end: int, events: list[Event]) -> None:
        """Every frame but an open connection's PACKET frames."""
        view = memoryview(raw)
        header = view[PREFIX_SIZE:header_end]
        payload = view[header_end:]
        if kind in (_PACKET, _DELIVER):
            self._require_open(kind)
            if kind == _DELIVER:
                raise ProtocolError("only the service sends DELIVER frames")
        elif kind == FrameKind.CHUNK:
            self._require_open(kind)
            self._receive_chunk(_chunk_header.decode(header).stream, payload, events)
        elif kind == FrameKind.PING:
            events.append(PingReceived())
        elif kind == FrameKind.ACK:
            self._require_open(kind)
            events.append(AckReceived(_ack_header.decode(header).id))
        elif kind == FrameKind.ERROR:
            err = _error_header.decode(header)
            events.append(ErrorReceived(err.ref, err.code, err.message))
        elif kind == FrameKind.CLOSE:
            close = _close_header.decode(header)
            self.state = State.CLOSED
            events.append(CloseReceived(close.code, close.reason))
        elif kind in (FrameKind.JOIN, FrameKind.LEAVE):
            self._require_open(kind)
            if self.role is not Role.SERVICE:
                raise ProtocolError("only a client may send JOIN or LEAVE")
            group = _group_header.decode(header)
            events.append(GroupChange(group.id, group.group, kind == FrameKind.JOIN))
        elif kind == FrameKind.HELLO:
            if (
                self.role is not Role.SERVICE
                or self.state is not State.HANDSHAKE
                or self._hello_seen
            ):
                raise ProtocolError("HELLO is only valid as a client's first frame")
            self._hello_seen = True
            events.append(HelloReceived(_hello.decode(header)))
        elif kind == FrameKind.WELCOME:
            if self.role is not Role.CLIENT or self.state is not State.HANDSHAKE:
                raise ProtocolError("WELCOME is only valid as the service's first frame")
            welcome = _welcome.decode(header)
            if (
                welcome.chunk_size < 1
                or welcome.max_frame < welcome.chunk_size + 64
                or not 0 < welcome.heartbeat < _FOREVER
                or not 0 < welcome.timeout < _FOREVER
            ):
                raise ProtocolError(
                    f"WELCOME limits make no sense: chunk_size {welcome.chunk_size}, "
                    f"max_frame {welcome.max_frame}, heartbeat {welcome.heartbeat}, "
                    f"timeout {welcome.timeout}"
                )
            self.state = State.OPEN
            self.apply_limits(
                max_frame=welcome.max_frame,
                max_payload=welcome.max_payload,
                chunk_size=welcome.chunk_size,
            )
            events.append(WelcomeReceived(welcome))
        else:
            raise ProtocolError(f"unknown frame kind {kind}")

    def _require_open(self, kind: int) -> None:
        if self.state is not State.OPEN:
            raise ProtocolError(f"{FrameKind(kind).name} frame before the handshake completed")

    def _open_stream(
        self, header: PacketHeader, payload: memoryview, events: list[Event], seq: int
    ) -> None:
        if payload:
            raise ProtocolError("a CHUNKED PACKET frame must carry no payload")
        if header.stream in self._in_streams:
            raise ProtocolError(f"stream {header.stream} is already open")
        if len(self._in_streams) >= MAX_OPEN_STREAMS:
            raise ProtocolError(f"more than {MAX_OPEN_STREAMS} chunked packets in flight")
        too_large = header.size > self.max_payload
        if too_large:
            events.append(OversizedPacket(header))
        if header.size == 0:
            self._complete(PacketReceived(header, bytearray(), 0, seq), events)
            return
        self._in_streams[header.stream] = _InStream(header, too_large, seq)
        if seq:
            self._open_seqs.append(seq)

    def _receive_chunk(self, stream_id: int, payload: memoryview, events: list[Event]) -> None:
        stream = self._in_streams.get(stream_id)
        if stream is None:
            raise ProtocolError(f"CHUNK for stream {stream_id}, which is not open")
        stream.remaining -= len(payload)
        if stream.remaining < 0:
            raise ProtocolError(f"stream {stream_id} sent more than its {stream.header.size} bytes")
        if not stream.discard:
            stream.buffer += payload
        if stream.remaining == 0:
            del self._in_streams[stream_id]
            if stream.seq:
                self._open_seqs.remove(stream.seq)
            if stream.discard:
                self._release_held(events)
            else:
                self._complete(PacketReceived(stream.header, stream.buffer, 0, stream.seq), events)

    def _complete(self, event: PacketReceived, events: list[Event]) -> None:
        """Hand up a packet reassembled from chunks, keeping deliveries in sequence order."""
        seq = event.seq
        if seq and self._open_seqs and min(self._open_seqs) < seq:
            self._held.append(event)
            self._sort_held()
            return
        events.append(event)
        self._release_held(events)

    def _sort_held(self) -> None:
        self._held = deque(sorted(self._held, key=lambda held: held.seq))

    def _release_held(self, events: list[Event]) -> None:
        held = self._held
        first_open = min(self._open_seqs) if self._open_seqs else None
        while held and (first_open is None or held[0].seq < first_open):
            events.append(held.popleft())

    # ------------------------------------------------------------------- send

    def hello_frame(self, hello: Hello) -> bytes:
        return frame(FrameKind.HELLO, _encoder.encode(hello))

    def welcome_frame(self, welcome: Welcome) -> bytes:
        self.state = State.OPEN
        return frame(FrameKind.WELCOME, _encoder.encode(welcome))

    def ping_frame(self) -> bytes:
        return frame(FrameKind.PING, EMPTY_HEADER)

    def ack_frame(self, packet_id: int) -> bytes:
        return frame(FrameKind.ACK, _encoder.encode(AckHeader(packet_id)))

    def error_frame(self, ref: int, code: int, message: str) -> bytes:
        return frame(FrameKind.ERROR, _encoder.encode(ErrorHeader(ref, code, message[:4096])))

    def group_frame(self, request_id: int, group: str, join: bool) -> bytes:
        kind = FrameKind.JOIN if join else FrameKind.LEAVE
        return frame(kind, _encoder.encode(GroupHeader(request_id, group)))

    def close_frame(self, code: CloseCode, reason: str = "") -> bytes:
        self.state = State.CLOSED
        return frame(FrameKind.CLOSE, _encoder.encode(CloseHeader(int(code), reason[:1024])))

    def send_packet(self, header: PacketHeader, payload: bytes | memoryview) -> bytes:
        """Return the frame for a packet. A payload over ``chunk_size`` becomes an outgoing
        stream: this returns only its announcing frame (or nothing while MAX_OPEN_STREAMS
        streams are already open: it is announced when one ends), and ``next_chunks``
        yields the rest. Raise PayloadTooLarge (nothing queued) when it is over
        ``max_payload``."""
        size = len(payload)
        if size > self.max_payload:
            raise PayloadTooLarge(
                f"payload of {size} bytes is over the maximum of {self.max_payload}"
            )
        if size <= self.chunk_size:
            if header.flags & _CHUNKED:  # reassembled from chunks, now small enough inline
                header = msgspec.structs.replace(
                    header, flags=header.flags & ~_CHUNKED, size=0, stream=0
                )
            return frame(_PACKET, _encoder.encode(header), payload)
        return self._stream(header, payload, 0)

    def _stream(self, header: PacketHeader, payload: bytes | memoryview, seq: int) -> bytes:
        if len(self._out_streams) >= MAX_OPEN_STREAMS:
            self._queued_streams.append((header, payload, seq))
            if seq:
                self._queued_deliveries += 1
            return b""
        return self._announce(header, payload, seq)

    def append_delivery(self, out: bytearray, seq: int, packet: bytes) -> None:
        """Append the DELIVER frame(s) carrying ``seq`` for ``packet``, a whole PACKET frame
        (as received, or from ``packet_frame``). A small one is re-prefixed, not re-encoded:
        the header and payload bytes are the sender's."""
        length, _, hlen = PREFIX.unpack_from(packet)
        # While a delivery waits for a free stream, later ones queue behind it: sent inline
        # they would reach the client first, out of sequence.
        if length - KIND_AND_HLEN - hlen <= self.chunk_size and not self._queued_deliveries:
            out += DELIVER_PREFIX.pack(length + _SEQ_SIZE, _DELIVER, hlen, seq)
            out += memoryview(packet)[PREFIX_SIZE:]
            return
        header = _packet_header.decode(memoryview(packet)[PREFIX_SIZE : PREFIX_SIZE + hlen])
        out += self._stream(header, memoryview(packet)[PREFIX_SIZE + hlen :], seq)

    def append_packet(
        self, out: bytearray, header: PacketHeader, body: Any, encode_into: BodyEncoder
    ) -> None:
        """Append the frame(s) for a packet to ``out``, encoding header and body straight
        into it: the hot path builds no intermediate bytes. ``encode_into(body, buffer,
        offset)`` writes the body. On any error ``out`` is left as it was."""
        start = len(out)
        header_at = start + PREFIX_SIZE
        try:
            out += _PREFIX_PLACEHOLDER
            _encoder.encode_into(header, out, header_at)
            body_at = len(out)
            hlen = body_at - header_at
            if hlen > MAX_HEADER:
                raise ProtocolError(f"a packet header of over {MAX_HEADER} bytes cannot be sent")
            encode_into(body, out, body_at)
            end = len(out)
            if end - body_at > self.chunk_size:
                payload = bytes(out[body_at:])
                del out[start:]
                out += self.send_packet(header, payload)
                return
            PREFIX.pack_into(out, start, end - start - 4, _PACKET, hlen)
        except BaseException:
            del out[start:]
            raise

    def _announce(self, header: PacketHeader, payload: bytes | memoryview, seq: int) -> bytes:
        stream_id = self._next_stream
        self._next_stream += 1
        announce = msgspec.structs.replace(
            header, flags=header.flags | _CHUNKED, size=len(payload), stream=stream_id
        )
        # Raises before anything is queued.
        announcing = frame(_DELIVER if seq else _PACKET, _encoder.encode(announce), b"", seq)
        self._out_streams.append(_OutStream(stream_id, payload))
        return announcing

    @property
    def has_chunks(self) -> bool:
        return bool(self._out_streams)

    def next_chunks(self, budget: int) -> list[bytes]:
        """CHUNK frames worth about ``budget`` bytes, one chunk per stream in turn, so
        several large packets share the connection fairly."""
        frames: list[bytes] = []
        streams = self._out_streams
        while streams and budget > 0:
            stream = streams.popleft()
            end = min(stream.offset + self.chunk_size, len(stream.payload))
            piece = stream.payload[stream.offset : end]
            frames.append(frame(FrameKind.CHUNK, _encoder.encode(ChunkHeader(stream.id)), piece))
            budget -= len(piece)
            stream.offset = end
            if end < len(stream.payload):
                streams.append(stream)
            elif self._queued_streams:
                header, payload, seq = self._queued_streams.popleft()
                if seq:
                    self._queued_deliveries -= 1
                frames.append(self._announce(header, payload, seq))
        return frames
