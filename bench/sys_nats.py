"""nats-py's drivers: two connections to the NATS server on 127.0.0.1:4222."""

from __future__ import annotations

import uuid
from typing import Any

import nats

from .common import (
    BODY_SIZE,
    REQUEST_TIMEOUT,
    CpuMeter,
    Plan,
    Receipts,
    drive_requests,
    one_way_result,
    produce,
)

NATS_URL = "nats://127.0.0.1:4222"
PAYLOAD = b"n" * BODY_SIZE
REPLY = b"a" * BODY_SIZE


async def connect(name: str, url: str) -> Any:
    return await nats.connect(url, name=name, allow_reconnect=False, connect_timeout=5)


async def server_version(url: str = NATS_URL) -> str | None:
    nc = await connect("bench-probe", url)
    try:
        return str(nc.connected_server_version)
    finally:
        await nc.close()


async def one_way(url: str, plan: Plan, count: int | None = None) -> dict[str, Any]:
    count = plan.one_way if count is None else count
    subject = f"bench.{uuid.uuid4().hex}.oneway"
    consumer = await connect("bench-consumer", url)
    producer = await connect("bench-producer", url)
    state: list[Receipts] = [Receipts(plan.one_way_warmup)]

    async def received(msg: Any) -> None:
        state[0].hit()

    # The default pending limits (512 Ki messages) hold a whole run: no slow-consumer drops.
    await consumer.subscribe(subject, cb=received)
    await consumer.flush()

    async def send(i: int) -> None:
        await producer.publish(subject, PAYLOAD)

    try:
        await produce(send, plan.one_way_warmup, 60)
        await producer.flush()
        await state[0].wait(30)
        receipts = state[0] = Receipts(count)
        meter = CpuMeter()
        sent, send_elapsed = await produce(send, count, plan.timebox)
        await producer.flush(timeout=plan.timebox + 20)
        receipts.expect(sent)
        await receipts.wait(plan.timebox + 20)
        return one_way_result(receipts, sent, send_elapsed, meter)
    finally:
        await producer.close()
        await consumer.close()


async def request_reply(url: str, plan: Plan, outstanding: int) -> dict[str, Any]:
    total = plan.rr1 if outstanding == 1 else plan.rr100
    subject = f"bench.{uuid.uuid4().hex}.request"
    responder = await connect("bench-responder", url)
    requester = await connect("bench-requester", url)

    async def answer(msg: Any) -> None:
        await msg.respond(REPLY)

    await responder.subscribe(subject, cb=answer)
    await responder.flush()

    async def request() -> None:
        await requester.request(subject, PAYLOAD, timeout=REQUEST_TIMEOUT)

    try:
        await drive_requests(request, plan.rr_warmup, outstanding, 60)
        return await drive_requests(request, total, outstanding, plan.timebox)
    finally:
        await requester.close()
        await responder.close()
