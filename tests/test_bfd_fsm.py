"""BFD session state machine (RFC 5880 §6.2, §6.5, §6.8): table, Poll/Final, timers, demux, on a virtual clock."""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bgp.bfd.codec import ControlPacket, Diag, DropReason, State, encode
from bgp.bfd.fsm import (
    RECV_EVENT,
    TRANSITIONS,
    BfdFsmError,
    Demux,
    Discard,
    Event,
    Session,
    SessionConfig,
    StateChange,
    Transmit,
    is_failure,
    jitter_factor,
)
from bgp.errors import BgpError

pytestmark = pytest.mark.unit

FAST = SessionConfig.from_ms(100, 3)  # 100 ms x 3, as in the BIRD tests
S = State


def session(cfg: SessionConfig = FAST, discr: int = 1, rnd: float | None = 0.5) -> Session:
    return Session(cfg, discr, (lambda: rnd) if rnd is not None else random.Random(discr).random)


def pkt(state: State, *, my: int = 99, your: int = 1, tx_us: int = 100_000, rx_us: int = 100_000, mult: int = 3,
        poll: bool = False, final: bool = False) -> ControlPacket:
    return ControlPacket(state, my, your if state not in (S.DOWN, S.ADMIN_DOWN) or your else 0, tx_us, rx_us, mult,
                         poll=poll, final=final)


def states(actions: list) -> list[tuple[State, State]]:
    return [(a.old, a.new) for a in actions if isinstance(a, StateChange)]


def sent(actions: list) -> list[ControlPacket]:
    return [a.packet for a in actions if isinstance(a, Transmit)]


# ---- the table ---------------------------------------------------------------------------------

PATHS = {
    S.DOWN: [],
    S.INIT: [pkt(S.DOWN, your=0)],
    S.UP: [pkt(S.DOWN, your=0), pkt(S.UP)],
}


def in_state(state: State) -> Session:
    s = session()
    s.start(0.0)
    if state is S.ADMIN_DOWN:
        s.admin_down(0.0)
    for p in PATHS.get(state, []):
        s.receive(p, 0.0)
    assert s.state is state
    return s


@pytest.mark.parametrize("state", list(State))
@pytest.mark.parametrize("event", list(Event))
def test_every_state_event_pair_is_an_entry_or_an_error(state: State, event: Event) -> None:
    s = in_state(state)
    recv = {v: k for k, v in RECV_EVENT.items()}
    if (state, event) not in TRANSITIONS:
        with pytest.raises(BfdFsmError):
            s._handle(event, 1.0)
        return
    if event in recv:
        s.receive(pkt(recv[event]), 0.01)
    elif event is Event.TIMER:
        s._handle(event, 1.0)
    elif event is Event.ADMIN_DOWN:
        s.admin_down(1.0)
    else:
        s.admin_up(1.0)
    assert s.state is TRANSITIONS[(state, event)][1]


# RFC 5880 §6.2 diagram, step by step: (received state or local event, expected state, expected diag)
WALKS = {
    "three-way handshake from Down": [(S.DOWN, S.INIT, Diag.NONE), (S.UP, S.UP, Diag.NONE)],
    "peer already Init": [(S.INIT, S.UP, Diag.NONE)],
    "Up from Down is ignored": [(S.UP, S.DOWN, Diag.NONE), (S.ADMIN_DOWN, S.DOWN, Diag.NONE)],
    "Init stays on Down": [(S.DOWN, S.INIT, Diag.NONE), (S.DOWN, S.INIT, Diag.NONE), (S.INIT, S.UP, Diag.NONE)],
    "neighbor signals Down": [(S.DOWN, S.INIT, Diag.NONE), (S.UP, S.UP, Diag.NONE),
                              (S.DOWN, S.DOWN, Diag.NEIGHBOR_SIGNALED_SESSION_DOWN)],
    "neighbor AdminDown from Up": [(S.INIT, S.UP, Diag.NONE), (S.ADMIN_DOWN, S.DOWN,
                                                               Diag.NEIGHBOR_SIGNALED_SESSION_DOWN)],
    "neighbor AdminDown from Init": [(S.DOWN, S.INIT, Diag.NONE), (S.ADMIN_DOWN, S.DOWN,
                                                                   Diag.NEIGHBOR_SIGNALED_SESSION_DOWN)],
    "Up stays Up on Init": [(S.INIT, S.UP, Diag.NONE), (S.INIT, S.UP, Diag.NONE)],
    "local admin down and up": [(S.DOWN, S.INIT, Diag.NONE), ("admin_down", S.ADMIN_DOWN, Diag.ADMINISTRATIVELY_DOWN),
                                (S.UP, S.ADMIN_DOWN, Diag.ADMINISTRATIVELY_DOWN),
                                ("admin_up", S.DOWN, Diag.NONE), (S.DOWN, S.INIT, Diag.NONE)],
}


@pytest.mark.parametrize("walk", list(WALKS), ids=list(WALKS))
def test_state_diagram_walks(walk: str) -> None:
    s = session()
    s.start(0.0)
    now = 0.0
    for step, want_state, want_diag in WALKS[walk]:
        now += 0.01
        if step == "admin_down":
            s.admin_down(now)
        elif step == "admin_up":
            s.admin_up(now)
        else:
            assert isinstance(step, State)
            s.receive(pkt(step), now)
        assert (s.state, s.local_diag) == (want_state, want_diag), (step, s.state, s.local_diag)


def test_state_changes_are_reported_and_announced_at_once() -> None:
    s = session()
    s.start(0.0)
    acts = s.receive(pkt(S.DOWN, your=0, my=42), 0.1)
    assert states(acts) == [(S.DOWN, S.INIT)]
    (p,) = sent(acts)
    assert (p.state, p.my_discriminator, p.your_discriminator) == (S.INIT, 1, 42)
    acts = s.receive(pkt(S.UP, my=42), 0.2)
    assert states(acts) == [(S.INIT, S.UP)]
    (p,) = sent(acts)
    assert p.state is S.UP and p.poll and p.desired_min_tx_us == 100_000  # Poll: 1 s -> 100 ms


def test_admin_down_discards_received_packets_and_stops_detection() -> None:
    s = in_state(S.UP)
    acts = s.admin_down(1.0)
    assert states(acts) == [(S.UP, S.ADMIN_DOWN)]
    assert sent(acts)[0].diag == Diag.ADMINISTRATIVELY_DOWN and sent(acts)[0].state is S.ADMIN_DOWN
    assert s.detect_deadline is None
    assert s.receive(pkt(S.UP), 1.1) == [] and s.state is S.ADMIN_DOWN


# ---- timers --------------------------------------------------------------------------------------

def test_detection_time_is_remote_mult_times_max_of_our_rx_and_their_tx() -> None:
    s = in_state(S.UP)  # our required min RX: 100 ms
    s.receive(pkt(S.UP, tx_us=300_000, mult=5), 1.0)
    assert s.detection_time_us == 1_500_000 and s.detect_deadline == pytest.approx(2.5)
    s.receive(pkt(S.UP, tx_us=50_000, mult=2), 1.2)
    assert s.detection_time_us == 200_000 and s.detect_deadline == pytest.approx(1.4)
    acts = s.poll(1.39)
    assert s.state is S.UP
    acts = s.poll(1.4)
    assert states(acts) == [(S.UP, S.DOWN)] and s.local_diag is Diag.CONTROL_DETECTION_TIME_EXPIRED
    assert s.remote_discr == 0  # §6.8.1: forgotten after a detection time of silence
    assert sent(acts)[-1].your_discriminator == 0 and sent(acts)[-1].desired_min_tx_us == 1_000_000


def test_transmit_interval_is_max_of_our_tx_and_their_rx() -> None:
    s = in_state(S.UP)
    s.receive(pkt(S.UP, rx_us=250_000, final=True), 1.0)
    assert s.tx_interval_us == 250_000
    s.receive(pkt(S.UP, rx_us=20_000), 1.1)
    assert s.tx_interval_us == 100_000


def test_remote_min_rx_zero_stops_periodic_transmission_but_not_final() -> None:
    s = in_state(S.UP)
    s.receive(pkt(S.UP, rx_us=0, final=True), 1.0)
    assert s.tx_interval_us is None
    assert sent(s.poll(1.25)) == [] and s.next_deadline() == pytest.approx(1.3)  # only detection
    acts = s.receive(pkt(S.UP, rx_us=0, poll=True), 1.1)
    assert [p.final for p in sent(acts)] == [True]


def drive(s: Session, until: float) -> list[tuple[float, ControlPacket]]:
    """Poll at every deadline up to `until`; the periodic packets with their times."""
    out = []
    while (d := s.next_deadline()) is not None and d <= until:
        out += [(d, p) for p in sent(s.poll(d))]
    return out


@pytest.mark.parametrize(("mult", "low", "high"), [(3, 0.75, 1.0), (1, 0.75, 0.9)])
def test_slow_transmission_until_up_with_jitter(mult: int, low: float, high: float) -> None:
    s = session(SessionConfig.from_ms(100, mult), rnd=None)
    s.start(0.0)
    times = [t for t, p in drive(s, 60.0)]
    gaps = [b - a for a, b in itertools.pairwise([0.0] + times)]
    assert len(gaps) > 60
    assert all(low <= g < high for g in gaps), (min(gaps), max(gaps))
    assert max(gaps) - min(gaps) > 0.5 * (high - low)  # jitter actually varies


def test_jitter_bounds() -> None:
    assert jitter_factor(0.0, 3) == 0.75 and jitter_factor(0.999999, 3) == pytest.approx(1.0, abs=1e-5)
    assert jitter_factor(0.999999, 1) == pytest.approx(0.9, abs=1e-5)


def test_fast_transmission_once_up() -> None:
    s = in_state(S.UP)
    s.receive(pkt(S.UP, final=True), 0.0)
    gaps = [b - a for a, b in itertools.pairwise(t for t, _ in drive(s, 0.25))]
    assert gaps and all(g == pytest.approx(0.0875) for g in gaps)  # 100 ms x (0.75 + 0.25 x 0.5)


# ---- Poll / Final --------------------------------------------------------------------------------

def test_poll_sequence_on_reaching_up_ends_with_final() -> None:
    s = in_state(S.UP)
    assert s.poll_active
    assert all(p.poll for _, p in drive(s, 0.2))
    s.receive(pkt(S.UP, final=True), 0.21)
    assert not s.poll_active
    assert not any(p.poll for _, p in drive(s, 0.5))


def test_received_poll_is_answered_with_final_at_once() -> None:
    s = in_state(S.UP)
    acts = s.receive(pkt(S.UP, poll=True, tx_us=200_000), 0.5)
    (p,) = sent(acts)
    assert p.final and not p.poll  # never P and F together, even during our own Poll
    assert s.poll_active


def test_increasing_tx_waits_for_final_decreasing_rx_too() -> None:
    s = in_state(S.UP)
    s.receive(pkt(S.UP, final=True), 0.1)
    acts = s.change(1.0, desired_min_tx_us=500_000, required_min_rx_us=50_000)
    (p,) = sent(acts)
    assert p.poll and p.desired_min_tx_us == 500_000 and p.required_min_rx_us == 50_000
    assert s.tx_interval_us == 100_000  # old rate until the Poll ends
    s.receive(pkt(S.UP, tx_us=10_000), 1.01)
    assert s.detection_time_us == 300_000  # still the old 100 ms required min RX
    s.receive(pkt(S.UP, tx_us=10_000, final=True), 1.02)
    assert not s.poll_active and s.tx_interval_us == 500_000
    assert s.detection_time_us == 150_000  # 3 x max(50 ms, 10 ms)


def test_decreasing_tx_and_increasing_rx_apply_at_once() -> None:
    s = in_state(S.UP)
    s.receive(pkt(S.UP, final=True, rx_us=10_000), 0.1)
    s.change(1.0, desired_min_tx_us=50_000, required_min_rx_us=400_000)
    assert s.poll_active and s.tx_interval_us == 50_000
    s.receive(pkt(S.UP, tx_us=10_000), 1.01)
    assert s.detection_time_us == 1_200_000


def test_change_while_down_needs_no_poll_and_keeps_slow_rate() -> None:
    s = session()
    s.start(0.0)
    assert sent(s.change(0.5, desired_min_tx_us=50_000, required_min_rx_us=50_000)) == []
    assert not s.poll_active and s.desired_min_tx_us == 1_000_000 and s.required_min_rx_us == 50_000


def test_going_down_returns_to_the_slow_rate_and_drops_the_poll() -> None:
    s = in_state(S.UP)
    acts = s.receive(pkt(S.DOWN, your=0), 0.1)
    assert states(acts) == [(S.UP, S.DOWN)]
    assert not s.poll_active and s.tx_interval_us == 1_000_000
    assert not sent(acts)[-1].poll


# ---- two sessions back to back -------------------------------------------------------------------

@dataclass
class Link:
    """Two sessions joined by a wire with a fixed delay, on a virtual clock."""

    a: Session
    b: Session
    delay_s: float = 0.001
    cut: bool = False
    frozen: str = ""  # this side neither sends nor receives (SIGSTOP)
    delivered: list[tuple[float, str]] = field(default_factory=list)
    now: float = 0.0
    wire: list[tuple[float, str, ControlPacket]] = field(default_factory=list)
    changes: list[tuple[float, str, State]] = field(default_factory=list)

    def _out(self, who: str, actions: list) -> None:
        for a in actions:
            if isinstance(a, Transmit) and not self.cut and who != self.frozen:
                self.wire.append((self.now + self.delay_s, "b" if who == "a" else "a", a.packet))
            elif isinstance(a, StateChange):
                self.changes.append((self.now, who, a.new))

    def run(self, until: float) -> None:
        while True:
            times = [t for who, s in (("a", self.a), ("b", self.b)) if who != self.frozen
                     and (t := s.next_deadline()) is not None]
            times += [t for t, _, _ in self.wire]
            t = min(times, default=None)
            if t is None or t > until:
                self.now = until
                return
            self.now = t
            for item in [w for w in self.wire if w[0] <= t]:
                self.wire.remove(item)
                if item[1] == self.frozen:
                    continue
                self.delivered.append((t, item[1]))
                s = self.a if item[1] == "a" else self.b
                self._out(item[1], s.receive(item[2], t))
            if self.frozen != "a":
                self._out("a", self.a.poll(t))
            if self.frozen != "b":
                self._out("b", self.b.poll(t))


def test_two_sessions_come_up_and_detect_a_silent_peer_in_detection_time() -> None:
    link = Link(session(discr=1, rnd=None), session(discr=2, rnd=None))
    link._out("a", link.a.start(0.0))
    link.run(0.3)
    link._out("b", link.b.start(0.3))
    link.run(3.0)
    assert link.a.state is S.UP and link.b.state is S.UP
    assert not link.a.poll_active and not link.b.poll_active
    up_at = max(t for t, _, st in link.changes if st is S.UP)
    assert up_at < 1.5
    # b freezes (SIGSTOP): a notices after 3 x 100 ms since b's last packet.
    frozen_at = link.now
    link.frozen = "b"
    link.run(frozen_at + 1.0)
    last_from_b = max(t for t, to in link.delivered if to == "a")
    (t_down,) = [t for t, who, st in link.changes if who == "a" and st is S.DOWN]
    assert link.a.local_diag is Diag.CONTROL_DETECTION_TIME_EXPIRED
    assert t_down - last_from_b == pytest.approx(0.3)  # 3 x max(100 ms, 100 ms)
    assert t_down - frozen_at <= 0.3 + link.delay_s + 1e-9  # a packet may still be on the wire


def test_two_sessions_cut_link_then_restore() -> None:
    link = Link(session(discr=1, rnd=None), session(discr=2, rnd=None))
    link._out("a", link.a.start(0.0))
    link._out("b", link.b.start(0.0))
    link.run(3.0)
    assert (link.a.state, link.b.state) == (S.UP, S.UP)
    link.cut = True
    link.run(3.5)
    downs = [(t, who) for t, who, st in link.changes if st is S.DOWN]
    assert {who for _, who in downs} == {"a", "b"} and all(3.0 < t <= 3.3 + 1e-9 for t, _ in downs)
    link.cut = False
    link.run(7.0)
    assert (link.a.state, link.b.state) == (S.UP, S.UP)


# ---- demultiplexing ------------------------------------------------------------------------------

def test_demux_checks_ttl_discriminators_and_source() -> None:
    d = Demux()
    d.add("10.0.0.254", 7)
    first = encode(ControlPacket(S.DOWN, 99, 0, 1_000_000, 100_000, 3))
    assert d.route(first, 255, "10.0.0.254") == ("10.0.0.254", ControlPacket(S.DOWN, 99, 0, 1_000_000, 100_000, 3))
    assert d.route(first, 254, "10.0.0.254") is DropReason.TTL
    assert d.route(first, None, "10.0.0.254") is DropReason.TTL
    assert d.route(first, 255, "10.0.0.9") is DropReason.UNKNOWN_PEER
    later = encode(ControlPacket(S.UP, 99, 7, 100_000, 100_000, 3))
    assert d.route(later, 255, "10.0.0.254")[0] == "10.0.0.254"  # type: ignore[index]
    assert d.route(later, 255, "10.0.0.9") is DropReason.WRONG_SOURCE
    assert d.route(encode(ControlPacket(S.UP, 99, 8, 100_000, 100_000, 3)), 255, "10.0.0.254") \
        is DropReason.UNKNOWN_DISCRIMINATOR
    assert d.route(b"\x20" * 10, 255, "10.0.0.254") is DropReason.SHORT
    assert d.drops == {DropReason.TTL: 2, DropReason.UNKNOWN_PEER: 1, DropReason.WRONG_SOURCE: 1,
                       DropReason.UNKNOWN_DISCRIMINATOR: 1, DropReason.SHORT: 1}


# ---- any packet sequence -------------------------------------------------------------------------

STEPS = st.lists(st.tuples(
    st.floats(0, 2.0),  # time until the step
    st.one_of(st.none(), st.builds(
        ControlPacket, state=st.sampled_from(State), my_discriminator=st.integers(1, 3),
        your_discriminator=st.sampled_from([0, 1, 1, 5]), desired_min_tx_us=st.sampled_from([0, 1, 50_000, 10**6]),
        required_min_rx_us=st.sampled_from([0, 1, 100_000, 10**6]), detect_mult=st.integers(1, 5),
        poll=st.booleans(), final=st.booleans())),
    st.sampled_from(["recv", "change", "admin"])), max_size=40)


def check(s: Session, acts: list) -> None:
    for a in sent(acts):
        assert not (a.poll and a.final)
        assert a.state is s.state
        assert a.desired_min_tx_us >= 1_000_000 or a.state is S.UP


@settings(max_examples=400, derandomize=True, deadline=None)
@given(STEPS)
def test_any_sequence_keeps_the_invariants(steps: list) -> None:
    s = session(rnd=None)
    now = 0.0
    s.start(now)
    for dt, p, kind in steps:
        now += dt
        check(s, s.poll(now))
        assert (d := s.next_deadline()) is None or d > now  # everything due has fired
        acts: list = []
        if p is not None and kind == "recv" and not (p.poll and p.final):
            acts += s.receive(p, now)
        elif kind == "change":
            acts += s.change(now, desired_min_tx_us=int(dt * 200_000) + 10_000)
        elif kind == "admin":
            acts += s.admin_down(now) if s.state is not S.ADMIN_DOWN else s.admin_up(now)
        check(s, acts)
        if s.state is not S.UP:
            assert not s.poll_active


# ---- RFC 5880 §6.8.6: who may change a session's state -------------------------------------------

PEER, STRANGER, IFX = "10.0.0.254", "10.0.0.9", 3  # the peer, another on-link address, the peer's ifindex
LEARNED, FORGED = 99, 77  # the peer's discriminator (learned in the handshake), another one


@dataclass(frozen=True)
class Case:
    session: State  # the session's state before the packet (Init and Up learned LEARNED)
    state: State  # the packet's State field
    my: int = LEARNED
    your: int | str = "ours"  # "ours": our discriminator (1), or a number
    ttl: int = 255
    source: str = PEER
    ifindex: int | None = IFX
    drop: DropReason | None = None  # why it is discarded (None: accepted)
    after: State | None = None  # the session's state afterwards (None: unchanged)


D, I, U, A = S.DOWN, S.INIT, S.UP, S.ADMIN_DOWN  # noqa: E741  # one letter per state keeps the table aligned
R = DropReason
DEMUX_CASES = {
    # An on-link spoofer with TTL 255 and the peer's source address, against an Up session.
    "spoof Up: Down, your 0, forged my": Case(U, D, my=FORGED, your=0, drop=R.REMOTE_DISCRIMINATOR_CHANGED),
    "spoof Up: AdminDown, your 0, forged my": Case(U, A, my=FORGED, your=0, drop=R.REMOTE_DISCRIMINATOR_CHANGED),
    "spoof Up: Up, your 0": Case(U, U, your=0, drop=R.YOUR_DISCRIMINATOR_ZERO),
    "spoof Up: Init, your 0": Case(U, I, your=0, drop=R.YOUR_DISCRIMINATOR_ZERO),
    "spoof Up: Up, your 0, forged my": Case(U, U, my=FORGED, your=0, drop=R.YOUR_DISCRIMINATOR_ZERO),
    "spoof Up: Down, ours, forged my": Case(U, D, my=FORGED, drop=R.REMOTE_DISCRIMINATOR_CHANGED),
    "spoof Up: AdminDown, ours, forged my": Case(U, A, my=FORGED, drop=R.REMOTE_DISCRIMINATOR_CHANGED),
    "spoof Up: Up, ours, forged my": Case(U, U, my=FORGED, drop=R.REMOTE_DISCRIMINATOR_CHANGED),
    "spoof Up: Down, your 0, another interface": Case(U, D, your=0, ifindex=7, drop=R.WRONG_INTERFACE),
    "spoof Up: Down, ours, another interface": Case(U, D, ifindex=7, drop=R.WRONG_INTERFACE),
    "spoof Up: interface not reported": Case(U, D, ifindex=None, drop=R.WRONG_INTERFACE),
    "spoof Up: Down, your 0, TTL 254": Case(U, D, your=0, ttl=254, drop=R.TTL),
    "spoof Up: Down, unknown your": Case(U, D, your=5, drop=R.UNKNOWN_DISCRIMINATOR),
    "spoof Up: Down, ours, other source": Case(U, D, source=STRANGER, drop=R.WRONG_SOURCE),
    "spoof Up: Down, your 0, other source": Case(U, D, your=0, source=STRANGER, drop=R.UNKNOWN_PEER),
    # The real peer, Up: what it legitimately sends.
    "peer Up: Up, ours": Case(U, U),
    "peer Up: Init, ours": Case(U, I),
    "peer Up: Down, ours (its detection time expired... and it kept ours)": Case(U, D, after=D),
    "peer Up: Down, your 0 (its detection time expired)": Case(U, D, your=0, after=D),
    "peer Up: AdminDown, ours": Case(U, A, after=D),
    "peer Up: AdminDown, your 0": Case(U, A, your=0, after=D),
    # Down: Your Discriminator 0 only with Down or AdminDown; any My Discriminator may be learned.
    "Down: Down, your 0": Case(D, D, my=FORGED, your=0, after=I),
    "Down: AdminDown, your 0": Case(D, A, your=0),
    "Down: Init, your 0": Case(D, I, your=0, drop=R.YOUR_DISCRIMINATOR_ZERO),
    "Down: Up, your 0": Case(D, U, your=0, drop=R.YOUR_DISCRIMINATOR_ZERO),
    "Down: Init, ours": Case(D, I, after=U),
    "Down: Up, ours": Case(D, U),
    "Down: Down, your 0, another interface": Case(D, D, your=0, ifindex=7, drop=R.WRONG_INTERFACE),
    "Down: Down, your 0, TTL 64": Case(D, D, your=0, ttl=64, drop=R.TTL),
    # Init (learned from a Down with Your Discriminator 0): not locked yet, §6.8.6 as written.
    "Init: Up, your 0": Case(I, U, your=0, drop=R.YOUR_DISCRIMINATOR_ZERO),
    "Init: Init, your 0": Case(I, I, your=0, drop=R.YOUR_DISCRIMINATOR_ZERO),
    "Init: Up, ours": Case(I, U, after=U),
    "Init: Up, ours, other my": Case(I, U, my=FORGED, after=U),
    "Init: AdminDown, your 0": Case(I, A, your=0, after=D),
    "Init: Down, your 0": Case(I, D, your=0),
    "Init: Down, your 0, another interface": Case(I, D, your=0, ifindex=7, drop=R.WRONG_INTERFACE),
}


def session_in(state: State) -> Session:
    """A session with our discriminator 1, in `state`, having learned LEARNED if Init or Up."""
    s = session()
    s.start(0.0)
    if state in (S.INIT, S.UP):
        s.receive(pkt(S.DOWN, my=LEARNED, your=0), 0.0)
    if state is S.UP:
        s.receive(pkt(S.UP, my=LEARNED), 0.0)
    assert s.state is state and s.remote_discr == (LEARNED if state in (S.INIT, S.UP) else 0)
    return s


def deliver(d: Demux, s: Session, data: bytes, ttl: int, source: str, ifindex: int | None,
            now: float) -> tuple[DropReason | None, list]:
    """What the I/O layer does with one datagram: demultiplex, then the session; drops counted."""
    routed = d.route(data, ttl, source, ifindex)
    if isinstance(routed, DropReason):
        return routed, []
    acts = s.receive(routed[1], now)
    discards = [a.reason for a in acts if isinstance(a, Discard)]
    for reason in discards:
        d.drops[reason] += 1
    return (discards[0] if discards else None), acts


@pytest.mark.parametrize("name", list(DEMUX_CASES), ids=list(DEMUX_CASES))
def test_rfc5880_6_8_6_who_may_change_a_session(name: str) -> None:
    c = DEMUX_CASES[name]
    d = Demux()
    d.add(PEER, 1)
    d.set_interface(PEER, IFX)
    s = session_in(c.session)
    before = (s.remote_discr, s.remote_detect_mult, s.detect_deadline, s.tx_interval_us)
    your = 1 if c.your == "ours" else c.your
    data = encode(ControlPacket(c.state, c.my, int(your), 50_000, 20_000, 5))
    drop, acts = deliver(d, s, data, c.ttl, c.source, c.ifindex, 0.05)
    assert drop is c.drop
    assert s.state is (c.after or c.session)
    if c.drop is not None:
        assert d.drops == {c.drop: 1}  # counted
        assert sent(acts) == [] and states(acts) == []
        # nothing of a discarded packet is used: not its discriminator, its timers or its state
        assert (s.remote_discr, s.remote_detect_mult, s.detect_deadline, s.tx_interval_us) == before
    else:
        assert d.drops == {}


def test_a_forged_packet_does_not_restart_detection_and_the_peer_keeps_the_session() -> None:
    """A spoofer flooding Down/Your Discriminator 0 at an Up session: the session stays Up while the
    peer talks, and goes Down by detection time (not by the forged packets) when the peer stops."""
    d = Demux()
    d.add(PEER, 1)
    s = session_in(S.UP)
    s.receive(pkt(S.UP, my=LEARNED, final=True), 0.0)
    forged = encode(ControlPacket(S.DOWN, FORGED, 0, 100_000, 100_000, 3))
    genuine = encode(ControlPacket(S.UP, LEARNED, 1, 100_000, 100_000, 3))
    now = 0.0
    for _ in range(20):  # peer and spoofer interleaved: 20 x 50 ms
        now += 0.05
        assert deliver(d, s, forged, 255, PEER, None, now)[0] is DropReason.REMOTE_DISCRIMINATOR_CHANGED
        assert deliver(d, s, genuine, 255, PEER, None, now)[0] is None
        s.poll(now)
        assert s.state is S.UP
    last_genuine = now
    for i in range(1, 6):  # only the spoofer now, up to 250 ms after the peer's last packet
        now = last_genuine + 0.05 * i
        deliver(d, s, forged, 255, PEER, None, now)
        s.poll(now)
        assert s.state is S.UP
    acts = s.poll(last_genuine + 0.3)
    assert states(acts) == [(S.UP, S.DOWN)] and s.local_diag is Diag.CONTROL_DETECTION_TIME_EXPIRED
    assert d.drops[DropReason.REMOTE_DISCRIMINATOR_CHANGED] == 25
    # Detection forgot the peer's discriminator: a restarted peer (a new one) is heard again.
    assert deliver(d, s, forged, 255, PEER, None, now + 0.4)[0] is None and s.state is S.INIT


def test_demux_checks_the_interface_only_once_told_it() -> None:
    d = Demux()
    d.add(PEER, 1)
    data = encode(ControlPacket(S.DOWN, 5, 0, 1_000_000, 100_000, 3))
    assert d.route(data, 255, PEER, None)[0] == PEER  # type: ignore[index]
    assert d.route(data, 255, PEER, 42)[0] == PEER  # type: ignore[index]
    d.set_interface(PEER, 42)
    assert d.route(data, 255, PEER, 42)[0] == PEER  # type: ignore[index]
    assert d.route(data, 255, PEER, 43) is DropReason.WRONG_INTERFACE
    d.set_interface(PEER, None)  # no route to the peer: nothing from it is accepted
    assert d.route(data, 255, PEER, 42) is DropReason.WRONG_INTERFACE
    with pytest.raises(BgpError):
        d.set_interface(STRANGER, 1)


D = Diag
# (old, new, diag, remote state at the change) -> a failure (RFC 5882 §3.2)
FAILURES = [
    (S.UP, S.DOWN, D.CONTROL_DETECTION_TIME_EXPIRED, S.UP, True),
    (S.UP, S.DOWN, D.CONTROL_DETECTION_TIME_EXPIRED, S.DOWN, True),
    (S.UP, S.DOWN, D.NEIGHBOR_SIGNALED_SESSION_DOWN, S.DOWN, True),  # the peer lost us: a failure
    (S.UP, S.DOWN, D.NEIGHBOR_SIGNALED_SESSION_DOWN, S.ADMIN_DOWN, False),  # the peer shut down
    (S.UP, S.ADMIN_DOWN, D.ADMINISTRATIVELY_DOWN, S.UP, False),  # our own shutdown
    (S.INIT, S.DOWN, D.CONTROL_DETECTION_TIME_EXPIRED, S.DOWN, False),  # never was Up
    (S.DOWN, S.UP, D.NONE, S.INIT, False),
]


@pytest.mark.parametrize(("old", "new", "diag", "remote", "failed"), FAILURES)
def test_which_changes_are_failures(old: State, new: State, diag: Diag, remote: State, failed: bool) -> None:
    assert is_failure(StateChange(old, new, diag), remote) is failed
