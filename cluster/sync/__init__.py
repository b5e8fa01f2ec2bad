"""Flow sync between the nodes of a cluster.

- `codec`: the datagram wire format (pure).
- `policy`: accept/reject, gap tracking, retransmit buffer (pure, takes `now`).
- `engine`: the protocol core (pure: datagrams and `now` in, actions out).
- `resync`: resync state: start-up and peer resyncs, streamed answers, answer guards (pure).
- `records`: flow records between the wire and the flow table (pure, numpy).
- `pacing`: the token bucket of bulk sends (pure, takes `now`).
- `identity`: node ids and incarnations.
- `status`: flow sync's section of the status document (pure).
- `config`: the ``sync:`` configuration.
- `flowsync`: the one trio module with the socket, the ring reader and the data plane.

`flowsync` imports trio and the data plane; import it explicitly
(``from cluster.sync.flowsync import FlowSync``).
"""
