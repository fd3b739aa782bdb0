"""A connected ending as the service sees it."""

from __future__ import annotations

from ..dispatch import Dispatcher
from ..grid.coordinator import Holder
from ..transport import Link
from .auth import Permissions, Principal
from .mailboxes import Ending
from .ratelimit import RateLimit


class Session:
    __slots__ = (
        "dispatcher",
        "ending",
        "holder",
        "link",
        "name",
        "permissions",
        "principal",
        "rate_limit",
    )

    def __init__(
        self,
        name: str,
        link: Link,
        dispatcher: Dispatcher,
        ending: Ending,
        principal: Principal,
        permissions: Permissions | None,
    ) -> None:
        self.name = name
        self.link = link
        self.dispatcher = dispatcher
        self.ending = ending  # its delivery state, which outlives this connection
        self.principal = principal
        # None when the principal may send anywhere: the router then checks nothing.
        self.permissions = permissions
        self.rate_limit: RateLimit | None = None
        self.holder: Holder | None = None  # its part in the data grid, if it holds data

    def __repr__(self) -> str:
        return f"Session({self.name!r}, groups={sorted(self.ending.groups)})"
