"""Service settings: defaults < TOML file < PACKETSTACK_* environment < overrides, and
ConfigError naming the problem for every bad value."""

from __future__ import annotations

from pathlib import Path

import pytest

from packetstack import ConfigError, ServiceConfig
from packetstack.protocol.frames import DEFAULT_CHUNK_SIZE, DEFAULT_MAX_FRAME, DEFAULT_MAX_PAYLOAD
from packetstack.service.config import from_env, load
from packetstack.transport import DEFAULT_PORT


def write(tmp_path: Path, text: str, name: str = "ps.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------- defaults


def test_defaults() -> None:
    config = load(environ={})
    assert isinstance(config, ServiceConfig)
    assert config.host == "127.0.0.1"
    assert config.port == DEFAULT_PORT == 7400
    assert config.unix_path is None
    assert config.data_dir == "packetstack-data"
    assert config.tokens == []
    assert config.tls_cert is None and config.tls_key is None
    assert config.heartbeat == 5.0
    assert config.heartbeat_timeout == 15.0
    assert config.handshake_timeout == 10.0
    assert config.max_frame == DEFAULT_MAX_FRAME
    assert config.max_payload == DEFAULT_MAX_PAYLOAD
    assert config.chunk_size == DEFAULT_CHUNK_SIZE
    assert config.high_water == 1024 * 1024
    assert config.low_water == 256 * 1024
    assert config.request_timeout == 30.0


def test_defaults_are_not_shared_between_configs() -> None:
    first = load(environ={})
    first.tokens.append("leak")
    assert load(environ={}).tokens == []


def test_none_overrides_are_ignored() -> None:
    config = load(overrides={"port": None, "host": None, "tokens": None}, environ={})
    assert config.port == 7400 and config.host == "127.0.0.1" and config.tokens == []


def test_os_environ_is_used_when_environ_is_not_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PACKETSTACK_PORT", "7999")
    assert load().port == 7999
    assert load(environ={}).port == 7400


# -------------------------------------------------------------- TOML file


def test_toml_top_level(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'host = "0.0.0.0"\nport = 7501\ntokens = ["a", "b"]\nheartbeat = 1.5\n'
        'heartbeat_timeout = 4.5\ndata_dir = "/var/lib/ps"\n',
    )
    config = load(path, environ={})
    assert config.host == "0.0.0.0"
    assert config.port == 7501
    assert config.tokens == ["a", "b"]
    assert config.heartbeat == 1.5 and config.heartbeat_timeout == 4.5
    assert config.data_dir == "/var/lib/ps"
    assert config.handshake_timeout == 10.0  # untouched settings keep their defaults


def test_toml_service_table(tmp_path: Path) -> None:
    path = write(tmp_path, '[service]\nport = 7502\nunix_path = "/tmp/ps.sock"\n')
    config = load(str(path), environ={})  # a str path works as well as a Path
    assert config.port == 7502
    assert config.unix_path == "/tmp/ps.sock"


def test_toml_integer_for_float_setting(tmp_path: Path) -> None:
    config = load(write(tmp_path, "heartbeat = 2\nheartbeat_timeout = 6\n"), environ={})
    assert config.heartbeat == 2.0 and config.heartbeat_timeout == 6.0


# ------------------------------------------------------------ environment


def test_env_values_are_converted_from_strings() -> None:
    config = load(
        environ={
            "PACKETSTACK_PORT": "7600",
            "PACKETSTACK_HEARTBEAT": "0.5",
            "PACKETSTACK_HEARTBEAT_TIMEOUT": "2",
            "PACKETSTACK_HOST": "::1",
            "PACKETSTACK_DATA_DIR": "/srv/ps",
            "PACKETSTACK_HIGH_WATER": "2097152",
        }
    )
    assert config.port == 7600
    assert config.heartbeat == 0.5 and config.heartbeat_timeout == 2.0
    assert config.host == "::1"
    assert config.data_dir == "/srv/ps"
    assert config.high_water == 2 * 1024 * 1024


def test_env_ignores_unrelated_variables() -> None:
    found = from_env({"PACKETSTACK_PORT": "1", "PORT": "2", "PACKETSTACK_BOGUS": "3", "X": "4"})
    assert found == {"port": "1"}


def test_env_tokens_are_comma_separated() -> None:
    assert load(environ={"PACKETSTACK_TOKENS": "alpha,beta,,gamma"}).tokens == [
        "alpha",
        "beta",
        "gamma",
    ]
    assert load(environ={"PACKETSTACK_TOKENS": "only"}).tokens == ["only"]
    assert load(environ={"PACKETSTACK_TOKENS": ""}).tokens == []


def test_env_overrides_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[service]\nport = 7501\nhost = "10.0.0.1"\ntokens = ["file"]\n')
    config = load(path, environ={"PACKETSTACK_PORT": "7700", "PACKETSTACK_TOKENS": "env1,env2"})
    assert config.port == 7700
    assert config.tokens == ["env1", "env2"]
    assert config.host == "10.0.0.1"  # not in the environment: the file's value stays


def test_overrides_beat_env_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, "port = 7501\nheartbeat = 1.0\nheartbeat_timeout = 3.0\n")
    config = load(
        path,
        overrides={"port": 7800, "tokens": ["flag"]},
        environ={"PACKETSTACK_PORT": "7700", "PACKETSTACK_TOKENS": "env"},
    )
    assert config.port == 7800
    assert config.tokens == ["flag"]
    assert config.heartbeat == 1.0  # from the file, nothing overrides it


def test_override_can_fix_a_bad_env_value() -> None:
    config = load(overrides={"port": 7401}, environ={"PACKETSTACK_PORT": "70000"})
    assert config.port == 7401


# --------------------------------------------------------------- bad values


def expect_error(*words: str, **kwargs: object) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(**kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    return info.value


def test_port_out_of_range() -> None:
    expect_error("port", "70000", "65535", overrides={"port": 70000}, environ={})
    expect_error("port", "-1", overrides={"port": -1}, environ={})
    expect_error("port 70000", environ={"PACKETSTACK_PORT": "70000"})


def test_port_bounds_are_accepted() -> None:
    assert load(overrides={"port": 0}, environ={}).port == 0
    assert load(overrides={"port": 65535}, environ={}).port == 65535


@pytest.mark.parametrize(
    ("heartbeat", "timeout"), [(5.0, 5.0), (5.0, 4.0), (0.0, 1.0), (-1.0, 1.0)]
)
def test_heartbeat_timeout_must_exceed_heartbeat(heartbeat: float, timeout: float) -> None:
    expect_error(
        "heartbeat_timeout",
        overrides={"heartbeat": heartbeat, "heartbeat_timeout": timeout},
        environ={},
    )


def test_tls_cert_without_key_and_key_without_cert() -> None:
    expect_error("tls_cert", "tls_key", overrides={"tls_cert": "cert.pem"}, environ={})
    expect_error("tls_cert", "tls_key", overrides={"tls_key": "key.pem"}, environ={})
    both = load(overrides={"tls_cert": "c.pem", "tls_key": "k.pem"}, environ={})
    assert (both.tls_cert, both.tls_key) == ("c.pem", "k.pem")


def test_low_water_above_high_water() -> None:
    expect_error("low_water", overrides={"low_water": 10, "high_water": 5}, environ={})


def test_chunk_size_limits() -> None:
    expect_error("chunk_size", overrides={"chunk_size": 100}, environ={})
    expect_error("chunk_size", overrides={"chunk_size": DEFAULT_MAX_FRAME}, environ={})
    expect_error("max_payload", overrides={"max_payload": 2048, "chunk_size": 4096}, environ={})


def test_several_problems_are_all_named() -> None:
    error = expect_error(
        "port", "tls_cert", overrides={"port": 99999, "tls_cert": "c.pem"}, environ={}
    )
    assert "heartbeat" not in str(error)


def test_unknown_key_in_file(tmp_path: Path) -> None:
    expect_error("hartbeat", path=write(tmp_path, "hartbeat = 1.0\n"), environ={})


def test_unknown_key_in_service_table(tmp_path: Path) -> None:
    expect_error("colour", path=write(tmp_path, '[service]\ncolour = "red"\n'), environ={})


def test_unknown_override() -> None:
    expect_error("bogus", overrides={"bogus": 1}, environ={})


def test_wrong_type_in_file(tmp_path: Path) -> None:
    expect_error("port", path=write(tmp_path, 'port = "high"\n'), environ={})
    expect_error("tokens", path=write(tmp_path, 'tokens = "abc"\n'), environ={})
    expect_error("heartbeat", path=write(tmp_path, "heartbeat = [1]\n"), environ={})


def test_wrong_type_in_env() -> None:
    expect_error("port", environ={"PACKETSTACK_PORT": "seventy"})
    expect_error("heartbeat", environ={"PACKETSTACK_HEARTBEAT": "often"})


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    expect_error("cannot read", "missing.toml", path=missing, environ={})


def test_unreadable_file(tmp_path: Path) -> None:
    # A directory cannot be read as a file (and works even when the tests run as root).
    directory = tmp_path / "conf.toml"
    directory.mkdir()
    expect_error("cannot read", "conf.toml", path=directory, environ={})


def test_invalid_toml(tmp_path: Path) -> None:
    expect_error(
        "not valid TOML", "bad.toml", path=write(tmp_path, "port = = 1\n", "bad.toml"), environ={}
    )
    expect_error("not valid TOML", path=write(tmp_path, "[service\nport = 1\n"), environ={})


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    """TOML files are UTF-8; anything else is a bad config file, not a crash."""
    path = tmp_path / "latin1.toml"
    path.write_bytes('data_dir = "caf\u00e9"\n'.encode("latin-1"))
    expect_error("latin1.toml", path=path, environ={})


def test_service_key_that_is_not_a_table(tmp_path: Path) -> None:
    expect_error("service", path=write(tmp_path, 'service = "main"\n'), environ={})
