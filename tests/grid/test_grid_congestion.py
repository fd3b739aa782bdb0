"""A holder that reads slowly holds back the clients' grid requests instead of letting
the service buffer what it owes that holder without bound."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from support import eventually

from packetstack import Service
from packetstack.service.grid import GRID_CONGESTION


@pytest.fixture
async def service(make_service: Any) -> Service:
    """Heartbeats slow enough that a holder which reads nothing for a while (on a loaded
    machine, several seconds) is not cut by them before the test has seen the congestion."""
    return await make_service(heartbeat=5.0, heartbeat_timeout=60.0)  # type: ignore[no-any-return]


async def test_a_slow_backup_holds_back_writers_and_nothing_is_lost(
    service: Service, make_client: Any
) -> None:
    await make_client("fast", holds_data=True)
    slow = await make_client("slow", holds_data=True)
    writer = await make_client("writer")

    def settled() -> bool:
        grid = service.grid.coordinator.snapshot()
        holders = grid["holders"]  # type: ignore[index]
        return len(holders) == 2 and grid["paused"] == 0 and all(h["backups"] for h in holders)

    await eventually(settled, timeout=10)
    assert slow._link is not None and slow._link.transport is not None
    slow._link.transport.pause_reading()  # alive (heartbeats aside), reading nothing
    link_to_slow = service.endings["slow"].link
    m = writer.grid.map("big", bytes)
    value = b"v" * 20_000
    # Keys that "fast" owns: "slow" only backs them up, and nothing waits for a backup.
    fast_keys = []
    for i in range(100_000):
        key = f"k{i}"
        _, part = m._key(key)
        if service.grid.coordinator.parts[part].owner is not None and (
            service.grid.coordinator.parts[part].owner.name == "fast"  # type: ignore[union-attr]
        ):
            fast_keys.append(key)
        if len(fast_keys) == 2_000:
            break

    async def write(keys: list[str]) -> None:
        for key in keys:
            await m.put(key, value)

    writers = [asyncio.ensure_future(write(fast_keys[i::20])) for i in range(20)]
    await eventually(lambda: service.stats["grid_congestion"] > 0, timeout=20)
    await asyncio.sleep(1.0)
    # Held back: the writer's connection is not read, and the buffer for "slow" stays
    # within a few high-water marks although 40 MB were to be written.
    writer_link = service.endings["writer"].link
    assert link_to_slow.transport is not None
    buffered = link_to_slow.pending_bytes + link_to_slow.transport.get_write_buffer_size()
    assert buffered < 8 * service.config.high_water, buffered
    assert GRID_CONGESTION in writer_link._read_holds
    assert not all(task.done() for task in writers)
    slow._link.transport.resume_reading()
    await asyncio.wait_for(asyncio.gather(*writers), 60)
    got = await m.get_all(fast_keys)
    assert len(got) == len(fast_keys) and all(v == value for v in got.values())
    assert slow.grid.holding is not None
    assert slow.grid.holding.backups  # it kept up again and still backs them up
