"""PacketStack's drivers: two Clients talking through a service in its own process.

The backlog scenario sends to an ending that is not connected: the service stores those
packets durably in its mailbox and delivers them when it connects."""

from __future__ import annotations

from typing import Any, ClassVar

from packetstack import Client, Context, Packet
from packetstack.codec import encode

from .common import (
    BODY_SIZE,
    REQUEST_TIMEOUT,
    CpuMeter,
    Plan,
    Receipts,
    backlog_result,
    drive_requests,
    one_way_result,
    perf_counter,
    produce,
)

BACKLOG_SINK = "bench-sink"
IDLE = 2.0  # seconds without a packet after which the replay counts the rest as lost


class Blob(Packet):
    """The one-way packet: one bytes field, sized so the encoded body is BODY_SIZE bytes."""

    packet_tag: ClassVar[str] = "bench.blob"
    data: bytes


class Ask(Packet):
    packet_tag: ClassVar[str] = "bench.ask"
    data: bytes


class Answer(Packet):
    packet_tag: ClassVar[str] = "bench.answer"
    data: bytes


def _fill(cls: type[Packet]) -> bytes:
    """Bytes for the field of ``cls`` that make its encoded body exactly BODY_SIZE bytes."""
    overhead = len(encode(cls(b"")))
    data = b"p" * (BODY_SIZE - overhead)
    assert len(encode(cls(data))) == BODY_SIZE
    return data


BLOB_DATA = _fill(Blob)
ASK_DATA = _fill(Ask)
ANSWER_DATA = _fill(Answer)


def _client(name: str, url: str) -> Client:
    return Client(name, url, reconnect=False, request_timeout=REQUEST_TIMEOUT)


async def one_way(url: str, plan: Plan, count: int | None = None) -> dict[str, Any]:
    count = plan.one_way if count is None else count
    consumer = _client("bench-consumer", url)
    producer = _client("bench-producer", url)
    await consumer.connect()
    await producer.connect()
    state: list[Receipts] = [Receipts(plan.one_way_warmup)]

    @consumer.on(Blob)
    async def received(packet: Blob, ctx: Context) -> None:
        state[0].hit()

    async def send(i: int) -> None:
        await producer.send("bench-consumer", Blob(BLOB_DATA))

    try:
        await produce(send, plan.one_way_warmup, 60)
        await state[0].wait(30)
        receipts = state[0] = Receipts(count)
        meter = CpuMeter()
        sent, send_elapsed = await produce(send, count, plan.timebox)
        receipts.expect(sent)
        await receipts.wait(plan.timebox + 20)
        return one_way_result(receipts, sent, send_elapsed, meter)
    finally:
        await producer.close()
        await consumer.close()


async def request_reply(url: str, plan: Plan, outstanding: int) -> dict[str, Any]:
    total = plan.rr1 if outstanding == 1 else plan.rr100
    responder = _client("bench-responder", url)
    requester = _client("bench-requester", url)
    await responder.connect()
    await requester.connect()

    @responder.on(Ask)
    async def answer(packet: Ask, ctx: Context) -> Answer:
        return Answer(ANSWER_DATA)

    async def request() -> None:
        await requester.request("bench-responder", Ask(ASK_DATA), timeout=REQUEST_TIMEOUT)

    try:
        await drive_requests(request, plan.rr_warmup, outstanding, 60)
        return await drive_requests(request, total, outstanding, plan.timebox)
    finally:
        await requester.close()
        await responder.close()


async def _fill_mailbox(producer: Client, count: int, timebox: float) -> tuple[int, float]:
    """Send to the offline sink; the last send waits for the service's acknowledgement that
    it is stored, and stores commit in order: (sent, seconds to that acknowledgement)."""

    async def send(i: int) -> None:
        await producer.send(BACKLOG_SINK, Blob(BLOB_DATA))

    start = perf_counter()
    sent, _ = await produce(send, count - 1, timebox)
    await producer.send(BACKLOG_SINK, Blob(BLOB_DATA), ack=True)
    return sent + 1, perf_counter() - start


async def backlog(url: str, plan: Plan, count: int | None = None) -> dict[str, Any]:
    count = plan.backlog if count is None else count
    producer = _client("bench-producer", url)
    sink = _client(BACKLOG_SINK, url)
    receipts = Receipts(count)

    @sink.on(Blob)
    async def received(packet: Blob, ctx: Context) -> None:
        receipts.hit()

    await producer.connect()
    try:
        sent, accept_elapsed = await _fill_mailbox(producer, count, plan.fill_timebox)
        receipts.expect(sent)
        meter = CpuMeter()
        started = perf_counter()
        await sink.connect()
        await receipts.settle(IDLE, plan.timebox * 2 + 60)
        return backlog_result(receipts, sent, accept_elapsed, started, meter)
    finally:
        await producer.close()
        await sink.close()
