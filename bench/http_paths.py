"""`make bench-http`: HTTP through lbnode against direct, a bare XDP_TX forwarder and HAProxy.

Four namespaces on one bridge (in a fifth, `sw`): a client (10.78.0.1), the node (10.78.0.2,
where the forwarders run), and a backend (10.78.0.3) running nginx (nginx-light, one worker,
`return 200`, keep-alive without limit) that also holds the VIP 10.78.1.100 on loopback, as a
layer-2 DSR backend does. The client routes the VIP's subnet via the node. Cases, each measured
in the same run:

- direct: the client to the backend's own address;
- bare: to the VIP, through bench/baseline.c built as a DSR forwarder on the node's veth (native
  XDP: a frame to the VIP gets the backend's MAC, XDP_TX), answered directly: what the DSR
  topology costs;
- lbnode: to the VIP, through lbnode's program (`DataPlane`, one TCP service, one backend);
  its flow-event ring has no reader here, so after the first ~13k new flows it counts lost
  events instead of writing them (flow sync would read them in another process);
- haproxy: HAProxy 2.6 in TCP mode on the node's address (maxconn 4000, default threads),
  which proxies both directions.

The node's veth peer on the bridge carries an XDP_PASS program while a forwarder is attached
(a veth delivers XDP_TX only to a peer with an XDP program), and no program otherwise.

Throughput: wrk, 2 threads, 50 connections, DURATION_S s, keep-alive and with `Connection: close`
(a new TCP connection per request). ROUNDS rounds; in each, every mode runs its four cases back
to back. The tables show medians over rounds; the ratios (and the last line) are paired: the
median over rounds of the ratio of two runs of the same round, seconds apart, which a shared
machine's changing load disturbs far less than a ratio of medians.

Latency: wrk at a low request rate with keep-alive, LATENCY_CONNS connections each pausing
LATENCY_DELAY_MS after every response (wrk's Lua `delay()`: a closed loop with think time,
about LATENCY_CONNS / (delay + latency) requests/s, so the offered rate is nearly the same in
every case; wrk2's open-loop constant rate is not available here). The table shows min, mean,
p50, p90, p95, p99 of wrk's per-request latency (write of the request to read of the
response), each the median over rounds.

Last line: lbnode_vs_bare=<r> lbnode_vs_haproxy=<r> p50_vs_direct=<r> (paired requests/s ratios
with keep-alive; paired p50 latency of lbnode / direct at the low rate).
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples.lab.hosts import make_client  # noqa: E402
from examples.lab.netguard import RealNicGuard  # noqa: E402
from examples.lab.netns import Lab, wait_until  # noqa: E402

BENCH = Path(__file__).resolve().parent
CLIENT, NODE, BACKEND = "10.78.0.1", "10.78.0.2", "10.78.0.3"
VIP = "10.78.1.100"
PORT = 80
CONNS, THREADS = 50, 2
DURATION_S = 3
ROUNDS = 7  # short runs, many rounds: noise from a shared machine spreads over every case
LATENCY_CONNS, LATENCY_DELAY_MS = 10, 10  # ~1,000 requests/s
CASES = ("direct", "bare", "lbnode", "haproxy")

# wrk prints its summary as one JSON line (latencies in microseconds).
WRK_SCRIPT = """
local delay_ms = tonumber(os.getenv("WRK_DELAY_MS") or "0")
if delay_ms > 0 then
  function delay() return delay_ms end
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "errors": %d, "non2xx": %d, "min": %d, "mean": %f, '
    .. '"p50": %d, "p90": %d, "p95": %d, "p99": %d}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency.min, latency.mean, latency:percentile(50), latency:percentile(90),
    latency:percentile(95), latency:percentile(99)))
end
"""

NGINX_CONF = """
worker_processes 1;
daemon off;
user root;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    keepalive_requests 1000000000;
    keepalive_timeout 300s;
    server {{
        listen {port} backlog=4096 reuseport;
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""

HAPROXY_CONF = """
global
    maxconn 4000
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend fe
    bind {node}:{port}
    default_backend be
backend be
    server b1 {backend}:{port}
"""


@dataclass
class Topology:
    lab: Lab
    client: str
    node: str
    backend: str
    sw: str
    node_mac: str
    backend_mac: str


def build(lab: Lab) -> Topology:
    client, node, backend, sw = (lab.netns(r) for r in ("client", "node", "backend", "sw"))
    for ns, dev, peer in ((client, "c0", "sc"), (node, "n0", "sn"), (backend, "b0", "sb")):
        lab.veth(ns, dev, sw, peer, queues=2)
    lab.bridge(sw, "br0", ["sc", "sn", "sb"])
    for ns, dev, addr in ((client, "c0", CLIENT), (node, "n0", NODE), (backend, "b0", BACKEND)):
        lab.addr(ns, dev, f"{addr}/24")
        lab.ns_run(ns, "sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65535", "net.ipv4.tcp_tw_reuse=1")
    lab.ns_run(client, "ip", "route", "add", str(ipaddress.ip_network(f"{VIP}/24", strict=False)), "via", NODE)
    lab.addr(backend, "lo", f"{VIP}/32")  # DSR: the backend answers from the VIP
    for key in ("net.ipv4.conf.all.arp_ignore=1", "net.ipv4.conf.all.arp_announce=2"):
        lab.ns_run(backend, "sysctl", "-qw", key)  # and never answers ARP for it
    make_client(lab, client, "c0")  # full checksums: an XDP_TX'd frame loses the offload's promise
    return Topology(lab, client, node, backend, sw, lab.mac(node, "n0"), lab.mac(backend, "b0"))


def wait_listening(t: Topology, host: str, proc: Any, what: str) -> None:
    """Until the client can open a TCP connection to host:PORT (and `proc` still runs)."""
    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        probe = f"exec 3<>/dev/tcp/{host}/{PORT}"
        return t.lab.ns_run(t.client, "bash", "-c", probe, check=False, timeout_s=5).returncode == 0

    wait_until(up, timeout_s=20, what=f"{what} listening on {host}:{PORT}")


def mac_c(mac: str) -> str:
    return ",".join(f"0x{b}" for b in mac.split(":"))


def wrk(t: Topology, url: str, script: Path, *, conns: int, seconds: int, close: bool = False,
        delay_ms: int = 0) -> dict[str, Any]:
    cmd = ["env", f"WRK_DELAY_MS={delay_ms}", "wrk", f"-t{min(THREADS, conns)}", f"-c{conns}", f"-d{int(seconds)}s",
           "-s", str(script)]
    if close:
        cmd += ["-H", "Connection: close"]
    out = t.lab.ns_run(t.client, *cmd, url, timeout_s=seconds + 60).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    # A few connection errors are normal at the end of a close run; many mean a broken path.
    if result["non2xx"] or result["errors"] > max(10, result["requests"] // 1000):
        raise RuntimeError(f"{url}: wrk saw {result['errors']} socket errors, {result['non2xx']} non-2xx: {result}")
    return result


class Node:
    """What runs on the node for each case: an XDP program (and XDP_PASS on its bridge-side
    peer), HAProxy, or nothing."""

    def __init__(self, t: Topology, tmp: Path) -> None:
        from bpf.dataplane import BackendSpec, DataPlane, ServiceSpec
        from bpf.loader import PASS_SOURCE, compile_program
        from bpf.structs import IPPROTO_TCP

        self.t = t
        vip_be32 = int.from_bytes(ipaddress.ip_address(VIP).packed, "little")  # as the program reads it
        self._fwd_bpf, self._fwd = compile_program(BENCH / "baseline.c", "xdp_baseline", [
            f"-DFWD_VIP={vip_be32}u", f"-DFWD_DST_MAC={mac_c(t.backend_mac)}", f"-DFWD_SRC_MAC={mac_c(t.node_mac)}"])
        self._pass_bpf, self._pass = compile_program(PASS_SOURCE, "xdp_pass")
        self.dp = DataPlane()
        self.dp.set_config(t.node_mac)
        self.dp.apply([ServiceSpec(ipaddress.ip_address(VIP), PORT, IPPROTO_TCP,
                                   (BackendSpec(ipaddress.ip_address(BACKEND), t.backend_mac),))])
        conf = tmp / "haproxy.cfg"
        conf.write_text(HAPROXY_CONF.format(node=NODE, backend=BACKEND, port=PORT))
        self._haproxy_conf = conf
        self._attached: list[Any] = []
        self._haproxy: Any = None

    def set(self, case: str) -> None:
        from bpf.loader import XdpMode, attach

        self.clear()
        if case in ("bare", "lbnode"):
            fd = self._fwd.fd if case == "bare" else self.dp.fd
            self._attached.append(attach(self._pass.fd, "sn", XdpMode.NATIVE, self.t.sw))
            self._attached.append(attach(fd, "n0", XdpMode.NATIVE, self.t.node))
        elif case == "haproxy":
            self._haproxy = self.t.lab.spawn(self.t.node, "haproxy", "-db", "-f", str(self._haproxy_conf))
            wait_listening(self.t, NODE, self._haproxy, "haproxy")

    def clear(self) -> None:
        from bpf.loader import detach

        while self._attached:
            detach(self._attached.pop())
        if self._haproxy is not None:
            self.t.lab.stop(self._haproxy)
            self._haproxy = None

    def close(self) -> None:
        self.clear()
        self.dp.close()
        self._fwd_bpf.cleanup()
        self._pass_bpf.cleanup()


TARGET = {"direct": BACKEND, "bare": VIP, "lbnode": VIP, "haproxy": NODE}


def url(case: str) -> str:
    return f"http://{TARGET[case]}:{PORT}/"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=ROUNDS)
    p.add_argument("--seconds", type=int, default=DURATION_S)
    args = p.parse_args()
    t0 = time.monotonic()
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmpdir, RealNicGuard(), Lab(prefix="lbhttp") as lab:
        tmp = Path(tmpdir)
        script = tmp / "summary.lua"
        script.write_text(WRK_SCRIPT)
        (tmp / "nginx.conf").write_text(NGINX_CONF.format(tmp=tmp, port=PORT))
        t = build(lab)
        nginx = lab.spawn(t.backend, "nginx", "-c", str(tmp / "nginx.conf"), "-p", str(tmp))
        wait_listening(t, BACKEND, nginx, "nginx")
        node = Node(t, tmp)
        modes: dict[str, Callable[[str], dict[str, Any]]] = {
            "keepalive": lambda u: wrk(t, u, script, conns=CONNS, seconds=args.seconds),
            "close": lambda u: wrk(t, u, script, conns=CONNS, seconds=args.seconds, close=True),
            "latency": lambda u: wrk(t, u, script, conns=LATENCY_CONNS, seconds=args.seconds,
                                     delay_ms=LATENCY_DELAY_MS),
        }
        try:
            for _ in range(args.rounds):
                for mode, run in modes.items():  # the cases of one mode back to back: close in time
                    for case in CASES:
                        node.set(case)
                        runs.setdefault((case, mode), []).append(run(url(case)))
                        node.clear()
            from bpf.structs import Stat

            lb = node.dp.stats()
            if lb[Stat.TX] == 0 or lb[Stat.DROP_NO_BACKEND] or lb[Stat.PASS_UNPARSED]:
                raise RuntimeError(f"lbnode counters: { {s.name: n for s, n in lb.items() if n} }")
        finally:
            node.close()
    return report(runs, args.rounds, args.seconds, time.monotonic() - t0, lb)


def report(runs: dict[tuple[str, str], list[dict[str, Any]]], rounds: int, seconds: int, took_s: float,
           lb: Any) -> int:
    def med(case: str, mode: str, field: str) -> float:
        return float(statistics.median(float(r[field]) for r in runs[(case, mode)]))

    print(f"HTTP to nginx (1 worker) through each path; wrk -t{THREADS} -c{CONNS}, {seconds:.0f} s a run, "
          f"{rounds} interleaved rounds, median (bench took {took_s:.0f} s)")
    print(f"{'path':8} {'keep-alive req/s':>16} {'vs direct':>9}  {'close req/s':>11} {'vs direct':>9}  samples (k/s)")
    for case in CASES:
        ka_rps, cl = med(case, "keepalive", "rps"), med(case, "close", "rps")
        print(f"{case:8} {ka_rps:16.0f} {ka_rps / med('direct', 'keepalive', 'rps'):9.2f}  {cl:11.0f} "
              f"{cl / med('direct', 'close', 'rps'):9.2f}  "
              f"{[round(r['rps'] / 1e3, 1) for r in runs[(case, 'keepalive')]]} "
              f"{[round(r['rps'] / 1e3, 1) for r in runs[(case, 'close')]]}")
    print(f"latency, keep-alive, {LATENCY_CONNS} connections each pausing {LATENCY_DELAY_MS} ms after a response "
          f"(wrk Lua delay()), ms:")
    print(f"{'path':8} {'req/s':>6} {'min':>6} {'mean':>6} {'p50':>6} {'p90':>6} {'p95':>6} {'p99':>6}")
    for case in CASES:
        cols = " ".join(f"{med(case, 'latency', f) / 1e3:6.3f}" for f in ("min", "mean", "p50", "p90", "p95", "p99"))
        print(f"{case:8} {med(case, 'latency', 'rps'):6.0f} {cols}")
    from bpf.structs import Stat

    print(f"lbnode counters over the run: tx {lb[Stat.TX]}, new flows {lb[Stat.NEW_FLOW]}, "
          f"SYNs forwarded unpinned {lb[Stat.SYN_UNPINNED]}, events lost (no ring reader) {lb[Stat.EVENT_LOST]}")
    def paired(case: str, other: str, mode: str, field: str) -> float:
        """The median over rounds of case / other, each pair measured seconds apart in one round."""
        return float(statistics.median(a[field] / b[field] for a, b in zip(runs[(case, mode)], runs[(other, mode)],
                                                                            strict=True)))

    print("paired ratios (median over rounds of the ratio within a round):")
    for mode in ("keepalive", "close"):
        print(f"  {mode:9} req/s: " + ", ".join(f"{case}/{other} {paired(case, other, mode, 'rps'):.2f}"
                                               for case, other in (("bare", "direct"), ("lbnode", "direct"),
                                                                   ("haproxy", "direct"), ("lbnode", "bare"),
                                                                   ("lbnode", "haproxy"))))
    print(f"  latency p50: lbnode/direct {paired('lbnode', 'direct', 'latency', 'p50'):.2f}, "
          f"haproxy/direct {paired('haproxy', 'direct', 'latency', 'p50'):.2f}")
    print(f"lbnode_vs_bare={paired('lbnode', 'bare', 'keepalive', 'rps'):.2f} "
          f"lbnode_vs_haproxy={paired('lbnode', 'haproxy', 'keepalive', 'rps'):.2f} "
          f"p50_vs_direct={paired('lbnode', 'direct', 'latency', 'p50'):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
