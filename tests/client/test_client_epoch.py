"""A client that outlives the service's store: sequence numbers of a fresh store count anew."""

from __future__ import annotations

import asyncio
from pathlib import Path

from packetstack import Client, Context, Packet, Service


class EpNumber(Packet):
    n: int


async def _serve(data_dir: Path, port: int = 0) -> Service:
    service = Service("127.0.0.1", port, data_dir=data_dir)
    await service.start()
    return service


async def test_a_fresh_store_does_not_make_the_client_drop_its_packets(tmp_path: Path) -> None:
    first = await _serve(tmp_path / "first")
    got: list[tuple[int, int]] = []
    receiver = Client("receiver", first.url, reconnect=False)

    @receiver.on(EpNumber)
    async def handle(packet: EpNumber, ctx: Context) -> None:
        got.append((packet.n, ctx.seq))

    async with Client("sender", first.url) as sender:
        await receiver.connect()
        for n in range(100):
            await sender.send("receiver", EpNumber(n))
        await sender.send("receiver", EpNumber(100), ack=True)
        await receiver.close()
    await first.close()
    assert [n for n, _ in got] == list(range(101))
    highest_seen = got[-1][1]

    # The same port, a new data directory: a new epoch whose sequence numbers start low.
    second = await _serve(tmp_path / "second", first.port)
    try:
        async with Client("sender", second.url) as sender:
            for n in range(200, 205):
                await sender.send("receiver", EpNumber(n), ack=True)  # stored: it is away
        await receiver.connect()  # WELCOME and the stored packets arrive together
        async with asyncio.timeout(10):
            while len(got) < 106:
                await asyncio.sleep(0.01)
        new = got[101:]
        assert [n for n, _ in new] == list(range(200, 205))
        assert all(seq < highest_seen for _, seq in new)  # counted in the new store's epoch
        assert receiver.repeats_dropped == 0
    finally:
        await receiver.close()
        await second.close()
