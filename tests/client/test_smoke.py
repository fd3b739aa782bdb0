from __future__ import annotations

from packetstack import Context, Packet


class Hello(Packet):
    text: str


class Echo(Packet):
    text: str


async def test_request_reply_between_two_endings(make_client) -> None:  # type: ignore[no-untyped-def]
    a = await make_client("a")
    b = await make_client("b")

    @b.on(Hello)
    async def answer(packet: Hello, ctx: Context) -> Echo:
        return Echo(f"{ctx.sender} said {packet.text}")

    reply = await a.request("b", Hello("hi"), timeout=5)
    assert reply == Echo("a said hi")
