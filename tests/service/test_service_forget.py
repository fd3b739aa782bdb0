"""Endings that are gone for good are forgotten; ones that still hold anything are kept."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from packetstack import Client, Context, Packet, Service
from packetstack.service import mailboxes


class FgNote(Packet):
    n: int


async def _until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def test_idle_endings_are_forgotten_and_come_back_fresh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mailboxes, "SWEEP_MAX_WAIT", 0.05)
    monkeypatch.setattr(mailboxes, "FORGET_AFTER", 0.2)
    async with Service("127.0.0.1", 0, data_dir=tmp_path / "data") as service:
        got: list[int] = []
        once = Client("once", service.url, reconnect=False)

        @once.on(FgNote)
        async def handle(packet: FgNote, ctx: Context) -> None:
            got.append(packet.n)

        async with Client("sender", service.url) as sender:
            await once.connect()
            member = Client("member", service.url)
            await member.connect()
            await member.join("room")
            await member.close()
            for n in range(3):
                await sender.send("once", FgNote(n), ack=True)
            await once.close()
            await sender.send("keeper", FgNote(99), ack=True)  # stored for an offline name

            await _until(lambda: "once" not in service.mailboxes.endings, "once forgotten")
            assert got == [0, 1, 2]
            assert service.stats["endings_forgotten"] >= 1
            # Whatever still holds something stays: a stored packet, a group membership.
            assert service.mailbox_depth("keeper") == 1
            assert "member" in service.mailboxes.endings
            assert service.group_members("room") == ["member"]

            # The same Client object comes back: the service numbers from 1 again, below
            # what the client took; WELCOME's `next` tells it, and nothing is dropped.
            await once.connect()
            for n in range(3, 6):
                await sender.send("once", FgNote(n), ack=True)
            await _until(lambda: len(got) == 6, "the new packets")
            assert got == [0, 1, 2, 3, 4, 5]
            assert once.repeats_dropped == 0
            await once.close()
