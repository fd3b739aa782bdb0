"""Storage: the embedded store (SQLite in the data directory) and the database bridges."""

from .bridge import BridgeSettings, Entry, EntryCodec, MapBridge, MapSpec, Store, resolve
from .embedded import Done, EmbeddedStore, Statement, Synchronous


def make_store(name: str, settings: BridgeSettings, shared_loop: bool = True) -> Store:
    """The bridge for ``settings.url``: MongoDB for mongodb:// URLs, SQL for the rest.
    Imports the driver only when a bridge uses it (ConfigError naming the extra to
    install when it is missing). ``shared_loop``: the event loop also serves packets, so
    batches are converted and sent in slices (the flush worker's loop serves nothing else)."""
    if settings.url.startswith(("mongodb://", "mongodb+srv://")):
        from .mongo import MongoStore

        return MongoStore(name, settings, shared_loop)
    from .sql import SQLStore

    return SQLStore(name, settings, shared_loop)


__all__ = [
    "BridgeSettings",
    "Done",
    "EmbeddedStore",
    "Entry",
    "EntryCodec",
    "MapBridge",
    "MapSpec",
    "Statement",
    "Store",
    "Synchronous",
    "make_store",
    "resolve",
]
