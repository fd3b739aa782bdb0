"""What a holding client keeps: the partitions it owns and those it backs up.

Pure logic, no I/O: the client feeds it the service's grid packets in the order they
arrive and sends back what :meth:`Holding.apply` returns.
"""

from __future__ import annotations

import time

from .messages import Backup, GridOps, Promote, Release, Take
from .ops import Outcome, PartitionData, apply, partition_data


class Holding:
    def __init__(self) -> None:
        self.owned: dict[int, PartitionData] = {}
        self.backups: dict[int, PartitionData] = {}
        self._taking: dict[int, PartitionData] = {}

    def apply(self, request: GridOps) -> list[Outcome]:
        now = time.time()
        owned = self.owned
        outcomes = []
        for op in request.ops:
            data = owned.get(op.part)
            if data is None:
                # The service sends a partition's data before its operations: this is a bug.
                outcomes.append(Outcome(error=f"partition {op.part} is not held here"))
            else:
                outcomes.append(apply(data, op, now))
        return outcomes

    def backup(self, message: Backup) -> None:
        now = time.time()
        backups = self.backups
        for op in message.ops:
            data = backups.get(op.part)
            if data is not None:
                apply(data, op, now)

    def take(self, message: Take) -> None:
        part = message.part
        if message.first:
            self._taking[part] = {}
        data = self._taking.get(part)
        if data is None:
            return  # chunks of a take that started on an earlier connection
        partition_data(message.entries, data)
        if message.last:
            del self._taking[part]
            if message.owner:
                self.backups.pop(part, None)
                self.owned[part] = data
            else:
                self.backups[part] = data

    def promote(self, message: Promote) -> None:
        for part in message.parts:
            self.owned[part] = self.backups.pop(part, {})

    def release(self, message: Release) -> None:
        for part in message.parts:
            self.owned.pop(part, None)
            self.backups.pop(part, None)

    def reset(self) -> None:
        """The connection is gone: the service has given everything here to others."""
        self.owned.clear()
        self.backups.clear()
        self._taking.clear()
