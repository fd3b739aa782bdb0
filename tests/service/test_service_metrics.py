"""The Prometheus endpoint: scraped over HTTP from a running service and parsed."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import ClassVar

import pytest
from conftest import ClientFactory, ServiceFactory
from prometheus_client.parser import text_string_to_metric_families
from support import free_port, wait_until

from packetstack import Context, Packet, Service
from packetstack.errors import GridError, UnknownDestination
from packetstack.grid.ops import Kind, Op

WAIT = 5.0


@pytest.fixture
async def service(make_service: ServiceFactory) -> Service:
    """The service make_client connects to, serving /metrics on a free port."""
    return await make_service(metrics_port=free_port())


class MetricsPing(Packet):
    packet_tag: ClassVar[str] = "tests.metrics.Ping"
    n: int


class MetricsNote(Packet):
    packet_tag: ClassVar[str] = "tests.metrics.Note"
    n: int


async def http_get(port: int, path: str = "/metrics") -> tuple[str, dict[str, str], str]:
    """(status line, headers, body) of ``GET path`` on 127.0.0.1:``port``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    response = await asyncio.wait_for(reader.read(), WAIT)  # the server closes after one
    writer.close()
    head, _, body = response.decode().partition("\r\n\r\n")
    status, *lines = head.split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines)
    assert int(headers["Content-Length"]) == len(body.encode())
    return status, headers, body


async def scrape(service: Service) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """family name -> {sorted label pairs: value} of the samples named like the family
    (``_total`` for counters), parsed by prometheus_client."""
    assert service.metrics is not None
    status, headers, body = await http_get(service.metrics.port)
    assert status == "HTTP/1.1 200 OK"
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    found: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(body):
        assert family.documentation, f"{family.name} has no HELP"
        assert family.type in ("counter", "gauge"), family.name
        wanted = family.name + ("_total" if family.type == "counter" else "")
        found[family.name] = {
            tuple(sorted(s.labels.items())): s.value for s in family.samples if s.name == wanted
        }
    return found


def value(metrics: dict[str, dict[tuple[tuple[str, str], ...], float]], name: str) -> float:
    return metrics[name][()]


def by_label(
    metrics: dict[str, dict[tuple[tuple[str, str], ...], float]], name: str
) -> dict[str, float]:
    return {labels[0][1]: v for labels, v in metrics[name].items()}


async def test_metrics_after_known_traffic(service: Service, make_client: ClientFactory) -> None:
    sender = await make_client("sender")
    reader = await make_client("reader", connect=False)
    handled: list[int] = []

    @reader.on(MetricsPing)
    async def on_ping(ping: MetricsPing, ctx: Context) -> None:
        handled.append(ping.n)

    await reader.connect()
    for n in range(7):
        await sender.send("reader", MetricsPing(n))
    for n in range(3):
        await sender.send("parked", MetricsNote(n), ack=True)  # stored: nobody is connected
    await wait_until(lambda: len(handled) == 7, WAIT, "7 pings handled")
    await wait_until(lambda: service.mailbox_depth("reader") == 0, WAIT, "reader's acks")

    metrics = await scrape(service)

    assert value(metrics, "packetstack_packets_in") == 10
    assert value(metrics, "packetstack_packets_out") == 10
    assert by_label(metrics, "packetstack_packets_in_by_tag") == {
        "tests.metrics.Ping": 7,
        "tests.metrics.Note": 3,
    }
    assert by_label(metrics, "packetstack_mailbox_depth") == {
        "sender": 0,
        "reader": 0,
        "parked": 3,
    }
    assert by_label(metrics, "packetstack_mailbox_in_flight") == {
        "sender": 0,
        "reader": 0,
        "parked": 0,
    }
    assert value(metrics, "packetstack_mailbox_depth_all") == 3
    assert by_label(metrics, "packetstack_mailbox_packets") == {
        "stored": 3,
        "replayed": 0,
        "expired": 0,
        "dropped": 0,
        "full": 0,
    }
    assert value(metrics, "packetstack_connections") == 2
    assert value(metrics, "packetstack_endings_connected") == 2
    assert value(metrics, "packetstack_endings_known") == 3
    assert value(metrics, "packetstack_connections_accepted") == 2
    assert value(metrics, "packetstack_auth_failures") == 0
    assert value(metrics, "packetstack_permission_denied") == 0
    assert value(metrics, "packetstack_rate_limited") == 0
    assert value(metrics, "packetstack_store_unsaved_rows") == 0  # the acked sends committed
    assert value(metrics, "packetstack_store_commits") == service.mailboxes.store.commits >= 1
    assert by_label(metrics, "packetstack_events") == {}  # nothing else happened
    assert "process_resident_memory_bytes" in metrics or "process_cpu_seconds" in metrics

    # The parked ending connects: its mailbox is replayed and acknowledged.
    parked = await make_client("parked", connect=False)
    notes: list[int] = []

    @parked.on(MetricsNote)
    async def on_note(note: MetricsNote, ctx: Context) -> None:
        notes.append(note.n)

    await parked.connect()
    await wait_until(lambda: service.mailbox_depth("parked") == 0, WAIT, "the replay's acks")
    metrics = await scrape(service)
    assert notes == [0, 1, 2]
    assert by_label(metrics, "packetstack_mailbox_depth")["parked"] == 0
    assert by_label(metrics, "packetstack_mailbox_packets")["replayed"] == 3
    assert value(metrics, "packetstack_endings_connected") == 3


async def test_grid_metrics(service: Service, make_client: ClientFactory) -> None:
    metrics = await scrape(service)  # no holder yet: the service owns every partition
    assert by_label(metrics, "packetstack_grid_partitions") == {"service": 271}
    assert metrics["packetstack_grid_backups"] == {}
    assert value(metrics, "packetstack_grid_holders") == 0
    assert value(metrics, "packetstack_grid_version") == 0
    assert value(metrics, "packetstack_grid_operations") == 0
    assert value(metrics, "packetstack_grid_migrations") == 0

    holder = await make_client("holder-1", holds_data=True)
    numbers = holder.grid.map("m", int)
    for n in range(5):
        await numbers.put(f"k{n}", n)  # writes always go through the service

    def settled() -> bool:
        grid = service.snapshot()["grid"]
        return grid["service_owned"] == 0 and grid["paused"] == 0

    await wait_until(settled, WAIT, "every partition moved to holder-1")
    metrics = await scrape(service)

    assert by_label(metrics, "packetstack_grid_partitions") == {"service": 0, "holder-1": 271}
    assert sum(by_label(metrics, "packetstack_grid_partitions").values()) == 271
    assert by_label(metrics, "packetstack_grid_backups") == {"holder-1": 0}  # no other holder
    assert value(metrics, "packetstack_grid_holders") == 1
    assert value(metrics, "packetstack_grid_version") == service.grid.coordinator.version >= 271
    assert value(metrics, "packetstack_grid_paused_partitions") == 0
    assert value(metrics, "packetstack_grid_waiting_operations") == 0
    assert value(metrics, "packetstack_grid_operations") == 5  # the puts
    assert value(metrics, "packetstack_grid_migrations") == 271
    assert value(metrics, "packetstack_grid_promotions") == 0
    assert value(metrics, "packetstack_grid_rebuilds") == 0
    assert value(metrics, "packetstack_grid_journal_retries") == 0
    assert (
        value(metrics, "packetstack_grid_journal_folds") == service.grid.coordinator.journal.folds
    )
    assert value(metrics, "packetstack_grid_requests_refused") == 0
    # The grid counters with a metric of their own are not kinds of events as well.
    assert by_label(metrics, "packetstack_events") == {}

    # A second holder: the partitions are shared out, each with a backup at the other one.
    await make_client("holder-2", holds_data=True)

    def shared() -> bool:
        grid = service.snapshot()["grid"]
        holders = grid["holders"]
        return (
            grid["paused"] == 0
            and all(h["owned"] > 0 for h in holders)
            and sum(h["backups"] for h in holders) == 271
        )

    await wait_until(shared, WAIT, "partitions shared by two holders")
    metrics = await scrape(service)
    owned = by_label(metrics, "packetstack_grid_partitions")
    backups = by_label(metrics, "packetstack_grid_backups")
    assert owned.keys() == {"service", "holder-1", "holder-2"}
    assert owned["service"] == 0 and sum(owned.values()) == 271
    assert backups.keys() == {"holder-1", "holder-2"}
    assert backups["holder-1"] == owned["holder-2"] and backups["holder-2"] == owned["holder-1"]
    assert value(metrics, "packetstack_grid_holders") == 2
    assert value(metrics, "packetstack_grid_migrations") > 271
    assert await numbers.get("k4") == 4  # (a read may be answered by the holder itself)

    # A request the service refuses (a map without a name) is counted, not run.
    operations = value(await scrape(service), "packetstack_grid_operations")
    with pytest.raises(GridError):
        await holder.grid.run([Op("", 0, Kind.PUT, b"k", b"1")])
    metrics = await scrape(service)
    assert value(metrics, "packetstack_grid_requests_refused") == 1
    assert value(metrics, "packetstack_grid_operations") == operations


async def test_errors_by_kind(service: Service, make_client: ClientFactory) -> None:
    client = await make_client("w1")
    with pytest.raises(UnknownDestination):
        await client.send("$nobody", MetricsPing(1), ack=True)
    metrics = await scrape(service)
    assert by_label(metrics, "packetstack_events") == {"unknown_destination": 1}


async def test_tags_are_capped_and_labels_escaped(
    service: Service, make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Service, "MAX_TAGS", 3)
    client = await make_client("w1")
    odd = 'tests.metrics."odd"\\tag\nline'
    tags = ["tests.metrics.t0", odd, "tests.metrics.t2", "tests.metrics.t3", "tests.metrics.t4"]
    for i, tag in enumerate(tags):
        cls = type(f"Tagged{i}", (Packet,), {"packet_tag": tag, "__module__": __name__})
        for _ in range(i + 1):
            await client.send("nobody-yet", cls())
    await wait_until(lambda: service.packets_in == 15, WAIT, "15 packets in")
    metrics = await scrape(service)
    assert by_label(metrics, "packetstack_packets_in_by_tag") == {
        "tests.metrics.t0": 1,
        odd: 2,  # escaped on the wire, parsed back exactly
        "tests.metrics.t2": 3,
        "$other": 4 + 5,
    }
    assert value(metrics, "packetstack_packets_in") == 15


async def test_endpoint_paths_and_lifecycle(make_service: ServiceFactory, tmp_path: Path) -> None:
    off = await make_service(data_dir=tmp_path / "off")
    assert off.metrics is None  # metrics_port 0 (the default): no endpoint

    port = free_port()
    service = await make_service(metrics_port=port)
    assert service.metrics is not None
    assert service.metrics.url == f"http://127.0.0.1:{port}/metrics"
    status, _, body = await http_get(port, "/")
    assert status == "HTTP/1.1 404 Not Found"
    assert "/metrics" in body
    status, _, _ = await http_get(port, "/metrics?x=1")
    assert status == "HTTP/1.1 200 OK"
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    assert (await asyncio.wait_for(reader.read(), WAIT)).startswith(b"HTTP/1.1 405")
    writer.close()

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\nX-Padding: " + b"x" * 20_000)  # over 16 KiB
    assert await asyncio.wait_for(reader.read(), WAIT) == b""  # dropped without an answer
    writer.close()
    assert (await http_get(port))[0] == "HTTP/1.1 200 OK"  # and it goes on serving

    await service.close()
    assert service.metrics is None
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


async def bearer_get(port: int, authorization: str | None) -> str:
    """The status line of GET /metrics with that Authorization header (or none)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    extra = f"Authorization: {authorization}\r\n" if authorization is not None else ""
    writer.write(f"GET /metrics HTTP/1.1\r\nHost: localhost\r\n{extra}\r\n".encode())
    response = await asyncio.wait_for(reader.read(), WAIT)
    writer.close()
    return response.decode().split("\r\n", 1)[0] + (
        " +challenge" if "WWW-Authenticate: Bearer" in response.decode() else ""
    )


async def test_a_metrics_token_is_required_when_set(make_service: ServiceFactory) -> None:
    service = await make_service(metrics_port=free_port(), metrics_token="s3cret")
    assert service.metrics is not None
    port = service.metrics.port
    assert await bearer_get(port, None) == "HTTP/1.1 401 Unauthorized +challenge"
    assert await bearer_get(port, "Bearer wrong") == "HTTP/1.1 401 Unauthorized +challenge"
    assert await bearer_get(port, "Basic czNjcmV0") == "HTTP/1.1 401 Unauthorized +challenge"
    assert await bearer_get(port, "Bearer s3cret") == "HTTP/1.1 200 OK"
    assert "s3cret" not in repr(service.config)


async def test_bridge_metrics_show_dirty_entries_flushes_and_loads(
    make_service: ServiceFactory, tmp_path: Path
) -> None:
    """Dirty entries per bridged map (as counted by the last flush or status request),
    what flushes wrote and deleted, and lazy read-throughs."""
    from packetstack.storage import BridgeSettings, MapBridge

    url = f"sqlite+aiosqlite:///{tmp_path / 'bridge.db'}"
    service = await make_service(
        metrics_port=free_port(),
        bridges={"lite": BridgeSettings(url=url)},
        maps={
            "scores": MapBridge(bridge="lite"),
            "lazy": MapBridge(bridge="lite", load="lazy"),
        },
    )
    scores = service.grid.map("scores", int)
    await scores.put_all({f"k{i}": i for i in range(5)})
    await scores.delete("k4")
    await service.grid.bridges.count_dirty()
    before = await scrape(service)
    labels = (("bridge", "lite"), ("map", "scores"))
    assert before["packetstack_bridge_dirty_entries"][labels] == 5  # four puts, one delete
    assert before["packetstack_flushes"][()] == 0

    report = await service.flush()
    assert (report.written, report.deleted) == (4, 1)
    with sqlite3.connect(tmp_path / "bridge.db") as db:  # the bridge created the table
        db.execute("INSERT INTO lazy VALUES ('k1', '7')")
    assert await service.grid.map("lazy", int).get("k1") == 7  # read through
    after = await scrape(service)
    assert after["packetstack_bridge_dirty_entries"][labels] == 0
    assert after["packetstack_bridge_set_aside_entries"][labels] == 0
    assert after["packetstack_flushes"][()] == 1
    assert after["packetstack_flush_written"][()] == 4
    assert after["packetstack_flush_deleted"][()] == 1
    assert after["packetstack_flush_set_aside"][()] == 0
    assert after["packetstack_flush_done_entries"][labels] == 0  # no flush running
    assert after["packetstack_grid_loads"][()] == 1
