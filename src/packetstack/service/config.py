"""Service settings: defaults, a TOML file, PACKETSTACK_* environment variables, flags."""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

import msgspec

from ..errors import ConfigError
from ..protocol.frames import DEFAULT_CHUNK_SIZE, DEFAULT_MAX_FRAME, DEFAULT_MAX_PAYLOAD
from ..storage.bridge import BridgeSettings, MapBridge
from ..transport.endpoints import DEFAULT_PORT
from .auth import Principal

ENV_PREFIX = "PACKETSTACK_"
LOOPBACK = ("127.0.0.1", "::1", "localhost")


class SettingProblems(ConfigError):
    """The checks of ServiceConfig that failed, all of them: ``problems`` lists each one
    (naming its settings), the message joins them."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


SECRETS = frozenset({"tokens", "metrics_token"})  # never shown by repr()
TABLES = frozenset({"principals", "bridges", "maps"})  # TOML only, no environment variable
_PASSWORD_IN_URL = re.compile(r"(://[^:/@]*:)[^@]*@")


class ServiceConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Every service setting with its default. docs/CONFIGURATION.md describes each."""

    def __repr__(self) -> str:
        # Every setting but the secrets: configs end up in logs and tracebacks.
        shown = {
            name: ("<hidden>" if name in SECRETS and value else value)
            for name, value in msgspec.structs.asdict(self).items()
        }
        shown["bridges"] = {name: hide_password(b.url) for name, b in self.bridges.items()}
        return "ServiceConfig(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    unix_path: str | None = None
    data_dir: str = "packetstack-data"
    tokens: list[str] = []  # each is an operator's: everything allowed
    principals: list[Principal] = []  # tokens with their own ACLs (TOML only)
    allow_open: bool = False  # listen beyond loopback with neither tokens nor principals
    max_connections: int = 10_000  # at once, all principals together
    # Frames per second one connection may send (0: no limit), and how many may come at
    # once after a quiet spell. Past it the service reads that connection more slowly.
    rate_limit: float = 0.0
    rate_burst: int = 0  # 0: one second's worth
    tls_cert: str | None = None
    tls_key: str | None = None
    # Mutual TLS: ask TLS clients for a certificate signed by this CA bundle (PEM); its
    # commonName maps to the principal whose ``certificate`` pattern it matches.
    tls_client_ca: str | None = None
    tls_client_cert_required: bool = False  # refuse TLS clients without a certificate
    heartbeat: float = 5.0
    heartbeat_timeout: float = 15.0
    handshake_timeout: float = 10.0
    max_frame: int = DEFAULT_MAX_FRAME
    max_payload: int = DEFAULT_MAX_PAYLOAD
    chunk_size: int = DEFAULT_CHUNK_SIZE
    high_water: int = 1024 * 1024
    low_water: int = 256 * 1024
    request_timeout: float = 30.0
    # Mailboxes: how long a packet waits for an offline or slow ending, and how much.
    mailbox_ttl: float = 3 * 3600.0
    mailbox_max_packets: int = 1_000_000
    mailbox_max_bytes: int = 1024 * 1024 * 1024
    mailbox_overflow: Literal["reject", "drop-oldest"] = "reject"
    # The embedded store: NORMAL survives a process crash, FULL also a power loss.
    store_synchronous: Literal["NORMAL", "FULL"] = "NORMAL"
    # Prometheus metrics over HTTP (GET /metrics); metrics_port 0: no metrics endpoint.
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0
    # When set, /metrics answers only requests with "Authorization: Bearer <metrics_token>".
    metrics_token: str = ""
    # Log lines of `packetstack serve`: human text, or one JSON object per line.
    log_format: Literal["text", "json"] = "text"
    # The data grid: partitions (fixed for the life of the data directory's journal) and
    # backups per partition among the holding endings.
    grid_partitions: int = 271
    grid_backups: int = 1
    # Database bridges by name ([bridges.NAME]: url, batch, retries...) and the maps written
    # to them ([maps.NAME]: bridge, table, mode, type, key, load). Written on flush and on
    # close; also every flush_interval seconds when that is > 0.
    bridges: dict[str, BridgeSettings] = {}
    maps: dict[str, MapBridge] = {}
    flush_interval: float = 0.0
    # A map's flush with at least this many dirty entries runs in a flush worker process,
    # so that it takes no CPU from the service's packet traffic; 0: every flush runs in
    # the service's event loop.
    flush_worker_at: int = 10_000

    def __post_init__(self) -> None:
        problems = []
        if self.mailbox_ttl <= 0:
            problems.append("mailbox_ttl must be > 0 seconds")
        if self.mailbox_max_packets < 1 or self.mailbox_max_bytes < 1:
            problems.append("mailbox_max_packets and mailbox_max_bytes must be at least 1")
        if not 0 <= self.port <= 65535:
            problems.append(f"port {self.port} is not between 0 and 65535")
        if not 0 <= self.metrics_port <= 65535:
            problems.append(f"metrics_port {self.metrics_port} is not between 0 and 65535")
        if self.heartbeat <= 0 or self.heartbeat_timeout < 2 * self.heartbeat:
            problems.append(
                "heartbeat must be > 0 and heartbeat_timeout at least twice heartbeat "
                "(three times or more tolerates a late PING)"
            )
        if self.chunk_size < 1024 or self.chunk_size > self.max_frame - 1024:
            problems.append("chunk_size must be at least 1024 and 1 KiB under max_frame")
        if self.max_payload < self.chunk_size:
            problems.append("max_payload must be at least chunk_size")
        if self.low_water > self.high_water:
            problems.append("low_water must not exceed high_water")
        if any(not token for token in self.tokens):
            problems.append("every entry of tokens must be non-empty")
        if any(not (p.token or p.certificate) for p in self.principals):
            problems.append("every principal needs a token, a certificate pattern or both")
        tokens = [p.token for p in self.principals if p.token] + self.tokens
        if len(set(tokens)) != len(tokens):
            problems.append("two principals (or tokens) share a token")
        names = [p.name for p in self.principals]
        if len(set(names)) != len(names):
            problems.append("two principals share a name")
        if self.rate_limit < 0 or self.rate_burst < 0:
            problems.append("rate_limit and rate_burst must not be negative")
        if not 1 <= self.grid_partitions <= 65_536:
            problems.append("grid_partitions must be between 1 and 65536")
        if not 0 <= self.grid_backups <= 6:
            problems.append("grid_backups must be between 0 and 6")
        problems.extend(_bridge_problems(self))
        if self.max_connections < 1:
            problems.append("max_connections must be at least 1")
        if (self.tls_cert is None) != (self.tls_key is None):
            problems.append("tls_cert and tls_key go together: set both or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            problems.append("tls_client_ca needs tls_cert and tls_key: mutual TLS is TLS first")
        if self.tls_client_cert_required and self.tls_client_ca is None:
            problems.append("tls_client_cert_required needs tls_client_ca to verify them with")
        if problems:
            raise SettingProblems(problems)


def hide_password(url: str) -> str:
    """``url`` with its password (if any) replaced by ***."""
    return _PASSWORD_IN_URL.sub(r"\1***@", url)


def _bridge_problems(config: ServiceConfig) -> list[str]:
    problems = []
    if config.flush_interval < 0:
        problems.append(
            "flush_interval must be >= 0 seconds (0: flush only when asked and on close)"
        )
    if config.flush_worker_at < 0:
        problems.append(
            "flush_worker_at must be >= 0 entries (0: every flush runs in the service's process)"
        )
    for name, bridge in config.bridges.items():
        if bridge.batch < 1 or bridge.retries < 1:
            problems.append(f"bridges.{name}: batch and retries must be at least 1")
        if not 0 < bridge.retry_delay <= bridge.retry_max_delay:
            problems.append(f"bridges.{name}: retry_delay must be > 0 and <= retry_max_delay")
        if bridge.connect_timeout <= 0 or bridge.timeout <= 0:
            problems.append(f"bridges.{name}: connect_timeout and timeout must be > 0 seconds")
    tables: dict[tuple[str, str], str] = {}
    for name, spec in config.maps.items():
        table = (spec.bridge, spec.table or name)
        if table in tables:
            problems.append(
                f"maps.{name} and maps.{tables[table]} both use table {table[1]!r} of bridge "
                f"{spec.bridge!r}: set table = '...' on one of them"
            )
        tables[table] = name
        if spec.bridge not in config.bridges:
            known = ", ".join(sorted(config.bridges)) or "none is configured"
            problems.append(
                f"maps.{name}.bridge = {spec.bridge!r} names no [bridges.{spec.bridge}] ({known})"
            )
    return problems


def exposure_problem(host: str, allow_open: bool, secured: bool) -> str | None:
    """Why a service must not start: open (not ``secured`` by tokens or principals) on a
    ``host`` beyond loopback without ``allow_open``. None when it may."""
    if secured or allow_open or host in LOOPBACK:
        return None
    return (
        f"no tokens or principals are configured and host {host!r} is not "
        "loopback: anyone who reaches it could connect as anything. Configure "
        "tokens or principals, or set allow_open = true to mean it"
    )


def _fields() -> dict[str, Any]:
    return {f.name: f.type for f in msgspec.structs.fields(ServiceConfig)}


def from_env(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """Settings named PACKETSTACK_<SETTING> (``PACKETSTACK_TOKENS`` is comma-separated)."""
    environ = dict(os.environ if environ is None else environ)
    found: dict[str, Any] = {}
    for name in _fields():
        if name in TABLES:
            continue
        value = environ.get(ENV_PREFIX + name.upper())
        if value is not None:
            found[name] = [t for t in value.split(",") if t] if name == "tokens" else value
    return found


def load(
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> ServiceConfig:
    """Defaults < TOML file (its ``[service]`` table or top level) < environment < overrides."""
    merged: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read config file {str(path)!r}: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from exc
        section = data.get("service", data)
        if not isinstance(section, dict):
            raise ConfigError(
                f"config file {str(path)!r}: 'service' must be a table ([service]), "
                f"not a {type(section).__name__}"
            )
        merged.update(section)
    merged.update(from_env(environ))
    merged.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return msgspec.convert(merged, ServiceConfig, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"bad service setting: {exc}") from exc
