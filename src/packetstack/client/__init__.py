"""The client side: an ending of the fleet."""

from .client import Client

__all__ = ["Client"]
