"""The protocol core stays sans-I/O: no module under packetstack/protocol/ imports asyncio,
sockets, TLS, selectors, or the transport/client/service layers built on top of it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import packetstack.protocol

PROTOCOL_DIR = Path(packetstack.protocol.__file__).resolve().parent
PROTOCOL_PACKAGE = "packetstack.protocol"

FORBIDDEN = (
    "asyncio",
    "socket",
    "ssl",
    "selectors",
    "uvloop",
    "packetstack.transport",
    "packetstack.client",
    "packetstack.service",
)


def _is_forbidden(module: str) -> bool:
    return any(module == bad or module.startswith(bad + ".") for bad in FORBIDDEN)


def _resolve(package: str, module: str | None, level: int) -> str:
    """The absolute name of ``from <level dots><module> import ...`` inside ``package``."""
    if level == 0:
        return module or ""
    parts = package.split(".")
    if level > len(parts):
        return module or ""  # beyond the top: cannot resolve, keep what is named
    base = parts[: len(parts) - (level - 1)]
    return ".".join([*base, module] if module else base)


def forbidden_imports(source: str, package: str = PROTOCOL_PACKAGE) -> list[str]:
    """Every forbidden module ``source`` imports, as ``line: module``."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(package, node.module, node.level)
            # `from packetstack import transport` imports packetstack.transport.
            names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name | ast.Attribute)
            and (node.func.id if isinstance(node.func, ast.Name) else node.func.attr)
            in ("__import__", "import_module")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names = [node.args[0].value]
        found += [f"{node.lineno}: {name}" for name in names if _is_forbidden(name)]
    return found


def _protocol_files() -> list[Path]:
    return sorted(PROTOCOL_DIR.rglob("*.py"))


def test_protocol_package_has_modules() -> None:
    names = {p.name for p in _protocol_files()}
    assert {"__init__.py", "connection.py", "frames.py", "events.py"} <= names


@pytest.mark.parametrize("path", _protocol_files(), ids=lambda p: p.name)
def test_protocol_module_imports_no_io(path: Path) -> None:
    relative = path.relative_to(PROTOCOL_DIR).with_suffix("")
    parts = [PROTOCOL_PACKAGE, *relative.parts[:-1]]
    package = ".".join(parts)  # the package the module's relative imports start from
    assert forbidden_imports(path.read_text(encoding="utf-8"), package) == []


@pytest.mark.parametrize(
    "source",
    [
        "import asyncio",
        "import asyncio.events",
        "import os, socket",
        "import ssl as tls",
        "from selectors import DefaultSelector",
        "from asyncio import Queue",
        "import packetstack.transport",
        "from packetstack.client import Client",
        "from packetstack import service",
        "from packetstack.service.session import Session",
        "from ..transport import Link",
        "from ..client.client import Client",
        "from .. import service",
        "from .. import transport, errors",
        "def f():\n    import asyncio\n",
        "try:\n    import uvloop\nexcept ImportError:\n    pass\n",
        "import importlib\nimportlib.import_module('asyncio')",
        "__import__('socket')",
    ],
)
def test_checker_flags_forbidden_imports(source: str) -> None:
    assert forbidden_imports(source) != []


@pytest.mark.parametrize(
    "source",
    [
        "import enum\nimport struct\nimport msgspec",
        "from ..errors import ProtocolError",
        "from .frames import FrameKind",
        "from . import events",
        "from .. import errors",
        "import asyncio_helpers",  # a different module that merely starts with the name
        "from packetstack.errors import ProtocolError",
        "x = 'import asyncio'",
    ],
)
def test_checker_accepts_allowed_imports(source: str) -> None:
    assert forbidden_imports(source) == []


def test_relative_import_resolution() -> None:
    assert _resolve("packetstack.protocol", "transport", 2) == "packetstack.transport"
    assert _resolve("packetstack.protocol", None, 2) == "packetstack"
    assert _resolve("packetstack.protocol", "frames", 1) == "packetstack.protocol.frames"
    assert _resolve("packetstack.protocol", "asyncio", 0) == "asyncio"
