"""Collision decisions (RFC 4271 §6.8) and failure reports: tables of inputs and the expected decision."""
from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from bgp.bfd.codec import State as BfdState
from bgp.codec import Notification
from bgp.fsm import Failure, FailureKind, State
from bgp.peering import (
    Accept,
    Resolution,
    Side,
    bfd_down_counts,
    bfd_matters,
    dump_other_on_established,
    on_accept,
    received_notification,
    resolve_collision,
    sent_notification,
)

pytestmark = pytest.mark.unit

S = State
LOW, HIGH = IPv4Address("10.0.0.1"), IPv4Address("10.0.0.2")

# (primary state, has connection, has other) -> decision
ACCEPT = [
    (S.IDLE, False, False, Accept.TO_FSM),
    (S.CONNECT, True, False, Accept.REPLACE_ATTEMPT),
    (S.ACTIVE, False, False, Accept.REPLACE_ATTEMPT),
    (S.OPEN_SENT, True, False, Accept.SECOND_FSM),
    (S.OPEN_CONFIRM, True, False, Accept.SECOND_FSM),
    (S.OPEN_SENT, True, True, Accept.REFUSE),  # a collision is already being resolved
    (S.OPEN_CONFIRM, False, False, Accept.REFUSE),
    (S.ESTABLISHED, True, False, Accept.REFUSE),
    (S.ESTABLISHED, True, True, Accept.REFUSE),
]


@pytest.mark.parametrize(("state", "has_connection", "has_other", "expected"), ACCEPT)
def test_what_an_accepted_connection_becomes(state: State, has_connection: bool, has_other: bool,
                                             expected: Accept) -> None:
    assert on_accept(state, has_connection=has_connection, has_other=has_other) is expected


def test_every_state_has_an_accept_decision() -> None:
    for state in State:
        for has_connection in (False, True):
            for has_other in (False, True):
                assert isinstance(on_accept(state, has_connection=has_connection, has_other=has_other), Accept)


OUT, IN = True, False
# (primary side or None, other side, local id, remote id) -> decision
COLLISIONS = [
    ("primary gone", None, Side(S.OPEN_CONFIRM, IN), LOW, HIGH, Resolution.PROMOTE_OTHER),
    ("primary fell to Idle", Side(S.IDLE, OUT), Side(S.OPEN_CONFIRM, IN), LOW, HIGH, Resolution.PROMOTE_OTHER),
    ("primary back in Active", Side(S.ACTIVE, OUT), Side(S.OPEN_SENT, IN), HIGH, LOW, Resolution.PROMOTE_OTHER),
    ("Established wins", Side(S.ESTABLISHED, OUT), Side(S.OPEN_CONFIRM, IN), LOW, HIGH,
     Resolution.DUMP_OTHER_FOR_ESTABLISHED),
    ("Established, other gone to Idle", Side(S.ESTABLISHED, OUT), Side(S.IDLE, IN), LOW, HIGH, Resolution.WAIT),
    ("other not exchanging OPENs", Side(S.OPEN_CONFIRM, OUT), Side(S.ACTIVE, IN), LOW, HIGH, Resolution.WAIT),
    # Higher identifier's connection survives: we are higher, so our outgoing one stays.
    ("we are higher: incoming dumped", Side(S.OPEN_CONFIRM, OUT), Side(S.OPEN_SENT, IN), HIGH, LOW,
     Resolution.DUMP_OTHER),
    ("we are lower: outgoing primary dumped", Side(S.OPEN_CONFIRM, OUT), Side(S.OPEN_CONFIRM, IN), LOW, HIGH,
     Resolution.DUMP_PRIMARY),
    ("we are higher, primary incoming: primary dumped", Side(S.OPEN_CONFIRM, IN), Side(S.OPEN_SENT, OUT), HIGH,
     LOW, Resolution.DUMP_PRIMARY),
    ("we are lower, primary incoming: other dumped", Side(S.OPEN_CONFIRM, IN), Side(S.OPEN_CONFIRM, OUT), LOW,
     HIGH, Resolution.DUMP_OTHER),
    # Both incoming (the primary took over from our attempt): the newer one goes, whoever is higher.
    ("both incoming, we are higher", Side(S.OPEN_CONFIRM, IN), Side(S.OPEN_SENT, IN), HIGH, LOW,
     Resolution.DUMP_OTHER),
    ("both incoming, we are lower", Side(S.OPEN_CONFIRM, IN), Side(S.OPEN_CONFIRM, IN), LOW, HIGH,
     Resolution.DUMP_OTHER),
]


@pytest.mark.parametrize(("primary", "other", "local", "remote", "expected"), [c[1:] for c in COLLISIONS],
                         ids=[c[0] for c in COLLISIONS])
def test_collision_resolution(primary: Side | None, other: Side, local: IPv4Address, remote: IPv4Address,
                              expected: Resolution) -> None:
    assert resolve_collision(primary, other, local, remote) is expected


@pytest.mark.parametrize(("other", "dump"), [(None, False), (S.IDLE, False), (S.ACTIVE, False),
                                             (S.OPEN_SENT, True), (S.OPEN_CONFIRM, True)])
def test_an_established_session_dumps_a_colliding_open_exchange(other: State | None, dump: bool) -> None:
    assert dump_other_on_established(other) is dump


BAD_AS = Failure(FailureKind.MESSAGE_ERROR, "sent NOTIFICATION 2/2: peer AS 65099, expected 65000",
                 "peer AS 65099, expected 65000")
# (NOTIFICATION sent, the FSM's failure, stopping) -> (is a failure, last_error)
SENT = [
    ("bad peer AS", Notification(2, 2), BAD_AS, False, True,
     "sent NOTIFICATION 2/2 (Open Message/Bad Peer AS): peer AS 65099, expected 65000"),
    ("hold expired", Notification(4, 0), Failure(FailureKind.HOLD_EXPIRED, "hold timer expired"), False, True,
     "sent NOTIFICATION 4/0 (Hold Timer Expired): hold timer expired"),
    ("FSM error", Notification(5, 1), Failure(FailureKind.FSM_ERROR, "FSM error: UPDATE in OpenSent"), False,
     True, "sent NOTIFICATION 5/1 (FSM/in OpenSent): FSM error: UPDATE in OpenSent"),
    ("BFD down", Notification(6, 10), Failure(FailureKind.BFD_DOWN, "BFD session down"), False, True,
     "sent NOTIFICATION 6/10 (Cease/BFD Down): BFD session down"),
    ("collision", Notification(6, 7), Failure(FailureKind.COLLISION, "connection collision"), False, False,
     "sent NOTIFICATION 6/7 (Cease/Connection Collision Resolution): connection collision"),
    ("our shutdown", Notification(6, 2), Failure(FailureKind.STOPPED, "stopped"), True, False,
     "sent NOTIFICATION 6/2 (Cease/Administrative Shutdown): stopped"),
    ("a stop while not shutting down", Notification(6, 2), Failure(FailureKind.STOPPED, "stopped"), False, True,
     "sent NOTIFICATION 6/2 (Cease/Administrative Shutdown): stopped"),
    ("no failure recorded", Notification(6, 4), None, False, True,
     "sent NOTIFICATION 6/4 (Cease/Administrative Reset)"),
]


@pytest.mark.parametrize(("msg", "failure", "stopping", "is_failure", "last_error"), [c[1:] for c in SENT],
                         ids=[c[0] for c in SENT])
def test_which_sent_notifications_are_failures(msg: Notification, failure: Failure | None, stopping: bool,
                                               is_failure: bool, last_error: str) -> None:
    report = sent_notification(msg, failure, stopping=stopping)
    assert (report.failure, report.last_error) == (is_failure, last_error)


def test_a_received_notification_is_always_a_failure() -> None:
    report = received_notification(Notification(6, 5))
    assert report.failure and report.last_error == "received NOTIFICATION 6/5 (Cease/Connection Rejected)"


B = BfdState
# (old, new, failed) -> does BGP hear of it
BFD = [
    (B.UP, B.DOWN, True, True),
    (B.UP, B.DOWN, False, True),  # the peer's AdminDown: not a failure, but Up is gone
    (B.INIT, B.UP, False, True),
    (B.DOWN, B.UP, False, True),
    (B.DOWN, B.INIT, False, False),
    (B.INIT, B.DOWN, False, False),
    (B.ADMIN_DOWN, B.DOWN, False, False),
]


@pytest.mark.parametrize(("old", "new", "failed", "matters"), BFD)
def test_which_bfd_changes_reach_the_bgp_peer(old: BfdState, new: BfdState, failed: bool, matters: bool) -> None:
    assert bfd_matters(old, new, failed) is matters


@pytest.mark.parametrize("state", list(State))
def test_bfd_downs_count_sessions_from_open_sent_on(state: State) -> None:
    assert bfd_down_counts(state) is (state in (S.OPEN_SENT, S.OPEN_CONFIRM, S.ESTABLISHED))
