"""Decisions about one peer above its session FSM: connection collisions and failure reports. No I/O.

Theory of operation
-------------------
The speaker runs one `Fsm` per peer, and a second one while an incoming connection collides with
an OPEN exchange already under way (RFC 4271 §6.8). What to do with each new connection and, once
the peer's OPEN names its BGP identifier, which connection to dump (Cease 6/7), are decided here
from the states of the two FSMs and the directions of their connections; the speaker carries the
decision out. The rules:

- An incoming connection in Connect/Active replaces our own attempt (`Accept.REPLACE_ATTEMPT`);
  in OpenSent/OpenConfirm it gets a second FSM (`Accept.SECOND_FSM`), once; in Idle the table
  refuses it (`Accept.TO_FSM`); with an Established session, or a second collision, it is refused
  with Cease 6/7 (`Accept.REFUSE`).
- With both OPENs in, the connection initiated by the speaker with the higher BGP identifier
  survives (`collision_loser`); if both connections share a direction, the newer one is dumped.
- An Established session always wins over a colliding connection still in OpenSent/OpenConfirm.
- If the primary connection is gone by the time the OPEN arrives, the other one takes its place.

Failure reports: which NOTIFICATIONs and BFD changes explain why a session failed or does not come
up (logged at WARNING and shown as `last_error`), and which are expected (our own Cease on
shutdown, a collision resolved). Decided from the FSM's structured `Failure` and the message's
code/subcode, never from log text.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from ipaddress import IPv4Address

from bgp.bfd.codec import State as BfdState
from bgp.codec import Notification
from bgp.errors import notification_text
from bgp.fsm import Failure, FailureKind, State

OPEN_EXCHANGE = frozenset({State.OPEN_SENT, State.OPEN_CONFIRM})
SESSION_STATES = frozenset({State.OPEN_SENT, State.OPEN_CONFIRM, State.ESTABLISHED})


# ---- collisions (RFC 4271 §6.8) -------------------------------------------------------------

class Accept(enum.Enum):
    """What to do with an accepted incoming connection."""

    REPLACE_ATTEMPT = "replace attempt"  # drop our own attempt; the incoming connection drives the FSM
    SECOND_FSM = "second FSM"  # a collision: run a second FSM on it until the OPENs decide
    TO_FSM = "to FSM"  # Idle: TcpConnectionConfirmed into the table, which refuses it
    REFUSE = "refuse"  # Cease 6/7 and close: a session exists, or a collision is already being resolved


def on_accept(state: State, *, has_connection: bool, has_other: bool) -> Accept:
    """`state` is the peer's FSM's; `has_connection` whether it has a connection; `has_other`
    whether a colliding connection is already running."""
    if state in (State.CONNECT, State.ACTIVE):
        return Accept.REPLACE_ATTEMPT
    if state in OPEN_EXCHANGE and has_connection and not has_other:
        return Accept.SECOND_FSM
    if state is State.IDLE:
        return Accept.TO_FSM
    return Accept.REFUSE


def collision_loser(local_id: IPv4Address, remote_id: IPv4Address) -> str:
    """RFC 4271 §6.8: which connection to close, "outgoing" or "incoming".

    The connection initiated by the speaker with the higher BGP identifier survives.
    """
    return "incoming" if int(local_id) > int(remote_id) else "outgoing"


class Resolution(enum.Enum):
    """What to do once an OPEN has arrived on either of two colliding connections."""

    WAIT = "wait"  # the other connection has no OPEN exchange under way (yet): nothing to decide
    PROMOTE_OTHER = "promote other"  # the primary connection is gone: the other one becomes the peer's
    DUMP_OTHER = "dump other"  # the other connection loses (Cease 6/7)
    DUMP_OTHER_FOR_ESTABLISHED = "dump other for established"  # ... because the primary is Established
    DUMP_PRIMARY = "dump primary"  # the primary connection loses; the other one becomes the peer's


@dataclass(frozen=True, slots=True)
class Side:
    """One of the two colliding connections, as the decision sees it."""

    state: State
    outgoing: bool


def resolve_collision(primary: Side | None, other: Side, local_id: IPv4Address, remote_id: IPv4Address) -> Resolution:
    """`primary` is None when the primary FSM has no connection any more; `remote_id` is the BGP
    identifier in the peer's OPEN."""
    if primary is None or primary.state not in SESSION_STATES:
        return Resolution.PROMOTE_OTHER
    if primary.state is State.ESTABLISHED:
        return Resolution.DUMP_OTHER_FOR_ESTABLISHED if other.state in OPEN_EXCHANGE else Resolution.WAIT
    if other.state not in OPEN_EXCHANGE:
        return Resolution.WAIT
    loser = collision_loser(local_id, remote_id)
    # Dump the connection in the losing direction; if both share a direction, the newer one.
    dump_primary = primary.outgoing == (loser == "outgoing") and other.outgoing != primary.outgoing
    return Resolution.DUMP_PRIMARY if dump_primary else Resolution.DUMP_OTHER


def dump_other_on_established(other: State | None) -> bool:
    """The primary FSM just reached Established: a colliding connection still exchanging OPENs goes."""
    return other in OPEN_EXCHANGE


# ---- failure reports --------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Report:
    """How to report a NOTIFICATION: the text, the failure behind it, and whether it explains a failure
    (WARNING, and shown as `last_error`) or is expected (INFO)."""

    text: str
    why: str
    failure: bool

    @property
    def last_error(self) -> str:
        return f"{self.text}: {self.why}" if self.why else self.text


def sent_notification(msg: Notification, failure: Failure | None, *, stopping: bool) -> Report:
    """A NOTIFICATION we are sending; `failure` is the sending FSM's (the reason it sends it)."""
    text = f"sent NOTIFICATION {msg.code}/{msg.subcode} ({notification_text(msg.code, msg.subcode)})"
    if failure is None:
        why = ""
    elif failure.kind is FailureKind.MESSAGE_ERROR:
        why = failure.detail  # the text already says "sent NOTIFICATION c/s"
    else:
        why = failure.text
    # Our own Cease on shutdown and a collision resolved are expected; anything else explains
    # why a session failed or does not come up.
    expected = (msg.code, msg.subcode) == (6, 7) or (stopping and (msg.code, msg.subcode) == (6, 2))
    return Report(text, why, not expected)


def received_notification(msg: Notification) -> Report:
    """A NOTIFICATION from the peer: always a failure (it closes the session)."""
    return Report(f"received NOTIFICATION {msg.code}/{msg.subcode} ({notification_text(msg.code, msg.subcode)})",
                  "", True)


def bfd_matters(old: BfdState, new: BfdState, failed: bool) -> bool:
    """Whether the BGP side hears of a BFD change: a failure, or any change into or out of Up (Up
    resets the connect backoff, `Fsm.set_path_up`). Whether a change is a failure is
    `bgp.bfd.fsm.is_failure`'s (RFC 5882 §3.2)."""
    return failed or BfdState.UP in (old, new)


def bfd_down_counts(state: State) -> bool:
    """A BFD failure counts as a BGP session torn down (`bfd_downs`) from OpenSent on."""
    return state in SESSION_STATES
