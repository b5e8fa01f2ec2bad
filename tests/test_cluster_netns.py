"""Two real lbnode processes behind a real BIRD router (examples/lab/ecmp.py): ECMP over both,
flows shared by flow sync, forged gossip rejected, and a restarted node that resyncs before it
advertises, all while 100 long-lived connections must survive."""
from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from cluster.sync.codec import Keyring, encode_flows, key_id
from examples.lab.ecmp import SYNC_KEY, EcmpLab, Load
from examples.lab.netns import wait_until
from tests.ecmp_lab import running_ecmp_lab

pytestmark = pytest.mark.netns

N1, N2 = "10.0.0.1", "10.0.0.2"
LONG = 100


@pytest.fixture
def ecmp(tmp_path: Path) -> Iterator[EcmpLab]:
    with running_ecmp_lab(tmp_path, "lbc", EcmpLab) as e:
        yield e


def entries(e: EcmpLab, node: str) -> int:
    status = e.node_status(node)
    return status["flows"]["entries"] if status else -1


def sync_counter(e: EcmpLab, node: str, name: str) -> int:
    status = e.node_status(node)
    return status["sync"]["counters"][name] if status and "sync" in status else -1


def send_from_router(e: EcmpLab, payload: bytes, to: str, port: int = 7946) -> None:
    code = f"import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto({payload!r}, ({to!r}, {port}))"
    e.lab.ns_run(e.router, sys.executable, "-c", code)


def test_flows_are_shared_forgeries_dropped_and_a_restart_resyncs_first(ecmp: EcmpLab) -> None:
    for node in ecmp.nodes:
        ecmp.start_node(node)
    ecmp.wait_next_hops({N1, N2})
    load = Load(ecmp, long=LONG, short_rate=10)

    # Each node pinned its share; flow sync gives each node all of them.
    wait_until(lambda: min(entries(ecmp, n) for n in ecmp.nodes) >= LONG, timeout_s=15, what="flows on both nodes")
    assert all(sync_counter(ecmp, n, "installed") > 0 for n in ecmp.nodes)

    # Forged (wrong key) and malformed datagrams are dropped and counted, never installed.
    forged0, malformed0 = sync_counter(ecmp, "node2", "forged"), sync_counter(ecmp, "node2", "malformed")
    forged = bytearray(encode_flows(Keyring(b"not-the-cluster-key-at-all"), 7, 1, 1, []))
    forged[8:12] = key_id(SYNC_KEY.strip()).to_bytes(4, "big")  # the cluster's key id (seen on the wire), a bad tag
    send_from_router(ecmp, bytes(forged), N2)
    send_from_router(ecmp, b"LBFS\x01garbage", N2)
    wait_until(lambda: sync_counter(ecmp, "node2", "forged") > forged0
               and sync_counter(ecmp, "node2", "malformed") > malformed0, timeout_s=10, what="forgery counted")

    # node2 leaves (SIGTERM: withdraw, drain, exit): its flows move to node1, which knows them.
    ecmp.kill_node("node2", signal.SIGTERM)
    ecmp.wait_next_hops({N1})
    # node2 returns: it must hold every flow before the router sends it any, learned by a resync
    # that node1 answered (counters, not log lines: "resync" also matches "resync incomplete").
    served0 = sync_counter(ecmp, "node1", "resync_served")
    ecmp.start_node("node2")
    seen_at_return: list[int] = []

    def node2_routed() -> bool:
        if N2 not in ecmp.next_hops():
            return False
        seen_at_return.append(entries(ecmp, "node2"))
        return True

    wait_until(node2_routed, timeout_s=40, interval_s=0.02, what="node2 back in the ECMP route")
    assert seen_at_return[0] >= LONG, f"node2 advertised with {seen_at_return[0]} flows, before its resync"
    assert sync_counter(ecmp, "node1", "resync_served") > served0, "node1 answered node2's resync request"
    assert sync_counter(ecmp, "node2", "resync_chunks") >= 1, "node2 installed node1's resync answer"

    report = load.stop()
    assert report["long"]["alive"] == LONG and report["long"]["lost"] == {}, report
    assert report["short"]["ok"] > 0
    assert ecmp.node_procs["node1"].poll() is None


def _reload(ecmp: EcmpLab, node: str, edit: dict[str, object | None]) -> None:
    """Edit the node's sync config (None deletes a key) and SIGHUP it; wait until applied."""
    path = ecmp.workdir / f"{node}.yaml"
    config = yaml.safe_load(path.read_text())
    for k, v in edit.items():
        if v is None:
            config["sync"].pop(k, None)
        else:
            config["sync"][k] = v
    path.write_text(yaml.safe_dump(config))
    _sighup(ecmp, node)


def _sighup(ecmp: EcmpLab, node: str) -> None:
    ok = (ecmp.node_status(node) or {})["node"]["reloads"]["ok"]
    ecmp.kill_node(node, signal.SIGHUP)
    wait_until(lambda: (ecmp.node_status(node) or {})["node"]["reloads"]["ok"] == ok + 1, timeout_s=10,
               what=f"{node} reloaded")


def test_keys_rotate_by_sighup_in_place_with_no_datagram_refused(ecmp: EcmpLab) -> None:
    """The README's rotation: add the new key as next everywhere, switch, remove the old. Every
    step is a SIGHUP; no node ever refuses a peer's datagram, and sync is never restarted. A
    key file whose contents change behind the same path is reread too."""
    for node in ecmp.nodes:
        ecmp.start_node(node)
    ecmp.wait_next_hops({N1, N2})
    load = Load(ecmp, long=LONG, short_rate=10)
    wait_until(lambda: min(entries(ecmp, n) for n in ecmp.nodes) >= LONG, timeout_s=15, what="flows on both nodes")
    old_key, new_key, third = SYNC_KEY.strip(), b"the-new-lab-sync-key-0123456789", b"a-third-key-written-in-place-0123"
    old_file, new_file = ecmp.workdir / "sync.key", ecmp.workdir / "new.key"
    new_file.write_bytes(new_key)
    new_file.chmod(0o600)
    sync_of = lambda n: (ecmp.node_status(n) or {})["sync"]  # noqa: E731
    incarnations = {n: sync_of(n)["incarnation"] for n in ecmp.nodes}
    ids = lambda n: (sync_of(n)["keys"]["current"], sync_of(n)["keys"]["next"])  # noqa: E731
    hexid = lambda k: f"{key_id(k):08x}"  # noqa: E731

    def installed_on_both_since(marks: dict[str, int]) -> bool:
        return all(sync_counter(ecmp, n, "installed") > marks[n] for n in ecmp.nodes)

    steps: list[tuple[str, dict[str, object | None], tuple[str, str | None]]] = [
        ("add", {"next_key_file": str(new_file)}, (hexid(old_key), hexid(new_key))),
        ("switch", {"key_file": str(new_file), "next_key_file": str(old_file)}, (hexid(new_key), hexid(old_key))),
    ]
    for _, edit, want in steps:
        for node in ecmp.nodes:  # one node after the other, as an operator goes
            _reload(ecmp, node, edit)
            assert ids(node) == want
            marks = {n: sync_counter(ecmp, n, "installed") for n in ecmp.nodes}
            wait_until(lambda marks=marks: installed_on_both_since(marks), timeout_s=10, what="flows still shared")
    # The old key's file rewritten in place (same path, so the same config text): reread.
    old_file.write_bytes(third)
    for node in ecmp.nodes:
        _sighup(ecmp, node)
        assert ids(node) == (hexid(new_key), hexid(third))
    for node in ecmp.nodes:  # remove the old key
        _reload(ecmp, node, {"next_key_file": None})
        assert ids(node) == (hexid(new_key), None)
    marks = {n: sync_counter(ecmp, n, "installed") for n in ecmp.nodes}
    wait_until(lambda: installed_on_both_since(marks), timeout_s=10, what="flows shared under the new key")
    for node in ecmp.nodes:
        assert sync_counter(ecmp, node, "unknown_key") == sync_counter(ecmp, node, "forged") == 0
        assert sync_of(node)["incarnation"] == incarnations[node], "re-keyed in place, not restarted"
        assert (ecmp.node_status(node) or {})["node"]["reloads"]["refused"] == 0
    report = load.stop()
    assert report["long"]["alive"] == LONG and report["long"]["lost"] == {}, report
