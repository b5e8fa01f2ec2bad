"""The RFC 4271 §8 state machine: table walks with a virtual clock, asserting the state each step."""
from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from bgp.codec import FourOctetAsCap, Keepalive, MultiprotocolCap, Notification, Open, RouteRefresh, Update
from bgp.errors import DecodeError
from bgp.fsm import (
    TRANSITIONS,
    Close,
    Connect,
    Event,
    EventKind,
    FailureKind,
    Fsm,
    ResendRoutes,
    Send,
    SessionDown,
    SessionUp,
    State,
    Timer,
    event_for,
)
from bgp.negotiate import FsmConfig
from bgp.peering import collision_loser

pytestmark = pytest.mark.unit

E, S = EventKind, State
LOCAL, PEER = IPv4Address("10.0.0.1"), IPv4Address("10.0.0.254")
CFG = FsmConfig(local_as=4200000001, peer_as=65000, router_id=LOCAL, hold_time_s=9, connect_retry_s=4.0,
                connect_retry_max_s=30.0)
PEER_OPEN = Open(65000, 6, PEER, (MultiprotocolCap(1, 1), FourOctetAsCap(65000)))


def fsm(cfg: FsmConfig = CFG) -> Fsm:
    return Fsm(cfg, random=lambda: 0.0)  # jitter factor 0.75 exactly


def kinds(actions: list) -> list[str]:
    return [type(a).__name__ if not isinstance(a, Send) else f"Send({type(a.message).__name__})" for a in actions]


def established(f: Fsm, now: float = 0.0) -> Fsm:
    f.handle(Event(E.MANUAL_START), now)
    f.handle(Event(E.TCP_CONNECTED), now)
    f.handle(event_for(PEER_OPEN), now)
    f.handle(event_for(Keepalive()), now)
    assert f.state is S.ESTABLISHED
    return f


def test_active_open_walk_to_established_with_state_after_each_step() -> None:
    f = fsm()
    steps = [
        (0.0, Event(E.MANUAL_START), S.CONNECT, ["Connect"]),
        (0.1, Event(E.TCP_CONNECTED), S.OPEN_SENT, ["Send(Open)"]),
        (0.2, event_for(PEER_OPEN), S.OPEN_CONFIRM, ["Send(Keepalive)"]),
        (0.3, event_for(Keepalive()), S.ESTABLISHED, ["SessionUp"]),
        (0.4, event_for(Update()), S.ESTABLISHED, []),
    ]
    for now, ev, state, acts in steps:
        assert kinds(f.handle(ev, now)) == acts
        assert f.state is state
    assert f.negotiated is not None
    assert (f.negotiated.hold_time_s, f.negotiated.keepalive_s) == (6, 2.0)  # min(9, 6), hold/3
    assert f.negotiated.families == frozenset({(1, 1)}) and f.negotiated.four_octet_as and not f.negotiated.ibgp
    sent_open = f.config.open_message()
    assert sent_open.my_as == 23456 and sent_open.asn == 4200000001


def test_keepalive_every_third_of_hold_and_hold_expiry_sends_4_0() -> None:
    f = established(fsm(), 0.3)
    assert f.next_deadline() == pytest.approx(2.3)
    assert f.poll(2.29) == []
    assert kinds(f.poll(2.3)) == ["Send(Keepalive)"]
    assert f.timer(Timer.KEEPALIVE) == pytest.approx(4.3)
    f.handle(event_for(Keepalive()), 3.0)  # restarts Hold: 3.0 + 6
    assert f.timer(Timer.HOLD) == pytest.approx(9.0)
    acts, times = [], []
    while f.state is S.ESTABLISHED:  # the I/O layer wakes at each deadline
        times.append(f.next_deadline() or 0.0)
        acts += f.poll(times[-1])
    assert times == pytest.approx([4.3, 6.3, 8.3, 9.0])  # keepalives, then hold expiry
    assert kinds(acts) == ["Send(Keepalive)"] * 3 + ["Send(Notification)", "Close", "SessionDown"]
    assert acts[-3] == Send(Notification(4, 0))
    assert f.state is S.IDLE
    assert f.timer(Timer.IDLE_HOLD) == pytest.approx(9.0 + 4.0 * 0.75)  # automatic restart scheduled


def test_hold_time_zero_disables_hold_and_keepalive() -> None:
    f = fsm()
    f.handle(Event(E.MANUAL_START), 0)
    f.handle(Event(E.TCP_CONNECTED), 0)
    f.handle(event_for(Open(65000, 0, PEER, (FourOctetAsCap(65000),))), 0)
    f.handle(event_for(Keepalive()), 0)
    assert f.state is S.ESTABLISHED and f.next_deadline() is None


def test_connect_retry_backoff_with_jitter_and_ceiling() -> None:
    draws = iter([1.0, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0])
    f = Fsm(CFG, random=lambda: next(draws))
    assert kinds(f.handle(Event(E.MANUAL_START), 0)) == ["Connect"]
    assert f.timer(Timer.CONNECT_RETRY) == pytest.approx(4.0)  # factor 1.0
    assert kinds(f.handle(Event(E.TCP_FAILS), 1)) == ["Close"]
    assert f.state is S.ACTIVE and f.timer(Timer.CONNECT_RETRY) == pytest.approx(1 + 4 * 0.75)
    assert kinds(f.poll(4)) == ["Connect"]
    assert f.state is S.CONNECT and f.timer(Timer.CONNECT_RETRY) == pytest.approx(4 + 8 * 0.875)
    gaps = []
    now = 4.0
    for _ in range(4):  # timeouts in Connect: abandon the attempt, try again, back off
        now = f.next_deadline() or 0.0
        assert kinds(f.poll(now)) == ["Close", "Connect"]
        gaps.append((f.next_deadline() or 0.0) - now)
    assert gaps == pytest.approx([16 * 0.75, 30 * 0.75, 30 * 0.75, 30 * 0.75])


@pytest.mark.parametrize("via", ["idle-hold", "connect-retry"])
def test_path_up_skips_the_backoff_that_grew_while_the_path_was_down(via: str) -> None:
    """BFD Up again: the pending restart or retry fires at once, and the backoff starts over."""
    f = established(fsm())
    now = 1.0
    assert kinds(f.handle(Event(E.BFD_DOWN), now)) == ["Send(Notification)", "Close", "SessionDown"]
    for _ in range(3):  # the link is down: every attempt fails and the backoff doubles
        now = f.next_deadline() or 0.0
        f.poll(now)
        if f.state is S.CONNECT:
            f.handle(Event(E.TCP_FAILS), now)
    if via == "idle-hold":
        f.handle(Event(E.BFD_DOWN), now)  # still Active: nothing to tear down
        f.handle(Event(E.MANUAL_STOP), now)
        f.handle(Event(E.MANUAL_START), now)
        f.handle(Event(E.TCP_CONNECTED), now)
        f.handle(event_for(PEER_OPEN), now)
        f.handle(Event(E.HOLD_EXPIRES), now)  # a session lost again: Idle with IdleHold pending
        assert f.state is S.IDLE and f.timer(Timer.IDLE_HOLD) is not None
    pending = (f.next_deadline() or 0.0) - now
    assert pending > CFG.connect_retry_s  # grown past the first interval
    now += 0.5
    f.set_path_up(True, now)
    assert f.next_deadline() == pytest.approx(now)
    actions = f.poll(now)
    assert "Connect" in kinds(actions) and f.state is S.CONNECT
    first = CFG.connect_retry_s * 0.75
    assert f.timer(Timer.CONNECT_RETRY) == pytest.approx(now + first)
    # The peer keeps refusing for a while (its own damping): while the path is up, no backoff.
    for _ in range(3):
        now = f.next_deadline() or 0.0
        assert kinds(f.poll(now)) == ["Close", "Connect"]
        assert f.timer(Timer.CONNECT_RETRY) == pytest.approx(now + first)
    f.set_path_up(False, now)  # down again: back to backing off
    now = f.next_deadline() or 0.0
    f.poll(now)
    assert (f.next_deadline() or 0.0) - now == pytest.approx(first)
    now = f.next_deadline() or 0.0
    f.poll(now)
    assert (f.next_deadline() or 0.0) - now == pytest.approx(2 * first)


def test_path_up_leaves_a_stopped_or_working_session_alone() -> None:
    f = fsm()
    f.set_path_up(True, 5.0)
    assert f.state is S.IDLE and f.next_deadline() is None
    f = established(fsm())
    deadline = f.next_deadline()
    f.set_path_up(True, 0.5)
    assert f.state is S.ESTABLISHED and f.next_deadline() == deadline


def test_passive_waits_in_active_and_accepts() -> None:
    f = fsm(FsmConfig(local_as=65000, peer_as=65000, router_id=LOCAL, passive=True))
    assert f.handle(Event(E.MANUAL_START_PASSIVE), 0) == [] and f.state is S.ACTIVE
    assert f.next_deadline() is None  # never connects out
    assert kinds(f.handle(Event(E.TCP_ACCEPTED), 1)) == ["Send(Open)"] and f.state is S.OPEN_SENT
    f.handle(event_for(Open(65000, 90, PEER)), 1)  # no capabilities: IPv4 unicast implied
    assert f.state is S.OPEN_CONFIRM and f.negotiated is not None
    assert f.negotiated.ibgp and f.negotiated.families == frozenset({(1, 1)}) and not f.negotiated.four_octet_as


@pytest.mark.parametrize("peer_open,code,subcode", [
    (Open(65001, 90, PEER, (FourOctetAsCap(65001),)), 2, 2),  # wrong AS
    (Open(65000, 90, PEER, (FourOctetAsCap(4200000009),)), 2, 2),  # 4-octet AS disagrees with config
    (Open(65001, 90, PEER, (FourOctetAsCap(65000),)), 2, 2),  # My AS contradicts the capability
])
def test_unacceptable_open_gets_open_message_error(peer_open: Open, code: int, subcode: int) -> None:
    f = fsm()
    f.handle(Event(E.MANUAL_START), 0)
    f.handle(Event(E.TCP_CONNECTED), 0)
    acts = f.handle(event_for(peer_open), 0)
    assert acts == [Send(Notification(code, subcode)), Close()] and f.state is S.IDLE


def test_ibgp_peer_with_our_identifier_is_refused() -> None:
    f = fsm(FsmConfig(local_as=65000, peer_as=65000, router_id=LOCAL))
    f.handle(Event(E.MANUAL_START), 0)
    f.handle(Event(E.TCP_CONNECTED), 0)
    assert f.handle(event_for(Open(65000, 90, LOCAL)), 0)[0] == Send(Notification(2, 3))


@pytest.mark.parametrize("state_after,event,subcode", [
    ("open_sent", event_for(Keepalive()), 1),
    ("open_sent", event_for(Update()), 1),
    ("open_confirm", event_for(Update()), 2),
    ("open_confirm", event_for(PEER_OPEN), 2),
    ("established", event_for(PEER_OPEN), 3),
])
def test_event_without_table_entry_is_an_fsm_error(state_after: str, event: Event, subcode: int) -> None:
    f = fsm()
    f.handle(Event(E.MANUAL_START), 0)
    f.handle(Event(E.TCP_CONNECTED), 0)
    if state_after != "open_sent":
        f.handle(event_for(PEER_OPEN), 0)
    if state_after == "established":
        f.handle(event_for(Keepalive()), 0)
    assert (f.state, event.kind) not in TRANSITIONS
    acts = f.handle(event, 1)
    assert acts[:2] == [Send(Notification(5, subcode)), Close()]
    assert f.state is S.IDLE and "FSM error" in f.last_error


def test_decode_error_in_established_sends_its_notification() -> None:
    f = established(fsm())
    acts = f.handle(Event(E.MESSAGE_ERROR, error=DecodeError(3, 1, b"", "x")), 1)
    assert acts[0] == Send(Notification(3, 1)) and isinstance(acts[-1], SessionDown) and f.state is S.IDLE


def test_manual_stop_is_cease_administrative_shutdown_and_no_restart() -> None:
    f = established(fsm())
    acts = f.handle(Event(E.MANUAL_STOP), 1)
    assert acts == [Send(Notification(6, 2)), Close(), SessionDown("stopped")]
    assert f.state is S.IDLE and f.next_deadline() is None


def test_notification_received_and_automatic_restart() -> None:
    f = established(fsm())
    assert kinds(f.handle(event_for(Notification(6, 4)), 1)) == ["Close", "SessionDown"]
    assert f.state is S.IDLE
    assert kinds(f.poll(f.next_deadline() or 0)) == ["Connect"] and f.state is S.CONNECT


def test_idle_refuses_incoming_connections() -> None:
    f = fsm()
    assert f.handle(Event(E.TCP_ACCEPTED), 0) == [Close()] and f.state is S.IDLE


def test_route_refresh_resends_negotiated_family_only() -> None:
    f = established(fsm())
    assert f.handle(event_for(RouteRefresh(1, 1)), 1) == [ResendRoutes(1, 1)]
    assert f.handle(event_for(RouteRefresh(2, 1)), 1) == []


def test_session_up_carries_negotiation() -> None:
    f = fsm()
    f.handle(Event(E.MANUAL_START), 0)
    f.handle(Event(E.TCP_CONNECTED), 0)
    f.handle(event_for(PEER_OPEN), 0)
    acts = f.handle(event_for(Keepalive()), 0)
    assert isinstance(acts[0], SessionUp) and acts[0].negotiated.peer_id == PEER
    assert Connect() not in acts


def test_collision_resolution_keeps_the_higher_identifiers_connection() -> None:
    assert collision_loser(IPv4Address("10.0.0.2"), IPv4Address("10.0.0.1")) == "incoming"
    assert collision_loser(IPv4Address("10.0.0.1"), IPv4Address("10.0.0.2")) == "outgoing"
    f = fsm()
    f.handle(Event(E.MANUAL_START), 0)
    f.handle(Event(E.TCP_CONNECTED), 0)
    f.handle(event_for(PEER_OPEN), 0)
    assert f.handle(Event(E.OPEN_COLLISION_DUMP), 0) == [Send(Notification(6, 7)), Close()]
    assert f.state is S.IDLE and f.next_deadline() is None


def _in_state(state: State) -> Fsm:
    f = fsm()
    path = {S.IDLE: [], S.CONNECT: [Event(E.MANUAL_START)],
            S.ACTIVE: [Event(E.MANUAL_START), Event(E.TCP_FAILS)],
            S.OPEN_SENT: [Event(E.MANUAL_START), Event(E.TCP_CONNECTED)],
            S.OPEN_CONFIRM: [Event(E.MANUAL_START), Event(E.TCP_CONNECTED), event_for(PEER_OPEN)],
            S.ESTABLISHED: [Event(E.MANUAL_START), Event(E.TCP_CONNECTED), event_for(PEER_OPEN),
                            event_for(Keepalive())]}[state]
    for ev in path:
        f.handle(ev, 0)
    assert f.state is state
    return f


EXAMPLE_EVENTS = {
    E.OPEN: event_for(PEER_OPEN), E.KEEPALIVE: event_for(Keepalive()), E.UPDATE: event_for(Update()),
    E.NOTIFICATION: event_for(Notification(6, 4)), E.ROUTE_REFRESH: event_for(RouteRefresh(1, 1)),
    E.MESSAGE_ERROR: Event(E.MESSAGE_ERROR, error=DecodeError(3, 1)),
}


@pytest.mark.parametrize("state", list(State))
@pytest.mark.parametrize("kind", list(EventKind))
def test_every_state_event_pair_is_an_entry_or_an_fsm_error(state: State, kind: EventKind) -> None:
    f = _in_state(state)
    ev = EXAMPLE_EVENTS.get(kind, Event(kind))
    actions = f.handle(ev, 1.0)
    if (state, kind) not in TRANSITIONS and state in (S.OPEN_SENT, S.OPEN_CONFIRM, S.ESTABLISHED) \
            and not (kind is E.OPEN and state is S.OPEN_SENT):
        assert actions[0] == Send(Notification(5, {S.OPEN_SENT: 1, S.OPEN_CONFIRM: 2, S.ESTABLISHED: 3}[state]))
        assert f.state is S.IDLE
    elif (state, kind) in TRANSITIONS:
        assert f.state is TRANSITIONS[(state, kind)][1]


# (state, event) -> the failure the FSM records: its kind and text (what `last_error` shows)
FAILURES = [
    (S.ESTABLISHED, Event(E.HOLD_EXPIRES), FailureKind.HOLD_EXPIRED, "hold timer expired"),
    (S.OPEN_SENT, Event(E.MESSAGE_ERROR, error=DecodeError(2, 2, b"", "peer AS 1, expected 65000")),
     FailureKind.MESSAGE_ERROR, "sent NOTIFICATION 2/2: peer AS 1, expected 65000"),
    (S.ESTABLISHED, event_for(Notification(6, 4)), FailureKind.NOTIFICATION, "received NOTIFICATION 6/4"),
    (S.ESTABLISHED, Event(E.TCP_FAILS), FailureKind.CONNECTION_LOST, "connection lost"),
    (S.ESTABLISHED, Event(E.TCP_FAILS, reason="peer closed the connection"), FailureKind.CONNECTION_LOST,
     "connection lost"),
    (S.OPEN_SENT, Event(E.TCP_FAILS), FailureKind.CONNECTION_LOST, "connection lost in OpenSent"),
    (S.ACTIVE, Event(E.TCP_FAILS, reason="peer closed the connection"), FailureKind.TRANSPORT,
     "peer closed the connection"),
    (S.OPEN_CONFIRM, Event(E.OPEN_COLLISION_DUMP), FailureKind.COLLISION, "connection collision"),
    (S.ESTABLISHED, Event(E.BFD_DOWN), FailureKind.BFD_DOWN, "BFD session down"),
    (S.ESTABLISHED, Event(E.MANUAL_STOP), FailureKind.STOPPED, "stopped"),
    (S.OPEN_SENT, Event(E.KEEPALIVE, message=Keepalive()), FailureKind.FSM_ERROR, "FSM error: KEEPALIVE in OpenSent"),
]


@pytest.mark.parametrize(("state", "event", "kind", "text"), FAILURES)
def test_failures_are_recorded_with_their_kind(state: State, event: Event, kind: FailureKind, text: str) -> None:
    f = _in_state(state)
    f.handle(event, 1.0)
    assert f.failure is not None and (f.failure.kind, f.failure.text, f.last_error) == (kind, text, text)
    if kind is FailureKind.MESSAGE_ERROR:
        assert f.failure.detail == "peer AS 1, expected 65000"


def test_an_established_session_clears_the_failure() -> None:
    f = established(fsm())
    f.handle(Event(E.TCP_FAILS), 1)
    assert f.failure is not None and f.state is S.IDLE
    f.poll(f.next_deadline() or 0)  # IdleHold: the automatic restart
    t = f.next_deadline() or 0
    for ev in (Event(E.TCP_CONNECTED), event_for(PEER_OPEN), event_for(Keepalive())):
        f.handle(ev, t)
    assert f.state is S.ESTABLISHED and f.failure is None and f.last_error == ""
