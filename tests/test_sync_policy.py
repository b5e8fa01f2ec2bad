"""Flow-sync policy: replay and gap logic, resend requests and liveness on a virtual clock."""
from __future__ import annotations

import time

import pytest

from cluster.sync.codec import Header, Heartbeat, MsgType, ResendRange
from cluster.sync.policy import INCARNATION_RENEW_S, MAX_INCARNATION_AGE_S, ReceivePolicy, RetransmitBuffer, Verdict

pytestmark = pytest.mark.unit

ME, PEER = 1, 2


def h(seq: int, inc: int = 100, node: int = PEER) -> Header:
    return Header(MsgType.FLOWS, node, inc, seq, 0)


def policy() -> ReceivePolicy:
    return ReceivePolicy(ME, window=1000, resend_interval_s=0.1, resend_tries=3, dead_after_s=3.0)


def test_in_order_replay_and_own_datagrams() -> None:
    p = policy()
    assert [p.accept(h(s), 0.0) for s in (10, 11, 12)] == [Verdict.ACCEPT] * 3
    assert p.accept(h(11), 0.0) is Verdict.REPLAY
    assert p.accept(h(12), 0.0) is Verdict.REPLAY
    assert p.accept(h(5, node=ME), 0.0) is Verdict.SELF
    assert (p.counters.replayed, p.counters.self_looped, p.counters.gaps) == (2, 1, 0)


def test_incarnations_reset_or_are_stale() -> None:
    p = policy()
    p.accept(h(500), 0.0)
    assert p.accept(h(1, inc=99), 0.0) is Verdict.STALE  # an old life of the peer, replayed
    assert p.accept(h(1, inc=101), 0.0) is Verdict.ACCEPT  # restarted: numbering starts again
    assert p.accept(h(2, inc=101), 0.0) is Verdict.ACCEPT
    assert p.peers[PEER].incarnation == 101 and p.counters.stale == 1


def test_gap_is_requested_filled_once_and_not_replayable() -> None:
    p = policy()
    p.accept(h(1), 0.0)
    p.accept(h(5), 0.0)  # 2, 3, 4 missing
    assert p.counters.gaps == 3
    assert p.next_deadline() == 0.0
    assert p.resend_requests(0.0) == [ResendRange(PEER, 100, 2, 4)]
    assert p.resend_requests(0.05) == []  # not due again yet
    assert p.next_deadline() == pytest.approx(0.1)
    assert p.accept(h(3), 0.06) is Verdict.ACCEPT  # the resend (or a late datagram) fills the hole
    assert p.accept(h(3), 0.07) is Verdict.REPLAY  # ...once
    assert p.resend_requests(0.1) == [ResendRange(PEER, 100, 2, 2), ResendRange(PEER, 100, 4, 4)]
    assert p.counters.recovered == 1


def test_missing_numbers_are_given_up_after_the_tries() -> None:
    p = policy()
    p.accept(h(1), 0.0)
    p.accept(h(3), 0.0)
    asked = [p.resend_requests(t / 10) for t in range(6)]
    assert [len(a) for a in asked] == [1, 1, 1, 0, 0, 0]
    assert p.counters.lost == 1 and p.counters.resend_requested == 3
    assert p.next_deadline() is None
    assert p.accept(h(2), 1.0) is Verdict.REPLAY  # too late: treated as a replay


def test_huge_gap_is_bounded_by_the_window() -> None:
    p = policy()
    p.accept(h(1), 0.0)
    p.accept(h(10_000), 0.0)
    assert len(p.peers[PEER].missing) <= 1000
    assert p.counters.lost + len(p.peers[PEER].missing) == 9998
    assert p.accept(h(50), 0.0) is Verdict.REPLAY  # older than the window


def test_liveness_and_digest_mismatch() -> None:
    p = policy()
    p.our_digest = b"a" * 16
    p.accept(h(1), 0.0)
    p.heartbeat(PEER, Heartbeat(b"a" * 16, 10, True))
    assert p.alive(PEER, 2.9) and not p.digest_mismatch(1.0)
    p.heartbeat(PEER, Heartbeat(b"b" * 16, 10, True))
    assert p.digest_mismatch(1.0)
    view = p.views(1.0)[0]
    assert (view.alive, view.digest_match, view.ready, view.flow_count) == (True, False, True, 10)
    assert not p.alive(PEER, 3.5) and not p.digest_mismatch(3.5)  # a dead peer's view does not count


def test_retransmit_buffer_is_bounded_and_serves_only_our_ranges() -> None:
    buf = RetransmitBuffer(capacity=4)
    for seq in range(1, 11):
        buf.add(seq, b"d%d" % seq)
    assert len(buf) == 4
    got = buf.lookup([ResendRange(ME, 7, 5, 8), ResendRange(99, 7, 9, 9)], ME, 7)
    assert got == [b"d7", b"d8"] and buf.missed == 2 and buf.served == 2
    assert buf.lookup([ResendRange(ME, 6, 9, 10)], ME, 7) == []  # another incarnation of us


def test_a_zero_digest_is_no_view_yet() -> None:
    p = policy()
    p.our_digest = b"a" * 16
    p.accept(h(1), 0.0)
    p.heartbeat(PEER, Heartbeat(bytes(16), 0, False))
    assert not p.digest_mismatch(0.5) and p.views(0.5)[0].digest_match is None


def test_lower_incarnation_is_adopted_once_the_known_one_is_silent() -> None:
    # A peer restarted with its clock behind its previous start (NTP step at boot).
    p = policy()
    p.accept(h(7, inc=1000), 0.0)
    assert p.accept(h(1, inc=900), 1.0) is Verdict.STALE  # the known life is alive: a replay
    assert p.accept(h(8, inc=1000), 2.0) is Verdict.ACCEPT
    assert p.accept(h(2, inc=900), 4.9) is Verdict.STALE  # heard 2.9 s ago: still alive
    assert p.accept(h(3, inc=900), 5.0) is Verdict.ACCEPT  # silent for dead_after_s: adopted
    assert p.peers[PEER].incarnation == 900 and p.counters.reincarnated == 1
    assert p.accept(h(4, inc=900), 5.1) is Verdict.ACCEPT
    # The life it left is never adopted again (only a replay can carry it now).
    assert p.accept(h(9, inc=1000), 9.0) is Verdict.STALE and p.counters.retired == 1
    assert p.peers[PEER].incarnation == 900


def test_incarnations_far_older_than_our_clock_are_not_adopted() -> None:
    wall = 1_800_000_000.0
    p = policy()
    assert p.accept(h(5, inc=int(wall) - 7 * 3600), 0.0, wall_s=wall) is Verdict.STALE  # a captured old life
    assert PEER not in p.peers and p.counters.too_old == 1
    assert p.accept(h(6, inc=int(wall) - 1200), 0.0, wall_s=wall) is Verdict.ACCEPT
    # ... nor after the known life went silent
    assert p.accept(h(1, inc=int(wall) - 7 * 3600), 10.0, wall_s=wall + 10) is Verdict.STALE
    assert p.peers[PEER].incarnation == int(wall) - 1200


def test_a_gap_larger_than_max_gap_is_lost_and_resync_worthy_not_tracked() -> None:
    p = ReceivePolicy(ME)  # the default cap
    p.accept(h(1), 0.0)
    assert p.accept(h(60_001), 0.0) is Verdict.ACCEPT
    assert p.peers[PEER].missing == {} and p.next_deadline() is None
    assert (p.counters.lost, p.counters.overflows, p.peers[PEER].overflowed) == (59_999, 1, 1)
    p.accept(h(60_005), 0.0)  # small gaps are still tracked
    assert p.resend_requests(0.0) == [ResendRange(PEER, 100, 60_002, 60_004)]


def test_gap_tracking_is_cheap_per_datagram() -> None:
    # 16,000 missing numbers, then 20,000 datagrams each followed by the loop's next_deadline():
    # O(missing) per datagram would be ~10^9 steps.
    p = ReceivePolicy(ME)
    p.accept(h(1), 0.0)
    p.accept(h(16_002), 0.0)
    t0 = time.perf_counter()
    for i in range(20_000):
        p.accept(h(16_003 + i), 0.001 * i)
        p.next_deadline()
    assert time.perf_counter() - t0 < 2.0
    assert p.counters.gaps == 16_000 and p.counters.lost + len(p.peers[PEER].missing) == 16_000


def test_replay_window_accepts_each_control_number_once_and_tolerates_reordering() -> None:
    from cluster.sync.policy import ReplayWindow

    w = ReplayWindow(size=8)
    assert [w.check(s) for s in (5, 5, 3, 3, 7, 6, 6)] == [True, False, True, False, True, True, False]
    assert w.check(100) and not w.check(92) and w.check(93)  # 8 below the highest is out of the window


def test_control_datagrams_open_no_gaps_and_are_replay_protected() -> None:
    p = policy()
    p.accept(h(1), 0.0)
    ctl = [Header(MsgType.RESEND, PEER, 100, s, 1) for s in (1, 2, 9)]
    assert [p.accept_control(c, 0.1) for c in ctl] == [Verdict.ACCEPT] * 3
    assert p.accept_control(ctl[1], 0.2) is Verdict.REPLAY
    assert p.accept_control(Header(MsgType.RESEND, PEER, 99, 50, 1), 0.2) is Verdict.STALE  # older life
    assert p.counters.gaps == 0 and p.peers[PEER].highest == 1 and p.next_deadline() is None


def test_a_heartbeat_turns_numbers_older_than_the_senders_buffer_into_a_resync() -> None:
    p = policy()
    p.accept(h(1), 0.0)
    p.accept(h(50), 0.0)  # 2..49 missing
    p.heartbeat(PEER, Heartbeat(b"a" * 16, 0, True, oldest_seq=40))
    peer = p.peers[PEER]
    assert list(peer.missing) == list(range(40, 50)) and peer.resync_wanted
    assert p.counters.unrepairable == 38
    p.resync_started(PEER)
    assert not peer.missing and not peer.resync_wanted and p.counters.covered == 10


def test_numbers_given_up_mark_the_peer_for_a_resync() -> None:
    p = policy()
    p.accept(h(1), 0.0)
    p.accept(h(3), 0.0)
    for t in range(5):
        p.resend_requests(t / 10)
    assert p.peers[PEER].resync_wanted and p.counters.resyncs_wanted == 1


def test_a_peer_that_started_after_us_is_tracked_from_its_first_number() -> None:
    p = policy()
    p.start(0.0, wall_s=1_000.0)
    p.accept(h(4, inc=1_000), 0.1)  # started with us: 1..3 lost on the way
    assert p.counters.gaps == 3
    q = policy()
    q.start(0.0, wall_s=1_000.0)
    q.accept(h(400, inc=500), 0.1)  # running long before we started: the start-up resync covers it
    assert q.counters.gaps == 0
    q.accept(h(7, inc=501), 0.2)  # its next life: from 1
    assert q.counters.gaps == 6


def test_the_incarnation_age_limit_is_about_two_renewals() -> None:
    # A live peer's incarnation is at most one renewal old: two leave one for clock skew.
    assert MAX_INCARNATION_AGE_S == 2 * INCARNATION_RENEW_S <= 3600
    wall = 1_800_000_000.0
    fresh = ReceivePolicy(ME, dead_after_s=3.0)  # the defaults, as flowsync uses them
    fresh.start(0.0, wall)
    # A fresh receiver refuses a life captured three hours ago (accepted up to six hours before) ...
    assert fresh.accept(h(5, inc=int(wall) - 3 * 3600), 0.0, wall_s=wall) is Verdict.STALE
    assert fresh.accept(h(6, inc=int(wall - 2.5 * INCARNATION_RENEW_S)), 0.0, wall_s=wall) is Verdict.STALE
    assert PEER not in fresh.peers and fresh.counters.too_old == 2
    # ... and adopts one renewed within the limit.
    assert fresh.accept(h(7, inc=int(wall - 1.5 * INCARNATION_RENEW_S)), 0.0, wall_s=wall) is Verdict.ACCEPT


def hb(seq: int, inc: int) -> Header:
    return Header(MsgType.HEARTBEAT, PEER, inc, seq, 1)


def test_a_replayed_old_heartbeat_does_not_keep_a_dead_peer_alive() -> None:
    wall = 1_800_000_000.0
    p = ReceivePolicy(ME, dead_after_s=3.0)
    p.start(0.0, wall)
    i0 = int(wall) - 60
    i1 = i0 + int(INCARNATION_RENEW_S)  # the peer renewed (its clock says so)
    captured = [hb(s, i0) for s in range(1, 11)]  # an attacker recorded its first life
    for t, header in enumerate(captured):
        assert p.accept(header, float(t), wall + t) is Verdict.ACCEPT
    base = INCARNATION_RENEW_S
    assert p.accept(hb(1, i1), base, wall + base) is Verdict.ACCEPT
    assert p.accept(hb(2, i1), base + 1, wall + base + 1) is Verdict.ACCEPT
    # It dies. Its old heartbeats, replayed, are refused while it lives and after it died.
    for k, header in enumerate(captured):  # one every 0.5 s from 1 s after its last word
        now = base + 2 + 0.5 * k
        assert p.accept(header, now, wall + now) is Verdict.STALE
    assert not p.alive(PEER, base + 20)
    assert p.accept(hb(2, i1), base + 20, wall + base + 20) is Verdict.REPLAY  # its last life, replayed
    assert not p.alive(PEER, base + 20) and p.peers[PEER].incarnation == i1
    assert p.counters.retired == sum(1 for k in range(10) if base + 2 + 0.5 * k >= base + 1 + p.dead_after_s)
    # A control datagram of the life it left is refused too.
    assert p.accept_control(Header(MsgType.RESYNC_REQUEST, PEER, i0, 99, 0), base + 21, wall + base + 21) \
        is Verdict.STALE
