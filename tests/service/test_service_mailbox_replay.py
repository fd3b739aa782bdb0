"""The replay of a mailbox against packets that arrive while it runs."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from packetstack.protocol import PacketHeader, Target, packet_frame
from packetstack.service import mailboxes as mailboxes_module
from packetstack.service.config import ServiceConfig
from packetstack.service.mailboxes import Mailboxes
from packetstack.storage import EmbeddedStore


class RecordingLink:
    """What the mailboxes need of a Link: deliveries are recorded, it never backs up."""

    closed = False

    def __init__(self) -> None:
        self.delivered: list[int] = []

    def write_delivery(self, seq: int, packet: bytes) -> bool:
        self.delivered.append(seq)
        return True

    def on_writable(self, callback: Callable[[], None]) -> None:
        callback()


def _packet(n: int) -> tuple[bytes, PacketHeader]:
    header = PacketHeader(n, int(Target.ENDING), "reader", "writer", "Note")
    return packet_frame(header, b"\x01"), header


async def test_a_packet_stored_while_a_replay_page_is_read_is_still_replayed(
    tmp_path: Path,
) -> None:
    """The replay asks the store for a page; the page comes back empty (what was stored
    has expired), but a packet arrived meanwhile: it must be sent, not skipped."""
    mailboxes = Mailboxes(
        EmbeddedStore(tmp_path / "store.db"),
        ServiceConfig(data_dir=str(tmp_path)),
        Counter(),
        lambda src, pid: None,
        lambda src, pid, dst, tag, reason: None,
    )
    await mailboxes.open()
    try:
        reader = mailboxes.ending("reader")
        frame, header = _packet(1)
        mailboxes.deliver(reader, frame, header, time.time() - 1)  # stored, already expired

        original_read = mailboxes.store.read
        pages = 0

        async def read_then_deliver(fn: Callable[[Any], Any]) -> Any:
            nonlocal pages
            pending = asyncio.ensure_future(original_read(fn))
            await asyncio.sleep(0)  # the read is queued in the store now
            if getattr(fn, "func", None) is mailboxes_module._page:
                pages += 1
                if pages == 1:
                    late_frame, late_header = _packet(2)
                    mailboxes.deliver(reader, late_frame, late_header, time.time() + 60)
            return await pending

        mailboxes.store.read = read_then_deliver  # type: ignore[method-assign]
        link = RecordingLink()
        mailboxes.attach(reader, link)  # type: ignore[arg-type]
        async with asyncio.timeout(5):
            while not reader.live:
                await asyncio.sleep(0.01)
        assert pages >= 2  # the late packet took a page of its own
        assert link.delivered == [2]
    finally:
        await mailboxes.close()
