"""Shared plumbing of the atheris harnesses in this folder (not a harness itself).

Each harness defines ``test_one_input(data: bytes) -> None``, which raises only when it finds
a bug, and calls ``main(test_one_input, __doc__)``. Without atheris installed the harnesses
still import (the tests call ``test_one_input`` with hypothesis-generated inputs); running one
then explains how to install atheris.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import TypeVar

F = TypeVar("F", bound=Callable[..., object])

INSTALL = """\
atheris is not installed. Install it into the project's environment and run again:

    .venv/bin/pip install atheris

atheris ships binary wheels for CPython on Linux x86_64 (no compiler needed there); on other
platforms pip builds it from source, which needs clang and libFuzzer (see
https://github.com/google/atheris#installation).
"""

USAGE = """\
usage: python {script} [libFuzzer options] [CORPUS_DIR ...]

Runs under atheris (libFuzzer) until it finds a failure or is stopped. Useful options:

    -max_total_time=60      stop after 60 seconds
    -runs=100000            stop after that many inputs
    -max_len=4096           longest input to try
    -jobs=4 -workers=4      fuzz in 4 processes at once
    CORPUS_DIR              keep interesting inputs here (and start from them next time);
                            an empty one is first filled with well-formed seed inputs

A failing input is written to ./crash-<sha1>; replay it with `python {script} crash-<sha1>`.
"""


def load_atheris() -> ModuleType | None:
    try:
        import atheris  # type: ignore[import-untyped,import-not-found,unused-ignore]
    except ImportError:
        return None
    return atheris  # type: ignore[no-any-return]


@contextlib.contextmanager
def instrumented() -> Iterator[None]:
    """Instrument the packetstack modules imported inside the block, for libFuzzer's
    coverage feedback, when atheris is present (and not just asked for help)."""
    atheris = load_atheris()
    if atheris is None or wants_help():
        yield
        return
    with atheris.instrument_imports(include=["packetstack"]):
        yield


def instrument(function: F) -> F:
    """Instrument one of the harness's own functions (a decorator): its branches (did the
    input decode?) guide libFuzzer where the C decoders give it no coverage."""
    atheris = load_atheris()
    if atheris is None:
        return function
    return atheris.instrument_func(function)  # type: ignore[no-any-return]


def wants_help() -> bool:
    return any(arg in ("-h", "--help", "-help") for arg in sys.argv[1:])


def plant_seeds(seeds: Callable[[], list[bytes]]) -> None:
    """Write ``seeds()`` into the first corpus directory on the command line if it is empty:
    random bytes rarely make well-formed msgpack, and msgspec's C decoder gives libFuzzer
    no coverage to find its way there by itself."""
    dirs = [Path(arg) for arg in sys.argv[1:] if not arg.startswith("-")]
    if not dirs or not dirs[0].is_dir() or any(dirs[0].iterdir()):
        return
    for i, seed in enumerate(seeds()):
        (dirs[0] / f"seed-{i:03d}").write_bytes(seed)


def main(
    test_one_input: Callable[[bytes], None],
    doc: str | None,
    seeds: Callable[[], list[bytes]] | None = None,
) -> None:
    script = sys.argv[0]
    if wants_help():
        print((doc or "").strip() + "\n")
        print(USAGE.format(script=script))
        if load_atheris() is None:
            print(INSTALL)
        return
    atheris = load_atheris()
    if atheris is None:
        print(INSTALL, file=sys.stderr)
        sys.exit(1)
    if seeds is not None:
        plant_seeds(seeds)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
