"""``packetstack demo``: a service on its embedded default and two endings talking."""

from __future__ import annotations

import asyncio
import tempfile
from datetime import UTC, datetime
from typing import Any

import click
import msgspec

from .client import Client
from .codec import Packet
from .dispatch import Context
from .service import Service


class ChatMessage(Packet):
    text: str
    sent_at: datetime


class Question(Packet):
    a: int
    b: int


class Answer(Packet):
    total: int
    answered_by: str


async def run_demo(url: str | None = None, token: str | None = None) -> None:
    if url is None:
        with tempfile.TemporaryDirectory(prefix="packetstack-demo-") as data_dir:
            async with Service(port=0, data_dir=data_dir) as service:
                click.echo(f"service listening on {service.url} (data in {data_dir})")
                await _talk(service.url, token)
    else:
        await _talk(url, token)


async def _talk(url: str, token: str | None) -> None:
    done = asyncio.Event()
    received: list[str] = []

    async with Client("alice", url, token=token) as alice, Client("bob", url, token=token) as bob:

        @bob.on(ChatMessage)
        async def on_chat(message: ChatMessage, ctx: Context) -> None:
            where = f" in #{ctx.group}" if ctx.group else ""
            received.append(message.text)
            click.echo(f"bob   <- {ctx.sender}{where}: {message.text!r}")
            if len(received) == 2:
                done.set()

        @bob.on(Question)
        async def on_question(question: Question, ctx: Context) -> Any:
            return Answer(question.a + question.b, answered_by="bob")

        await bob.join("lobby")
        click.echo("alice -> bob: hello")
        await alice.send("bob", ChatMessage("hello, bob", datetime.now(UTC)))
        click.echo("alice -> #lobby: anyone here?")
        await alice.publish("lobby", ChatMessage("anyone here?", datetime.now(UTC)))
        answer: Answer = await alice.request("bob", Question(20, 22), timeout=5)
        click.echo(f"alice asked bob 20 + 22 and got {answer.total} from {answer.answered_by}")
        await asyncio.wait_for(done.wait(), 5)
        await _offline_delivery(alice, url, token)
        await _grid(alice, url, token)
    click.echo("demo finished: 3 packets delivered, 1 request answered, 1 map shared")


class Score(msgspec.Struct):
    player: str
    points: int


async def _grid(alice: Client, url: str, token: str | None) -> None:
    """A map whose entries live on a holding ending, journaled by the service."""
    async with Client("dave", url, token=token, holds_data=True) as dave:
        scores = alice.grid.map("scores", Score)
        await scores.put("alice", Score("alice", 10))
        await scores.put("bob", Score("bob", 7))
        hits = alice.grid.map("hits", int)
        await asyncio.gather(*(hits.increment("demo") for _ in range(5)))
        mine = dave.grid.map("scores", Score)
        holding = dave.grid.holding
        assert holding is not None
        for _ in range(100):  # the service hands its partitions over to dave
            if len(holding.owned) == dave.grid.partitions:
                break
            await asyncio.sleep(0.05)
        click.echo(
            f"grid: dave holds {len(holding.owned)} partitions and reads {await mine.get('alice')} "
            f"in-process; 5 concurrent increments made {await hits.get('demo')}"
        )


async def _offline_delivery(alice: Client, url: str, token: str | None) -> None:
    """A packet for an ending that is not connected waits in its mailbox."""
    click.echo("alice -> carol (not connected): see you later")
    await alice.send("carol", ChatMessage("see you later", datetime.now(UTC)), ack=True)
    click.echo("  stored in carol's mailbox at the service (kept 3 hours by default)")
    arrived = asyncio.Event()
    carol = Client("carol", url, token=token)

    @carol.on(ChatMessage)
    async def on_chat(message: ChatMessage, ctx: Context) -> None:
        click.echo(f"carol <- {ctx.sender} (waited for carol to connect): {message.text!r}")
        arrived.set()

    async with carol:
        await asyncio.wait_for(arrived.wait(), 5)
