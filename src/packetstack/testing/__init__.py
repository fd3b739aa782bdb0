"""Helpers for testing code built on PacketStack.

:mod:`packetstack.testing.store_conformance` is the conformance suite every
:class:`~packetstack.storage.Store` backend passes: the SQL and MongoDB bridges, the
embedded store, and any backend of your own. Importing it needs no test framework.
"""

from .store_conformance import (
    CHECKS,
    AllTypes,
    Check,
    Colour,
    ConformanceFailure,
    Inner,
    StoreBackend,
    check_store,
)

__all__ = [
    "CHECKS",
    "AllTypes",
    "Check",
    "Colour",
    "ConformanceFailure",
    "Inner",
    "StoreBackend",
    "check_store",
]
