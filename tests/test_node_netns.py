"""A real `lbnode` process on the single-node lab: health checks drive the XDP tables, SIGHUP
reloads atomically (a broken file changes nothing), SIGTERM drains and detaches."""
from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bpf.loader import attached_program_id
from examples.lab.netns import wait_until
from examples.lab.single_node import VIP4, SingleNodeLab, node_status, running_lab

pytestmark = pytest.mark.netns

CONFIG = """
xdp: native
drain_s: 0.5
services:
  - name: web
    vips: [{vip}]
    ports: [80]
    need: 2
    checks: [{{kind: http, path: /, interval_ms: 200, timeout_ms: 150, rise: 1, fall: 2}}]
    backends:
{backends}
"""


def config_text(backends: list[str], weights: dict[str, int] | None = None) -> str:
    lines = "\n".join(f"      - {{address: {b}, weight: {(weights or {}).get(b, 1)}}}" for b in backends)
    return CONFIG.format(vip=VIP4, backends=lines)


@pytest.fixture
def lab() -> Iterator[SingleNodeLab]:
    with running_lab("lbn") as single:
        yield single


def usable_backends(sock: Path) -> set[str] | None:
    snap = node_status(sock)
    if snap is None or snap["node"]["state"] != "serving":
        return None
    return {b["backend"] for s in snap["services"] for b in s["backends"] if b["usable"]}


def test_node_balances_follows_health_reloads_and_drains(lab: SingleNodeLab, tmp_path: Path) -> None:
    addresses = [b.ip4 for b in lab.backends]
    config = tmp_path / "node.yaml"
    config.write_text(config_text(addresses))
    sock = tmp_path / "status.sock"
    node = lab.start_node(config, sock)
    everyone = {f"{a}:80" for a in addresses}
    wait_until(lambda: usable_backends(sock) == everyone, timeout_s=30, what="all backends healthy")
    ours = attached_program_id("eth0", netns=lab.node.ns)
    assert ours != 0

    # A second node on the same interface is refused; the running one keeps its program.
    second = lab.lab.ns_run(lab.node.ns, sys.executable, "-m", "cluster.cli", "--ip", lab.node.ip4, "--if", "eth0",
                            "--config", str(config), "--status-socket", str(tmp_path / "second.sock"), check=False)
    assert second.returncode == 2 and "another lbnode is running on eth0" in second.stderr, second
    assert attached_program_id("eth0", netns=lab.node.ns) == ours

    result = lab.http_spread(VIP4, 30)
    assert result["ok"] == 30 and set(result["backends"]) == {"b1", "b2", "b3"}, result  # type: ignore[arg-type]

    # A backend dies: its checks fail, it leaves the hash, and new connections avoid it.
    lab.lab.stop(lab.backend_procs["b2"])
    wait_until(lambda: usable_backends(sock) == everyone - {f"{lab.backends[1].ip4}:80"}, timeout_s=10,
               what="b2 out of the hash")
    result = lab.http_spread(VIP4, 30)
    assert result["ok"] == 30 and "b2" not in result["backends"], result  # type: ignore[operator]

    # A broken file on SIGHUP is refused; the running config stays and keeps serving.
    good = config.read_text()
    config.write_text(good.replace("weight: 1", "weight: -1", 1))
    node.send_signal(signal.SIGHUP)
    snap = wait_until(lambda: (s := node_status(sock)) and s["node"]["reloads"]["refused"] == 1 and s,
                      timeout_s=10, what="reload refused")
    assert "weight: must be an integer 0..1000, got -1" in snap["node"]["last_reload_error"]
    assert lab.http_spread(VIP4, 10)["ok"] == 10

    # A good file is applied: b1 drained by weight 0 gets no new connections.
    config.write_text(config_text(addresses, {lab.backends[0].ip4: 0}))
    node.send_signal(signal.SIGHUP)
    wait_until(lambda: (s := node_status(sock)) and s["node"]["reloads"]["ok"] == 1, timeout_s=10, what="reload")
    result = lab.http_spread(VIP4, 20)
    assert result["ok"] == 20 and set(result["backends"]) == {"b3"}, result  # type: ignore[arg-type]

    # Someone detaches the program (another tool, a mistake): the node attaches it again.
    lab.lab.ns_run(lab.node.ns, "ip", "link", "set", "eth0", "xdp", "off")
    wait_until(lambda: (s := node_status(sock)) and s["node"]["xdp_reattached"] == 1, timeout_s=10,
               what="the program attached again")
    assert attached_program_id("eth0", netns=lab.node.ns) == ours
    assert lab.http_spread(VIP4, 10)["ok"] == 10

    text = subprocess.run([str(Path(__file__).parents[1] / ".venv/bin/lbnode"), "status", "--socket", str(sock)],
                          capture_output=True, text=True, timeout=10).stdout
    assert "web/10.99.1.100:80" in text and "counters:" in text

    node.send_signal(signal.SIGTERM)
    assert node.wait(timeout=15) == 0
    assert attached_program_id("eth0", netns=lab.node.ns) == 0


def _start_logged(lab: SingleNodeLab, config: Path, sock: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return lab.lab.spawn(lab.node.ns, sys.executable, "-m", "cluster.cli", "--ip", lab.node.ip4, "--if", "eth0",
                             "--config", str(config), "--status-socket", str(sock), cwd=Path(__file__).parents[1],
                             stderr=out, stdout=out)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_during_start_up_is_handled(lab: SingleNodeLab, tmp_path: Path, sig: signal.Signals) -> None:
    """SIGTERM while compiling stops cleanly, with nothing left attached; SIGHUP is applied once up."""
    addresses = [b.ip4 for b in lab.backends]
    config = tmp_path / "node.yaml"
    config.write_text(config_text(addresses))
    sock = tmp_path / "status.sock"
    log = tmp_path / "node.log"
    node = _start_logged(lab, config, sock, log)
    # The node is in its seconds-long compile (its log says so first): the moment to signal.
    wait_until(lambda: "compiling the XDP program" in log.read_text(), timeout_s=30, interval_s=0.01,
               what="the node compiling")
    node.send_signal(sig)
    if sig == signal.SIGTERM:
        assert node.wait(timeout=30) == 0
        assert attached_program_id("eth0", netns=lab.node.ns) == 0
        return
    wait_until(lambda: (s := node_status(sock)) and s["node"]["state"] == "serving"
               and s["node"]["reloads"]["ok"] == 1, timeout_s=30, what="serving, with the reload applied")
    assert node.poll() is None
    node.send_signal(signal.SIGTERM)
    assert node.wait(timeout=15) == 0
