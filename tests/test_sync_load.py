"""Flow sync's part in load-aware weighting (cluster/sync/engine.py): LOAD datagrams to every peer
outside the stream, the members a leader is chosen from, a prompt heartbeat when the digest
changes, and a digest warning only for a view that stays different."""
from __future__ import annotations

import pytest

from bpf.structs import addr16
from cluster.sync import codec
from cluster.sync.engine import PROMPT_HEARTBEAT_S, LoadIn, Send, SyncEngine, Warn
from cluster.sync.policy import DIGEST_SETTLE_S

pytestmark = pytest.mark.unit

KEY = codec.Keyring(b"k" * 32)
LOAD = codec.Load(codec.LoadKind.OBSERVE, bytes(8), 0, 1, (codec.LoadRecord(addr16("10.0.0.11"), 3.0),))


def engines() -> tuple[SyncEngine, SyncEngine]:
    a, b = SyncEngine(KEY, 1, 1000), SyncEngine(KEY, 2, 2000)
    for e in (a, b):
        e.start(0.0)
    return a, b


def test_a_load_goes_to_every_peer_as_a_control_datagram_and_comes_out_as_load_in() -> None:
    a, b = engines()
    send = a.load(LOAD)
    assert isinstance(send, Send) and send.addr is None and a.seq == 0  # no stream number taken
    [action] = b.receive(send.datagram, "10.0.0.1", 0.1)
    assert action == LoadIn(1, LOAD)
    assert b.receive(send.datagram, "10.0.0.1", 0.2) == []  # a replay is refused
    assert (a.counters["loads_sent"], b.counters["loads_received"]) == (1, 1)
    assert b.gaps_open() == 0


def test_members_are_the_live_peers_and_their_ready_flags() -> None:
    a, b = engines()
    b.ready = True
    hb = b.heartbeat(0.0)
    a.receive(hb.datagram, "10.0.0.2", 0.0)
    assert a.members(0.5) == {2: True}
    assert a.members(0.5 + a.timing.dead_after_s) == {}


def test_a_changed_digest_is_heartbeated_at_once_but_not_more_often_than_the_prompt_spacing() -> None:
    a, _ = engines()
    a.heartbeat(0.0)
    assert a.digest_heartbeat(1.0) == []  # unchanged
    a.set_digest(b"\x01" * 16)
    [hb] = a.digest_heartbeat(1.0)
    assert isinstance(hb, Send) and codec.decode(KEY, hb.datagram).body.digest == b"\x01" * 16  # type: ignore[union-attr]
    a.set_digest(b"\x02" * 16)
    assert a.digest_heartbeat(1.0 + PROMPT_HEARTBEAT_S / 2) == []  # too soon: flowsync.py waits for this
    assert a.digest_heartbeat_at() == 1.0 + PROMPT_HEARTBEAT_S
    [hb] = a.digest_heartbeat(1.0 + PROMPT_HEARTBEAT_S)
    assert a.digest_heartbeat_at() is None


def test_a_digest_is_warned_of_only_when_two_heartbeats_in_a_row_carry_it() -> None:
    a, b = engines()
    a.set_digest(b"\x01" * 16)
    b.set_digest(b"\x02" * 16)
    warned = [x for x in a.receive(b.heartbeat(0.0).datagram, "10.0.0.2", 0.0) if isinstance(x, Warn)]
    assert warned == []  # one heartbeat: perhaps a peer a moment behind
    warned = [x for x in a.receive(b.heartbeat(1.0).datagram, "10.0.0.2", 1.0) if isinstance(x, Warn)]
    assert [w.reason for w in warned] == ["digest"]
    warned = [x for x in a.receive(b.heartbeat(2.0).datagram, "10.0.0.2", 2.0) if isinstance(x, Warn)]
    assert warned == []  # once per differing digest


def test_a_digest_differs_only_once_both_have_stood_for_the_settle_time() -> None:
    """Nodes adopt a weight publication milliseconds apart: a peer just behind or ahead has the
    same view. A difference that stands for DIGEST_SETTLE_S is a mismatch."""
    a, b = engines()
    a.set_digest(b"\x01" * 16, 0.0)
    b.set_digest(b"\x01" * 16, 0.0)
    a.receive(b.heartbeat(0.0).datagram, "10.0.0.2", 0.0)
    assert not a.policy.digest_mismatch(1.0)
    b.set_digest(b"\x02" * 16, 1.0)  # b adopted first; its prompt heartbeat reaches a
    a.receive(b.digest_heartbeat(1.0)[0].datagram, "10.0.0.2", 1.001)  # type: ignore[union-attr]
    assert not a.policy.digest_mismatch(1.01)
    a.set_digest(b"\x02" * 16, 1.01)  # ... and a 9 ms later
    assert not a.policy.digest_mismatch(1.5)
    a.set_digest(b"\x03" * 16, 2.0)  # a moves on alone
    assert not a.policy.digest_mismatch(2.0 + DIGEST_SETTLE_S / 2)
    assert a.policy.digest_mismatch(2.0 + DIGEST_SETTLE_S)
    assert [v.digest_match for v in a.policy.views(2.0 + DIGEST_SETTLE_S)] == [False]
