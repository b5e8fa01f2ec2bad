"""Flow sync's section of the node's status document (pure: built from the engine's state).

`lbnode status` shows it as ``sync``: this node's numbers and keys, whether it is ready and
repairing, each peer as the receive policy sees it, and every counter (the engine's protocol
counters, flowsync.py's I/O counters and the receive policy's).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cluster.sync.engine import SyncEngine


def sync_status(engine: SyncEngine, counters: Mapping[str, int], ring_pending_bytes: int,
                now: float) -> dict[str, Any]:
    c = engine.policy.counters
    return {
        "node_id": engine.node_id,
        "incarnation": engine.incarnation,
        "sequence": engine.seq,
        "keys": {"current": f"{engine.keys.current_id:08x}",
                 "next": None if engine.keys.next_id is None else f"{engine.keys.next_id:08x}"},
        "ready": engine.ready,
        "digest_mismatch": engine.policy.digest_mismatch(now),
        "repairing": engine.repairing(),
        "gaps_open": engine.gaps_open(),
        "ring_pending_bytes": ring_pending_bytes,
        "peers": [{
            "node_id": v.node_id, "address": engine.peer_addr.get(v.node_id), "alive": v.alive,
            "last_seen_s": round(v.last_heard_s_ago, 3), "highest_seq": v.highest_seq, "lag": v.missing,
            "digest_match": v.digest_match, "ready": v.ready, "flows": v.flow_count,
            "resync_wanted": v.resync_wanted, "resyncing": v.node_id in engine.peer_resyncs,
        } for v in engine.policy.views(now)],
        "counters": {**counters, "replayed": c.replayed, "stale": c.stale, "gaps": c.gaps,
                     "recovered": c.recovered, "lost": c.lost, "resend_requested": c.resend_requested,
                     "self_looped": c.self_looped, "retransmit_missed": engine.retransmit.missed,
                     "gap_overflows": c.overflows, "reincarnated": c.reincarnated,
                     "incarnation_too_old": c.too_old, "unrepairable": c.unrepairable,
                     "control_replayed": c.control_replayed, "resends_received": c.recovered,
                     "gaps_open": engine.gaps_open()},
    }
