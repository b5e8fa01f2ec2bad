"""Minimal BGP4 speaker: sans-IO codec and state machine, plus the trio I/O around them.

Pure modules: `codec` (bytes <-> messages, framing), `attrs` (path attributes and NLRI prefixes),
`fsm` (RFC 4271 §8 table), `negotiate` (OPEN), `peering` (collision and failure-report decisions),
`rib` (desired state, per-peer diffing), `config` (validated settings). I/O: `speaker` (the peer loops, with
`inbox`, the typed items they dispatch on, and `peer`, their state) and `transport` (TCP sockets,
TCP MD5). `__main__` (`python -m bgp speaker.yaml`: announce, SIGTERM = graceful shutdown).
BFD (RFC 5880/5881) per peer in the `bfd` subpackage: `bfd.codec` (control packets), `bfd.fsm`
(session table, timers, demux), `bfd.session` (the BFD I/O: UDP with TTL 255); a failed BFD
session tears its BGP session down.

Operator notes:
- Hold time 0 or >= 3 s (1-2 are refused with NOTIFICATION 2/6, as BIRD does). With 3 s a silent
  node is dropped in about 3-4 s; a killed one (FIN) in tens of milliseconds.
- After a hold-time expiry BIRD refuses the peer for `error wait time` (60 s by default); lower it
  (examples/bird.conf uses `error wait time 1, 10`) or a restarted node waits a minute.
- ECMP (`merge paths on`) merges only equal routes: give all nodes the same MED, LOCAL_PREF and
  communities policy. Graceful Restart is never advertised, so dead nodes' routes are not kept.
- BFD (`bfd: {interval_ms: 100, multiplier: 3}` on a peer, `protocol bfd` + `bfd on` at the
  router, see examples/bird-bfd.conf) drops a frozen or unplugged node in about 3 x interval.
  The router's BGP does not wait for BFD, so a peer without BFD simply keeps plain BGP.
"""
