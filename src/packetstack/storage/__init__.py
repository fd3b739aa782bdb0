"""Storage: the embedded store (SQLite in the data directory)."""

from .embedded import EmbeddedStore, Statement, Synchronous

__all__ = ["EmbeddedStore", "Statement", "Synchronous"]
