"""nats-py's JetStream driver for the backlog scenario: a file-storage stream filled with
acknowledged publishes, then read by a durable push consumer that acks every message.

A push consumer with a callback replays ~3.5x faster through nats-py than a pull consumer's
``fetch`` (measured here: ~200,000 against ~57,000 messages/s, whatever the batch size), so
the baseline uses it."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from nats.js.api import AckPolicy, ConsumerConfig, StorageType

from .common import (
    CpuMeter,
    Plan,
    Receipts,
    backlog_result,
    perf_counter,
    produce,
)
from .sys_nats import PAYLOAD, connect

DURABLE = "bench-sink"
MAX_ACK_PENDING = 20_000  # the default (1000) costs the replay ~7%


async def _publish(js: Any, subject: str, count: int, timebox: float) -> tuple[int, float]:
    """``publish_async`` (up to its 4000 pending) for each; (sent, seconds to the last ack)."""
    acks: list[asyncio.Future[Any]] = []

    async def send(i: int) -> None:
        acks.append(await js.publish_async(subject, PAYLOAD))

    start = perf_counter()
    sent, _ = await produce(send, count, timebox)
    await asyncio.gather(*acks)
    return sent, perf_counter() - start


async def _consume(url: str, stream: str, subject: str, receipts: Receipts, timeout: float) -> None:
    """Connect, bind to the durable consumer and ack every message as it arrives."""
    nc = await connect("bench-sink", url)

    async def received(msg: Any) -> None:
        await msg.ack()
        receipts.hit()

    try:
        js = nc.jetstream()
        await js.subscribe(subject, durable=DURABLE, stream=stream, cb=received, manual_ack=True)
        await receipts.wait(timeout)
    finally:
        await nc.close()


def _names(token: str) -> tuple[str, str]:
    """The run's stream and the subject it stores."""
    return f"BENCH_{token}", f"bench.{token}.backlog"


async def _measure(js: Any, url: str, token: str, plan: Plan, count: int) -> dict[str, Any]:
    stream, subject = _names(token)
    config = ConsumerConfig(
        durable_name=DURABLE,
        deliver_subject=f"bench.{token}.deliver",
        ack_policy=AckPolicy.EXPLICIT,
        max_ack_pending=MAX_ACK_PENDING,
    )
    await js.add_consumer(stream, config)
    sent, accept_elapsed = await _publish(js, subject, count, plan.fill_timebox)
    receipts = Receipts(sent)
    meter = CpuMeter()
    started = perf_counter()
    await _consume(url, stream, subject, receipts, plan.timebox * 2 + 60)
    return backlog_result(receipts, sent, accept_elapsed, started, meter)


async def backlog(url: str, plan: Plan, count: int | None = None) -> dict[str, Any]:
    """One stream per run (a unique name), deleted afterwards."""
    count = plan.backlog if count is None else count
    token = uuid.uuid4().hex
    stream, subject = _names(token)
    producer = await connect("bench-producer", url)
    try:
        js = producer.jetstream()
        await js.add_stream(name=stream, subjects=[subject], storage=StorageType.FILE)
        try:
            return await _measure(js, url, token, plan, count)
        finally:
            await js.delete_stream(stream)
    finally:
        await producer.close()
