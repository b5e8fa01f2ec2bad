"""The BGP speaker's peer loops: trio tasks and timers around the sans-IO core.

Theory of operation
-------------------
`Speaker.run` owns a nursery (start it with `await nursery.start(speaker.run)`; it reports ready
once the listener, if any, is bound). Inside: an optional listener that accepts only configured
peer addresses, and one loop per peer. A peer loop is the only place its `Fsm` is touched: it
waits for the next item in its `Inbox` (`bgp.inbox`: a frame from a connection, a finished connect
attempt, an accepted connection, a BFD change, a RIB change, a stop request) or the FSM's next
deadline, dispatches on the item's type, feeds the event in with `trio.current_time()`, and
carries out the actions. Sockets, readers and closing are `bgp.transport`'s; decoding happens in
the loop, so the 4-octet-AS switch applies exactly from the message after the OPEN.

Backpressure: at most INBOX_FRAMES received messages wait in a peer's inbox (`bgp.inbox`); the
FSM's deadline is checked between any two items, so a flooded peer still gets its keepalives. A
peer that floods and does not read our messages in turn is dropped by the send bound below when its
Hold time runs out, as RFC 4271 expects.

Collisions (RFC 4271 §6.8): a connection accepted in OpenSent/OpenConfirm gets its own FSM
(`peer.other`); `bgp.peering` decides which connection to dump (Cease 6/7) once an OPEN names the
peer's identifier. Routes go out on whichever FSM is Established.

Shutdown (`shutdown()`): optionally re-advertise everything with GRACEFUL_SHUTDOWN and wait, then
withdraw all routes, then NOTIFICATION Cease/Administrative Shutdown and close (FIN after data).
Cancelled without `shutdown()` (the node stops on an error), `run` still sends Cease 6/2 on every
session and closes every connection, shielded, within CANCEL_CLEANUP_S, so routers drop our routes
at once instead of at hold expiry; BFD sessions go AdminDown as they are cancelled.

Sends are awaited by the peer loop, so each is bounded by the Hold deadline (and SEND_TIMEOUT_S):
a peer that stops reading cannot hold our timers back. A second connection while Established is
answered with Cease 6/7. Logging: FSM transitions at INFO (Idle/Connect/Active flapping at most once
a minute per peer), NOTIFICATIONs sent and received at WARNING with code/subcode, except those
`bgp.peering` calls expected; `snapshot()` shows the latest failure reason as `last_error`.

BFD (RFC 5880/5881): peers with a `bfd` config get a session each in a `BfdEndpoint` in the
speaker's nursery, whose changes into or out of Up reach the peer's inbox. A failure feeds BFD_DOWN
into the FSM (Cease 6/10, close, restart after IdleHold); Up again resets the connect backoff
(`Fsm.set_path_up`). On shutdown the sessions go AdminDown after the BGP Cease.
"""
from __future__ import annotations

import ipaddress
import logging
import random
from collections.abc import Callable
from functools import partial
from typing import Any

import trio

from bgp import peering, transport
from bgp.attrs import Prefix
from bgp.bfd.codec import State as BfdState
from bgp.bfd.fsm import SessionConfig as BfdSessionConfig
from bgp.bfd.fsm import StateChange as BfdStateChange
from bgp.bfd.session import BFD_PORT, BfdEndpoint
from bgp.bfd.session import Sender as BfdSender
from bgp.codec import Message, Notification, Open, Update, decode, encode
from bgp.config import PeerConfig, SpeakerConfig
from bgp.errors import DecodeError, notification_text
from bgp.fsm import (
    Action,
    Close,
    Connect,
    Event,
    EventKind,
    Fsm,
    ResendRoutes,
    Send,
    SessionDown,
    SessionUp,
    State,
    Timer,
    event_for,
)
from bgp.inbox import Accepted, BfdChange, Closed, Conn, Connected, ConnectFailed, Frame, Item, ReadError, Stop, Sync
from bgp.negotiate import FsmConfig
from bgp.peer import Peer, PeerStatus
from bgp.peering import Accept, Resolution
from bgp.rib import AdjRibOut, DesiredRib, ExportPolicy, RouteAttrs, end_of_rib
from bgp.transport import Connector, tcp_connect

log = logging.getLogger(__name__)

SEND_TIMEOUT_S = 10.0
CANCEL_CLEANUP_S = 2.0  # Cease and close on cancellation, shielded, at most this long
_QUIET_STATES = frozenset({State.IDLE, State.CONNECT, State.ACTIVE})


class Speaker:
    """Originates routes to the configured peers. The node calls `announce` and `withdraw`."""

    def __init__(self, config: SpeakerConfig, *, connector: Connector = tcp_connect,
                 rng: Callable[[], float] = random.random, bfd_port: int = BFD_PORT,
                 bfd_sender: BfdSender | None = None, on_sessions_changed: Callable[[], None] | None = None) -> None:
        """`on_sessions_changed` is called whenever a session comes up or goes down (read
        `established_peers()` then)."""
        self.config = config
        self._on_sessions_changed = on_sessions_changed
        self.rib = DesiredRib()
        self.draining = False
        self._connector = connector
        self._rng = rng
        self._nursery: trio.Nursery | None = None
        self._peers: dict[str, Peer] = {str(pc.address): Peer(pc, self._new_fsm(pc)) for pc in config.peers}
        self.listen_port: int | None = None
        self._stopping = False
        bfd = {str(pc.address): BfdSessionConfig.from_ms(pc.bfd.interval_ms, pc.bfd.multiplier)
               for pc in config.peers if pc.bfd is not None}
        self.bfd = BfdEndpoint(bfd, on_change=self._bfd_changed, port=bfd_port, rng=rng,
                               sender=bfd_sender) if bfd else None

    # ---- the node's API -------------------------------------------------------------------

    def announce(self, prefix: Prefix, attrs: RouteAttrs = RouteAttrs()) -> None:
        self.rib.announce(prefix, attrs)
        self._request_sync()

    def withdraw(self, prefix: Prefix) -> None:
        self.rib.withdraw(prefix)
        self._request_sync()

    def peer_state(self, address: str) -> State:
        return self._peers[str(ipaddress.ip_address(address))].fsm.state

    def established_peers(self) -> int:
        """How many peers have an Established session (on either of two colliding connections)."""
        return sum(any(fsm.state is State.ESTABLISHED for fsm, _ in p.fsms()) for p in self._peers.values())

    async def wait_established(self, address: str) -> None:
        await self._peers[str(ipaddress.ip_address(address))].up.wait()

    def snapshot(self) -> list[PeerStatus]:
        bfd = self.bfd.snapshot() if self.bfd is not None else {}
        return [p.status(bfd.get(name)) for name, p in self._peers.items()]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self.bfd is not None:
                    await nursery.start(self.bfd.run)
                if self.config.listen:
                    self.listen_port = await nursery.start(partial(
                        transport.listen, self.config.listen_address, self.config.listen_port,
                        [p.config for p in self._peers.values()],
                        {name: p.inbox for name, p in self._peers.items()}, self._accept))
                for peer in self._peers.values():
                    nursery.start_soon(self._peer_loop, peer)
                task_status.started()
        finally:
            self._nursery = None
            with trio.CancelScope(shield=True):
                await self._abort()

    async def _abort(self) -> None:
        """Cancelled or crashed without `shutdown()`: tell every peer now rather than at its hold expiry.

        Cease/Administrative Shutdown (6/2), as `shutdown()` sends: stopping the speaker is the
        node's decision (it stops attracting traffic it may not be able to forward), not a protocol
        error, and routers handle it like any Cease. No withdrawals first: closing the session
        drops its routes at once. Bounded by CANCEL_CLEANUP_S; then whatever is still open is
        closed forcefully. (BFD sessions send AdminDown from `BfdEndpoint.run` as they are cancelled.)
        """
        self._stopping = True  # connections are closed inline: FIN after the NOTIFICATION
        with trio.move_on_after(CANCEL_CLEANUP_S):
            try:
                async with trio.open_nursery() as nursery:
                    for peer in self._peers.values():
                        nursery.start_soon(self._stop_fsms, peer)
            except Exception:  # noqa: BLE001 - the streams below must be closed whatever happened
                log.exception("Cease on cancellation failed; closing the connections")
        for peer in self._peers.values():
            streams = [c.stream for _, c in peer.fsms() if c is not None and c.stream is not None]
            streams += [item.stream for item in peer.inbox.drain() if isinstance(item, (Accepted, Connected))]
            for stream in streams:
                await trio.aclose_forcefully(stream)

    async def shutdown(self, *, timeout_s: float = 10.0) -> None:
        """Graceful: GRACEFUL_SHUTDOWN + wait (if configured), withdraw all, Cease 6/2, close."""
        if self.config.graceful_shutdown_wait_s > 0 and any(p.fsm.state is State.ESTABLISHED
                                                             for p in self._peers.values()):
            log.info("graceful shutdown: tagging routes 65535:0 for %ss", self.config.graceful_shutdown_wait_s)
            self.draining = True
            self._request_sync()
            await trio.sleep(self.config.graceful_shutdown_wait_s)
        self.rib.routes.clear()
        self._stopping = True  # from now on connections are closed inline, so the FIN is not cut short
        with trio.move_on_after(timeout_s) as scope:
            done = []
            for peer in self._peers.values():
                ev = trio.Event()
                done.append(ev)
                peer.inbox.post(Stop(ev))
            for ev in done:
                await ev.wait()
        if scope.cancelled_caught:
            log.warning("graceful shutdown: peers did not finish within %ss", timeout_s)
        if self.bfd is not None:
            await self.bfd.shutdown()  # AdminDown: the routers must not take this for a failure
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    # ---- internals --------------------------------------------------------------------------

    def _new_fsm(self, pc: PeerConfig) -> Fsm:
        cfg = FsmConfig(local_as=self.config.local_as, peer_as=pc.asn, router_id=self.config.router_id,
                        hold_time_s=pc.hold_time_s, passive=pc.passive, connect_retry_s=pc.connect_retry_s,
                        families=self.config.families)
        return Fsm(cfg, self._rng)

    def _bfd_changed(self, address: str, change: BfdStateChange, failed: bool) -> None:
        if not self._stopping and peering.bfd_matters(change.old, change.new, failed):
            self._peers[address].inbox.post(BfdChange(change.new is BfdState.UP, failed, change.diag.name))

    def _request_sync(self) -> None:
        for peer in self._peers.values():
            if not peer.sync_pending:
                peer.sync_pending = True
                peer.inbox.post(Sync())

    def _policy(self, peer: Peer, fsm: Fsm) -> ExportPolicy:
        assert fsm.negotiated is not None
        return ExportPolicy(local_as=self.config.local_as, ibgp=fsm.negotiated.ibgp,
                            next_hop_v4=self.config.next_hop_v4, next_hop_v6=self.config.next_hop_v6,
                            families=fsm.negotiated.families, peer_attrs=peer.config.attrs,
                            graceful_shutdown=self.draining,
                            next_hop_v6_link_local=self.config.next_hop_v6_link_local)

    async def _accept(self, sock: trio.socket.SocketType) -> tuple[trio.socket.SocketType, Any]:
        return await sock.accept()

    def _start_reader(self, peer: Peer, conn: Conn) -> None:
        assert self._nursery is not None
        transport.start_reader(self._nursery, conn, peer.inbox)

    # ---- the peer loop ----------------------------------------------------------------------

    async def _peer_loop(self, peer: Peer) -> None:
        start = EventKind.MANUAL_START_PASSIVE if peer.config.passive else EventKind.MANUAL_START
        await self._apply(peer, peer.fsm, None, Event(start))
        while True:
            item: Item | None = None
            with trio.move_on_at(peer.next_deadline()):
                item = await peer.inbox.receive()
            match item:
                case None:  # a deadline
                    for fsm, conn in peer.fsms():
                        await self._apply(peer, fsm, conn, None)
                case Sync():
                    peer.sync_pending = False
                    await self._sync(peer)
                case Stop(done=done):
                    await self._stop(peer)
                    done.set()
                    return
                case Accepted(stream=stream):
                    await self._accepted(peer, stream)
                case BfdChange():
                    await self._bfd_change(peer, item)
                case Connected(conn=conn, stream=stream):
                    await self._connected(peer, conn, stream)
                case ConnectFailed(conn=conn, reason=reason):
                    if peer.conn is conn and conn.stream is None:
                        log.debug("%s: connect failed: %s", peer.config.address, reason)
                        await self._apply(peer, peer.fsm, conn, Event(EventKind.TCP_FAILS))
                case Frame() | ReadError() | Closed():
                    conn_fsm = peer.fsm_for(item.conn)
                    if conn_fsm is not None:  # else from a connection already given up
                        await self._from_connection(peer, conn_fsm, item)

    async def _from_connection(self, peer: Peer, fsm: Fsm, item: Frame | ReadError | Closed) -> None:
        match item:
            case Frame(conn=conn, data=data):
                four = fsm.negotiated.four_octet_as if fsm.negotiated else False
                try:
                    msg = decode(data, four_octet_as=four)
                except DecodeError as exc:
                    await self._apply(peer, fsm, conn, Event(EventKind.MESSAGE_ERROR, error=exc))
                    return
                await self._received(peer, fsm, conn, msg)
            case ReadError(conn=conn, error=error):
                await self._apply(peer, fsm, conn, Event(EventKind.MESSAGE_ERROR, error=error))
            case Closed(conn=conn, reason=reason):
                await self._apply(peer, fsm, conn, Event(EventKind.TCP_FAILS, reason=reason))

    async def _connected(self, peer: Peer, conn: Conn, stream: trio.abc.Stream) -> None:
        if peer.conn is not conn or conn.stream is not None:
            await transport.close_quietly(stream)  # an attempt given up meanwhile
            return
        conn.stream = stream
        conn.scope = trio.CancelScope()  # the attempt used the first one
        self._start_reader(peer, conn)
        await self._apply(peer, peer.fsm, conn, Event(EventKind.TCP_CONNECTED))

    async def _bfd_change(self, peer: Peer, change: BfdChange) -> None:
        now = trio.current_time()
        for fsm, _ in peer.fsms():  # Up: the path works again, no backoff left from its outage
            fsm.set_path_up(change.up, now)
        if change.failed:
            if peering.bfd_down_counts(peer.fsm.state):
                peer.bfd_downs += 1
            log.info("%s: BFD session down (%s) in BGP state %s", peer.config.address, change.diag,
                     peer.fsm.state.value)
            for fsm, conn in peer.fsms():
                await self._apply(peer, fsm, conn, Event(EventKind.BFD_DOWN))

    async def _received(self, peer: Peer, fsm: Fsm, conn: Conn, msg: Message) -> None:
        log.debug("%s: received %s", peer.config.address, type(msg).__name__)
        if isinstance(msg, Update):
            peer.received_updates += 1  # parsed and validated; we originate only
            if msg.errors:
                peer.treat_as_withdraw += 1
                log.debug("%s: UPDATE treated as withdraw: %s", peer.config.address, msg.errors)
        report = None
        if isinstance(msg, Notification):
            report = peering.received_notification(msg)
            log.warning("%s: %s in %s%s", peer.config.address, report.text, fsm.state.value,
                        f", data {msg.data.hex()}" if msg.data else "")
        await self._apply(peer, fsm, conn, event_for(msg))
        if report is not None:
            peer.last_error = report.last_error
        if isinstance(msg, Open) and fsm.state is State.OPEN_CONFIRM and peer.other is not None:
            await self._resolve_collision(peer, msg)

    # ---- collisions (RFC 4271 §6.8; the decisions are bgp.peering's) ------------------------

    def _promote_other(self, peer: Peer) -> None:
        """The primary connection is gone: the colliding incoming one becomes the peer's FSM."""
        assert peer.other is not None
        log.info("%s: primary connection gone (%s); carrying on with the incoming one in %s",
                 peer.config.address, peer.fsm.state.value, peer.other[0].state.value)
        peer.promote_other()

    async def _dump_other(self, peer: Peer) -> None:
        """Close the colliding connection with Cease 6/7; the primary one carries on."""
        assert peer.other is not None
        other_fsm, other_conn = peer.other
        peer.other = None
        await self._apply(peer, other_fsm, other_conn, Event(EventKind.OPEN_COLLISION_DUMP))

    async def _resolve_collision(self, peer: Peer, msg: Open) -> None:
        if peer.other is None:
            return
        other_fsm, other_conn = peer.other
        primary = None if peer.conn is None else peering.Side(peer.fsm.state, peer.conn.outgoing)
        decision = peering.resolve_collision(primary, peering.Side(other_fsm.state, other_conn.outgoing),
                                             self.config.router_id, msg.bgp_id)
        match decision:
            case Resolution.WAIT:
                pass
            case Resolution.PROMOTE_OTHER:
                self._promote_other(peer)  # no collision any more: the primary connection has gone
            case Resolution.DUMP_OTHER_FOR_ESTABLISHED:
                log.info("%s: connection collision with an Established session, closing the incoming one",
                         peer.config.address)
                await self._dump_other(peer)
            case Resolution.DUMP_OTHER | Resolution.DUMP_PRIMARY:
                assert peer.conn is not None
                dumped = peer.conn if decision is Resolution.DUMP_PRIMARY else other_conn
                log.info("%s: connection collision, closing the %s one", peer.config.address,
                         "outgoing" if dumped.outgoing else "incoming")
                if decision is Resolution.DUMP_PRIMARY:
                    old_fsm, old_conn = peer.fsm, peer.conn
                    peer.fsm, peer.conn, peer.other = other_fsm, other_conn, None
                    await self._apply(peer, old_fsm, old_conn, Event(EventKind.OPEN_COLLISION_DUMP))
                else:
                    await self._dump_other(peer)

    async def _accepted(self, peer: Peer, stream: trio.abc.Stream) -> None:
        state = peer.fsm.state
        conn = Conn(outgoing=False, stream=stream)
        match peering.on_accept(state, has_connection=peer.conn is not None, has_other=peer.other is not None):
            case Accept.REPLACE_ATTEMPT:
                if peer.conn is not None:
                    await self._drop(peer.conn)  # abandon our own attempt: the peer's connection wins
                peer.conn = conn
                self._start_reader(peer, conn)
                await self._apply(peer, peer.fsm, conn, Event(EventKind.TCP_ACCEPTED))
            case Accept.SECOND_FSM:
                fsm = self._new_fsm(peer.config)
                fsm.path_up = peer.fsm.path_up
                peer.other = (fsm, conn)
                self._start_reader(peer, conn)
                await self._apply(peer, fsm, conn, Event(EventKind.MANUAL_START_PASSIVE))
                await self._apply(peer, fsm, conn, Event(EventKind.TCP_ACCEPTED))
            case Accept.TO_FSM:
                await self._apply(peer, peer.fsm, conn, Event(EventKind.TCP_ACCEPTED))  # Idle: refused
            case Accept.REFUSE:
                log.warning("%s: refusing another connection in %s: sent NOTIFICATION 6/7 (%s)",
                            peer.config.address, state.value, notification_text(6, 7))
                assert self._nursery is not None
                self._nursery.start_soon(transport.refuse, stream)

    # ---- feeding the FSM and carrying out its actions ----------------------------------------

    async def _apply(self, peer: Peer, fsm: Fsm, conn: Conn | None, event: Event | None) -> None:
        """Feed one event (None: the passage of time) into an FSM, log the transition, carry out the actions."""
        old, old_error = fsm.state, fsm.last_error
        now = trio.current_time()
        actions = fsm.poll(now) if event is None else fsm.handle(event, now)
        if fsm.last_error and fsm.last_error != old_error:
            peer.last_error = fsm.last_error
        if fsm.state is not old:
            self._log_transition(peer, fsm, old, now)
        peer.state_before = old
        await self._run_actions(peer, fsm, conn, actions)

    def _log_transition(self, peer: Peer, fsm: Fsm, old: State, now: float) -> None:
        """INFO. Only the Connect/Active cycle of a peer that refuses TCP (and the restarts out of Idle)
        is rate-limited; a fall to Idle, which an error or a stop causes, is always shown."""
        which = "" if fsm is peer.fsm else " (other connection)"
        why = f" ({fsm.last_error})" if fsm.last_error and fsm.state in _QUIET_STATES else ""
        if old in _QUIET_STATES and fsm.state in (State.CONNECT, State.ACTIVE):
            held = peer.flap_log.allow(now)
            if held is None:
                log.debug("%s%s: %s -> %s%s", peer.config.address, which, old.value, fsm.state.value, why)
                return
            if held:
                why += f" ({held} similar transitions not logged)"
        log.info("%s%s: %s -> %s%s", peer.config.address, which, old.value, fsm.state.value, why)

    async def _run_actions(self, peer: Peer, fsm: Fsm, conn: Conn | None, actions: list[Action]) -> None:
        name = peer.config.address
        for action in actions:
            match action:
                case Send(message=message):
                    await self._send(peer, fsm, conn, message)
                case Connect():
                    if fsm is not peer.fsm:
                        continue  # an FSM given up (collision) does not start connections
                    if peer.conn is not None:
                        await self._drop(peer.conn)
                    conn = peer.conn = Conn(outgoing=True)
                    assert self._nursery is not None
                    self._nursery.start_soon(transport.attempt, peer.config, conn, self._connector, peer.inbox)
                case Close():
                    if conn is not None:
                        await self._drop(conn)
                    if peer.conn is conn and fsm is peer.fsm:
                        peer.conn = None
                        if peer.other is not None:
                            self._promote_other(peer)  # the colliding connection is all we have now
                    elif peer.other is not None and peer.other[1] is conn:
                        peer.other = None
                case SessionUp(negotiated=negotiated):
                    peer.established_count += 1
                    peer.adj_out = AdjRibOut()
                    log.info("%s: session Established (hold %ss, peer id %s, families %s)", name,
                             negotiated.hold_time_s, negotiated.peer_id, sorted(negotiated.families))
                    policy = self._policy(peer, fsm)
                    for update in peer.adj_out.sync(self.rib.routes, policy) + end_of_rib(policy.families):
                        await self._send(peer, fsm, conn, update)
                    peer.up.set()
                    if fsm is peer.fsm and peer.other is not None and \
                            peering.dump_other_on_established(peer.other[0].state):
                        log.info("%s: connection collision with the Established session, closing the incoming one",
                                 name)
                        await self._dump_other(peer)  # RFC 4271 §6.8
                    if self._on_sessions_changed is not None:
                        self._on_sessions_changed()
                case SessionDown(reason=reason):
                    peer.last_error = reason
                    peer.up = trio.Event()
                    log.info("%s: session down: %s", name, reason)
                    if self._on_sessions_changed is not None:
                        self._on_sessions_changed()
                case ResendRoutes(afi=afi, safi=safi):
                    for update in peer.adj_out.resend((afi, safi), self._policy(peer, fsm)):
                        await self._send(peer, fsm, conn, update)

    async def _send(self, peer: Peer, fsm: Fsm, conn: Conn | None, msg: Message) -> None:
        """Send one message. The peer loop waits for it, so it is bounded: by SEND_TIMEOUT_S, and by the
        Hold deadline, so that a peer that stops reading cannot hold our timers back. (Keepalives
        could not get through a full send buffer anyway; the peer's Hold timer runs out as ours would.)"""
        if conn is None or conn.stream is None or conn.torn:
            return  # a send that was cut short left half a message: nothing more can be framed on it
        if isinstance(msg, Notification):
            report = peering.sent_notification(msg, fsm.failure, stopping=self._stopping)
            log.log(logging.WARNING if report.failure else logging.INFO, "%s: %s in %s%s", peer.config.address,
                    report.text, peer.state_before.value, f": {report.why}" if report.why else "")
            if report.failure:
                peer.last_error = report.last_error
        four = fsm.negotiated.four_octet_as if fsm.negotiated else True
        now = trio.current_time()
        deadline, by_hold = now + SEND_TIMEOUT_S, False
        hold = fsm.timer(Timer.HOLD)
        if hold is not None and hold < deadline:
            deadline, by_hold = max(hold, now), True
        failed = await transport.send(conn, encode(msg, four_octet_as=four), deadline, by_hold=by_hold)
        if failed is not None:
            peer.inbox.post(Closed(conn, failed))

    async def _sync(self, peer: Peer) -> None:
        for fsm, conn in peer.fsms():  # routes follow whichever FSM is Established
            if fsm.state is State.ESTABLISHED:
                for update in peer.adj_out.sync(self.rib.routes, self._policy(peer, fsm)):
                    await self._send(peer, fsm, conn, update)
                return

    async def _stop(self, peer: Peer) -> None:
        await self._sync(peer)  # the desired RIB is empty now: withdraw everything
        await self._stop_fsms(peer)

    async def _stop_fsms(self, peer: Peer) -> None:
        """ManualStop: Cease 6/2 on a session (OpenSent and later), then close; attempts abandoned."""
        if peer.other is not None:
            other_fsm, other_conn = peer.other
            await self._apply(peer, other_fsm, other_conn, Event(EventKind.MANUAL_STOP))
        await self._apply(peer, peer.fsm, peer.conn, Event(EventKind.MANUAL_STOP))

    async def _drop(self, conn: Conn) -> None:
        await transport.drop(conn, self._nursery, inline=self._stopping)
