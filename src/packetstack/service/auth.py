"""Who may connect and what they may do: principals, their tokens and their ACLs.

A token, or a verified TLS client certificate whose subject commonName matches a
principal's ``certificate`` pattern, maps to a principal; a principal's ACL lists, as
shell-style patterns (``worker-*``), the ending names it may claim, the endings it may send
to, the groups it may publish to and join, the grid maps it may read and write, and whether
it may broadcast, flush or administer. A service configured with neither ``tokens`` nor
``principals`` is open: one anonymous principal may do everything (and the service refuses
to listen beyond loopback unless ``allow_open`` says so).
"""

from __future__ import annotations

import hmac
from fnmatch import fnmatchcase
from typing import Any, Literal

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
    # A pattern for the commonName of a verified client certificate (mutual TLS).
    certificate: str = ""
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


class Refused(Exception):
    """A client the gate lets not in; the message says why (no secret in it)."""


def common_name(peercert: Any) -> str | None:
    """The subject commonName of a verified peer certificate (``getpeercert()``), None when
    there is none, it was not verified (an empty dict) or it has several."""
    if not peercert:
        return None
    names = [
        value for rdn in peercert.get("subject", ()) for key, value in rdn if key == "commonName"
    ]
    return names[0] if len(names) == 1 else None


class Gate:
    """Finds the principal of a client certificate's commonName or of a token, comparing
    tokens in constant time."""

    def __init__(self, tokens: list[str], principals: list[Principal]) -> None:
        # A bare token is an operator's: everything allowed.
        self.principals = [
            Principal(name=f"token-{i + 1}", token=token, flush=True, admin=True)
            for i, token in enumerate(tokens)
        ] + list(principals)
        self._by_token = [(p.token.encode(), p) for p in self.principals if p.token]
        self._by_certificate = [p for p in self.principals if p.certificate]

    @property
    def open(self) -> bool:
        return not self.principals

    def principal(self, token: str | None, certificate: str | None = None) -> Principal:
        """The principal of a client that sent ``token`` and presented a verified certificate
        with the commonName ``certificate``. The first principal whose pattern matches the
        commonName is its; a token, when given, must name a principal, and the same one.
        Raises Refused otherwise."""
        if not self.principals:
            return ANONYMOUS
        by_token = self._token_principal(token) if token else None
        if token and by_token is None:
            raise Refused("wrong or missing token")
        by_certificate = next(
            (
                p
                for p in self._by_certificate
                if certificate is not None and fnmatchcase(certificate, p.certificate)
            ),
            None,
        )
        if by_certificate is not None and by_token is not None and by_token is not by_certificate:
            raise Refused("certificate and token name different principals")
        found = by_certificate or by_token
        if found is None:
            raise Refused(
                "wrong or missing token"
                if certificate is None
                else f"no principal for certificate {certificate!r} and no token"
            )
        return found

    def _token_principal(self, token: str) -> Principal | None:
        given = token.encode()
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
