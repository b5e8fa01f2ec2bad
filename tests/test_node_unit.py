"""The node's own logic with fakes of its components (never of the kernel): start-up order,
health events, reloads, leaving and rejoining the route, keeping forwarding, supervision."""
from __future__ import annotations

import ipaddress
import math
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from bgp.config import SpeakerConfig
from bgp.rib import RouteAttrs
from bpf.counters import Counters, FlowCount
from bpf.dataplane import ServiceSpec
from bpf.loader import Limits, XdpMode
from bpf.pinned import Leave
from bpf.structs import Stat
from cluster.components import Components
from cluster.config import IPAddress, load_text
from cluster.desired import Prefix
from cluster.events import MacsLearned
from cluster.node import ATTACH_CHECK_S, Node, NodeArgs
from cluster.sync.config import SyncConfig
from healthcheck.config import BackendId, ServiceHealthConfig
from healthcheck.state import BackendChanged, BackendStatus, Event, ServiceStatus

pytestmark = pytest.mark.unit

ip = ipaddress.ip_address
NODE_IP = ip("10.0.0.5")
VIP = "192.0.2.10/32"
WEB = "web/192.0.2.10:80"
B11, B12 = BackendId(ip("10.0.0.11"), 80), BackendId(ip("10.0.0.12"), 80)

CONFIG = """
drain_s: 0.5
services:
  - name: web
    vips: [192.0.2.10]
    ports: [80]
    need: {need}
    backends: [{{address: 10.0.0.11, weight: {weight}}}, {{address: 10.0.0.12}}]
http: {{listen: "127.0.0.1:0"}}  # any free port: unit tests run side by side
bgp:
  local_as: 65001
  peers: [{{address: 10.0.0.254, asn: 65000}}]
sync: {{key_file: {key_file}, resync_timeout_s: 1, digest_mismatch_blocks: true}}
"""


KEY_FILE = Path("sync.key")  # made absolute by the config_path fixture


def config_text(*, need: int = 1, weight: int = 1) -> str:
    return CONFIG.format(need=need, weight=weight, key_file=KEY_FILE)


# ---- fakes of the components, recording into one log -------------------------------------------------

class World:
    """Every fake of one node, and the order things happened in."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.dp: FakeDataPlane | None = None
        self.health: list[FakeHealth] = []
        self.speaker: FakeSpeaker | None = None
        self.sync: FakeSync | None = None
        self.neighbours: FakeNeighbours | None = None
        self.initially_healthy = True  # the checker's first snapshot: every backend passing
        self.sync_crash = False
        self.sync_mismatch = False

    def components(self) -> Components:
        return Components(dataplane=self._dataplane, health=self._health, speaker=self._speaker, sync=self._sync,
                          neighbours=self._neighbours, interface_mac=lambda ifname: "02:00:00:00:00:05")

    def _dataplane(self, limits: Limits, ifname: str) -> FakeDataPlane:
        self.dp = FakeDataPlane(self.log)
        return self.dp

    def _health(self, services: Sequence[ServiceHealthConfig]) -> FakeHealth:
        self.health.append(FakeHealth(self.log, services, self.initially_healthy))
        return self.health[-1]

    def _speaker(self, config: SpeakerConfig, on_sessions_changed: Callable[[], None]) -> FakeSpeaker:
        self.speaker = FakeSpeaker(self.log, config, on_sessions_changed)
        return self.speaker

    def _sync(self, config: SyncConfig, dp: object, node_ip: IPAddress, ifname: str) -> FakeSync:
        self.sync = FakeSync(self.log, self.sync_crash)
        self.sync.digest_mismatch = self.sync_mismatch
        return self.sync

    def _neighbours(self, ifname: str, addresses: Iterable[IPAddress],
                    events: trio.abc.SendChannel[MacsLearned]) -> FakeNeighbours:
        self.neighbours = FakeNeighbours(addresses, events)
        return self.neighbours


class FakeDataPlane:
    reattached = 0
    sweep_pending = False

    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.applied: list[list[ServiceSpec]] = []
        self.problem: str | None = None  # what keep_attached reports
        self.max_backends = 1000  # apply refuses a service with more
        self.closed = False

    def set_config(self, mac: str, refresh_s: float, max_new_per_s_per_cpu: int) -> None:
        pass

    def attach(self, ifname: str, mode: XdpMode) -> None:
        self.log.append("attach")

    def keep_attached(self) -> str | None:
        return self.problem

    def tick(self) -> None:
        pass

    def apply(self, services: Iterable[ServiceSpec]) -> None:
        specs = list(services)
        if any(len(s.backends) > self.max_backends for s in specs):
            raise ValueError("too many backends")
        self.applied.append(specs)
        in_hash = sorted(str(b.address) for s in specs for b in s.backends if b.hash_weight > 0)
        self.log.append(f"apply {len(specs)} services, in hash {in_hash}")

    def maintain(self) -> bool:
        return True

    def flow_count(self) -> FlowCount:
        return FlowCount(0, 0, math.inf, 1024)

    def pin_status(self) -> None:
        return None

    def close(self, leave: Leave = Leave.NOTHING) -> None:
        self.closed = True
        self.log.append("detach")

    def counters(self) -> Counters:
        return Counters(None, None)

    def stats(self) -> dict[Stat, int]:
        return {}

    def service_index(self, vip: IPAddress, port: int, proto: int) -> int | None:
        return None

    def backend_index(self, vip: IPAddress, port: int, proto: int, address: IPAddress) -> int | None:
        return None


class FakeHealth:
    def __init__(self, log: list[str], services: Sequence[ServiceHealthConfig], healthy: bool) -> None:
        self.log, self.services, self.healthy = log, services, healthy
        self.send, self.events = trio.open_memory_channel[Event](100)
        self.crash = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.log.append("health start")
        task_status.started()
        await self.crash.wait()
        raise RuntimeError("health checker bug")

    def snapshot(self) -> tuple[ServiceStatus, ...]:
        return tuple(ServiceStatus(s.name, self.healthy, len(s.backends) if self.healthy else 0, s.need, 0.0,
                                   tuple(BackendStatus(b.key, b.disabled, self.healthy, self.healthy, 0.0, ())
                                         for b in s.backends))
                     for s in self.services)

    async def backend(self, backend: BackendId, usable: bool) -> None:
        await self.send.send(BackendChanged(WEB, backend, usable, usable, False, "test", trio.current_time()))


class FakeSpeaker:
    def __init__(self, log: list[str], config: SpeakerConfig, on_sessions_changed: Callable[[], None]) -> None:
        self.log, self.config, self._changed = log, config, on_sessions_changed
        self.routes: dict[Prefix, RouteAttrs] = {}
        self.established = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.log.append("bgp start")
        task_status.started()
        self.sessions(1)
        await trio.sleep_forever()

    async def shutdown(self) -> None:
        self.log.append("bgp shutdown")
        for prefix in list(self.routes):
            self.withdraw(prefix)

    def announce(self, prefix: Prefix, attrs: RouteAttrs) -> None:
        self.log.append(f"announce {prefix}")
        self.routes[prefix] = attrs

    def withdraw(self, prefix: Prefix) -> None:
        self.log.append(f"withdraw {prefix}")
        del self.routes[prefix]

    def established_peers(self) -> int:
        return self.established

    def snapshot(self) -> Sequence[Any]:
        return []

    def sessions(self, established: int) -> None:
        """What the test drives: sessions come up or go down."""
        self.established = established
        self._changed()


class FakeSync:
    def __init__(self, log: list[str], crash: bool) -> None:
        self.log, self.crash = log, crash
        self.digest_mismatch = False
        self.digests: list[bytes] = []

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.log.append("sync start")
        task_status.started()
        if self.crash:
            await trio.sleep(3)
            raise OSError("flow sync: the socket went away")
        await trio.sleep_forever()

    async def resync(self, timeout_s: float) -> bool:
        self.log.append("resync")
        await trio.sleep(0.1)
        return True

    def set_digest(self, digest: bytes) -> None:
        self.digests.append(digest)

    def snapshot(self) -> dict[str, Any]:
        return {"digest_mismatch": self.digest_mismatch}


class FakeNeighbours:
    def __init__(self, addresses: Iterable[IPAddress], events: trio.abc.SendChannel[MacsLearned]) -> None:
        self.addresses = list(addresses)
        self.events = events

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.events.send(MacsLearned({a: f"02:00:00:00:00:{a.packed[-1]:02x}" for a in self.addresses}))
        task_status.started()
        await trio.sleep_forever()

    def set_addresses(self, addresses: Iterable[IPAddress]) -> None:
        self.addresses = list(addresses)


# ---- helpers ------------------------------------------------------------------------------------------

@pytest.fixture
def clock() -> trio.testing.MockClock:
    """Virtual time that jumps once the loop has idled 1 ms of real time. (`autojump_clock` jumps
    at once, also while a task waits for a worker thread: the node's fast fake calls on threads
    would then let virtual time run ahead by seconds, past the tests' deadlines.)"""
    return trio.testing.MockClock(autojump_threshold=0.001)


@pytest.fixture
def world() -> World:
    return World()


@pytest.fixture
def config_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    key_file = tmp_path / "sync.key"
    key_file.write_text("a-long-enough-shared-key")
    key_file.chmod(0o600)  # a key readable by others is refused
    monkeypatch.setattr(__import__(__name__), "KEY_FILE", key_file)
    path = tmp_path / "node.yaml"
    path.write_text(config_text())
    return path


def make_node(world: World, config_path: Path) -> Node:
    config = load_text(config_path.read_text(), NODE_IP, str(config_path))
    args = NodeArgs(NODE_IP, "fake0", "02:00:00:00:00:05", str(config_path), str(config_path.parent / "status.sock"))
    return Node(args, config, world.components())


async def until(what: str, condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    with trio.fail_after(timeout_s):
        while not condition():  # noqa: ASYNC110  # polls a state with no event to wait on, under fail_after(timeout_s)
            await trio.sleep(0.01)


def announced(world: World) -> list[str]:
    return sorted(str(p) for p in world.speaker.routes) if world.speaker else []


def from_(log: list[str], first: str) -> list[str]:
    """The log from the last `first` entry on."""
    return log[len(log) - 1 - log[::-1].index(first):]


@pytest.fixture
async def serving(world: World, config_path: Path, nursery: trio.Nursery) -> AsyncIterator[Node]:
    node = make_node(world, config_path)
    with trio.fail_after(10):
        await nursery.start(node.run)
    await until("announced", lambda: announced(world) == [VIP])
    yield node
    nursery.cancel_scope.cancel()


# ---- tests --------------------------------------------------------------------------------------------

async def test_start_up_resyncs_before_announcing_and_applies_before_routing(world: World, serving: Node) -> None:
    log = world.log
    assert log.index("attach") < log.index("health start") < log.index("sync start") < log.index("resync")
    assert log.index("resync") < log.index("bgp start") < log.index(f"announce {VIP}")
    # The announcement follows an apply that has both backends in the hash.
    last_apply = max(i for i, e in enumerate(log[:log.index(f"announce {VIP}")]) if e.startswith("apply"))
    assert log[last_apply] == "apply 1 services, in hash ['10.0.0.11', '10.0.0.12']"
    assert serving.state == "serving" and world.sync is not None and world.sync.digests


async def test_health_events_withdraw_and_announce(world: World, serving: Node) -> None:
    checker = world.health[-1]
    await checker.backend(B11, False)
    await until("b11 out of the hash", lambda: world.log[-1] == "apply 1 services, in hash ['10.0.0.12']")
    assert announced(world) == [VIP]  # need 1: one usable backend is enough
    await checker.backend(B12, False)
    await until("withdrawn", lambda: announced(world) == [])
    doc = serving.snapshot()
    assert doc["services"][0]["up"] is False and doc["services"][0]["usable"] == 0
    assert doc["node"]["withheld"] == {VIP: f"{WEB}: 0 of need 1 backends usable (healthy, weight > 0, MAC known)"}
    await checker.backend(B12, True)
    await until("announced again", lambda: announced(world) == [VIP])
    assert from_(world.log, "apply 1 services, in hash ['10.0.0.12']")[-1] == f"announce {VIP}"


async def test_a_weight_0_backend_is_down_and_not_announced_consistently(world: World, config_path: Path,
                                                                           nursery: trio.Nursery) -> None:
    """The checker says its only backend passes, but it has weight 0: the service is down in the
    status as in BGP."""
    # noqa below: the test's own small config file, written before the call under test; a thread (trio.Path)
    # would let the autojump clock move while it runs.
    config_path.write_text(config_text(weight=0).replace(", {address: 10.0.0.12}", ""))  # noqa: ASYNC240
    node = make_node(world, config_path)
    with trio.fail_after(10):
        await nursery.start(node.run)
    doc = node.snapshot()
    row = doc["services"][0]
    assert (row["up"], row["usable"], row["need"]) == (False, 0, 1)
    assert [(b["backend"], b["usable"], b["in_hash"], b["weight"]) for b in row["backends"]] == [
        ("10.0.0.11:80", True, False, {"configured": 0, "observed": None, "effective": 0})]
    assert doc["node"]["announced"] == [] and announced(world) == []
    assert doc["node"]["withheld"] == {VIP: f"{WEB}: 0 of need 1 backends usable (healthy, weight > 0, MAC known)"}
    nursery.cancel_scope.cancel()


async def test_a_refused_reload_leaves_the_config_as_it_was(world: World, serving: Node, config_path: Path) -> None:
    before = serving.config
    # noqa below: the test's own small config file, written before the call under test; a thread (trio.Path)
    # would let the autojump clock move while it runs.
    config_path.write_text("services: [{name: web, vips: [not-an-ip]}]\n")  # noqa: ASYNC240
    await serving.reload()
    assert serving.reloads == {"ok": 0, "refused": 1} and "vips" in (serving.last_reload_error or "")
    assert serving.config is before and len(world.health) == 1

    # A file that loads but that the data plane refuses: rolled back, health checks as before.
    assert world.dp is not None
    applied_before = world.dp.applied[-1]
    # noqa below: the test's own small config file, written before the call under test; a thread (trio.Path)
    # would let the autojump clock move while it runs.
    config_path.write_text(config_text(need=2).replace("{address: 10.0.0.12}",  # noqa: ASYNC240
                                                       "{address: 10.0.0.12}, {address: 10.0.0.13}"))
    world.dp.max_backends = 2
    await serving.reload()
    assert serving.reloads == {"ok": 0, "refused": 2} and "too many backends" in (serving.last_reload_error or "")
    assert serving.config == before and announced(world) == [VIP]
    await until("the old services applied again",
                lambda: world.dp is not None and world.dp.applied[-1] == applied_before)
    world.dp.max_backends = 3
    await serving.reload()  # the same file, now accepted
    assert serving.reloads == {"ok": 1, "refused": 2} and serving.config.services[0].need == 2


async def test_losing_every_session_withdraws_and_a_session_back_resyncs_first(world: World, serving: Node) -> None:
    speaker = world.speaker
    assert speaker is not None
    speaker.sessions(0)
    await until("withdrawn", lambda: announced(world) == [])
    assert serving.state == "out of route"
    assert serving.snapshot()["node"]["withheld"] == {
        VIP: "no BGP session Established; flows are resynced before announcing again"}
    speaker.sessions(1)
    await until("announced again", lambda: announced(world) == [VIP])
    assert [e for e in from_(world.log, f"withdraw {VIP}") if not e.startswith("apply")] == [
        f"withdraw {VIP}", "resync", f"announce {VIP}"]
    assert serving.state == "serving"


async def test_sessions_lost_again_while_resyncing_keep_the_node_out(world: World, serving: Node) -> None:
    speaker = world.speaker
    assert speaker is not None
    speaker.sessions(0)
    await until("out of route", lambda: serving.state == "out of route")
    speaker.sessions(1)
    await until("resyncing", lambda: serving.state == "resyncing")
    speaker.sessions(0)
    await until("out of route again", lambda: serving.state == "out of route")
    assert announced(world) == [] and world.log[-1] == "resync"


async def test_a_node_that_cannot_forward_withdraws_until_it_can(clock: trio.testing.MockClock, world: World,
                                                                 serving: Node) -> None:
    assert world.dp is not None
    world.dp.problem = "fake0: another program is attached"
    await until("withdrawn", lambda: announced(world) == [], timeout_s=3 * ATTACH_CHECK_S)
    assert serving.snapshot()["node"]["withheld"] == {VIP: "cannot forward: fake0: another program is attached"}
    world.dp.problem = None
    await until("announced again", lambda: announced(world) == [VIP], timeout_s=3 * ATTACH_CHECK_S)


async def test_a_digest_mismatch_holds_the_first_announcement(clock: trio.testing.MockClock, world: World,
                                                               config_path: Path, nursery: trio.Nursery) -> None:
    world.sync_mismatch = True  # a live peer has another view, known by the end of the resync
    node = make_node(world, config_path)
    with trio.fail_after(10):
        await nursery.start(node.run)
    assert announced(world) == [] and "digest differs" in node.snapshot()["node"]["withheld"][VIP]
    assert world.sync is not None
    world.sync.digest_mismatch = False
    await until("announced", lambda: announced(world) == [VIP])
    world.sync.digest_mismatch = True  # once advertising, a mismatch is only logged
    await trio.sleep(1)
    assert announced(world) == [VIP]
    nursery.cancel_scope.cancel()


async def test_a_component_crash_stops_the_node(clock: trio.testing.MockClock, world: World, config_path: Path) -> None:
    world.sync_crash = True
    node = make_node(world, config_path)
    with pytest.RaisesGroup(pytest.RaisesExc(OSError, match="socket went away"), flatten_subgroups=True):
        with trio.fail_after(10):
            await node.run()
    assert world.dp is not None and world.dp.closed and world.log[-1] == "detach"


async def test_a_health_checker_crash_stops_a_serving_node(clock: trio.testing.MockClock, world: World,
                                                            config_path: Path) -> None:
    node = make_node(world, config_path)
    with pytest.RaisesGroup(pytest.RaisesExc(RuntimeError, match="health checker bug"), flatten_subgroups=True):
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await nursery.start(node.run)
                await until("announced", lambda: announced(world) == [VIP])
                world.health[-1].crash.set()
    assert world.dp is not None and world.dp.closed


async def test_load_aware_weights_reach_the_data_plane_the_digest_and_the_status(world: World, config_path: Path,
                                                                                  nursery: trio.Nursery) -> None:
    """weighting: leastconn (no probes: the fake data plane's counters): the node, its own leader
    without a sync peer, publishes K x configured weights; they reach the data plane, the digest
    and `lbnode status`. A reload that changes nothing else keeps them."""
    # noqa below: as above, the test's own config file, written before the call under test.
    config_path.write_text(config_text().replace("    need: 1\n", "    need: 1\n    weighting: leastconn\n"))  # noqa: ASYNC240
    node = make_node(world, config_path)
    with trio.fail_after(10):
        await nursery.start(node.run)
    await until("weights applied", lambda: bool(world.dp and world.dp.applied) and all(
        b.weight == 125 for b in world.dp.applied[-1][0].backends))
    row = node.snapshot()["services"][0]
    assert [b["weight"] for b in row["backends"]] == [{"configured": 1, "observed": 0.0, "effective": 125,
                                                       "multiplier": 1.0, "agent": None}] * 2
    assert node.snapshot()["load"]["web"]["published_by"] == int(NODE_IP)
    assert world.sync is not None and world.sync.digests[-1] == node._desired.digest()
    await node.reload()
    assert node.reloads["ok"] == 1 and all(b.weight == 125 for b in world.dp.applied[-1][0].backends)
    nursery.cancel_scope.cancel()
