"""The atheris harnesses in fuzz/ run here without atheris: their one-input functions get a
few hundred hypothesis-generated inputs each, so CI exercises the code path a local fuzzing
run takes, and a harness that rots (an import, a wrong oracle) fails here first."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import clean_env
from test_protocol_fuzz import plausible_frames

from packetstack.protocol import Connection, Hello, PacketHeader, Role, packet_frame

FUZZ_DIR = Path(__file__).resolve().parents[2] / "fuzz"
HARNESS = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def load(name: str) -> ModuleType:
    """fuzz/<name>.py as a module (fuzz/ is not a package; its scripts import _harness)."""
    if str(FUZZ_DIR) not in sys.path:
        sys.path.insert(0, str(FUZZ_DIR))
    spec = importlib.util.spec_from_file_location(f"fuzz_harness_{name}", FUZZ_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


frames_harness = load("fuzz_frames")
envelope_harness = load("fuzz_envelope")
OneInput = Callable[[bytes], None]


def selector(count: int) -> st.SearchStrategy[int]:
    """A harness's first byte: which receiver or decoder, with the high bit (the envelope
    harness's "structured" mode) either way."""
    return st.integers(0, count - 1) | st.integers(0, 255)


# ------------------------------------------------------------------ frames


@HARNESS
@given(
    mode=selector(4),
    step=st.integers(0, 255),
    body=st.binary(max_size=600) | st.lists(plausible_frames(), max_size=8).map(b"".join),
)
def test_fuzz_frames_one_input(mode: int, step: int, body: bytes) -> None:
    frames_harness.test_one_input(bytes([mode, step]) + body)


def test_fuzz_frames_reaches_every_receiver_with_valid_frames() -> None:
    """Sanity of the oracle: well-formed traffic for each receiver parses to events
    (cut in pieces or not) without tripping any assertion."""
    client = Connection(Role.CLIENT)
    hello = client.hello_frame(Hello(1, "alpha"))
    header = PacketHeader(1, 0, "beta", "alpha", "t")
    packet = packet_frame(header, b"x" * 3000)  # over the harness's chunk size: a whole frame
    for mode, body in enumerate([hello, client.ping_frame() + packet, b"", b""]):
        for step in (0, 1, 7):
            frames_harness.test_one_input(bytes([mode, step]) + body)


# ---------------------------------------------------------------- envelope

headers = st.builds(
    PacketHeader,
    id=st.integers(0, 2**64 - 1),
    target=st.integers(0, 3),
    dst=st.text(max_size=20),
    src=st.text(max_size=20),
    tag=st.text(max_size=20),
    flags=st.integers(0, 127),
    corr=st.integers(0, 2**64 - 1),
    size=st.integers(0, 1000),
    stream=st.integers(0, 1000),
    ttl=st.integers(0, 2**32),
)


@HARNESS
@given(mode=selector(3), body=st.binary(max_size=400))
def test_fuzz_envelope_one_input_with_raw_bytes(mode: int, body: bytes) -> None:
    envelope_harness.test_one_input(bytes([mode]) + body)


@HARNESS
@given(header=headers, payload=st.binary(max_size=255))
def test_fuzz_envelope_one_input_with_valid_headers(header: PacketHeader, payload: bytes) -> None:
    """Real headers, so the round trips (whole, delivered, chunked) run every time."""
    raw = msgspec.msgpack.encode(header)
    envelope_harness.test_one_input(bytes([0, len(payload)]) + payload + raw)


@HARNESS
@given(
    which=st.sampled_from([1, 2]),
    fields=st.dictionaries(
        st.sampled_from(["v", "name", "token", "caps", "session", "heartbeat", "timeout"])
        | st.sampled_from(["max_frame", "max_payload", "chunk_size", "epoch", "acked"]),
        st.integers(-5, 10**6) | st.floats() | st.text(max_size=8) | st.lists(st.text(max_size=3)),
    ),
)
def test_fuzz_envelope_one_input_with_hello_and_welcome_shapes(
    which: int, fields: dict[str, object]
) -> None:
    envelope_harness.test_one_input(bytes([which]) + msgspec.msgpack.encode(fields))


# ------------------------------------------------------------ without atheris


@pytest.mark.parametrize("script", ["fuzz_frames.py", "fuzz_envelope.py"])
def test_a_harness_explains_itself_and_how_to_install_atheris(script: str) -> None:
    hide_atheris = (
        "import runpy, sys; sys.modules['atheris'] = None; "
        f"sys.argv = [{script!r}] + sys.argv[1:]; sys.path.insert(0, {str(FUZZ_DIR)!r}); "
        f"runpy.run_path({str(FUZZ_DIR / script)!r}, run_name='__main__')"
    )
    helped = subprocess.run(
        [sys.executable, "-c", hide_atheris, "--help"],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
    )
    assert helped.returncode == 0, helped.stderr
    assert "pip install atheris" in helped.stdout
    assert "-max_total_time" in helped.stdout

    run = subprocess.run(
        [sys.executable, "-c", hide_atheris],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
    )
    assert run.returncode == 1
    assert "pip install atheris" in run.stderr


@pytest.mark.parametrize("harness", [frames_harness, envelope_harness], ids=["frames", "envelope"])
def test_the_seed_inputs_pass_their_harness(harness: ModuleType) -> None:
    seeds = harness.seeds()
    assert len(seeds) >= 4
    for seed in seeds:
        harness.test_one_input(seed)
