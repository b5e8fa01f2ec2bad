"""The XDP program on real veths in namespaces: real HTTP over DSR and a long-lived
connection that survives backend changes. See examples/lab/single_node.py for the topology."""
from __future__ import annotations

import ipaddress
from collections.abc import Iterator

import pytest

from bpf.dataplane import DataPlane
from bpf.loader import PROGRAM_SOURCE, AttachError, XdpMode, attach, attached_program_id, compile_program
from bpf.structs import IPPROTO_TCP, Stat
from examples.lab.netns import Lab
from examples.lab.single_node import ECHO_PORT, VIP4, VIP6, SingleNodeLab

pytestmark = pytest.mark.netns


@pytest.fixture
def lab() -> Iterator[SingleNodeLab]:
    with Lab(prefix="lbt") as owner:
        single = SingleNodeLab(owner)
        try:
            single.start_backends()
            yield single
        finally:
            single.stop_dataplane()


@pytest.mark.parametrize("mode", [XdpMode.NATIVE, XdpMode.GENERIC])
def test_http_to_both_vips_spreads_over_all_backends_by_dsr(lab: SingleNodeLab, mode: XdpMode) -> None:
    dp = lab.start_dataplane(mode)
    dp.apply(lab.services())
    # The node neither holds the VIPs nor forwards: only XDP can carry these requests.
    assert lab.lab.ns_run(lab.node.ns, "sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "0"
    for vip, count in ((VIP4, 60), (VIP6, 30)):
        result = lab.http_spread(vip, count)
        assert result["ok"] == count and result["failed"] == 0, result
        assert set(result["backends"]) == {"b1", "b2", "b3"}, result  # type: ignore[arg-type]
    stats = dp.stats()
    assert stats[Stat.NEW_FLOW] >= 90 and stats[Stat.TX] > 5 * 90
    for b in lab.backends:
        index = dp.backend_index(VIP4, 80, IPPROTO_TCP, ipaddress.ip_address(b.ip4))
        assert index is not None and dp.backend_stats(index).packets > 0


def test_long_lived_connection_survives_backend_changes(lab: SingleNodeLab) -> None:
    dp = lab.start_dataplane()
    dp.apply(lab.services())
    session = lab.open_echo(VIP4)
    assert session.ping() == "ok ping-1"
    [(_, flow)] = [(k, f) for k, f in dp.flows() if k.dst_port == ECHO_PORT]
    pinned = next(b.name for b in lab.backends
                  if dp.backend_index(VIP4, ECHO_PORT, IPPROTO_TCP, ipaddress.ip_address(b.ip4)) == flow.backend)
    assert pinned == session.backend, "the flow table and the backend's greeting agree"

    # Its backend leaves the hash (unhealthy or drained): the connection goes on, new ones avoid it.
    dp.apply(lab.services(out_of_hash=frozenset({pinned})))
    assert session.ping() == "ok ping-2"
    result = lab.http_spread(VIP4, 30)
    assert result["ok"] == 30 and pinned not in result["backends"], result  # type: ignore[operator]

    # Every other backend is deleted from the service: the pinned flow is untouched.
    others = frozenset(b.name for b in lab.backends) - {pinned}
    dp.apply(lab.services(removed=others))
    for n in range(3, 13):
        assert session.ping() == f"ok ping-{n}"
    assert dp.stats()[Stat.FLOW_REPINNED] == 0


def test_attach_replaces_a_stale_program_and_refuses_unknown_interfaces() -> None:
    with Lab(prefix="lbt") as lab:
        a, b = lab.netns("a"), lab.netns("b")
        lab.veth(a, "eth0", b, "eth0")
        stale_bpf, stale_fn = compile_program(PROGRAM_SOURCE, "xdp_main")
        dp = DataPlane()
        try:
            stale = attach(stale_fn.fd, "eth0", XdpMode.GENERIC, netns=a)  # as if left by a killed node
            stale_bpf.cleanup()  # the program stays attached after its owner is gone
            assert attached_program_id("eth0", netns=a) == stale.prog_id
            ours = dp.attach("eth0", XdpMode.NATIVE, netns=a)
            assert ours.prog_id != stale.prog_id
            assert attached_program_id("eth0", netns=a) == ours.prog_id
            with pytest.raises(AttachError, match="no interface 'nope'"):
                dp.attach("nope", XdpMode.NATIVE, netns=a)
        finally:
            dp.close()
        assert attached_program_id("eth0", netns=a) == 0
