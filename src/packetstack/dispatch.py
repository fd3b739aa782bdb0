"""Handlers, ordered dispatch and pending requests: shared by Client and Service.

Packets from one connection are handled in arrival order by one task per connection (not a
task per packet). Replies are matched to their requests as they arrive, outside that order,
so a handler that awaits a request of its own never deadlocks its connection.
"""

from __future__ import annotations

import asyncio
import heapq
import inspect
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Container
from typing import Any, TypeVar, cast

import msgspec

from .codec import DECODE_ERRORS, Decode, Packet, decode_failed, decoder_for, registry
from .errors import (
    CodecError,
    ConnectionClosed,
    DeliveryError,
    ErrorCode,
    GridError,
    MailboxFull,
    PayloadTooLarge,
    PermissionDenied,
    RemoteError,
    RequestTimeout,
    UnknownDestination,
    UnknownPacketType,
)
from .protocol import ErrorBody, Flag, PacketHeader, PacketReceived, Target

log = logging.getLogger("packetstack.dispatch")

P = TypeVar("P", bound=Packet)
Handler = Callable[[Any, "Context"], Awaitable[Packet | None] | Packet | None]
ReplySender = Callable[[PacketHeader, Packet | None, ErrorBody | None], None]

_error_body_decoder = msgspec.msgpack.Decoder(ErrorBody)

ERROR_TAG = "$error"
# A delivery the client recognised as one it already handled: queued under this tag so the
# dispatcher passes its sequence number in order (and acknowledges it) without handling it.
REPEAT_TAG = "$repeat"

_REQUEST = int(Flag.REQUEST)
_ERROR = int(Flag.ERROR)


class Context(msgspec.Struct, gc=False):
    """What a handler knows about the packet it handles.

    A msgspec Struct only because its C constructor is the cheapest: one is made per
    received packet."""

    header: PacketHeader
    # The service's sequence number for this delivery to this ending (0 for packets that
    # are not deliveries: replies, packets to the service). The same packet redelivered
    # after a crash keeps it, so (ending, seq) can key idempotent side effects.
    seq: int = 0

    @property
    def sender(self) -> str:
        """Name of the sending ending, or ``"service"``."""
        return self.header.src

    @property
    def id(self) -> int:
        return self.header.id

    @property
    def is_request(self) -> bool:
        return bool(self.header.flags & _REQUEST)

    @property
    def group(self) -> str | None:
        """The group it was published to, or None for a direct packet."""
        return self.header.dst if self.header.target == Target.GROUP else None

    @property
    def broadcast(self) -> bool:
        return self.header.target == Target.ALL

    def __repr__(self) -> str:
        return f"Context(sender={self.sender!r}, id={self.id}, tag={self.header.tag!r})"


class HandlerTable:
    """Packet tag -> (decoder, handler, is_async): one lookup per received packet."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[Decode, Handler, bool]] = {
            REPEAT_TAG: (cast(Decode, _nothing), _nothing_to_do, False)
        }
        self.on_unhandled: Callable[[BaseException, Context], None] | None = None

    def on(self, packet_type: type[P]) -> Callable[[Handler], Handler]:
        """Decorator: ``@x.on(Move) async def moved(packet, ctx): ...``. A handler that
        returns a Packet answers a request. Plain functions work too."""
        if not (isinstance(packet_type, type) and issubclass(packet_type, Packet)):
            raise TypeError(f"on() takes a Packet subclass, not {packet_type!r}")

        def register(handler: Handler) -> Handler:
            is_async = inspect.iscoroutinefunction(handler)
            decoder = decoder_for(packet_type)
            self._entries[packet_type.packet_tag] = (decoder, handler, is_async)
            return handler

        return register


def _nothing(_: object) -> None:
    return None


def _nothing_to_do(_: object, __: Context) -> None:
    return None


def error_body(code: ErrorCode, exc: BaseException) -> ErrorBody:
    return ErrorBody(int(code), type(exc).__name__, str(exc))


# Packets waiting for slow handlers: past HIGH the connection stops reading (TCP then pushes
# back on the senders), below LOW it reads again.
QUEUE_HIGH = 8192
QUEUE_LOW = 2048
HANDLERS = "handlers"  # the reason a connection's reading is held for its dispatcher
# Deliveries handled between two progress reports while the queue is never empty.
PROGRESS_EVERY = 256


class Dispatcher:
    """Runs handlers for one connection's packets, in order, on one task.

    ``hold(True)`` is called when handlers fall QUEUE_HIGH packets behind, ``hold(False)``
    when they are back under QUEUE_LOW: the owner pauses and resumes reading its connection,
    so slow handlers cannot make the queue, and memory, grow without bound.

    ``progress(seq, urgent)`` is told the sequence number of the last delivery whose
    handler has finished: when the queue runs dry, every PROGRESS_EVERY deliveries
    meanwhile, and (urgent) when a request is answered. The client acknowledges deliveries
    with it."""

    def __init__(
        self,
        table: HandlerTable,
        send_reply: ReplySender,
        hold: Callable[[bool], None] | None = None,
        progress: Callable[[int, bool], None] | None = None,
    ) -> None:
        self._table = table
        self._send_reply = send_reply
        self._hold = hold
        self._progress = progress
        self.done_seq = 0  # the last delivery handled (its handler returned or failed)
        self.held = False
        self.queue: deque[PacketReceived] = deque()  # append, then wake()
        self._wakeup: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self.handled = 0
        self.failed = 0

    def wake(self) -> None:
        """Have the queued packets handled."""
        if len(self.queue) > QUEUE_HIGH and not self.held and self._hold is not None:
            self.held = True
            self._hold(True)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        else:
            wakeup = self._wakeup
            if wakeup is not None and not wakeup.done():
                wakeup.set_result(None)

    async def stop(self) -> None:
        if self._task is not None:
            task, self._task = self._task, None
            task.cancel()
            # The loop only ends by cancellation; whatever else it raised was logged.
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        queue = self.queue
        entries = self._table._entries
        loop = asyncio.get_running_loop()
        seq = reported = self.done_seq
        while True:
            # The whole per-packet path is inline here: no coroutine per packet beyond the
            # handler's own.
            while queue:
                if self.held and len(queue) < QUEUE_LOW:
                    self._release()
                if seq - reported >= PROGRESS_EVERY:
                    reported = self._report(seq)
                event = queue.popleft()
                delivery = event.seq
                seq = delivery or seq  # read before the handler runs; done after it
                header = event.header
                entry = entries.get(header.tag)
                if entry is None:
                    self._unhandled(header)
                    continue
                decode, handler, is_async = entry
                ctx = Context(header, delivery)
                try:
                    packet = decode(memoryview(event.data)[event.offset :])
                except DECODE_ERRORS as exc:
                    self._fail(ctx, ErrorCode.DECODE_FAILED, decode_failed(header.tag, exc))
                    continue
                try:
                    result = handler(packet, ctx)
                    if is_async:
                        result = await result  # type: ignore[misc]
                except asyncio.CancelledError:
                    raise
                except PermissionDenied as exc:  # a refusal, not a failure: no traceback
                    self._fail(ctx, ErrorCode.PERMISSION_DENIED, exc)
                    continue
                except Exception as exc:
                    log.exception("handler for %r from %r raised", header.tag, header.src)
                    self._fail(ctx, ErrorCode.HANDLER_FAILED, exc, logged=True)
                    continue
                self.handled += 1
                if header.flags & _REQUEST:
                    self._answer(ctx, result)
            if seq != reported:
                reported = self._report(seq)
            self._wakeup = loop.create_future()
            await self._wakeup
            self._wakeup = None

    def _report(self, seq: int) -> int:
        self.done_seq = seq
        if self._progress is not None:
            self._progress(seq, False)
        return seq

    def _answered(self, ctx: Context) -> None:
        """A request is done: acknowledge its delivery now, with its reply, so a crash
        right after answering does not hand the request to the ending's next process."""
        if ctx.seq and self._progress is not None:
            self.done_seq = ctx.seq
            self._progress(ctx.seq, True)

    def _release(self) -> None:
        self.held = False
        if self._hold is not None:
            self._hold(False)

    def _unhandled(self, header: PacketHeader) -> None:
        ctx = Context(header)
        if registry.get(header.tag) is None:
            unknown = UnknownPacketType(f"no packet class is registered under tag {header.tag!r}")
            self._fail(ctx, ErrorCode.UNKNOWN_PACKET_TYPE, unknown)
        else:
            self._fail(
                ctx, ErrorCode.NO_HANDLER, LookupError(f"no handler for packet {header.tag!r}")
            )

    def _answer(self, ctx: Context, result: object) -> None:
        header = ctx.header
        if not isinstance(result, Packet):
            wrong = TypeError(
                f"the handler for request {header.tag!r} returned "
                f"{type(result).__name__}, not a Packet"
            )
            self._fail(ctx, ErrorCode.HANDLER_FAILED, wrong)
            return
        self._answered(ctx)
        try:
            self._send_reply(header, result, None)
        except PayloadTooLarge as exc:
            self._fail(ctx, ErrorCode.PAYLOAD_TOO_LARGE, exc)
        except CodecError as exc:
            self._fail(ctx, ErrorCode.HANDLER_FAILED, exc)
        except ConnectionClosed as exc:
            log.warning("reply to %r from %r dropped: %s", header.tag, header.src, exc)

    def _fail(
        self, ctx: Context, code: ErrorCode, exc: BaseException, logged: bool = False
    ) -> None:
        self.failed += 1
        if ctx.is_request:
            self._answered(ctx)
            try:
                self._send_reply(ctx.header, None, error_body(code, exc))
            except Exception:  # the requester is gone; nothing more to tell
                log.debug("could not send the error reply", exc_info=True)
        elif not logged:
            log.warning("packet %r from %r: %s", ctx.header.tag, ctx.sender, exc)
        hook = self._table.on_unhandled
        if hook is not None:
            hook(exc, ctx)


def remote_error(
    body: bytes | memoryview,
) -> DeliveryError | PermissionDenied | GridError:
    """The exception a requester raises for an error reply."""
    try:
        err = _error_body_decoder.decode(body)
    except DECODE_ERRORS:
        return RemoteError("malformed error reply", "ProtocolError", ErrorCode.PROTOCOL)
    try:
        code = ErrorCode(err.code)
    except ValueError:
        code = ErrorCode.INTERNAL
    if code == ErrorCode.PERMISSION_DENIED:
        return PermissionDenied(err.message)  # the same type as every other denial
    if code == ErrorCode.GRID:
        return GridError(err.message)
    return RemoteError(f"{err.type}: {err.message}", err.type, code)


def service_error(code: int, message: str) -> Exception:
    """The exception for an ERROR frame the service sent about one of our packets."""
    if code == ErrorCode.UNKNOWN_DESTINATION:
        return UnknownDestination(message)
    if code == ErrorCode.PAYLOAD_TOO_LARGE:
        return PayloadTooLarge(message)
    if code == ErrorCode.MAILBOX_FULL:
        return MailboxFull(message)
    if code == ErrorCode.PERMISSION_DENIED:
        return PermissionDenied(message)
    return DeliveryError(f"{message} (code {code})")


class Pending:
    """Requests and acknowledged sends waiting for their answer, by packet id.

    Timeouts share one timer: deadlines go into a heap and a single callback, set for the
    earliest one, expires whatever is due (answered entries are skipped lazily). A timer
    per request would cost a TimerHandle and its cancellation on every request."""

    def __init__(self) -> None:
        # id -> (future, what it waits for, name of the only peer whose reply counts)
        self._waiting: dict[int, tuple[asyncio.Future[Any], str, str | None]] = {}
        self._deadlines: list[tuple[float, int, float]] = []  # (deadline, id, timeout)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    def __len__(self) -> int:
        return len(self._waiting)

    def __contains__(self, packet_id: object) -> bool:
        return packet_id in self._waiting

    def expect(
        self, packet_id: int, timeout: float | None, what: str, replier: str | None = None
    ) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._waiting[packet_id] = (future, what, replier)
        if timeout is not None:
            deadline = loop.time() + timeout
            deadlines = self._deadlines
            if len(deadlines) > 2 * len(self._waiting) + 1024:
                # Mostly answered entries: rebuild so memory follows what is outstanding.
                waiting = self._waiting
                deadlines = self._deadlines = [d for d in deadlines if d[1] in waiting]
                heapq.heapify(deadlines)
            heapq.heappush(deadlines, (deadline, packet_id, timeout))
            if self._timer is None or deadline < self._timer_at:
                self._arm(loop, deadline)
        return future

    def _arm(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = loop.call_at(deadline, self._expire_due)

    def _expire_due(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            _, packet_id, timeout = heapq.heappop(deadlines)
            entry = self._waiting.get(packet_id)
            if entry is None:
                continue  # answered in time
            what = entry[1] if entry[2] is None else f"request {entry[1]!r} to {entry[2]!r}"
            self.fail(packet_id, RequestTimeout(f"no answer to {what} within {timeout:g} s"))
        if deadlines:
            self._arm(loop, deadlines[0][0])

    def forget(self, packet_id: int) -> None:
        self._waiting.pop(packet_id, None)

    def resolve(self, packet_id: int, value: Any) -> bool:
        return self._settle(packet_id, value, None)

    def resolve_reply(self, event: PacketReceived) -> bool:
        """Settle the request ``event`` answers, if it came from the peer asked."""
        header = event.header
        entry = self._waiting.get(header.corr)
        if entry is None or entry[2] != header.src:
            return False
        reply = decode_reply(header, memoryview(event.data)[event.offset :])
        return self._settle(header.corr, reply, None)

    def fail(self, packet_id: int, error: BaseException) -> bool:
        return self._settle(packet_id, None, error)

    def _settle(self, packet_id: int, value: Any, error: BaseException | None) -> bool:
        entry = self._waiting.pop(packet_id, None)
        if entry is None:
            return False
        future = entry[0]
        if not future.done():
            if error is None:
                future.set_result(value)
            else:
                future.set_exception(error)
        return True

    def fail_all(
        self, error: ConnectionClosed, *, acks_only: bool = False, keep: Container[int] = ()
    ) -> None:
        """Fail everything waiting, or with ``acks_only`` only what no peer replies to
        (acknowledgements of sends and group changes): those come from this connection's
        service alone and cannot arrive on the next one. Ids in ``keep`` go on waiting."""
        for packet_id, (_, _, replier) in list(self._waiting.items()):
            if packet_id in keep:
                continue
            if not acks_only or replier is None:
                self._settle(packet_id, None, error)


def decode_reply(header: PacketHeader, payload: memoryview) -> Packet | BaseException:
    """A reply's packet, or the exception the requester should raise."""
    if header.flags & _ERROR:
        return remote_error(payload)
    try:
        return registry.decode(header.tag, payload)
    except CodecError as exc:
        return exc
