"""The ``packetstack`` command line, run as a real process."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest
from support import clean_env, cli_command, config_toml, free_port

from packetstack import Client, Context, Packet

pytestmark = pytest.mark.timeout(90)


class CliPing(Packet):
    packet_tag: ClassVar[str] = "tests.cli.Ping"
    n: int


class Serve:
    """``packetstack serve ...`` in the background, output in a file."""

    def __init__(self, tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.log_path = tmp_path / f"serve-{time.monotonic_ns()}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cli_command("serve", *args),
                stdout=log,
                stderr=log,
                cwd=tmp_path,
                env=env if env is not None else clean_env(),
            )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_output(self, text: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output():
            if self.proc.poll() is not None:
                pytest.fail(f"serve exited with {self.proc.returncode}:\n{self.output()}")
            if time.monotonic() > deadline:
                pytest.fail(f"serve did not print {text!r} in {timeout} s:\n{self.output()}")
            time.sleep(0.05)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"serve did not exit within {timeout} s:\n{self.output()}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
def serving(tmp_path: Path) -> Iterator[list[Serve]]:
    started: list[Serve] = []
    yield started
    for server in started:
        server.kill()


def run(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, capture_output=True, text=True, timeout=60, cwd=tmp_path, env=clean_env(**env)
    )


# ------------------------------------------------------------------- demo


def test_demo_runs_to_completion(tmp_path: Path) -> None:
    result = run(cli_command("demo"), tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "demo finished" in result.stdout
    assert "bob   <- alice: 'hello, bob'" in result.stdout
    assert "got 42 from bob" in result.stdout
    assert "carol <- alice (waited for carol to connect)" in result.stdout
    assert "dave holds 271 partitions and reads Score(player='alice', points=10)" in result.stdout
    assert "5 concurrent increments made 5" in result.stdout
    assert "Traceback" not in result.stderr


def test_module_entry_point_matches_console_script(tmp_path: Path) -> None:
    result = run([sys.executable, "-m", "packetstack.cli", "--help"], tmp_path)
    assert result.returncode == 0
    assert "serve" in result.stdout and "demo" in result.stdout


# ------------------------------------------------------------------ serve


async def talk_to(port: int) -> None:
    """Connect a client and have it send a packet to itself through the service."""
    got: list[CliPing] = []
    client = Client("cli-test", f"ps://127.0.0.1:{port}", reconnect=False)

    @client.on(CliPing)
    async def on_ping(packet: CliPing, ctx: Context) -> None:
        got.append(packet)

    async with client:
        await client.send("cli-test", CliPing(7), ack=True)
        async with asyncio.timeout(5):
            while not got:
                await asyncio.sleep(0.01)
    assert got == [CliPing(7)]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_serve_listens_accepts_and_stops_on_signal(
    tmp_path: Path, serving: list[Serve], signum: signal.Signals
) -> None:
    port = free_port()
    data_dir = tmp_path / "state"
    server = Serve(tmp_path, "--port", str(port), "--data-dir", str(data_dir))
    serving.append(server)
    server.wait_for_output(f"listening on ps://127.0.0.1:{port}")
    assert data_dir.is_dir()

    asyncio.run(talk_to(port))
    server.wait_for_output("'cli-test'")

    start = time.monotonic()
    server.proc.send_signal(signum)
    assert server.wait(timeout=10) == 0, server.output()
    assert time.monotonic() - start < 5
    output = server.output()
    assert "stopped" in output
    assert "Traceback" not in output
    # The port is free again.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0


def test_serve_stops_with_a_client_still_connected(tmp_path: Path, serving: list[Serve]) -> None:
    port = free_port()
    server = Serve(tmp_path, "--port", str(port), "--data-dir", str(tmp_path / "d"))
    serving.append(server)
    server.wait_for_output(f"listening on ps://127.0.0.1:{port}")

    async def scenario() -> None:
        client = Client("lingering", f"ps://127.0.0.1:{port}", reconnect=False)
        await client.connect()
        try:
            server.proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(5):
                while client.connected:
                    await asyncio.sleep(0.02)
        finally:
            await client.close()

    asyncio.run(scenario())
    assert server.wait(timeout=10) == 0, server.output()
    assert "stopped" in server.output()


def test_serve_honours_packetstack_port(tmp_path: Path, serving: list[Serve]) -> None:
    port = free_port()
    env = clean_env(PACKETSTACK_PORT=str(port), PACKETSTACK_DATA_DIR=str(tmp_path / "envdata"))
    server = Serve(tmp_path, env=env)
    serving.append(server)
    server.wait_for_output(f"listening on ps://127.0.0.1:{port}")
    asyncio.run(talk_to(port))
    assert (tmp_path / "envdata").is_dir()
    server.proc.send_signal(signal.SIGTERM)
    assert server.wait(timeout=10) == 0


def test_serve_flag_beats_env(tmp_path: Path, serving: list[Serve]) -> None:
    port, other = free_port(), free_port()
    env = clean_env(PACKETSTACK_PORT=str(other))
    server = Serve(tmp_path, "--port", str(port), "--data-dir", str(tmp_path / "d"), env=env)
    serving.append(server)
    server.wait_for_output(f"listening on ps://127.0.0.1:{port}")
    assert f":{other}" not in server.output()


def test_serve_reads_config_file(tmp_path: Path, serving: list[Serve]) -> None:
    port = free_port()
    config = tmp_path / "ps.toml"
    config.write_text(f'[service]\nport = {port}\ndata_dir = "{tmp_path / "fromfile"}"\n')
    server = Serve(tmp_path, "--config", str(config))
    serving.append(server)
    server.wait_for_output(f"listening on ps://127.0.0.1:{port}")
    assert (tmp_path / "fromfile").is_dir()


def test_serve_bad_port_exits_2_naming_it(tmp_path: Path) -> None:
    result = run(cli_command("serve", "--port", "70000"), tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "error:" in result.stderr
    assert "port 70000" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_bad_env_value_exits_2(tmp_path: Path) -> None:
    result = run(cli_command("serve"), tmp_path, PACKETSTACK_HEARTBEAT="often")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "heartbeat" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_missing_config_exits_2_naming_the_file(tmp_path: Path) -> None:
    result = run(cli_command("serve", "--config", "missing.toml"), tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "missing.toml" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_port_in_use_exits_2(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run(
            cli_command("serve", "--port", str(port), "--data-dir", str(tmp_path / "d")), tmp_path
        )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "error:" in result.stderr
    assert str(port) in result.stderr and "in use" in result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------- database bridges


def serve_refuses(tmp_path: Path, tables: dict[str, dict[str, object]]) -> str:
    """``packetstack serve`` of a config with ``tables`` ([service.NAME] each) exits 2
    without a traceback; its stderr."""
    config = tmp_path / "ps.toml"
    config.write_text(config_toml({"data_dir": str(tmp_path / "d")}, tables))
    result = run(cli_command("serve", "--port", "0", "--config", str(config)), tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr


def test_serve_with_an_eager_map_whose_database_is_unreachable_exits_2(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'missing' / 'app.db'}"
    stderr = serve_refuses(
        tmp_path,
        {"bridges.local": {"url": url}, "maps.players": {"bridge": "local", "load": "eager"}},
    )
    assert "error: bridge 'local'" in stderr
    assert "maps ['players'] load from it at start (load = 'eager')" in stderr
    assert "listening on" not in stderr


def test_serve_with_a_bridge_url_it_cannot_use_exits_2_without_the_password(
    tmp_path: Path,
) -> None:
    url = "http://app:hunter2@db.example.com/app"
    stderr = serve_refuses(
        tmp_path, {"bridges.web": {"url": url}, "maps.players": {"bridge": "web"}}
    )
    assert "error: bridges.web.url: 'http' is not a supported SQL database" in stderr
    assert "hunter2" not in stderr


def test_flush_help_names_its_options(tmp_path: Path) -> None:
    result = run(cli_command("flush", "--help"), tmp_path)
    assert result.returncode == 0, result.stderr
    for option in (
        "--url",
        "--token",
        "--map",
        "--retry-rejected",
        "--name",
        "--timeout",
        "--wait",
    ):
        assert option in result.stdout
