"""Packets the service itself sends to endings about their own packets."""

from __future__ import annotations

from typing import ClassVar, Literal

from .codec import Packet


class Expired(Packet):
    """A packet sent with ``notify_expired=True`` will never be delivered.

    ``reason`` is ``"expired"`` (its time to live ran out in the destination's mailbox) or
    ``"dropped"`` (the mailbox was full and its policy is ``drop-oldest``). ``id`` is the
    packet id ``send`` used, ``destination`` the ending it was for."""

    packet_tag: ClassVar[str] = "$expired"

    id: int
    destination: str
    tag: str
    reason: Literal["expired", "dropped"]
