"""A peer loop's inbox: one frozen dataclass per kind of item, and the bound on received messages.

Theory of operation
-------------------
Everything a peer loop reacts to, apart from the passage of time, arrives as one of the `Item`
types below and is dispatched on its type. Connection tasks (`bgp.transport`) post `Frame`,
`Closed`, `ReadError`, `Connected`, `ConnectFailed` and `Accepted`; the speaker posts `Sync`,
`Stop` and `BfdChange`. An item naming a `Conn` is ignored by the loop once that connection is
no longer one of the peer's.

Backpressure: at most INBOX_FRAMES received messages wait in an inbox. A reader takes a slot
(`post_frame`) before it posts a frame and `receive` gives it back as it takes the frame out, so a
reader that is that far ahead blocks and stops reading its socket: TCP flow control then holds the
peer back instead of our memory growing. Every other item is posted without waiting (`post`),
often by the loop itself or from synchronous callbacks, and is few by construction (one `Sync`
pending, one item per connection or BFD change), so the loop never waits on its own inbox.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import trio

from bgp.errors import DecodeError

INBOX_FRAMES = 64  # received messages (at most 4096 bytes each) read ahead of a peer's loop


@dataclass(eq=False)
class Conn:
    """One TCP connection (or outgoing attempt) and the tasks that serve it."""

    outgoing: bool
    stream: trio.abc.Stream | None = None
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    reader_done: trio.Event | None = None  # set when the reader task has exited
    torn: bool = False  # a send was cut short mid-message: the stream is unusable for BGP


@dataclass(frozen=True, slots=True)
class Frame:
    """One whole message from `conn` (header checked, not yet decoded: the loop knows the session's AS width)."""

    conn: Conn
    data: bytes


@dataclass(frozen=True, slots=True)
class ReadError:
    """The framer refused what `conn` sent (a bad header): send this NOTIFICATION."""

    conn: Conn
    error: DecodeError


@dataclass(frozen=True, slots=True)
class Closed:
    """`conn` is unusable: the peer closed it, a read or a send failed."""

    conn: Conn
    reason: str


@dataclass(frozen=True, slots=True)
class Connected:
    """Our outgoing attempt `conn` succeeded with `stream`."""

    conn: Conn
    stream: trio.abc.Stream


@dataclass(frozen=True, slots=True)
class ConnectFailed:
    conn: Conn
    reason: str


@dataclass(frozen=True, slots=True)
class Accepted:
    """The listener accepted a connection from this peer's address."""

    stream: trio.abc.Stream


@dataclass(frozen=True, slots=True)
class BfdChange:
    """The peer's BFD session went into or out of Up (`failed`: a failure, RFC 5882 §3.2)."""

    up: bool
    failed: bool
    diag: str


@dataclass(frozen=True, slots=True)
class Sync:
    """The desired RIB changed: send the difference."""


@dataclass(frozen=True, slots=True)
class Stop:
    """Graceful shutdown: withdraw everything, Cease, close; then set `done`."""

    done: trio.Event


Item = Frame | ReadError | Closed | Connected | ConnectFailed | Accepted | BfdChange | Sync | Stop


class Inbox:
    """Unbounded for control items, at most `frames` received messages."""

    def __init__(self, frames: int = INBOX_FRAMES) -> None:
        self.frames = frames
        self.send, self.recv = trio.open_memory_channel[Item](math.inf)
        self._slots = trio.Semaphore(frames)
        self.peak = 0  # most received messages ever waiting (at most `frames`)
        self.reader_waits = 0  # times a reader had to wait for a slot (backpressure)

    def post(self, item: Item) -> None:
        """Post a control item; never waits."""
        self.send.send_nowait(item)

    async def post_frame(self, frame: Frame) -> None:
        """Post a received message once a slot is free; the caller reads nothing meanwhile."""
        if self._slots.value == 0:
            self.reader_waits += 1
        await self._slots.acquire()
        self.send.send_nowait(frame)
        self.peak = max(self.peak, self.frames - self._slots.value)

    async def receive(self) -> Item:
        item = await self.recv.receive()
        if isinstance(item, Frame):
            self._slots.release()  # out of the inbox: the reader may read on
        return item

    def drain(self) -> list[Item]:
        """Whatever is queued, without waiting (on the way out, to close the streams in it)."""
        items: list[Item] = []
        while True:
            try:
                items.append(self.recv.receive_nowait())
            except trio.WouldBlock:
                return items
