"""The BFD session state machine of RFC 5880 §6.2/§6.8, as an enforced table, plus the demultiplexer. No I/O.

Theory of operation
-------------------
One `Session` per peer, asynchronous mode, single hop (RFC 5881), no echo, no demand mode, no
authentication. The I/O layer feeds it received packets (`receive(packet, now)`), the passage of
time (`poll(now)`, at or after `next_deadline()`) and administrative commands; it answers with
actions: `Transmit(packet)` and `StateChange(old, new, diag)`. It never sleeps, reads a clock or
touches a socket; the TX jitter (§6.8.7) comes from an injected `random` in [0, 1).

States and events are those of the §6.2 diagram: a received packet is the event RECV_<its state>,
the detection timer is TIMER, and the local ADMIN_DOWN / ADMIN_UP commands. `TRANSITIONS` maps
(state, event) to (handler, next state); a pair without an entry raises `BfdFsmError`.

Timers (§6.8.2-§6.8.4, §6.8.7):
- Transmit interval = max(bfd.DesiredMinTxInterval, bfd.RemoteMinRxInterval), jittered to
  75-100 % (75-90 % when bfd.DetectMult is 1). While the session is not Up, DesiredMinTxInterval
  is at least 1 s (`slow_tx_us`). A remote Required Min RX of 0 stops periodic transmission.
- Detection time = remote Detect Mult x max(bfd.RequiredMinRxInterval, remote Desired Min TX),
  restarted by every accepted packet. Expiry in Init/Up takes the session Down (diag 1); expiry
  in any state forgets the remote discriminator.
Poll sequence (§6.5, §6.8.3): changing DesiredMinTx or RequiredMinRx while Up (including the
switch from the slow 1 s rate to the configured one on reaching Up) sets P on every packet until
one with F arrives. An increase of DesiredMinTx and a decrease of RequiredMinRx take effect
locally only when the sequence ends; the opposite changes take effect at once. A received P is
answered at once by a packet with F. A packet also goes out at once on every state change.

Who may change a session's state (§6.8.6): `decode` discards a Your Discriminator of zero unless
the packet says Down or AdminDown; `Demux` selects the session by Your Discriminator when it is
non-zero, and otherwise by source address and (when the I/O layer set one) the interface of the
route to the peer, after the TTL 255 check. Once Up, the remote discriminator learned in the
handshake is fixed: `Session.receive` discards (returns `Discard`) any packet whose My
Discriminator differs, whatever its Your Discriminator. So an on-link sender that forges the
peer's address with TTL 255 and Your Discriminator zero cannot take an Up session down without
also knowing the peer's discriminator (only authentication, which lbnode does not implement,
protects against a sender that sniffs it). A peer that restarted with a new discriminator is
therefore detected by the detection timer, which forgets the remote discriminator (§6.8.1); its
next Down packet then starts the handshake again.
"""
from __future__ import annotations

import collections
import enum
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from bgp.bfd.codec import ControlPacket, Diag, DropReason, Malformed, State, decode
from bgp.errors import BgpError

SLOW_TX_US = 1_000_000  # RFC 5880 §6.8.3: at least one second while not Up
TTL_SINGLE_HOP = 255  # RFC 5881 §5


class BfdFsmError(BgpError):
    """An event that has no entry in the transition table for the current state."""


class Event(enum.Enum):
    RECV_ADMIN_DOWN = "recv AdminDown"
    RECV_DOWN = "recv Down"
    RECV_INIT = "recv Init"
    RECV_UP = "recv Up"
    TIMER = "detection time expired"
    ADMIN_DOWN = "admin down"
    ADMIN_UP = "admin up"


RECV_EVENT = {State.ADMIN_DOWN: Event.RECV_ADMIN_DOWN, State.DOWN: Event.RECV_DOWN,
              State.INIT: Event.RECV_INIT, State.UP: Event.RECV_UP}


@dataclass(frozen=True, slots=True)
class Transmit:
    packet: ControlPacket


@dataclass(frozen=True, slots=True)
class StateChange:
    old: State
    new: State
    diag: Diag


@dataclass(frozen=True, slots=True)
class Discard:
    """A received packet that the session discarded (§6.8.6); the I/O layer counts it."""

    reason: DropReason


Action = Transmit | StateChange | Discard


def is_failure(change: StateChange, remote_state: State) -> bool:
    """RFC 5882 §3.2: Up -> Down is a failure of the path, unless the peer took the session down
    administratively (it said AdminDown, so our diag is Neighbor Signaled Session Down): a peer
    shutting down must not make its clients react as to a failure. `remote_state` is the session's
    `remote_state` when the change happened."""
    return (change.old is State.UP and change.new is State.DOWN
            and not (change.diag is Diag.NEIGHBOR_SIGNALED_SESSION_DOWN and remote_state is State.ADMIN_DOWN))


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """What we ask for. Intervals in microseconds, as on the wire."""

    desired_min_tx_us: int = 300_000
    required_min_rx_us: int = 300_000
    detect_mult: int = 3
    slow_tx_us: int = SLOW_TX_US

    @classmethod
    def from_ms(cls, interval_ms: int, multiplier: int) -> SessionConfig:
        return cls(desired_min_tx_us=interval_ms * 1000, required_min_rx_us=interval_ms * 1000,
                   detect_mult=multiplier)


def jitter_factor(r: float, detect_mult: int) -> float:
    """RFC 5880 §6.8.7: 75-100 % of the interval, or 75-90 % when bfd.DetectMult is 1."""
    return 0.75 + (0.15 if detect_mult == 1 else 0.25) * r


@dataclass
class Session:
    """One BFD session. Drive with `start`, `receive`, `poll`, `admin_down`/`admin_up`, `change`."""

    config: SessionConfig
    local_discr: int
    random: Callable[[], float]  # uniform in [0, 1)
    state: State = State.DOWN
    local_diag: Diag = Diag.NONE
    remote_discr: int = 0
    remote_state: State = State.DOWN
    remote_diag: int = 0
    remote_min_rx_us: int = 1  # §6.8.1: initialised to 1
    remote_desired_min_tx_us: int = 0
    remote_detect_mult: int = 0
    poll_active: bool = False
    # Values in effect locally (they lag the advertised ones during a Poll sequence, §6.8.3).
    tx_in_effect_us: int = 0
    rx_in_effect_us: int = 0
    _next_tx: float | None = None
    _last_tx: float | None = None
    _detect_at: float | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.local_discr <= 0xFFFFFFFF:
            raise BgpError(f"local discriminator must be 1..2^32-1, got {self.local_discr}")
        self.tx_in_effect_us = self.desired_min_tx_us
        self.rx_in_effect_us = self.config.required_min_rx_us

    # ---- what we advertise (bfd.DesiredMinTxInterval etc.) ------------------------------------

    @property
    def desired_min_tx_us(self) -> int:
        if self.state is State.UP:
            return self.config.desired_min_tx_us
        return max(self.config.desired_min_tx_us, self.config.slow_tx_us)

    @property
    def required_min_rx_us(self) -> int:
        return self.config.required_min_rx_us

    # ---- negotiated timers -------------------------------------------------------------------

    @property
    def tx_interval_us(self) -> int | None:
        """The interval between periodic packets (before jitter); None: none are sent."""
        if self.remote_min_rx_us == 0:
            return None
        return max(self.tx_in_effect_us, self.remote_min_rx_us)

    @property
    def detection_time_us(self) -> int | None:
        if self.remote_detect_mult == 0:
            return None
        return self.remote_detect_mult * max(self.rx_in_effect_us, self.remote_desired_min_tx_us)

    def next_deadline(self) -> float | None:
        return min((t for t in (self._next_tx, self._detect_at) if t is not None), default=None)

    @property
    def detect_deadline(self) -> float | None:
        return self._detect_at

    # ---- inputs ------------------------------------------------------------------------------

    def start(self, now: float) -> list[Action]:
        """Begin periodic transmission (Active role, §6.1): the first packet goes out now."""
        self._next_tx = now
        return self.poll(now)

    def receive(self, p: ControlPacket, now: float) -> list[Action]:
        """A packet that passed `decode` and the demultiplexer (RFC 5880 §6.8.6, from "set bfd.RemoteDiscr")."""
        if self.state is State.ADMIN_DOWN:
            return self._handle(RECV_EVENT[p.state], now)  # the table discards it
        if self.state is State.UP and p.my_discriminator != self.remote_discr:
            # The peer's discriminator does not change during a session: this is someone else (or a
            # restarted peer, which the detection timer finds). Nothing of it is used, not even timers.
            return [Discard(DropReason.REMOTE_DISCRIMINATOR_CHANGED)]
        self.remote_discr = p.my_discriminator
        self.remote_state = p.state
        self.remote_diag = p.diag
        self.remote_detect_mult = p.detect_mult
        self.remote_desired_min_tx_us = p.desired_min_tx_us
        old_tx = self.tx_interval_us
        self.remote_min_rx_us = p.required_min_rx_us
        if p.final and self.poll_active:
            self._end_poll()
        actions = self._handle(RECV_EVENT[p.state], now)
        # Still not AdminDown: TRANSITIONS has no received-packet entry that leads there.
        detect = self.detection_time_us
        self._detect_at = now + detect / 1e6 if detect is not None else None
        if self.tx_interval_us != old_tx:
            self._reschedule(now)
        if p.poll:
            actions.append(self._transmit(now, final=True, periodic=False))
        return actions

    def poll(self, now: float) -> list[Action]:
        """Fire the detection timer and the periodic transmission if due at `now`."""
        actions: list[Action] = []
        if self._detect_at is not None and now >= self._detect_at:
            self._detect_at = None
            actions += self._handle(Event.TIMER, now)
        if self._next_tx is not None and now >= self._next_tx:
            actions.append(self._transmit(now, final=False, periodic=True))
        return actions

    def admin_down(self, now: float) -> list[Action]:
        return self._handle(Event.ADMIN_DOWN, now)

    def admin_up(self, now: float) -> list[Action]:
        return self._handle(Event.ADMIN_UP, now)

    def change(self, now: float, *, desired_min_tx_us: int | None = None, required_min_rx_us: int | None = None,
               detect_mult: int | None = None) -> list[Action]:
        """Change our parameters (§6.8.3); while Up this runs a Poll sequence."""
        new = replace(self.config,
                      desired_min_tx_us=self.config.desired_min_tx_us if desired_min_tx_us is None
                      else desired_min_tx_us,
                      required_min_rx_us=self.config.required_min_rx_us if required_min_rx_us is None
                      else required_min_rx_us,
                      detect_mult=self.config.detect_mult if detect_mult is None else detect_mult)
        if new == self.config:
            return []
        old_tx_adv, old_rx_adv = self.desired_min_tx_us, self.required_min_rx_us
        self.config = new
        return self._parameters_changed(now, old_tx_adv, old_rx_adv)

    # ---- internals ---------------------------------------------------------------------------

    def _handle(self, event: Event, now: float) -> list[Action]:
        entry = TRANSITIONS.get((self.state, event))
        if entry is None:
            raise BfdFsmError(f"no transition for {event.value} in {self.state.name}")
        handler, new = entry
        old, old_tx_adv, old_rx_adv = self.state, self.desired_min_tx_us, self.required_min_rx_us
        handler(self, now)
        if new is old:
            return []
        self.state = new
        if new is State.UP:
            self.local_diag = Diag.NONE  # the diagnostic tells why the session last went down
        actions: list[Action] = [StateChange(old, new, self.local_diag)]
        if new is State.UP:
            actions += self._parameters_changed(now, old_tx_adv, old_rx_adv, send=False)
        elif old is State.UP:
            self.poll_active = False  # the slow rate applies at once outside Up (§6.8.3)
            self.tx_in_effect_us = self.desired_min_tx_us
            self.rx_in_effect_us = self.required_min_rx_us
            self._reschedule(now)
        if new is State.ADMIN_DOWN:
            self._detect_at = None
        actions.append(self._transmit(now, final=False, periodic=False))  # tell the peer at once
        return actions

    def _parameters_changed(self, now: float, old_tx_adv: int, old_rx_adv: int, send: bool = True) -> list[Action]:
        tx_adv, rx_adv = self.desired_min_tx_us, self.required_min_rx_us
        if self.state is not State.UP:
            self.tx_in_effect_us, self.rx_in_effect_us = tx_adv, rx_adv
            self._reschedule(now)
            return []
        if tx_adv == old_tx_adv and rx_adv == old_rx_adv:
            return []
        self.poll_active = True
        if tx_adv < self.tx_in_effect_us:
            self.tx_in_effect_us = tx_adv  # a faster rate may start at once
            self._reschedule(now)
        if rx_adv > self.rx_in_effect_us:
            self.rx_in_effect_us = rx_adv  # a longer detection time may start at once
        return [self._transmit(now, final=False, periodic=False)] if send else []

    def _end_poll(self) -> None:
        self.poll_active = False
        self.tx_in_effect_us = self.desired_min_tx_us
        self.rx_in_effect_us = self.required_min_rx_us

    def _reschedule(self, now: float) -> None:
        interval = self.tx_interval_us
        if interval is None:
            self._next_tx = None
        elif self._next_tx is not None or self._last_tx is not None:
            base = self._last_tx if self._last_tx is not None else now
            self._next_tx = max(now, base + interval * jitter_factor(self.random(), self.config.detect_mult) / 1e6)

    def _transmit(self, now: float, *, final: bool, periodic: bool) -> Transmit:
        packet = ControlPacket(
            state=self.state, my_discriminator=self.local_discr, your_discriminator=self.remote_discr,
            desired_min_tx_us=self.desired_min_tx_us, required_min_rx_us=self.required_min_rx_us,
            detect_mult=self.config.detect_mult, diag=self.local_diag,
            poll=self.poll_active and not final, final=final)
        if periodic or not final:
            self._last_tx = now
            interval = self.tx_interval_us
            self._next_tx = (None if interval is None else
                             now + interval * jitter_factor(self.random(), self.config.detect_mult) / 1e6)
        return Transmit(packet)


# ---- handlers: set the diagnostic and the remote view; the table says where to go --------------

def _stay(s: Session, now: float) -> None:
    pass


def _neighbor_down(s: Session, now: float) -> None:
    s.local_diag = Diag.NEIGHBOR_SIGNALED_SESSION_DOWN


def _forget_remote(s: Session, now: float) -> None:
    """A detection time without packets: §6.8.1 resets bfd.RemoteDiscr (and what came with it)."""
    s.remote_discr = 0
    s.remote_state = State.DOWN
    s.remote_min_rx_us = 1
    s.remote_detect_mult = 0


def _detect_expired(s: Session, now: float) -> None:
    _forget_remote(s, now)
    s.local_diag = Diag.CONTROL_DETECTION_TIME_EXPIRED


def _admin_down(s: Session, now: float) -> None:
    s.local_diag = Diag.ADMINISTRATIVELY_DOWN


def _admin_up(s: Session, now: float) -> None:
    s.local_diag = Diag.NONE


Handler = Callable[[Session, float], None]
S, E = State, Event

TRANSITIONS: dict[tuple[State, Event], tuple[Handler, State]] = {
    (S.DOWN, E.RECV_ADMIN_DOWN): (_stay, S.DOWN),
    (S.DOWN, E.RECV_DOWN): (_stay, S.INIT),
    (S.DOWN, E.RECV_INIT): (_stay, S.UP),
    (S.DOWN, E.RECV_UP): (_stay, S.DOWN),
    (S.DOWN, E.TIMER): (_forget_remote, S.DOWN),
    (S.DOWN, E.ADMIN_DOWN): (_admin_down, S.ADMIN_DOWN),
    (S.INIT, E.RECV_ADMIN_DOWN): (_neighbor_down, S.DOWN),
    (S.INIT, E.RECV_DOWN): (_stay, S.INIT),
    (S.INIT, E.RECV_INIT): (_stay, S.UP),
    (S.INIT, E.RECV_UP): (_stay, S.UP),
    (S.INIT, E.TIMER): (_detect_expired, S.DOWN),
    (S.INIT, E.ADMIN_DOWN): (_admin_down, S.ADMIN_DOWN),
    (S.UP, E.RECV_ADMIN_DOWN): (_neighbor_down, S.DOWN),
    (S.UP, E.RECV_DOWN): (_neighbor_down, S.DOWN),
    (S.UP, E.RECV_INIT): (_stay, S.UP),
    (S.UP, E.RECV_UP): (_stay, S.UP),
    (S.UP, E.TIMER): (_detect_expired, S.DOWN),
    (S.UP, E.ADMIN_DOWN): (_admin_down, S.ADMIN_DOWN),
    # AdminDown: received packets are discarded (§6.8.6); only ADMIN_UP leaves it.
    (S.ADMIN_DOWN, E.RECV_ADMIN_DOWN): (_stay, S.ADMIN_DOWN),
    (S.ADMIN_DOWN, E.RECV_DOWN): (_stay, S.ADMIN_DOWN),
    (S.ADMIN_DOWN, E.RECV_INIT): (_stay, S.ADMIN_DOWN),
    (S.ADMIN_DOWN, E.RECV_UP): (_stay, S.ADMIN_DOWN),
    (S.ADMIN_DOWN, E.ADMIN_DOWN): (_stay, S.ADMIN_DOWN),
    (S.ADMIN_DOWN, E.ADMIN_UP): (_admin_up, S.DOWN),
}


# ---- demultiplexing (RFC 5880 §6.8.6 session selection, RFC 5881 §5 TTL) -----------------------

@dataclass
class Demux:
    """Checks a datagram and finds its session; counts every drop by reason."""

    by_discr: dict[int, str] = field(default_factory=dict)  # our discriminator -> peer address
    by_peer: dict[str, int] = field(default_factory=dict)
    # peer address -> ifindex of the route to it (None: no route now); peers absent: not checked
    interfaces: dict[str, int | None] = field(default_factory=dict)
    drops: collections.Counter[DropReason] = field(default_factory=collections.Counter)

    def add(self, peer: str, local_discr: int) -> None:
        if local_discr in self.by_discr or peer in self.by_peer:
            raise BgpError(f"BFD session for {peer} or discriminator {local_discr} already exists")
        self.by_discr[local_discr] = peer
        self.by_peer[peer] = local_discr

    def set_interface(self, peer: str, ifindex: int | None) -> None:
        """Accept `peer`'s packets only from interface `ifindex` (None: from none, there is no route)."""
        if peer not in self.by_peer:
            raise BgpError(f"no BFD session for {peer}")
        self.interfaces[peer] = ifindex

    def route(self, data: bytes, ttl: int | None, source: str,
              ifindex: int | None = None) -> tuple[str, ControlPacket] | DropReason:
        """The session (peer address) and packet, or why the datagram was dropped. `ifindex`: the
        interface it arrived on (None: not reported), checked for peers given to `set_interface`."""
        try:
            if ttl != TTL_SINGLE_HOP:
                raise Malformed(DropReason.TTL, f"TTL {ttl}")
            packet = decode(data)
            if packet.your_discriminator:
                peer = self.by_discr.get(packet.your_discriminator)
                if peer is None:
                    raise Malformed(DropReason.UNKNOWN_DISCRIMINATOR)
                if peer != source:
                    raise Malformed(DropReason.WRONG_SOURCE)
            elif source in self.by_peer:
                peer = source
            else:
                raise Malformed(DropReason.UNKNOWN_PEER)
            if peer in self.interfaces and (ifindex is None or ifindex != self.interfaces[peer]):
                raise Malformed(DropReason.WRONG_INTERFACE, f"ifindex {ifindex}, route to {peer}: "
                                                            f"{self.interfaces[peer]}")
        except Malformed as exc:
            self.drops[exc.reason] += 1
            return exc.reason
        return peer, packet
