"""Model-based test of the grid: random operations interleaved with holders joining,
leaving gracefully and being killed (their connections dropped without a goodbye); after
every step, every acknowledged write reads back with the model's value, from a client that
holds nothing and from every holder (whose owned partitions answer in-process)."""

from __future__ import annotations

import asyncio
import itertools
import tempfile
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from packetstack import Client, Service

KEYS = st.integers(min_value=0, max_value=24)
VALUES = st.integers(min_value=-5, max_value=5)
MAX_HOLDERS = 4


class GridModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.tmp = tempfile.TemporaryDirectory()
        self.model: dict[int, int] = {}
        self.names = itertools.count()
        self.holders: list[Client] = []
        self.dead: list[Client] = []
        self.service = Service("127.0.0.1", 0, data_dir=self.tmp.name, grid_partitions=31)
        self.run(self.service.start())
        self.user = Client("user", self.service.url)
        self.run(self.user.connect())
        self.map = self.user.grid.map("m", int, int)

    def run(self, coroutine: Any) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coroutine, 30))

    def teardown(self) -> None:
        for client in [self.user, *self.holders, *self.dead]:
            self.run(client.close())
        self.run(self.service.close())
        self.loop.close()
        self.tmp.cleanup()

    # ------------------------------------------------------------ operations

    @rule(key=KEYS, value=VALUES)
    def put(self, key: int, value: int) -> None:
        self.run(self.map.put(key, value))
        self.model[key] = value

    @rule(key=KEYS)
    def delete(self, key: int) -> None:
        assert self.run(self.map.delete(key)) == (key in self.model)
        self.model.pop(key, None)

    @rule(key=KEYS, delta=VALUES)
    def increment(self, key: int, delta: int) -> None:
        expected = self.model.get(key, 0) + delta
        assert self.run(self.map.increment(key, delta)) == expected
        self.model[key] = expected

    @rule(key=KEYS, value=VALUES)
    def put_if_absent(self, key: int, value: int) -> None:
        assert self.run(self.map.put_if_absent(key, value)) == (key not in self.model)
        self.model.setdefault(key, value)

    @rule(key=KEYS, expected=st.none() | VALUES, value=VALUES)
    def compare_and_set(self, key: int, expected: int | None, value: int) -> None:
        done = self.run(self.map.compare_and_set(key, expected, value))
        assert done == (self.model.get(key) == expected)
        if done:
            self.model[key] = value

    @rule(entries=st.dictionaries(KEYS, VALUES, max_size=10))
    def put_all(self, entries: dict[int, int]) -> None:
        self.run(self.map.put_all(entries))
        self.model.update(entries)

    # --------------------------------------------------------------- holders

    @precondition(lambda self: len(self.holders) < MAX_HOLDERS)
    @rule()
    def join(self) -> None:
        holder = Client(f"h{next(self.names)}", self.service.url, holds_data=True)
        self.run(holder.connect())
        self.holders.append(holder)

    @precondition(lambda self: self.holders)
    @rule(index=st.integers(min_value=0, max_value=MAX_HOLDERS - 1))
    def leave(self, index: int) -> None:
        holder = self.holders.pop(index % len(self.holders))
        self.run(holder.close())

    @precondition(lambda self: self.holders)
    @rule(index=st.integers(min_value=0, max_value=MAX_HOLDERS - 1))
    def kill(self, index: int) -> None:
        holder = self.holders.pop(index % len(self.holders))
        holder.reconnect = False
        assert holder._link is not None
        holder._link.abort()  # no goodbye, no hand-over: a crash as the service sees it
        self.dead.append(holder)

    # ------------------------------------------------------------- invariant

    @invariant()
    def every_acknowledged_write_reads_back(self) -> None:
        keys = range(25)
        assert self.run(self.map.get_all(keys)) == self.model
        for holder in self.holders:
            if holder.connected:
                view = holder.grid.map("m", int, int)
                assert self.run(view.get_all(keys)) == self.model, holder.name
        assert self.run(self.map.size()) == len(self.model)


GridModel.TestCase.settings = settings(
    max_examples=30,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_grid_model = GridModel.TestCase
