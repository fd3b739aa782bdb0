"""Who may connect and what they may do: principals, their tokens and their ACLs.

A token maps to a principal; a principal's ACL lists, as shell-style patterns (``worker-*``),
the ending names it may claim, the endings it may send to, the groups it may publish to and
join, the grid maps it may read and write, and whether it may broadcast, flush or
administer. A service configured with neither ``tokens`` nor ``principals`` is open: one
anonymous principal may do everything (and the service refuses to listen beyond loopback
unless ``allow_open`` says so).
"""

from __future__ import annotations

import hmac
from fnmatch import fnmatchcase
from typing import Literal

import msgspec

Action = Literal["claim", "send", "publish", "join", "read", "write"]
ANYTHING = ["*"]


def _anything() -> list[str]:
    return ["*"]


class Principal(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    """One identity and its permissions. Patterns match with ``fnmatch`` rules (``*``,
    ``?``, ``[abc]``), case-sensitively."""

    name: str
    token: str = msgspec.field(default="")  # the secret; never logged or shown
    endings: list[str] = msgspec.field(default_factory=_anything)  # ending names it may connect as
    send: list[str] = msgspec.field(
        default_factory=_anything
    )  # endings it may send to and request from
    publish: list[str] = msgspec.field(default_factory=_anything)  # groups it may publish to
    join: list[str] = msgspec.field(default_factory=_anything)  # groups it may join
    read: list[str] = msgspec.field(default_factory=_anything)  # grid maps it may read
    write: list[str] = msgspec.field(default_factory=_anything)  # grid maps it may write
    broadcast: bool = True
    flush: bool = False
    admin: bool = False
    max_connections: int = 0  # sessions at once under this principal; 0: no limit

    def __repr__(self) -> str:
        return f"Principal({self.name!r})"  # without the token

    def allows(self, action: Action, name: str) -> bool:
        patterns: list[str] = getattr(self, _FIELDS[action])
        return any(fnmatchcase(name, pattern) for pattern in patterns)

    @property
    def unrestricted(self) -> bool:
        """Whether it may send, publish and broadcast anywhere: the router then skips the
        per-packet checks."""
        return self.send == ANYTHING and self.publish == ANYTHING and self.broadcast


_FIELDS: dict[str, str] = {
    "claim": "endings",
    "send": "send",
    "publish": "publish",
    "join": "join",
    "read": "read",
    "write": "write",
}

# Everything allowed: the identity of a service without tokens.
ANONYMOUS = Principal(name="anonymous", flush=True, admin=True)


class Gate:
    """Finds the principal of a token, comparing in constant time."""

    def __init__(self, tokens: list[str], principals: list[Principal]) -> None:
        # A bare token is an operator's: everything allowed.
        self._by_token: list[tuple[bytes, Principal]] = [
            (token.encode(), Principal(name=f"token-{i + 1}", token=token, flush=True, admin=True))
            for i, token in enumerate(tokens)
        ]
        self._by_token += [(p.token.encode(), p) for p in principals]
        self.principals = [p for _, p in self._by_token]

    @property
    def open(self) -> bool:
        return not self._by_token

    def principal(self, token: str | None) -> Principal | None:
        """The principal ``token`` belongs to; None for a wrong or missing token."""
        if not self._by_token:
            return ANONYMOUS
        given = (token or "").encode()
        found: Principal | None = None
        # Compare against every token so timing says nothing about which one is close.
        for expected, principal in self._by_token:
            if hmac.compare_digest(given, expected) and found is None:
                found = principal
        return found


class Permissions:
    """A session's view of its principal's ACL, remembering each answer: a sender names
    the same few destinations over and over."""

    __slots__ = ("_answers", "principal")

    def __init__(self, principal: Principal) -> None:
        self.principal = principal
        self._answers: dict[tuple[str, str], bool] = {}

    def allows(self, action: Action, name: str) -> bool:
        key = (action, name)
        answer = self._answers.get(key)
        if answer is None:
            if len(self._answers) > 4096:
                self._answers.clear()  # bounded: a sender cycling through names
            answer = self._answers[key] = self.principal.allows(action, name)
        return answer
