"""The service side: the hub every ending connects to."""

from .auth import Principal
from .config import ServiceConfig
from .service import Service

__all__ = ["Principal", "Service", "ServiceConfig"]
