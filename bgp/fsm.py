"""The BGP session state machine of RFC 4271 §8, as an enforced transition table. No I/O.

Theory of operation
-------------------
One `Fsm` per peer connection attempt cycle. The I/O layer feeds it events (`handle(event, now)`)
and the passage of time (`poll(now)`, at or after `next_deadline()`); it answers with actions
(`Connect`, `Send`, `Close`, `SessionUp`, `SessionDown`, `ResendRoutes`). It never sleeps, reads a
clock or touches a socket; randomness (timer jitter, RFC 4271 §10) comes from an injected source.

Every (state, event) pair that may happen has an entry in `TRANSITIONS`: a handler producing the
actions, and the next state. A pair without an entry is an FSM error (RFC 4271 §8.2.2, RFC 6608):
with an OPEN sent, it is answered with NOTIFICATION 5/<subcode of the state> and the connection
closes; before that the connection is just dropped.

Timers (§8.1.3, §10): ConnectRetry (jittered, with doubling backoff up to a ceiling), IdleHold
(the automatic restart after an error, §8.1.1 DampPeerOscillations, same backoff), Hold (4 minutes
in OpenSent, then the negotiated value; 0 disables Hold and Keepalive) and Keepalive (hold/3).
Hold-time negotiation (§4.2): the smaller of the two; 1 and 2 are refused by the codec with 2/6.
An OPEN is checked against the configuration (`bgp.negotiate`) before it enters the table: an
unacceptable one becomes a MESSAGE_ERROR event carrying the right NOTIFICATION.

BFD (RFC 5882 §3.2): BFD_DOWN, posted by the I/O layer when the peer's BFD session fails, tears
an OpenSent/OpenConfirm/Established session down with Cease/BFD Down (6/10, RFC 9384) and starts
the IdleHold restart, as a hold-timer expiry would; in Idle/Connect/Active it changes nothing.
When the BFD session comes Up again, `set_path_up` resets the backoff and makes a pending restart
or connect retry due at once; retries do not back off while it stays Up.

Collisions (§6.8) when both sides connect: the I/O layer runs a second `Fsm` on the incoming
connection; once both have an OPEN, `bgp.peering.resolve_collision` says which one gets
OPEN_COLLISION_DUMP.

Failures: every way a session ends or fails to come up is recorded as a `Failure` (`failure`): its
kind, the text shown as `last_error`, and for a NOTIFICATION we send because of a bad message, the
decoder's reason. `bgp.peering` decides from the kind, never from the text, what is worth a WARNING.
A TCP_FAILS event may carry the I/O layer's words (`reason`, such as "peer closed the connection"):
they are the failure unless the transition records a more specific one.
"""
from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

from bgp.codec import Keepalive, Message, Notification, Open, RouteRefresh, Update
from bgp.errors import DecodeError
from bgp.negotiate import FsmConfig, Negotiated, negotiate

OPEN_SENT_HOLD_S = 240.0  # RFC 4271 §8.2.2: "a large value (4 minutes)"


class State(enum.Enum):
    IDLE = "Idle"
    CONNECT = "Connect"
    ACTIVE = "Active"
    OPEN_SENT = "OpenSent"
    OPEN_CONFIRM = "OpenConfirm"
    ESTABLISHED = "Established"


class EventKind(enum.Enum):
    """Events of RFC 4271 §8.1, numbered as there where they exist."""

    MANUAL_START = 1
    MANUAL_STOP = 2
    AUTOMATIC_START = 3
    MANUAL_START_PASSIVE = 4
    AUTOMATIC_START_PASSIVE = 5
    CONNECT_RETRY_EXPIRES = 9
    HOLD_EXPIRES = 10
    KEEPALIVE_EXPIRES = 11
    TCP_CONNECTED = 16  # Tcp_CR_Acked: our outgoing connection is up
    TCP_ACCEPTED = 17  # TcpConnectionConfirmed: an incoming connection was accepted
    TCP_FAILS = 18
    OPEN = 19
    MESSAGE_ERROR = 21  # BGPHeaderErr / BGPOpenMsgErr / UpdateMsgErr (21, 22, 28)
    OPEN_COLLISION_DUMP = 23
    NOTIFICATION = 25
    KEEPALIVE = 26
    UPDATE = 27
    ROUTE_REFRESH = 100  # RFC 2918; not in RFC 4271's list
    BFD_DOWN = 101  # RFC 5882 §3.2: the peer's BFD session failed (Up -> Down); not in RFC 4271's list


@dataclass(frozen=True, slots=True)
class Event:
    kind: EventKind
    message: Message | None = None
    error: DecodeError | None = None
    reason: str = ""  # TCP_FAILS: what the I/O layer saw (peer closed, connection error, send failed)


class FailureKind(enum.Enum):
    """Why a session ended or did not come up."""

    STOPPED = "stopped"  # ManualStop (our own shutdown)
    HOLD_EXPIRED = "hold expired"
    MESSAGE_ERROR = "message error"  # we sent the NOTIFICATION a malformed or unacceptable message calls for
    NOTIFICATION = "notification"  # the peer sent one
    CONNECTION_LOST = "connection lost"
    TRANSPORT = "transport"  # the I/O layer's reason for a TCP_FAILS
    COLLISION = "collision"  # this connection lost a collision (§6.8)
    BFD_DOWN = "BFD down"
    FSM_ERROR = "FSM error"


@dataclass(frozen=True, slots=True)
class Failure:
    kind: FailureKind
    text: str  # as shown in logs and `last_error`
    detail: str = ""  # MESSAGE_ERROR: the decoder's reason for the NOTIFICATION we sent


def event_for(msg: Message) -> Event:
    """The event a received message is."""
    kinds = {Open: EventKind.OPEN, Keepalive: EventKind.KEEPALIVE, Update: EventKind.UPDATE,
             Notification: EventKind.NOTIFICATION, RouteRefresh: EventKind.ROUTE_REFRESH}
    return Event(kinds[type(msg)], message=msg)


# Actions the I/O layer carries out, in order.
@dataclass(frozen=True, slots=True)
class Connect:
    """Start an outgoing TCP connection (abandoning any attempt in progress)."""


@dataclass(frozen=True, slots=True)
class Send:
    message: Message


@dataclass(frozen=True, slots=True)
class Close:
    """Close the connection (or abandon the attempt)."""


@dataclass(frozen=True, slots=True)
class SessionUp:
    negotiated: Negotiated


@dataclass(frozen=True, slots=True)
class SessionDown:
    reason: str


@dataclass(frozen=True, slots=True)
class ResendRoutes:
    """The peer asked for a ROUTE-REFRESH of this family: send it everything again."""

    afi: int
    safi: int


Action = Connect | Send | Close | SessionUp | SessionDown | ResendRoutes


class Timer(enum.Enum):
    CONNECT_RETRY = "ConnectRetry"
    IDLE_HOLD = "IdleHold"
    HOLD = "Hold"
    KEEPALIVE = "Keepalive"


_TIMER_EVENTS = {Timer.CONNECT_RETRY: EventKind.CONNECT_RETRY_EXPIRES, Timer.HOLD: EventKind.HOLD_EXPIRES,
                 Timer.KEEPALIVE: EventKind.KEEPALIVE_EXPIRES}

# RFC 6608: FSM error subcodes by state.
_FSM_ERROR_SUBCODE = {State.OPEN_SENT: 1, State.OPEN_CONFIRM: 2, State.ESTABLISHED: 3}

S, E = State, EventKind
Handler = Callable[["Fsm", Event, float], list[Action]]


@dataclass
class Fsm:
    """One peer's session state machine. Drive with `handle` and `poll`; read `state`."""

    config: FsmConfig
    random: Callable[[], float]  # uniform in [0, 1); jitter source
    state: State = State.IDLE
    negotiated: Negotiated | None = None
    peer_open: Open | None = None
    failure: Failure | None = None  # the latest reason a session ended or did not come up
    stopped: bool = True
    path_up: bool = False  # BFD says the path to the peer works (see `set_path_up`)
    _timers: dict[Timer, float] = field(default_factory=dict)
    _retry_s: float = 0.0

    def __post_init__(self) -> None:
        self._retry_s = self.config.connect_retry_s

    # ---- public API -------------------------------------------------------------------------

    @property
    def last_error(self) -> str:
        return self.failure.text if self.failure is not None else ""

    def handle(self, event: Event, now: float) -> list[Action]:
        """Apply one event; returns the actions to carry out, in order."""
        if event.kind is E.OPEN and self.state is S.OPEN_SENT:
            assert isinstance(event.message, Open)
            try:
                self.negotiated = negotiate(self.config, event.message)
                self.peer_open = event.message
            except DecodeError as exc:
                event = Event(E.MESSAGE_ERROR, error=exc)
        if event.kind is E.TCP_FAILS and event.reason:
            self.failure = Failure(FailureKind.TRANSPORT, event.reason)
        entry = TRANSITIONS.get((self.state, event.kind))
        old = self.state
        if entry is None:
            actions, new = self._fsm_error(event, now)
        else:
            handler, new = entry
            actions = handler(self, event, now)
        self.state = new
        if old is S.ESTABLISHED and new is not S.ESTABLISHED:
            actions.append(SessionDown(self.last_error or event.kind.name))
        if new is S.IDLE:
            self.negotiated = None
            for t in (Timer.CONNECT_RETRY, Timer.HOLD, Timer.KEEPALIVE):
                self._timers.pop(t, None)
        return actions

    def poll(self, now: float) -> list[Action]:
        """Fire every timer due at `now`."""
        actions: list[Action] = []
        while True:
            due = [t for t, d in self._timers.items() if d <= now]
            if not due:
                return actions
            timer = min(due, key=lambda t: self._timers[t])
            del self._timers[timer]
            if timer is Timer.IDLE_HOLD:
                kind = E.AUTOMATIC_START_PASSIVE if self.config.passive else E.AUTOMATIC_START
            else:
                kind = _TIMER_EVENTS[timer]
            actions += self.handle(Event(kind), now)

    def next_deadline(self) -> float | None:
        return min(self._timers.values(), default=None)

    def set_path_up(self, up: bool, now: float) -> None:
        """BFD's word on the path to the peer. The backoff damps a peer that keeps failing (§8.1.1
        DampPeerOscillations); while the path was down it only grew, and would keep a node out of
        service long after its link came back. So Up resets it and makes a pending automatic
        restart (IdleHold) or ConnectRetry due now; and while the path stays up, retries keep the
        first interval: the peer is only refusing for a while (its own damping, such as BIRD's
        `error wait time`). An attempt under way (Connect) gets one first interval. Not a state
        transition: the timer fires through `poll` and the table."""
        self.path_up = up
        if not up:
            return
        self._retry_s = self.config.connect_retry_s
        if self.state is S.IDLE and Timer.IDLE_HOLD in self._timers:
            self._timers[Timer.IDLE_HOLD] = now
        elif self.state is S.ACTIVE and Timer.CONNECT_RETRY in self._timers:
            self._timers[Timer.CONNECT_RETRY] = now
        elif self.state is S.CONNECT and Timer.CONNECT_RETRY in self._timers:
            # An attempt is under way (its SYN may be in the kernel's retransmission backoff):
            # give it one first interval, not what the backoff had grown to.
            self._timers[Timer.CONNECT_RETRY] = min(self._timers[Timer.CONNECT_RETRY],
                                                    now + self._jittered(self._retry_s))

    def timer(self, timer: Timer) -> float | None:
        return self._timers.get(timer)

    # ---- helpers ----------------------------------------------------------------------------

    def _jittered(self, seconds: float) -> float:
        return seconds * (0.75 + 0.25 * self.random())  # RFC 4271 §10

    def _backoff(self, now: float, timer: Timer) -> None:
        self._timers[timer] = now + self._jittered(self._retry_s)
        if not self.path_up:
            self._retry_s = min(self._retry_s * 2, self.config.connect_retry_max_s)

    def _start_hold(self, now: float) -> None:
        assert self.negotiated is not None
        if self.negotiated.hold_time_s:
            self._timers[Timer.HOLD] = now + self.negotiated.hold_time_s
            self._timers.setdefault(Timer.KEEPALIVE, now + self.negotiated.keepalive_s)
        else:
            self._timers.pop(Timer.HOLD, None)
            self._timers.pop(Timer.KEEPALIVE, None)

    def _fail(self, now: float, failure: Failure) -> None:
        """Session lost: remember why and schedule the automatic restart."""
        self.failure = failure
        if not self.stopped:
            self._backoff(now, Timer.IDLE_HOLD)

    def _fsm_error(self, event: Event, now: float) -> tuple[list[Action], State]:
        reason = Failure(FailureKind.FSM_ERROR, f"FSM error: {event.kind.name} in {self.state.value}")
        if self.state is S.IDLE:
            # No connection exists in Idle; an incoming one is refused, anything else is stray.
            return ([Close()] if event.kind is E.TCP_ACCEPTED else []), S.IDLE
        self._fail(now, reason)
        subcode = _FSM_ERROR_SUBCODE.get(self.state)
        if subcode is None:
            return [Close()], S.IDLE
        return [Send(Notification(5, subcode)), Close()], S.IDLE


# ---- handlers ---------------------------------------------------------------------------------

def _start_active(f: Fsm, ev: Event, now: float) -> list[Action]:
    f.stopped = False
    f._timers.pop(Timer.IDLE_HOLD, None)
    f._timers[Timer.CONNECT_RETRY] = now + f._jittered(f._retry_s)
    return [Connect()]


def _start_passive(f: Fsm, ev: Event, now: float) -> list[Action]:
    f.stopped = False
    f._timers.pop(Timer.IDLE_HOLD, None)
    return []


def _stop_quiet(f: Fsm, ev: Event, now: float) -> list[Action]:
    f.stopped = True
    f._timers.pop(Timer.IDLE_HOLD, None)
    f.failure = Failure(FailureKind.STOPPED, "stopped")
    return []


def _stop_close(f: Fsm, ev: Event, now: float) -> list[Action]:
    _stop_quiet(f, ev, now)
    return [Close()]


def _stop_cease(f: Fsm, ev: Event, now: float) -> list[Action]:
    _stop_quiet(f, ev, now)
    return [Send(Notification(6, 2)), Close()]  # Cease / Administrative Shutdown (RFC 4486)


def _retry_connect(f: Fsm, ev: Event, now: float) -> list[Action]:
    f._backoff(now, Timer.CONNECT_RETRY)
    return [Close(), Connect()]


def _connect_again(f: Fsm, ev: Event, now: float) -> list[Action]:
    f._backoff(now, Timer.CONNECT_RETRY)
    return [Connect()]


def _connect_failed(f: Fsm, ev: Event, now: float) -> list[Action]:
    """The outgoing attempt failed: wait in Active (incoming still welcome), retry later."""
    f._backoff(now, Timer.CONNECT_RETRY)
    return [Close()]


def _send_open(f: Fsm, ev: Event, now: float) -> list[Action]:
    f._timers.pop(Timer.CONNECT_RETRY, None)
    f._timers[Timer.HOLD] = now + OPEN_SENT_HOLD_S
    return [Send(f.config.open_message())]


def _lost_in_open_sent(f: Fsm, ev: Event, now: float) -> list[Action]:
    """RFC 4271: OpenSent + TcpConnectionFails -> Active with ConnectRetry running."""
    f._timers.pop(Timer.HOLD, None)
    f.failure = Failure(FailureKind.CONNECTION_LOST, "connection lost in OpenSent")
    if not f.config.passive:
        f._backoff(now, Timer.CONNECT_RETRY)
    return [Close()]


def _open_accepted(f: Fsm, ev: Event, now: float) -> list[Action]:
    f._timers.pop(Timer.KEEPALIVE, None)
    f._start_hold(now)
    return [Send(Keepalive())]


def _established(f: Fsm, ev: Event, now: float) -> list[Action]:
    assert f.negotiated is not None
    f._retry_s = f.config.connect_retry_s  # backoff resets once a session works
    f.failure = None
    f._start_hold(now)
    return [SessionUp(f.negotiated)]


def _restart_hold(f: Fsm, ev: Event, now: float) -> list[Action]:
    f._start_hold(now)
    return []


def _send_keepalive(f: Fsm, ev: Event, now: float) -> list[Action]:
    assert f.negotiated is not None
    f._timers[Timer.KEEPALIVE] = now + f.negotiated.keepalive_s
    return [Send(Keepalive())]


def _route_refresh(f: Fsm, ev: Event, now: float) -> list[Action]:
    assert isinstance(ev.message, RouteRefresh) and f.negotiated is not None
    f._start_hold(now)
    if (ev.message.afi, ev.message.safi) in f.negotiated.families:
        return [ResendRoutes(ev.message.afi, ev.message.safi)]
    return []  # RFC 2918 §4: a family not advertised is ignored


def _hold_expired(f: Fsm, ev: Event, now: float) -> list[Action]:
    f._fail(now, Failure(FailureKind.HOLD_EXPIRED, "hold timer expired"))
    return [Send(Notification(4, 0)), Close()]


def _message_error(f: Fsm, ev: Event, now: float) -> list[Action]:
    assert ev.error is not None
    f._fail(now, Failure(FailureKind.MESSAGE_ERROR, f"sent NOTIFICATION {ev.error}", ev.error.reason))
    return [Send(Notification(ev.error.code, ev.error.subcode, ev.error.data)), Close()]


def _notification(f: Fsm, ev: Event, now: float) -> list[Action]:
    assert isinstance(ev.message, Notification)
    f._fail(now, Failure(FailureKind.NOTIFICATION, f"received NOTIFICATION {ev.message.code}/{ev.message.subcode}"))
    return [Close()]


def _connection_lost(f: Fsm, ev: Event, now: float) -> list[Action]:
    f._fail(now, Failure(FailureKind.CONNECTION_LOST, "connection lost"))
    return [Close()]


def _collision_dump(f: Fsm, ev: Event, now: float) -> list[Action]:
    f.failure = Failure(FailureKind.COLLISION, "connection collision")
    f.stopped = True  # this FSM's connection is given up; the winner carries on
    return [Send(Notification(6, 7)), Close()]  # Cease / Connection Collision Resolution


def _bfd_down(f: Fsm, ev: Event, now: float) -> list[Action]:
    """The forwarding path to the peer is gone: drop the session, restart per IdleHold (RFC 5882 §3.2)."""
    f._fail(now, Failure(FailureKind.BFD_DOWN, "BFD session down"))
    return [Send(Notification(6, 10)), Close()]  # Cease / BFD Down (RFC 9384)


def _ignore(f: Fsm, ev: Event, now: float) -> list[Action]:
    return []


def _refuse(f: Fsm, ev: Event, now: float) -> list[Action]:
    return [Close()]


_SESSION = (S.OPEN_SENT, S.OPEN_CONFIRM, S.ESTABLISHED)

TRANSITIONS: dict[tuple[State, EventKind], tuple[Handler, State]] = {
    # Idle: starts; incoming connections refused; stray timers/stop ignored.
    (S.IDLE, E.MANUAL_START): (_start_active, S.CONNECT),
    (S.IDLE, E.AUTOMATIC_START): (_start_active, S.CONNECT),
    (S.IDLE, E.MANUAL_START_PASSIVE): (_start_passive, S.ACTIVE),
    (S.IDLE, E.AUTOMATIC_START_PASSIVE): (_start_passive, S.ACTIVE),
    (S.IDLE, E.MANUAL_STOP): (_stop_quiet, S.IDLE),
    (S.IDLE, E.TCP_ACCEPTED): (_refuse, S.IDLE),
    (S.IDLE, E.TCP_FAILS): (_ignore, S.IDLE),
    # Connect: an outgoing attempt is in progress.
    (S.CONNECT, E.MANUAL_START): (_ignore, S.CONNECT),
    (S.CONNECT, E.MANUAL_STOP): (_stop_close, S.IDLE),
    (S.CONNECT, E.CONNECT_RETRY_EXPIRES): (_retry_connect, S.CONNECT),
    (S.CONNECT, E.TCP_CONNECTED): (_send_open, S.OPEN_SENT),
    (S.CONNECT, E.TCP_ACCEPTED): (_send_open, S.OPEN_SENT),
    (S.CONNECT, E.TCP_FAILS): (_connect_failed, S.ACTIVE),
    # Active: waiting for the peer to connect (and for ConnectRetry, unless passive).
    (S.ACTIVE, E.MANUAL_START): (_ignore, S.ACTIVE),
    (S.ACTIVE, E.MANUAL_START_PASSIVE): (_ignore, S.ACTIVE),
    (S.ACTIVE, E.MANUAL_STOP): (_stop_quiet, S.IDLE),
    (S.ACTIVE, E.CONNECT_RETRY_EXPIRES): (_connect_again, S.CONNECT),
    (S.ACTIVE, E.TCP_ACCEPTED): (_send_open, S.OPEN_SENT),
    (S.ACTIVE, E.TCP_FAILS): (_ignore, S.ACTIVE),
    # OpenSent: our OPEN is out, waiting for theirs.
    (S.OPEN_SENT, E.OPEN): (_open_accepted, S.OPEN_CONFIRM),
    (S.OPEN_SENT, E.TCP_FAILS): (_lost_in_open_sent, S.ACTIVE),
    # OpenConfirm: OPENs exchanged, waiting for their KEEPALIVE.
    (S.OPEN_CONFIRM, E.KEEPALIVE): (_established, S.ESTABLISHED),
    (S.OPEN_CONFIRM, E.KEEPALIVE_EXPIRES): (_send_keepalive, S.OPEN_CONFIRM),
    (S.OPEN_CONFIRM, E.OPEN_COLLISION_DUMP): (_collision_dump, S.IDLE),
    (S.OPEN_CONFIRM, E.TCP_FAILS): (_connection_lost, S.IDLE),
    # Established.
    (S.ESTABLISHED, E.KEEPALIVE): (_restart_hold, S.ESTABLISHED),
    (S.ESTABLISHED, E.UPDATE): (_restart_hold, S.ESTABLISHED),
    (S.ESTABLISHED, E.ROUTE_REFRESH): (_route_refresh, S.ESTABLISHED),
    (S.ESTABLISHED, E.KEEPALIVE_EXPIRES): (_send_keepalive, S.ESTABLISHED),
    (S.ESTABLISHED, E.TCP_FAILS): (_connection_lost, S.IDLE),
}
for _s in _SESSION:
    TRANSITIONS[(_s, E.MANUAL_STOP)] = (_stop_cease, S.IDLE)
    TRANSITIONS[(_s, E.HOLD_EXPIRES)] = (_hold_expired, S.IDLE)
    TRANSITIONS[(_s, E.MESSAGE_ERROR)] = (_message_error, S.IDLE)
    TRANSITIONS[(_s, E.NOTIFICATION)] = (_notification, S.IDLE)
    TRANSITIONS[(_s, E.MANUAL_START)] = (_ignore, _s)
    TRANSITIONS[(_s, E.BFD_DOWN)] = (_bfd_down, S.IDLE)
for _s in (S.IDLE, S.CONNECT, S.ACTIVE):
    TRANSITIONS[(_s, E.BFD_DOWN)] = (_ignore, _s)  # no session to tear down; a connect attempt fails by itself
TRANSITIONS[(S.OPEN_SENT, E.OPEN_COLLISION_DUMP)] = (_collision_dump, S.IDLE)
for _s in (S.CONNECT, S.ACTIVE):
    # Before any OPEN: a message error on the (just accepted) connection just drops it.
    TRANSITIONS[(_s, E.MESSAGE_ERROR)] = (_connection_lost, S.IDLE)
