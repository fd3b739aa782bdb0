"""A connected ending as the service sees it."""

from __future__ import annotations

from ..dispatch import Dispatcher
from ..transport import Link


class Session:
    __slots__ = ("dispatcher", "groups", "held_sources", "link", "name")

    def __init__(self, name: str, link: Link, dispatcher: Dispatcher) -> None:
        self.name = name
        self.link = link
        self.groups: set[str] = set()
        self.dispatcher = dispatcher
        # Sources whose reading is paused until this session's link drains.
        self.held_sources: set[Link] = set()

    def __repr__(self) -> str:
        return f"Session({self.name!r}, groups={sorted(self.groups)})"
