"""One peer's state in the speaker: its FSM (two while a collision is resolved), their connections,
its inbox, its Adj-RIB-Out and counters, and the snapshot built from them.

Touched only by the peer's loop in `bgp.speaker` (and read by `snapshot()`); no tasks, no logging.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import trio

from bgp.bfd.session import BfdStatus
from bgp.config import PeerConfig
from bgp.fsm import Fsm, State
from bgp.inbox import Conn, Inbox, Item
from bgp.rib import AdjRibOut
from bpf.loglimit import LogLimiter

FLAP_LOG_INTERVAL_S = 60.0  # at most one INFO line per peer per interval for Idle/Connect/Active flaps


@dataclass(frozen=True, slots=True)
class PeerStatus:
    """A snapshot of one peer for status output."""

    address: str
    state: str
    established_count: int
    received_updates: int
    treat_as_withdraw: int
    bfd_downs: int  # BGP sessions torn down because BFD failed
    inbox_peak: int  # most received messages ever waiting in the inbox (at most INBOX_FRAMES)
    reader_waits: int  # times a reader stopped reading because the inbox was full (backpressure)
    last_error: str
    bfd: BfdStatus | None


@dataclass(eq=False)
class Peer:
    config: PeerConfig
    fsm: Fsm
    inbox: Inbox = field(default_factory=Inbox)
    conn: Conn | None = None  # the connection the FSM drives
    other: tuple[Fsm, Conn] | None = None  # a colliding incoming connection and its FSM
    adj_out: AdjRibOut = field(default_factory=AdjRibOut)
    sync_pending: bool = False
    established_count: int = 0
    up: trio.Event = field(default_factory=trio.Event)
    received_updates: int = 0
    treat_as_withdraw: int = 0  # received UPDATEs with attribute errors (RFC 7606), ignored
    bfd_downs: int = 0
    last_error: str = ""  # the latest reason a session failed or did not come up
    flap_log: LogLimiter = field(default_factory=lambda: LogLimiter(FLAP_LOG_INTERVAL_S))  # Idle/Connect/Active logs
    state_before: State = State.IDLE  # the FSM's state before the event whose actions are being carried out

    @property
    def inbox_recv(self) -> trio.MemoryReceiveChannel[Item]:
        return self.inbox.recv

    def fsms(self) -> list[tuple[Fsm, Conn | None]]:
        """The peer's FSM and its connection, then the colliding one if any."""
        out: list[tuple[Fsm, Conn | None]] = [(self.fsm, self.conn)]
        if self.other is not None:
            out.append(self.other)
        return out

    def fsm_for(self, conn: Conn) -> Fsm | None:
        """The FSM `conn` belongs to; None for a connection already given up."""
        if self.conn is conn:
            return self.fsm
        if self.other is not None and self.other[1] is conn:
            return self.other[0]
        return None

    def next_deadline(self) -> float:
        """The earliest deadline of either FSM (inf: none)."""
        return min((d for fsm, _ in self.fsms() if (d := fsm.next_deadline()) is not None), default=math.inf)

    def promote_other(self) -> None:
        """The primary connection is gone: the colliding one becomes the peer's FSM."""
        assert self.other is not None
        self.fsm, self.conn = self.other
        self.other = None

    def status(self, bfd: BfdStatus | None) -> PeerStatus:
        return PeerStatus(address=str(self.config.address), state=self.fsm.state.value,
                          established_count=self.established_count, received_updates=self.received_updates,
                          treat_as_withdraw=self.treat_as_withdraw, bfd_downs=self.bfd_downs,
                          inbox_peak=self.inbox.peak, reader_waits=self.inbox.reader_waits,
                          last_error=self.last_error or self.fsm.last_error, bfd=bfd)
