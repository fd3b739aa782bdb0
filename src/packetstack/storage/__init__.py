"""Storage: the embedded store (SQLite in the data directory)."""

from .embedded import Done, EmbeddedStore, Statement, Synchronous

__all__ = ["Done", "EmbeddedStore", "Statement", "Synchronous"]
