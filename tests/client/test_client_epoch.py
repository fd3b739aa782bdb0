"""A client that outlives the service's store: sequence numbers of a fresh store count anew."""

from __future__ import annotations

import asyncio
from pathlib import Path

from packetstack import Client, Context, Packet, Service
from packetstack.protocol import PROTOCOL_VERSION, Welcome


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


def _welcome(epoch: str, acked: int, next_seq: int) -> Welcome:
    return Welcome(
        PROTOCOL_VERSION,
        "receiver",
        5.0,
        15.0,
        1 << 20,
        1 << 26,
        1 << 18,
        epoch=epoch,
        acked=acked,
        next=next_seq,
    )


def test_a_service_numbering_again_below_what_the_client_took_resets_its_dedupe() -> None:
    """A service killed before it stored an ending's first block of sequence numbers hands
    them out again after its restart (same store, same epoch): WELCOME's ``next`` tells."""
    client = Client("receiver", "ps://127.0.0.1:1")
    client._adopt(_welcome("e1", 0, 1))
    client._delivered = 500  # took deliveries 1..500 from the service before it died
    client._adopt(_welcome("e1", 0, 501))  # a normal reconnect: keep dropping repeats
    assert client._delivered == 500
    client._adopt(_welcome("e1", 0, 3))  # numbering restarted below 500
    assert client._delivered == 0
