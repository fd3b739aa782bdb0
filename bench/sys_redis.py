"""Redis's drivers for the data grid scenarios: redis-py's asyncio client against the
Redis server on 127.0.0.1:6379 (not started by the suite).

Every measurement writes under a prefix of its own (``bench:grid:<random>:``) and deletes
those keys afterwards, whatever happened.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

try:
    import redis.asyncio as aioredis
except ImportError:  # the suite reports redis as unavailable: pip install -e '.[bench]'
    aioredis = None

from .common import (
    REQUEST_TIMEOUT,
    CpuMeter,
    Plan,
    drive_key_ops,
    drive_loop,
    perf_counter,
    untimed_result,
)

REDIS_URL = "redis://127.0.0.1:6379"
POOL_SIZE = 100  # connections for the 100-outstanding scenarios: one per task
PIPELINE = 100  # SETs per pipeline in the put_all scenario


def _prefix() -> str:
    return f"bench:grid:{secrets.token_hex(6)}:"


@asynccontextmanager
async def _redis(url: str) -> AsyncIterator[tuple[aioredis.Redis, str]]:
    """A client with a pool of POOL_SIZE connections and a fresh key prefix; the keys under
    the prefix are deleted afterwards."""
    pool = aioredis.ConnectionPool.from_url(
        url, max_connections=POOL_SIZE, socket_timeout=REQUEST_TIMEOUT
    )
    client = aioredis.Redis(connection_pool=pool)
    prefix = _prefix()
    try:
        yield client, prefix
    finally:
        try:
            await _delete_prefix(client, prefix)
        finally:
            await client.aclose()
            await pool.aclose()


async def _delete_prefix(client: aioredis.Redis, prefix: str) -> int:
    deleted = 0
    batch: list[bytes] = []
    async for key in client.scan_iter(match=prefix + "*", count=10_000):
        batch.append(key)
        if len(batch) >= 10_000:
            deleted += await client.unlink(*batch)
            batch = []
    if batch:
        deleted += await client.unlink(*batch)
    return deleted


async def _preload(client: aioredis.Redis, keys: list[str]) -> None:
    for first in range(0, len(keys), 1000):
        pipe = client.pipeline(transaction=False)
        for i, key in enumerate(keys[first : first + 1000], first):
            pipe.set(key, i)
        await pipe.execute()


async def server_version(url: str = REDIS_URL) -> str:
    client = aioredis.Redis.from_url(url, socket_timeout=5)
    try:
        info = await client.info("server")
        return f"redis-server {info.get('redis_version', '?')}"
    finally:
        await client.aclose()


async def remote(url: str, plan: Plan, op: str, outstanding: int) -> dict[str, Any]:
    """GET or SET of preloaded keys with ``outstanding`` tasks sharing the pool."""
    async with _redis(url) as (client, prefix):
        keys = [f"{prefix}{i}" for i in range(plan.grid_keys)]
        await _preload(client, keys)
        result = await drive_key_ops(client.get, client.set, keys, op, plan, outstanding)
        return {**result, "keyspace": prefix}


async def local_get(url: str, plan: Plan) -> dict[str, Any]:
    """The owned-get scenario's baseline: GET of preloaded keys, one at a time."""
    async with _redis(url) as (client, prefix):
        keys = [f"{prefix}{i}" for i in range(plan.grid_keys)]
        await _preload(client, keys)
        get = client.get
        await drive_loop(get, keys, plan.grid_warmup, 60)
        result = await drive_loop(get, keys, plan.grid_local, plan.grid_timebox)
        return {**result, "keyspace": prefix}


async def put_all(url: str, plan: Plan) -> dict[str, Any]:
    """N SETs in pipelines of PIPELINE (transaction=False), executed one after another."""
    total = plan.grid_put_all
    async with _redis(url) as (client, prefix):
        keys = [f"{prefix}{i}" for i in range(total)]
        warm = client.pipeline(transaction=False)
        for i in range(PIPELINE):
            warm.set(f"{prefix}warm{i}", i)
        await warm.execute()
        meter = CpuMeter()
        start = perf_counter()
        for first in range(0, total, PIPELINE):
            pipe = client.pipeline(transaction=False)
            for i in range(first, min(total, first + PIPELINE)):
                pipe.set(keys[i], i)
            await pipe.execute()
        elapsed = perf_counter() - start
        stored = await client.exists(*keys[:: max(1, total // 100)])
        if stored != len(keys[:: max(1, total // 100)]):
            raise RuntimeError("redis did not store every entry of the put_all")
        return {**untimed_result(total, elapsed, meter), "keyspace": prefix}
