"""The service side: the hub every ending connects to."""

from .config import ServiceConfig
from .service import Service

__all__ = ["Service", "ServiceConfig"]
