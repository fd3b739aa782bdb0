"""Grid requests whose answers a broken connection lost: sent again on the next
connection, answered without running twice; after a service restart, those that must not
run twice fail with GridError instead of waiting out their timeout."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from support import ServiceProcess, TcpProxy, free_port

from packetstack import Client, GridError, Service


async def cut_while_answers_are_lost(proxy: TcpProxy, calls: list[Any]) -> list[Any]:
    """Run ``calls`` with the answers swallowed, then cut the connection; their results."""
    proxy.swallow_replies = True
    tasks = [asyncio.ensure_future(call) for call in calls]
    await asyncio.sleep(0.3)  # they reach the service and run (any that do not go again too)
    assert not any(task.done() for task in tasks)
    proxy.swallow_replies = False
    proxy.cut()
    return await asyncio.wait_for(asyncio.gather(*tasks), 5)


async def test_unanswered_operations_are_sent_again_and_run_once(service: Service) -> None:
    proxy = TcpProxy(service.port)
    await proxy.start()
    client = Client("c", proxy.url, request_timeout=20, backoff_max=0.1)
    await client.connect()
    try:
        counters = client.grid.map("counters", int)
        started = time.monotonic()
        results = await cut_while_answers_are_lost(
            proxy,
            [
                counters.increment("n", 5),
                counters.put_if_absent("once", 1),
                counters.compare_and_set("once", None, 2),  # runs after put_if_absent
                counters.put("plain", 7),
                counters.get("plain"),
            ],
        )
        assert time.monotonic() - started < 5  # not the request timeout
        assert results[:4] == [5, True, False, None]
        assert await counters.get("n") == 5  # the increment ran once
        assert await counters.get("once") == 1
        assert await counters.get("plain") == 7
        assert client.reconnects == 1
    finally:
        await client.close()
        await proxy.close()


async def test_after_a_service_restart_only_repeatable_operations_go_again(
    tmp_path: Any,
) -> None:
    service = ServiceProcess(free_port(), tmp_path)
    service.start()
    await service.wait_listening()
    proxy = TcpProxy(service.port)
    await proxy.start()
    client = Client("c", proxy.url, request_timeout=20, backoff_max=0.2)
    await client.connect()
    try:
        m = client.grid.map("m", int)
        proxy.swallow_replies = True
        increment = asyncio.ensure_future(m.increment("n"))
        put = asyncio.ensure_future(m.put("k", 1))
        async with Client("observer", service.url) as observer:  # not through the proxy
            seen = observer.grid.map("m", int)
            while await seen.get("n") != 1:
                await asyncio.sleep(0.02)  # until the increment is applied
            # A read may see a write before its commit; a write acknowledged after it was
            # committed after it (the journal commits in order): the increment is journaled.
            await seen.put("after", 1)
        service.kill9()
        proxy.swallow_replies = False
        service.start()  # same port, same data
        await service.wait_listening()
        with pytest.raises(GridError, match="may or may not have been applied"):
            await asyncio.wait_for(increment, 10)
        await asyncio.wait_for(put, 10)
        assert await m.get("k") == 1
        assert await m.get("n") == 1  # it had been journaled: applied once
    finally:
        await client.close()
        await proxy.close()
        service.stop()
