"""A connected ending as the service sees it."""

from __future__ import annotations

from ..dispatch import Dispatcher
from ..transport import Link
from .mailboxes import Ending


class Session:
    __slots__ = ("dispatcher", "ending", "link", "name")

    def __init__(self, name: str, link: Link, dispatcher: Dispatcher, ending: Ending) -> None:
        self.name = name
        self.link = link
        self.dispatcher = dispatcher
        self.ending = ending  # its delivery state, which outlives this connection

    def __repr__(self) -> str:
        return f"Session({self.name!r}, groups={sorted(self.ending.groups)})"
