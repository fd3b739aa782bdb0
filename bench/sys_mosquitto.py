"""aiomqtt's driver for the backlog scenario: QoS 1 messages queued by mosquitto for a
persistent session (clean_session=False, fixed client id) while its client is offline."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Any
from urllib.parse import urlsplit

import aiomqtt
from aiomqtt import ProtocolVersion

from .common import (
    BODY_SIZE,
    REQUEST_TIMEOUT,
    CpuMeter,
    Plan,
    Receipts,
    Window,
    backlog_result,
    perf_counter,
    produce,
)

MQTT_URL = "mqtt://127.0.0.1:1883"  # the machine's broker, used with --mqtt-url
PAYLOAD = b"m" * BODY_SIZE
SINK_ID = "bench-backlog-sink"
WINDOW = 1000  # QoS 1 publishes awaiting their PUBACK at once
IDLE = 2.0  # seconds without a message after which the replay counts the rest as lost


def _client(url: str, identifier: str, *, clean: bool) -> aiomqtt.Client:
    parts = urlsplit(url)
    client = aiomqtt.Client(
        parts.hostname or "127.0.0.1",
        parts.port or 1883,
        identifier=identifier,
        protocol=ProtocolVersion.V311,
        clean_session=clean,
        timeout=REQUEST_TIMEOUT,
        max_inflight_messages=WINDOW,
    )
    client.pending_calls_threshold = WINDOW  # it warns past 10 concurrent publishes
    return client


async def _forget_session(url: str) -> None:
    """Drop whatever the broker keeps for SINK_ID (a clean session ends the old one)."""
    async with _client(url, SINK_ID, clean=True):
        pass


async def _subscribe_offline(url: str, topic: str) -> None:
    """Make SINK_ID's persistent session subscribe with QoS 1, then disconnect."""
    async with _client(url, SINK_ID, clean=False) as sink:
        await sink.subscribe(topic, qos=1)


async def _publish(url: str, topic: str, count: int, timebox: float) -> tuple[int, float]:
    """Publish with QoS 1, WINDOW at a time; (sent, seconds until every PUBACK came)."""
    async with _client(url, f"bench-producer-{uuid.uuid4().hex[:8]}", clean=True) as producer:
        window = Window(WINDOW)

        async def send(i: int) -> None:
            await window.add(producer.publish(topic, PAYLOAD, qos=1))

        start = perf_counter()
        sent, _ = await produce(send, count, timebox)
        await window.flush()
        return sent, perf_counter() - start


async def _count(sink: aiomqtt.Client, receipts: Receipts) -> None:
    async for _message in sink.messages:
        receipts.hit()


async def backlog(url: str, plan: Plan, count: int | None = None) -> dict[str, Any]:
    count = plan.backlog if count is None else count
    topic = f"bench/{uuid.uuid4().hex}/backlog"
    await _forget_session(url)
    try:
        await _subscribe_offline(url, topic)
        sent, accept_elapsed = await _publish(url, topic, count, plan.fill_timebox)
        receipts = Receipts(sent)
        meter = CpuMeter()
        started = perf_counter()
        async with _client(url, SINK_ID, clean=False) as sink:
            counter = asyncio.ensure_future(_count(sink, receipts))
            try:
                await receipts.settle(IDLE, plan.timebox * 2 + 60)
            finally:
                counter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await counter
        return backlog_result(receipts, sent, accept_elapsed, started, meter)
    finally:
        await _forget_session(url)
