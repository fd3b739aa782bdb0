"""The raw baseline hub: an asyncio.Protocol relay with PacketStack's framing.

``python -m bench.relay --port P`` listens on 127.0.0.1:P (on uvloop, like the PacketStack
service). It parses the u32 length prefix of every frame and routes every PACKET frame to
the other connected peer (the most recently joined one that is not the sender); a request
reaches the responder and its reply comes back the same way. The frames one
``data_received`` call completes go out in one write; a slow receiver pauses reading from
the sender (the same backpressure the service applies). No msgspec, no framework.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
from typing import cast

from .rawwire import HELLO, LENGTH, PACKET, PREFIX_SIZE, WELCOME, control_frame

HIGH_WATER = 1024 * 1024
LOW_WATER = 256 * 1024
MAX_FRAME = 1024 * 1024

_WELCOME_FRAME = control_frame(WELCOME)


class Relay:
    def __init__(self) -> None:
        self.peers: list[RelayPeer] = []  # joined peers, oldest first

    def other(self, peer: RelayPeer) -> RelayPeer | None:
        for candidate in reversed(self.peers):
            if candidate is not peer:
                return candidate
        return None


class RelayPeer(asyncio.Protocol):
    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.paused = False
        self.held: list[RelayPeer] = []  # peers whose reading waits for us to drain

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's: not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.transport.set_write_buffer_limits(high=HIGH_WATER, low=LOW_WATER)

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.relay.peers:
            self.relay.peers.remove(self)
        self.transport = None
        self._release()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._release()

    def _release(self) -> None:
        held, self.held = self.held, []
        for peer in held:
            if peer.transport is not None:
                peer.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        if buffer:
            buffer += data
            source: bytes | bytearray = buffer
        else:
            source = data
        total = len(source)
        pos = 0
        start = 0  # first byte of the run of PACKET frames not yet forwarded
        unpack = LENGTH.unpack_from
        while total - pos >= PREFIX_SIZE:
            (length,) = unpack(source, pos)
            if length > MAX_FRAME or length < 3:
                assert self.transport is not None
                self.transport.close()
                return
            end = pos + 4 + length
            if end > total:
                break
            if source[pos + 4] != PACKET:
                self._forward(source, start, pos)
                self._control(source[pos + 4])
                start = end
            pos = end
        self._forward(source, start, pos)
        if buffer:
            del buffer[:pos]
        elif pos < total:
            self.buffer = bytearray(source[pos:])

    def _forward(self, source: bytes | bytearray, start: int, end: int) -> None:
        if end <= start:
            return
        other = self.relay.other(self)
        if other is None or other.transport is None:
            return  # nobody to route to: dropped
        if start == 0 and end == len(source) and type(source) is bytes:
            other.transport.write(source)
        else:
            other.transport.write(bytes(source[start:end]))
        if other.paused and self not in other.held and self.transport is not None:
            other.held.append(self)
            self.transport.pause_reading()

    def _control(self, kind: int) -> None:
        if kind == HELLO and self not in self.relay.peers:
            self.relay.peers.append(self)
            assert self.transport is not None
            self.transport.write(_WELCOME_FRAME)


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    relay = Relay()
    server = await loop.create_server(lambda: RelayPeer(relay), host, port)
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    server.close()
    for peer in list(relay.peers):
        if peer.transport is not None:
            peer.transport.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.relay", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        asyncio.run(serve(args.host, args.port))
    else:
        uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
