"""The data grid: typed maps partitioned over the holding endings, journaled by the service."""

from .maps import EntryEvent, Map
from .partitions import DEFAULT_BACKUPS, DEFAULT_PARTITIONS, partition_of

__all__ = ["DEFAULT_BACKUPS", "DEFAULT_PARTITIONS", "EntryEvent", "Map", "partition_of"]
