"""The public surface: ``packetstack.__all__`` is accurate, and the error tree is whole."""

from __future__ import annotations

import inspect

import pytest

import packetstack
from packetstack import errors


def _error_classes() -> list[type[BaseException]]:
    """Public exception classes defined in packetstack.errors."""
    return [
        obj
        for name, obj in vars(errors).items()
        if not name.startswith("_")
        and inspect.isclass(obj)
        and issubclass(obj, BaseException)
        and obj.__module__ == errors.__name__
    ]


def test_all_is_a_list_of_strings_without_duplicates() -> None:
    names = packetstack.__all__
    assert all(isinstance(name, str) for name in names)
    duplicates = sorted({name for name in names if names.count(name) > 1})
    assert duplicates == []


@pytest.mark.parametrize("name", packetstack.__all__)
def test_every_name_in_all_exists(name: str) -> None:
    assert hasattr(packetstack, name), f"packetstack.__all__ names {name!r}, which is missing"


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from packetstack import *", namespace)
    namespace.pop("__builtins__", None)
    assert sorted(namespace) == sorted(packetstack.__all__)


def test_errors_module_defines_the_documented_tree() -> None:
    names = {cls.__name__ for cls in _error_classes()}
    # The tree drawn in the module docstring: every node is a class here.
    for expected in (
        "PacketStackError",
        "ConfigError",
        "ProtocolError",
        "FrameTooLarge",
        "CodecError",
        "UnknownPacketType",
        "DuplicatePacketTag",
        "PacketDecodeError",
        "PayloadTooLarge",
        "ConnectionFailed",
        "HandshakeRefused",
        "AuthenticationFailed",
        "ConnectionClosed",
        "DeliveryError",
        "UnknownDestination",
        "MailboxFull",
        "OutboxFull",
        "StoreError",
        "RequestTimeout",
        "RemoteError",
    ):
        assert expected in names
        assert expected in (errors.__doc__ or "")


@pytest.mark.parametrize("cls", _error_classes(), ids=lambda cls: cls.__name__)
def test_error_class_is_exported_and_derives_from_packetstack_error(
    cls: type[BaseException],
) -> None:
    assert getattr(errors, cls.__name__) is cls
    exported = getattr(errors, "__all__", None)
    if exported is not None:
        assert cls.__name__ in exported
    assert issubclass(cls, errors.PacketStackError)


def test_top_level_error_names_are_the_errors_module_classes() -> None:
    for name in packetstack.__all__:
        obj = getattr(packetstack, name)
        if inspect.isclass(obj) and issubclass(obj, BaseException):
            assert getattr(errors, name) is obj
            assert issubclass(obj, errors.PacketStackError)


def test_errors_module_is_exported() -> None:
    assert packetstack.errors is errors
    assert "errors" in packetstack.__all__


def test_error_tree_relationships() -> None:
    assert issubclass(errors.FrameTooLarge, errors.ProtocolError)
    assert issubclass(errors.AuthenticationFailed, errors.HandshakeRefused)
    assert issubclass(errors.HandshakeRefused, errors.ConnectionFailed)
    assert issubclass(errors.ConnectionClosed, errors.ConnectionFailed)
    assert issubclass(errors.RequestTimeout, TimeoutError)
    assert issubclass(errors.ConfigError, ValueError)
    assert errors.FrameTooLarge.close_code is errors.CloseCode.FRAME_TOO_LARGE
    assert errors.ProtocolError.close_code is errors.CloseCode.PROTOCOL_ERROR
