"""`lbnode drain/undrain/disable/enable` on a node with fakes of its components (tests/test_node_unit.py's
World), through the real control socket: what the data plane gets and what BGP announces after each
command, across a reload, and from the state file a previous run left."""
from __future__ import annotations

import ipaddress
import json
import re
from pathlib import Path

import pytest
import trio

import tests.test_node_unit as fakes
from cluster import cli, control, status
from cluster.config import load_text
from cluster.node import Node, NodeArgs
from tests.test_node_unit import NODE_IP, VIP, WEB, World, announced, until

pytestmark = pytest.mark.unit

ip = ipaddress.ip_address
B11, VIP_IP = ip("10.0.0.11"), ip("192.0.2.10")


def write_config(directory: Path, *, weight: int = 1) -> Path:
    """tests/test_node_unit.py's config (need 1, b11 and b12, BGP, sync) with its key file here."""
    key_file = directory / "sync.key"
    if not key_file.exists():
        key_file.write_text("a-long-enough-shared-key")
        key_file.chmod(0o600)  # a key readable by others is refused
    path = directory / "node.yaml"
    path.write_text(fakes.CONFIG.format(need=1, weight=weight, key_file=key_file))
    return path


@pytest.fixture
def world() -> World:
    return World()


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    return write_config(tmp_path)


def admin_node(world: World, config_path: Path) -> Node:
    """As tests/test_node_unit.py's make_node, with a state file (the CLI's --admin-state)."""
    config = load_text(config_path.read_text(), NODE_IP, str(config_path))
    args = NodeArgs(NODE_IP, "fake0", "02:00:00:00:00:05", str(config_path), str(config_path.parent / "status.sock"),
                    admin_state=str(config_path.parent / "admin.json"))
    return Node(args, config, world.components())


async def start(world: World, config_path: Path, nursery: trio.Nursery) -> Node:
    """The node started and serving (pytest-trio cancels `nursery` when the test ends)."""
    node = admin_node(world, config_path)
    with trio.fail_after(10):
        await nursery.start(node.run)
    assert node.state == "serving"
    return node


@pytest.fixture
async def serving(world: World, config_path: Path, nursery: trio.Nursery) -> Node:
    node = await start(world, config_path, nursery)
    await until("announced", lambda: announced(world) == [VIP])
    return node


async def ask(node: Node, request: control.Request) -> dict[str, object]:
    return await trio.to_thread.run_sync(status.request, node.args.status_socket, request)


def last_apply(world: World) -> str:
    return next(e for e in reversed(world.log) if e.startswith("apply"))


def web_row(node: Node) -> dict[str, object]:
    row: dict[str, object] = next(s for s in node.snapshot()["services"] if s["name"] == WEB)
    return row


async def test_drain_reload_disable_enable_undrain(world: World, serving: Node, config_path: Path) -> None:
    node, state_file = serving, config_path.parent / "admin.json"
    reply = await ask(node, control.Drain(B11, None, "alice"))
    assert reply["changed"] == ["web 10.0.0.11"] and reply["persisted"] is True
    await until("b11 out of the hash", lambda: last_apply(world) == "apply 1 services, in hash ['10.0.0.12']")
    assert announced(world) == [VIP]  # need 1: b12 is enough
    b11 = next(b for b in web_row(node)["backends"] if b["backend"] == "10.0.0.11:80")  # type: ignore[attr-defined]
    assert (b11["admin"], b11["disabled"], b11["in_hash"]) == ("drained", True, False)
    assert b11["admin_by"].startswith("alice (uid 0, pid ")
    assert json.loads(state_file.read_text())["drained"][0]["backend"] == "10.0.0.11"
    assert (await ask(node, control.Drain(B11, "web")))["changed"] == []  # idempotent
    with pytest.raises(control.ReplyError, match="10.0.0.99 is not a backend of any service"):
        await ask(node, control.Drain(ip("10.0.0.99")))

    # A reload (SIGHUP) keeps it: the new config's tables still leave b11 out.
    write_config(config_path.parent, weight=2)
    await node.reload()
    assert node.reloads["ok"] == 1
    await until("reload applied", lambda: node.config.services[0].backends[0].weight == 2)
    assert last_apply(world) == "apply 1 services, in hash ['10.0.0.12']"
    assert node.snapshot()["node"]["admin"]["drained"][0]["backend"] == "10.0.0.11"

    # Disable: the route goes before the reply; new flows stop after the grace, pins stay.
    mark = len(world.log)
    reply = await ask(node, control.Disable(VIP_IP, 0.3, "bob"))
    assert reply["changed"] == ["192.0.2.10"] and announced(world) == []
    assert f"withdraw {VIP}" in world.log[mark:]
    assert last_apply(world) == "apply 1 services, in hash ['10.0.0.12']"  # still taking new flows
    assert "disabled by bob (uid 0, pid" in node.snapshot()["node"]["withheld"][VIP]
    t0 = trio.current_time()
    await until("no new flows", lambda: last_apply(world) == "apply 1 services, in hash []")
    assert trio.current_time() - t0 >= 0.25
    assert len(world.dp.applied[-1][0].backends) == 2  # type: ignore[union-attr]  # both kept: pinned flows go on
    assert (web_row(node)["admin_phase"], web_row(node)["takes_new_flows"]) == ("stopped", False)
    assert announced(world) == []

    # Enable: new flows again, then announced (after the apply, as always).
    await ask(node, control.Enable(VIP_IP))
    await until("announced again", lambda: announced(world) == [VIP])
    assert last_apply(world) == "apply 1 services, in hash ['10.0.0.12']"
    await ask(node, control.Undrain(B11))
    await until("b11 back", lambda: last_apply(world) == "apply 1 services, in hash ['10.0.0.11', '10.0.0.12']")
    assert json.loads(state_file.read_text()) == {"version": 1, "drained": [], "disabled": []}


async def test_a_restarted_node_takes_its_state_from_the_file(world: World, config_path: Path,
                                                             nursery: trio.Nursery) -> None:
    (config_path.parent / "admin.json").write_text(json.dumps({
        "version": 1, "drained": [{"service": "web", "backend": "10.0.0.11", "by": "alice", "at": "t1"}],
        "disabled": [{"vip": "192.0.2.10", "by": "bob", "at": "t2"}]}))
    node = await start(world, config_path, nursery)
    assert last_apply(world) == "apply 1 services, in hash []"  # disabled VIP: stopped from the start
    assert not any(e.startswith("announce") for e in world.log)
    await trio.to_thread.run_sync(status.request, node.args.status_socket, control.Enable(VIP_IP))
    await until("announced", lambda: announced(world) == [VIP])
    assert last_apply(world) == "apply 1 services, in hash ['10.0.0.12']"  # b11 still drained


async def test_the_cli_commands(serving: Node, capsys: pytest.CaptureFixture[str]) -> None:
    sock = serving.args.status_socket

    async def lbnode(*argv: str) -> tuple[int, str, str]:
        code = await trio.to_thread.run_sync(cli.main, [*argv, "--socket", sock])
        out, err = capsys.readouterr()
        return code, out, err

    assert await lbnode("drain", "10.0.0.11", "--service", "web") == (0, "drain: web 10.0.0.11\n", "")
    assert await lbnode("drain", "10.0.0.11") == (0, "drain: nothing to change\n", "")
    code, out, _ = await lbnode("status")
    assert code == 0 and re.search(r"10\.0\.0\.11:80 +drained .*drained by root \(uid 0, pid \d+\) at 20", out), out
    assert await lbnode("drain", "10.0.0.99") == (2, "", "lbnode: drain: 10.0.0.99 is not a backend of any service\n")
    assert await lbnode("disable", "vip1") == (2, "", "lbnode: vip: not an IP address: 'vip1'\n")
    code, out, _ = await lbnode("disable", "192.0.2.10", "--grace-s", "0", "--json")
    assert code == 0 and json.loads(out)["changed"] == ["192.0.2.10"]
    code, out, _ = await lbnode("status")
    assert "DISABLED (" in out and "disabled by root" in json.dumps(serving.snapshot()["node"]["withheld"])
    assert await lbnode("enable", "192.0.2.10") == (0, "enable: 192.0.2.10\n", "")
    assert await lbnode("undrain", "10.0.0.11") == (0, "undrain: web 10.0.0.11\n", "")


async def test_commands_at_once_all_reach_the_state_file(serving: Node, config_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask, serving, control.Drain(B11))
        nursery.start_soon(ask, serving, control.Drain(ip("10.0.0.12")))
        nursery.start_soon(ask, serving, control.Disable(VIP_IP, 60))
    saved = json.loads((config_path.parent / "admin.json").read_text())  # noqa: ASYNC230  # a small file
    assert {d["backend"] for d in saved["drained"]} == {"10.0.0.11", "10.0.0.12"}
    assert [d["vip"] for d in saved["disabled"]] == ["192.0.2.10"]
    assert list(config_path.parent.glob("*.tmp")) == []
