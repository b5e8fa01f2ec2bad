"""The lbnode node: one nursery owns every component; health drives the data plane and BGP.

Start-up: compile and attach the XDP program (a stale one left by a killed node is replaced),
learn backend MACs, start health checks, start flow sync and resync the peers' flow tables
(bounded by `sync.resync_timeout_s`), start BGP, serve status. Only then is the node *ready*,
and VIPs whose services have `need` usable backends are announced.

Out of the route: when every BGP session is lost (the node's link went down, a partition, the
router restarted), the node may miss flows its peers pin meanwhile, and the router will send it
their packets once it is back. So it withdraws from its RIB at once (nothing reaches a router
then), and when a session is Established again it resyncs its peers' tables, as at start-up,
before announcing. `lbnode status` says why a VIP is not announced (`node.withheld`).

Changes: the components report on one inbox (cluster.events), which one task applies to the
view. Every batch of events, and every reload, recomputes the desired state once
(cluster.desired): the data plane, the routes, the digest peers compare and the status document
all read that one `Desired`. `reconcile()` is synchronous and cheap: it withdraws what is no
longer wanted at once and wakes the apply task (cluster.applier), which runs `DataPlane.apply`
on a worker thread and only then announces what the applied state allows, so a route is never
announced before the data plane has its services. Components come from the factories in
`Components` (cluster.components), so tests can run all this with fakes of them.

Signals: SIGTERM/SIGINT drain (withdraw routes, gracefully if configured; keep forwarding for
`drain_s`; then detach and remove the pins); SIGUSR2 (`lbnode stop --keep-forwarding`, for
upgrades) withdraws routes and exits at once, leaving the program attached and the maps pinned:
it forwards while no node runs, and the next start adopts the maps and replaces the program in
place. SIGHUP reloads the config atomically: a bad file is refused with its error logged and the
running config stays.

The data plane never compiles in this process (bcc's LLVM would stay resident): a child does,
and pins everything in bpffs (bpf/pinned.py says where, and what each way of stopping leaves).

When the control plane dies: a component that raises takes the node down, its BGP session
closes and the router withdraws the node's routes; the XDP program is detached in `finally`
(the pins stay, so a supervisor's restart keeps the flows). A SIGKILLed node cannot detach:
its program stays attached and keeps forwarding pinned and hashed flows correctly (the tables
are still valid) while the router, told by the closed BGP session (or BFD / hold timer for a
frozen node), moves traffic away. That beats falling back to XDP_PASS (vc5's choice after
60 s), which would blackhole: the node holds no VIP. A restart adopts the pinned maps (flows,
tables, counters) and replaces the stale program in place.
"""
from __future__ import annotations

import dataclasses
import gc
import logging
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import trio

from bgp.rib import RouteAttrs
from bpf.loader import Limits, XdpMode
from bpf.pinned import Leave
from cluster import control, feeds, metrics, status_doc
from cluster.adminctl import AdminControl
from cluster.applier import Applier
from cluster.components import Components, DataPlaneLike, HealthLike, SpeakerLike, SyncLike
from cluster.config import ConfigError, IPAddress, NodeConfig, load_file
from cluster.desired import NOT_READY, Prefix, View, decide
from cluster.events import DigestVerdict, HealthReset, Inbox, MacsLearned, NodeEvent, SessionsChanged, WeightsPublished
from cluster.lifecycle import Component, Supervisor
from cluster.loadfeed import LoadFeed, LoadTransport
from cluster.loadshare import Published, changes_hash
from cluster.loopwatch import LoopWatch, heartbeat
from cluster.status import DocumentCache, Peer
from cluster.status import serve as serve_status
from cluster.status_doc import StatusInputs
from cluster.sync.identity import node_id_of
from cluster.web import Listener
from healthcheck.config import BackendId
from healthcheck.state import BackendChanged

log = logging.getLogger(__name__)

CLEANUP_TIMEOUT_S = 10.0
ATTACH_CHECK_S = 1.0  # how often the program's attachment and the interface's MAC are checked
STATUS_REUSE_S = 0.2  # a status document this young is sent again rather than rebuilt
MAINTAIN_IDLE_S = 5.0  # between flow-table maintenance passes (sweep of removed indexes, recount)


@dataclass(frozen=True, slots=True)
class NodeArgs:
    ip: IPAddress
    ifname: str
    mac: str
    config_path: str | None
    status_socket: str
    xdp: XdpMode | None = None  # --xdp overrides the config
    admin_state: str | None = None  # the runtime admin state's file (cluster.admin); None: memory only


class Node:
    def __init__(self, args: NodeArgs, config: NodeConfig, components: Components | None = None) -> None:
        self.args = args
        self.config = config
        components = components or Components()
        self.components = components
        self.state = "starting"
        self.reloads = {"ok": 0, "refused": 0}
        self.last_reload_error: str | None = None
        self._ready = False
        # The view: written from the components' events, in order, by the inbox task (_apply_event).
        self._healthy: dict[str, frozenset[BackendId]] = {}
        self._macs: dict[IPAddress, str] = {}
        self._digest_mismatch = False
        self._established = 0
        self._weights: dict[str, Published] = {}  # load-aware weights the cluster published, per service
        self._load: LoadFeed | None = None
        self._inbox = Inbox()
        self._announced: dict[Prefix, RouteAttrs] = {}
        self._mac = args.mac
        self._started = trio.Event()  # start-up finished: serving
        self._reload_pending = False  # a SIGHUP came during start-up
        self._reload_lock = trio.Lock()
        self._leave = Leave.PINS  # what stopping leaves behind: a signal decides, an error keeps the pins
        self._forwarding_problem: str | None = None  # why the data plane cannot forward now
        self._status = DocumentCache(self._status_build, STATUS_REUSE_S)
        self._web = Listener(self.status, self._metrics_build)  # metrics, /api/v1/status, console
        self._loop_watch = LoopWatch()  # the longest the event loop was blocked: BFD allows 300 ms
        self._advertised = False  # has announced a route since start
        self._dp: DataPlaneLike | None = None
        self._checker: HealthLike | None = None
        self._speaker: SpeakerLike | None = None
        self._sync: SyncLike | None = None
        self._neighbours = components.neighbours(args.ifname, self._backend_addresses(config), self._inbox.sender)
        self._nursery: trio.Nursery | None = None
        self._supervisor = Supervisor()
        self._admin = AdminControl(args.admin_state)  # drained backends, disabled VIPs: `lbnode drain` ...
        self._desired = decide(self.view())  # of the latest reconcile(): what to apply and announce
        self._applier = Applier(self._desired, lambda: self._route(self._desired.routes))

    @property
    def xdp_mode(self) -> XdpMode:
        return self.args.xdp or self.config.xdp

    # ---- lifecycle --------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start, serve until SIGTERM/SIGINT (then drain), reload on SIGHUP. Signals are taken
        from the first moment: one during the seconds-long compile or right after the attach
        must neither kill the process by default action (leaving the program attached) nor wait
        for start-up to finish. SIGTERM during start-up stops at once (nothing is announced
        yet); SIGHUP then is applied once the node is up."""
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2) as signals:
            async with trio.open_nursery() as outer:
                outer.start_soon(self._handle_signals, signals, outer.cancel_scope)
                await self._serve(task_status=task_status)

    async def _serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        limits = Limits(flow_table_size=self.config.flows.table_size)
        log.info("compiling the XDP program (flow table %d entries)", limits.flow_table_size)
        dp = await trio.to_thread.run_sync(self.components.dataplane, limits, self.args.ifname)
        self._dp = dp
        trio.lowlevel.add_instrument(self._loop_watch)
        try:
            dp.set_config(self.args.mac, self.config.flows.refresh_s, self.config.flows.max_new_per_s_per_cpu)
            dp.attach(self.args.ifname, self.xdp_mode)
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(heartbeat, self._loop_watch)
                await nursery.start(self._inbox.run, self._apply_event, self.reconcile)
                await nursery.start(self._applier.run, dp)
                nursery.start_soon(self._tick)
                nursery.start_soon(self._keep_forwarding, dp)
                nursery.start_soon(self._maintain_flows)
                await nursery.start(self._neighbours.run)
                await self._start("health", self._run_health)
                await self._start("load", self._run_load)
                await self.applied()  # flows resynced from peers need our services' indexes
                nursery.start_soon(self._admin.run, self.reconcile)
                await nursery.start(serve_status, self.args.status_socket, self.status, self._control)
                await self._start("http", self._run_http)
                if self.config.sync is not None and self.config.sync.enabled:
                    await self._start("sync", self._run_sync)
                    await self._resync()
                if self.config.bgp is not None:
                    await self._start("bgp", self._run_speaker)
                self._ready = True
                self.state = "serving"
                self.reconcile()
                log.info("ready: serving %d services", len(self.config.services))
                self._loop_watch.reset()  # start-up (attach, first tables) is not a stall of the serving loop
                # What start-up built (modules, components, the first config and tables'
                # bookkeeping: ~100k objects at 4,096 backends) leaves the collector's generations:
                # a full collection walks every tracked object holding the GIL, 50-70 ms at that
                # size, whichever thread triggers it. Only once: frozen objects are still freed by
                # reference counting, but a frozen cycle dropped later never is, so freezing at
                # every reload would leak the old config's cycles each time.
                gc.freeze()
                self._started.set()
                task_status.started()
                if self._reload_pending:
                    nursery.start_soon(self.reload)
        finally:
            trio.lowlevel.remove_instrument(self._loop_watch)
            self._dp = None
            dp.close(self._leave)  # detach (unless leaving it forwarding): synchronous, survives cancellation

    async def _handle_signals(self, signals: Any, stop: trio.CancelScope) -> None:
        async for signum in signals:
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                if self._started.is_set():
                    await self.reload()
                else:
                    log.info("SIGHUP during start-up: reloading once the node is up")
                    self._reload_pending = True
            elif signum == signal.SIGUSR2:
                log.info("%s: stopping, the XDP program keeps forwarding with the pinned maps", name)
                self._leave = Leave.FORWARDING
                if self._started.is_set():
                    self.state = "draining"  # (the status schema's name for a node on its way out)
                    self._ready = False
                    await self._shutdown_speaker()
                break
            elif not self._started.is_set():
                log.info("%s during start-up: stopping", name)
                self._leave = Leave.NOTHING
                break
            else:
                self._leave = Leave.NOTHING
                log.info("%s: draining", name)
                await self.drain()
                break
        stop.cancel()

    async def drain(self) -> None:
        """Withdraw routes (gracefully if configured), keep forwarding for drain_s."""
        self.state = "draining"
        self._ready = False
        await self._shutdown_speaker()
        self.reconcile()
        log.info("routes withdrawn; forwarding for %.1fs more", self.config.drain_s)
        await trio.sleep(self.config.drain_s)

    async def _shutdown_speaker(self) -> None:
        """Graceful BGP shutdown (GRACEFUL_SHUTDOWN + wait if configured, withdraw, Cease), bounded."""
        speaker = self._speaker
        if speaker is None:
            return
        with trio.move_on_after(speaker.config.graceful_shutdown_wait_s + CLEANUP_TIMEOUT_S) as scope:
            await speaker.shutdown()
        if scope.cancelled_caught:
            log.warning("BGP shutdown did not finish within %ss", CLEANUP_TIMEOUT_S)

    async def reload(self) -> None:
        async with self._reload_lock:  # a SIGHUP from start-up and a new one never overlap
            await self._reload()

    async def _reload(self) -> None:
        path = self.args.config_path
        if path is None:
            log.warning("SIGHUP: no --config to reload")
            return
        try:
            new = await trio.to_thread.run_sync(load_file, path, self.args.ip)
        except ConfigError as err:
            self.reloads["refused"] += 1
            self.last_reload_error = str(err)
            log.error("reload refused, the running config stays: %s", err)
            return
        old = self.config
        if new.xdp != old.xdp or new.flows != old.flows:
            log.warning("reload: xdp mode and flows settings take effect at the next restart")
            new = replace(new, xdp=old.xdp, flows=old.flows)
        try:
            await self._switch_config(old, new)
            await self.applied()  # a data-plane error (say, too many backends) refuses the reload too
        except Exception as exc:  # e.g. a socket the new sync or BGP config cannot open
            self.reloads["refused"] += 1
            self.last_reload_error = f"applying {path} failed, previous config restored: {exc}"
            log.error("reload: %s", self.last_reload_error)
            await self._switch_config(new, old)  # what ran before must run again; if not, the node stops
            return
        self.reloads["ok"] += 1
        self.last_reload_error = None
        log.info("reload: config from %s applied", path)

    async def _switch_config(self, old: NodeConfig, new: NodeConfig) -> None:
        """Make `new` the running config, restarting only the components whose settings changed."""
        self.config = new
        addresses = set(self._backend_addresses(new))
        self._neighbours.set_addresses(addresses)
        self._macs = {a: m for a, m in self._macs.items() if a in addresses}
        # Comparing every backend's check configs costs ~15 ms at 4,096 backends: off the loop.
        if await trio.to_thread.run_sync(_health_differs, old, new):
            await self._restart("health", self._run_health)
        if new.sync is not None and old.sync is not None and new.sync.differs_only_in_keys(old.sync) \
                and self._sync is not None:
            self._sync.set_keys(new.sync)  # new key files or contents: re-keyed in place, no restart
        elif new.sync != old.sync:
            await self._stop("sync")
            if new.sync is not None and new.sync.enabled:
                await self._start("sync", self._run_sync)
        if new.http != old.http:
            await self._restart("http", self._run_http)
        if self._load is not None:
            self._load.reconfigure(new.services)  # synchronous: unchanged services keep their weights
        if new.bgp != old.bgp:
            await self._shutdown_speaker()  # withdraw and close the sessions; a bare cancel would not
            await self._stop("bgp")
            self._announced = {}
            if new.bgp is not None:
                await self._start("bgp", self._run_speaker)
        self.reconcile()

    # ---- components ---------------------------------------------------------------------------------

    async def _start(self, name: str, component: Component) -> None:
        assert self._nursery is not None
        await self._supervisor.start(self._nursery, name, component)

    async def _stop(self, name: str) -> None:
        await self._supervisor.stop(name)

    async def _restart(self, name: str, component: Component) -> None:
        await self._stop(name)
        await self._start(name, component)

    async def _run_health(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # Backends usable now start up in a new checker, so a reload does not flap them.
        await self._inbox.flush()  # the verdicts of the checker this one replaces are all in
        usable_now = frozenset(k for keys in self._healthy.values() for k in keys)
        services = [h for s in self.config.services for h in s.health_configs(usable_now)]
        self._checker = checker = self.components.health(services)
        await feeds.run_health(checker, self._inbox, task_status=task_status)

    async def _run_http(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self._web.run(self.config.http, task_status=task_status)

    async def _run_load(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._load = feed = LoadFeed(self.config.services, node_id_of(self.args.ip), self._inbox,
                                     lambda: self._sync if isinstance(self._sync, LoadTransport) else None,
                                     lambda: self._dp, lambda: getattr(self._checker, "steering", None))
        await feed.run(task_status=task_status)

    async def _run_speaker(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        assert self.config.bgp is not None
        sessions = feeds.SessionFeed(self._inbox)
        self._speaker = speaker = self.components.speaker(self.config.bgp, sessions.changed)
        self._announced = {}
        try:
            await sessions.run(speaker, task_status=task_status)
        finally:
            if self._speaker is speaker:
                self._speaker = None

    async def _run_sync(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        assert self.config.sync is not None and self._dp is not None
        self._sync = sync = self.components.sync(self.config.sync, self._dp, self.args.ip, self.args.ifname)
        try:
            await feeds.run_sync(sync, self._inbox, lambda: self._digest_mismatch, task_status=task_status)
        finally:
            if self._sync is sync:
                self._sync = None

    # ---- the inbox --------------------------------------------------------------------------------------

    def _apply_event(self, event: NodeEvent) -> bool:
        """Update the view; True if it changed what the node should do."""
        if isinstance(event, HealthReset):
            self._healthy = dict(event.healthy)
        elif isinstance(event, BackendChanged):
            keys = set(self._healthy.get(event.service, frozenset()))
            (keys.add if event.usable else keys.discard)(event.backend)
            self._healthy[event.service] = frozenset(keys)
        elif isinstance(event, MacsLearned):
            self._macs.update(event.macs)
        elif isinstance(event, DigestVerdict):
            blocked = self._blocked_by_digest()
            self._digest_mismatch = event.mismatch
            if self._blocked_by_digest() == blocked:
                return False
            log.warning("flow-sync digest %s a peer's: %s", "differs from" if not blocked else "matches again",
                        "not advertising" if not blocked else "advertising allowed")
        elif isinstance(event, SessionsChanged):
            self._established = event.established
            return self._sessions_changed()
        elif isinstance(event, WeightsPublished):
            old = self._weights.pop(event.service, None)
            if event.published is not None:
                self._weights[event.service] = event.published
            return changes_hash(old, event.published)
        else:
            return False
        return True

    # ---- out of the route, and back ----------------------------------------------------------------

    def _sessions_changed(self) -> bool:
        """Leave the route with the last BGP session; rejoin (resync first) with the first one back."""
        if self._speaker is None or self._nursery is None:
            return False
        if self._established == 0 and self.state == "serving":
            log.warning("no BGP session is Established: out of the route; flows will be resynced before "
                        "announcing again")
            self.state = "out of route"
            self._ready = False
            return True
        if self._established > 0 and self.state == "out of route":
            self.state = "resyncing"  # now, so that a second session up does not start a second rejoin
            self._nursery.start_soon(self._rejoin)
        return False

    async def _rejoin(self) -> None:
        """A router is back: learn what the peers pinned while we were out, then announce."""
        if self._sync is not None and self.config.sync is not None:
            await self._resync()
        await self._inbox.flush()  # session counts and digest verdicts sent meanwhile are in
        if self.state != "resyncing":  # draining meanwhile
            return
        if self._speaker is not None and self._established == 0:
            self.state = "out of route"  # lost again while resyncing: wait for the next session
            return
        self._ready = True
        self.state = "serving"
        log.info("back in touch with a router: announcing again")
        self.reconcile()

    async def _resync(self) -> None:
        assert self.config.sync is not None and self._sync is not None
        self.state = "resyncing"
        timeout_s = self.config.sync.resync_timeout_s
        if not await self._sync.resync(timeout_s):
            log.warning("flow resync incomplete after %.1fs: advertising anyway", timeout_s)
        # The peers' digests are known now: the verdict is in the view before anything is announced.
        await self._inbox.send(DigestVerdict(self._sync.digest_mismatch))
        await self._inbox.flush()

    # ---- the data plane --------------------------------------------------------------------------------

    async def _tick(self) -> None:
        """Publish the clock that stamps flows (see bpf/dataplane.py)."""
        while True:
            await trio.sleep(self.config.flows.refresh_s / 2)
            if self._dp is not None:
                self._dp.tick()

    async def _maintain_flows(self) -> None:
        """Delete stale flows of removed services and backends, and recount the table: chunk by
        chunk on a worker thread, never on the loop; a pass every MAINTAIN_IDLE_S while idle."""
        while (dp := self._dp) is not None:
            done = await trio.to_thread.run_sync(dp.maintain)
            if done and not dp.sweep_pending:
                await trio.sleep(MAINTAIN_IDLE_S)

    async def _keep_forwarding(self, dp: DataPlaneLike) -> None:
        """Every second: our program is still attached (attached again if someone removed it or
        the interface was created anew) and the interface's MAC is the one frames are matched
        against. A node that cannot forward withdraws its routes and says why, until it can."""
        while True:
            await trio.sleep(ATTACH_CHECK_S)
            problem = await trio.to_thread.run_sync(dp.keep_attached)
            mac = (await trio.to_thread.run_sync(self.components.interface_mac, self.args.ifname)
                   if problem is None else None)
            if mac is not None and mac != self._mac:
                log.warning("%s: MAC changed %s -> %s (interface created anew?)", self.args.ifname, self._mac, mac)
                self._mac = mac
                dp.set_config(mac, self.config.flows.refresh_s, self.config.flows.max_new_per_s_per_cpu)
            if problem != self._forwarding_problem:
                if problem:
                    log.error("cannot forward, withdrawing: %s", problem)
                else:
                    log.warning("forwarding again: %s", self._forwarding_problem)
                self._forwarding_problem = problem
                self.reconcile()

    def _blocked_by_digest(self) -> bool:
        """With sync.digest_mismatch_blocks, a node whose view (services, backends, health) differs
        from a live peer's does not *start* advertising: a misconfigured node would hash flows
        differently. Once serving, a mismatch is only logged: health checks of two nodes disagree
        for up to fall x interval, and both nodes withdrawing then would be a full outage."""
        cfg = self.config.sync
        return bool(self._sync is not None and cfg is not None and cfg.digest_mismatch_blocks
                    and self._digest_mismatch and not self._advertised)

    # ---- desired state --------------------------------------------------------------------------------

    def view(self) -> View:
        return View(self.config, self._healthy, self._macs,
                    self._ready and not self._blocked_by_digest() and self._forwarding_problem is None,
                    self._admin.state, weights=self._weights)

    def reconcile(self) -> None:
        """Make the data plane, BGP and the sync digest match the current view. Synchronous:
        routes no longer wanted are withdrawn now; the data plane is applied by the apply task,
        and new routes are announced after it (cluster.applier)."""
        self._desired = desired = decide(self.view())
        self._applier.want(desired)
        self._route(desired.routes)
        if self._sync is not None:
            self._sync.set_digest(desired.digest())

    def _why_withheld(self, reason: str) -> str:
        if reason != NOT_READY:
            return reason
        if self._forwarding_problem is not None:
            return f"cannot forward: {self._forwarding_problem}"
        if self._blocked_by_digest():
            return "flow-sync digest differs from a peer's (sync.digest_mismatch_blocks)"
        return {"starting": "starting", "resyncing": "resyncing flows from the peers before announcing",
                "out of route": "no BGP session Established; flows are resynced before announcing again",
                "draining": "draining"}.get(self.state, self.state)

    def _route(self, wanted: Mapping[Prefix, RouteAttrs]) -> None:
        """Withdraw what is not wanted; announce what is wanted *and* allowed by the state the
        data plane last applied (its services are in the kernel)."""
        if self._speaker is None:
            return
        for prefix in [p for p in self._announced if p not in wanted]:
            log.info("withdrawing %s", prefix)
            self._speaker.withdraw(prefix)
            del self._announced[prefix]
        for prefix, attrs in wanted.items():
            if prefix in self._applier.routes and self._announced.get(prefix) != attrs:
                log.info("announcing %s", prefix)
                self._speaker.announce(prefix, attrs)
                self._announced[prefix] = attrs
        self._advertised = self._advertised or bool(self._announced)

    async def applied(self) -> None:
        """Wait until the data plane has the state of the latest reconcile(); raise its error."""
        await self._applier.applied()

    @staticmethod
    def _backend_addresses(config: NodeConfig) -> list[IPAddress]:
        return [b.address for s in config.services for b in s.backends]

    # ---- status ------------------------------------------------------------------------------------------

    def status_inputs(self) -> StatusInputs:
        """On the loop: shallow copies of what the status document needs (see cluster.status_doc)."""
        bgp = None
        if self._speaker is not None:
            bgp = {"peers": [dataclasses.asdict(p) for p in self._speaker.snapshot()],  # with BFD state and counters
                   "announced": sorted(str(p) for p in self._announced)}
        return StatusInputs(
            desired=self._desired,
            health=self._checker.snapshot() if self._checker else (),
            node={"ip": str(self.args.ip), "interface": self.args.ifname, "xdp": self.xdp_mode.value,
                  "state": self.state, "config": self.args.config_path, "reloads": dict(self.reloads),
                  "last_reload_error": self.last_reload_error,
                  "forwarding_problem": self._forwarding_problem,
                  "xdp_reattached": self._dp.reattached if self._dp is not None else 0,
                  "pins": self._dp.pin_status() if self._dp is not None else None,
                  "announced": sorted(str(p) for p in self._announced),
                  "admin": self._admin.state.document(),
                  "http": list(self._web.urls),
                  "withheld": {str(p): self._why_withheld(reason)
                               for p, reason in sorted(self._desired.withheld.items())}},
            flows={"entries": self._dp.flow_count().entries if self._dp is not None else 0,  # counters: no walk
                   "table_size": self.config.flows.table_size},
            loop=self._loop_watch.snapshot(),
            bgp=bgp,
            sync=self._sync.snapshot() if self._sync is not None else None,
            weights=dict(self._weights),
            load=self._load.snapshot() if self._load is not None else None,
        )

    def snapshot(self) -> dict[str, Any]:
        """The status document, built here and now (tests, benchmarks; the socket uses `status`)."""
        return status_doc.document(self.status_inputs(), self._dp)

    async def _control(self, request: control.Request, peer: Peer) -> dict[str, Any]:
        """`lbnode drain/undrain/disable/enable` (cluster.adminctl): a change is reconciled at once,
        so a disabled VIP's route is withdrawn before the reply."""
        # Shielded: the socket's request deadline must not land between the admin state changing
        # (in memory and in its file) and the reconcile that applies it.
        with trio.CancelScope(shield=True):
            reply = await self._admin.apply(request, peer, self.config)
            if reply["changed"]:
                self.reconcile()
                self._status.invalidate()
                self._web.invalidate()  # /metrics too
        return reply

    async def status(self) -> bytes:
        """The status document as one JSON line: copied on the loop, built on a worker thread,
        shared and briefly reused (cluster.status.DocumentCache)."""
        return await self._status.get()

    def _status_build(self) -> Callable[[], bytes]:
        inputs, dp = self.status_inputs(), self._dp
        return lambda: status_doc.encode(status_doc.document(inputs, dp))

    def _metrics_build(self) -> Callable[[], bytes]:
        """/metrics: the same inputs, copied on the loop; the document and the exposition text
        are built on a worker thread (cluster.metrics)."""
        inputs, dp = self.status_inputs(), self._dp
        return lambda: metrics.render(metrics.Snapshot(status_doc.document(inputs, dp), inputs.health))


def _health_differs(old: NodeConfig, new: NodeConfig) -> bool:
    """Whether a reload changes what the health checker checks (it is restarted then)."""
    return [s.health_configs() for s in new.services] != [s.health_configs() for s in old.services]
