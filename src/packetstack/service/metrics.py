"""Prometheus metrics over HTTP, served from the service's own event loop.

``GET /metrics`` answers in the Prometheus text exposition format (version 0.0.4). The
values are read from :meth:`Service.snapshot` and the service's counters in one go on the
event loop, between two reads of the network, so they are consistent with each other: no
thread, no locks. ``prometheus_client`` only formats them (HELP and TYPE lines, label
escaping); its own registry of process metrics (``process_*``) is added.

docs/OPERATIONS.md lists every metric.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import CollectorRegistry

from ..protocol import SERVICE_NAME

if TYPE_CHECKING:
    from .service import Service

log = logging.getLogger("packetstack.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# A request line and headers larger than this, or slower than the timeout, are dropped.
MAX_REQUEST = 16 * 1024
REQUEST_TIMEOUT = 10.0

# Counters of service.stats with a metric of their own (label value -> stats key); every
# other stats key is a kind of packetstack_events_total.
MAILBOX_OUTCOMES = {
    "stored": "mailbox_stored",
    "replayed": "mailbox_replayed",
    "expired": "mailbox_expired",
    "dropped": "mailbox_dropped",
    "full": "mailbox_full",
}
NAMED_STATS = {
    "connections": (
        "connections_accepted",
        "Handshakes accepted (WELCOME sent), reconnects included.",
    ),
    "auth_failures": ("auth_failures", "HELLOs refused for a wrong or missing token."),
    "permission_denied": (
        "permission_denied",
        "Actions refused because the principal's ACL does not allow them.",
    ),
    "rate_limited": (
        "rate_limited",
        "Times a connection's reading was paused for its rate_limit.",
    ),
}
# Grid counters of service.stats with a metric of their own (the others, grid_expired_checks
# and grid_events_dropped, are kinds of packetstack_events_total).
GRID_STATS = {
    "grid_migrations": (
        "grid_migrations",
        "Grid partitions that changed owner (to a holder, or back to the service).",
    ),
    "grid_promotions": (
        "grid_promotions",
        "Grid partitions whose backup holder was promoted to owner.",
    ),
    "grid_rebuilds": (
        "grid_rebuilds",
        "Grid partitions rebuilt from the journal by the service (owner and backups gone).",
    ),
    "grid_refused": (
        "grid_requests_refused",
        "Grid requests refused: malformed, invalid, or not allowed by the principal's ACL "
        "(those count in packetstack_permission_denied_total too).",
    ),
}
# Flush counters of service.stats (service/bridges.py), each a metric of its own.
FLUSH_STATS = {
    "flushes": ("flushes", "Flushes of the bridged maps (asked, on an interval, on close)."),
    "flush_written": ("flush_written", "Entries written (upserted) to bridges by flushes."),
    "flush_deleted": ("flush_deleted", "Entries deleted from bridges by flushes."),
    "flush_set_aside": (
        "flush_set_aside",
        "Entries a database refused during a flush, set aside with their error.",
    ),
    "flush_failures": (
        "flush_failures",
        "Maps whose flush stopped because their database could not be reached (their "
        "entries stay dirty for the next flush).",
    ),
}
_OWN_METRIC = set(MAILBOX_OUTCOMES.values()) | set(NAMED_STATS) | set(GRID_STATS) | set(FLUSH_STATS)


class ServiceCollector:
    """The service's metrics, read at scrape time."""

    def __init__(self, service: Service) -> None:
        self._service = service

    def collect(self) -> Iterator[Metric]:
        snapshot = self._service.snapshot()
        stats: dict[str, int] = snapshot["stats"]
        endings = snapshot["endings"]

        yield _gauge(
            "connections", "Open connections, handshaking ones included.", snapshot["connections"]
        )
        yield _gauge(
            "endings_connected",
            "Endings connected now.",
            sum(1 for ending in endings if ending["connected"]),
        )
        yield _gauge(
            "endings_known",
            "Endings the service keeps state for (mailbox, groups), connected or not.",
            len(endings),
        )
        yield _gauge("groups", "Groups with at least one member.", len(snapshot["groups"]))
        for key, (name, doc) in NAMED_STATS.items():
            yield _counter(name, doc, stats.get(key, 0))
        yield _counter(
            "packets_in",
            "Packets accepted from endings (any target, replies included).",
            snapshot["packets_in"],
        )
        yield _counter(
            "packets_out",
            "Packets handed on: one per destination sent or stored for, plus forwarded replies.",
            snapshot["packets_out"],
        )
        by_tag = CounterMetricFamily(
            "packetstack_packets_in_by_tag",
            "Packets accepted from endings by packet tag; tags past the first "
            f'{self._service.MAX_TAGS} are counted under tag="$other".',
            labels=["tag"],
        )
        for tag, count in snapshot["packets_in_by_tag"].items():
            by_tag.add_metric([tag], count)
        yield by_tag

        depth = GaugeMetricFamily(
            "packetstack_mailbox_depth",
            "Packets waiting for an ending: stored in its mailbox or sent and not yet "
            "acknowledged.",
            labels=["ending"],
        )
        inflight = GaugeMetricFamily(
            "packetstack_mailbox_in_flight",
            "Packets sent to an ending and not yet acknowledged.",
            labels=["ending"],
        )
        for ending in endings:
            depth.add_metric([ending["name"]], ending["depth"])
            inflight.add_metric([ending["name"]], ending["in_flight"])
        yield depth
        yield inflight
        yield _gauge(
            "mailbox_depth_all",
            "Packets waiting for all endings together (the sum of packetstack_mailbox_depth).",
            sum(ending["depth"] for ending in endings),
        )
        mailbox = CounterMetricFamily(
            "packetstack_mailbox_packets",
            "Mailbox packets by outcome: stored, replayed (sent from the store), expired "
            "(ttl ran out), dropped (drop-oldest policy), full (refused, reject policy).",
            labels=["outcome"],
        )
        for outcome, key in MAILBOX_OUTCOMES.items():
            mailbox.add_metric([outcome], stats.get(key, 0))
        yield mailbox

        store = snapshot["store"]
        yield _counter("store_commits", "Commits of the embedded store.", store["commits"])
        yield _counter("store_writes", "Rows written by the embedded store.", store["writes"])
        yield _gauge(
            "store_unsaved_rows",
            "Rows handed to the embedded store and not committed yet.",
            store["unsaved_rows"],
        )

        yield from _grid(snapshot["grid"], stats)
        yield from _bridges(snapshot["bridges"], stats)

        events = CounterMetricFamily(
            "packetstack_events",
            "Other events and errors by kind, one per key of Service.stats that has no metric "
            "of its own (handshake_timeouts, unknown_destination, ...); a kind appears once "
            "it has happened.",
            labels=["kind"],
        )
        for kind, count in sorted(stats.items()):
            if kind not in _OWN_METRIC:
                events.add_metric([kind], count)
        yield events


def _grid(grid: dict[str, Any], stats: dict[str, int]) -> Iterator[Metric]:
    """The data grid's metrics, from ``Coordinator.snapshot()`` and the grid counters."""
    holders: list[dict[str, Any]] = grid["holders"]
    owned = GaugeMetricFamily(
        "packetstack_grid_partitions",
        "Grid partitions owned, by holder; the service's own under "
        f'holder="{SERVICE_NAME}". They add up to the number of partitions.',
        labels=["holder"],
    )
    owned.add_metric([SERVICE_NAME], grid["service_owned"])
    backups = GaugeMetricFamily(
        "packetstack_grid_backups",
        "Grid partitions a holder keeps a backup copy of, by holder.",
        labels=["holder"],
    )
    for holder in holders:
        owned.add_metric([holder["name"]], holder["owned"])
        backups.add_metric([holder["name"]], holder["backups"])
    yield owned
    yield backups
    yield _gauge(
        "grid_holders",
        "Connected endings that hold grid partitions, leaving ones included.",
        len(holders),
    )
    yield _gauge(
        "grid_version",
        "Version of the grid's partition table: one more at every change of hands.",
        grid["version"],
    )
    yield _gauge(
        "grid_paused_partitions",
        "Grid partitions paused while they change hands or are rebuilt.",
        grid["paused"],
    )
    yield _gauge(
        "grid_waiting_operations",
        "Grid operations queued at the service for a paused or busy partition.",
        grid["waiting"],
    )
    yield _counter(
        "grid_operations",
        "Grid operations submitted to the service (expiry checks included).",
        grid["ops"],
    )
    for key, (name, doc) in GRID_STATS.items():
        yield _counter(name, doc, stats.get(key, 0))
    yield _counter(
        "grid_loads",
        "Entries of lazily loaded maps read through from their database on a miss.",
        grid["loads"],
    )
    yield _counter(
        "grid_journal_retries",
        "Failed writes of the grid journal, retried.",
        grid["journal_retries"],
    )
    yield _counter(
        "grid_journal_folds",
        "Folds of the grid journal's log into its table of latest values.",
        grid["journal_folds"],
    )


def _bridges(bridges: dict[str, Any], stats: dict[str, int]) -> Iterator[Metric]:
    """Dirty entries per bridged map (as last counted: by each flush and each status
    request), the running flush's progress, and the flush counters."""
    labels = ["map", "bridge"]
    dirty = GaugeMetricFamily(
        "packetstack_bridge_dirty_entries",
        "Entries of a bridged map not written to its database yet, as last counted (by a "
        "flush or a status request).",
        labels=labels,
    )
    set_aside = GaugeMetricFamily(
        "packetstack_bridge_set_aside_entries",
        "Entries of a bridged map its database refused, waiting for a change or a retry.",
        labels=labels,
    )
    done = GaugeMetricFamily(
        "packetstack_flush_done_entries",
        "Entries the running flush has handled, by map (0 when no flush runs).",
        labels=labels,
    )
    total = GaugeMetricFamily(
        "packetstack_flush_total_entries",
        "Entries the running flush found dirty when it started, by map (0 when none runs).",
        labels=labels,
    )
    for name, info in bridges["maps"].items():
        values = [name, info["bridge"]]
        dirty.add_metric(values, info["dirty"])
        set_aside.add_metric(values, info["set_aside"])
        flushing = info["flushing"] or (0, 0)
        done.add_metric(values, flushing[0])
        total.add_metric(values, flushing[1])
    yield from (dirty, set_aside, done, total)
    for key, (name, doc) in FLUSH_STATS.items():
        yield _counter(name, doc, stats.get(key, 0))
    yield _counter(
        "bridge_retries",
        "Writes to a bridge retried after the database could not be reached.",
        bridges["retries"],
    )


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"packetstack_{name}", doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(f"packetstack_{name}", doc, value=value)


UNAUTHORIZED = "401 Unauthorized"


class MetricsServer:
    """A minimal HTTP/1.1 server for ``GET /metrics`` (one request per connection)."""

    def __init__(self, service: Service) -> None:
        token = service.config.metrics_token
        self._authorization = f"Bearer {token}".encode() if token else None
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(ServiceCollector(service))
        ProcessCollector(registry=self._registry)
        self._server: asyncio.Server | None = None
        self.host = ""
        self.port = 0

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._serve, host, port, limit=MAX_REQUEST)
        self.host = host
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("metrics on %s", self.url)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def render(self) -> bytes:
        """The metrics in the text exposition format."""
        return generate_latest(self._registry)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            status, body, content_type = self._answer(head)
            challenge = "WWW-Authenticate: Bearer\r\n" if status == UNAUTHORIZED else ""
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n{challenge}"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode("ascii")
                + (b"" if head.startswith(b"HEAD ") else body)
            )
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # a slow, truncated or oversized request: dropped without an answer
        except ConnectionError:
            pass
        finally:
            writer.close()

    def _answer(self, head: bytes) -> tuple[str, bytes, str]:
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            return "400 Bad Request", b"bad request\n", "text/plain; charset=utf-8"
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if target != b"/metrics":
            return "404 Not Found", b"metrics are at /metrics\n", "text/plain; charset=utf-8"
        if method not in (b"GET", b"HEAD"):
            return "405 Method Not Allowed", b"use GET\n", "text/plain; charset=utf-8"
        if self._authorization is not None and not self._authorized(head):
            body = b"send Authorization: Bearer <metrics_token>\n"
            return UNAUTHORIZED, body, "text/plain; charset=utf-8"
        return "200 OK", self.render(), CONTENT_TYPE

    def _authorized(self, head: bytes) -> bool:
        assert self._authorization is not None
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"authorization":
                # Compared in constant time: the token is a secret.
                return hmac.compare_digest(value.strip(), self._authorization)
        return False
