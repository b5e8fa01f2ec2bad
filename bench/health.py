"""Health-check cost: N backends at a 1 s interval against real local servers.

A child process (this file with --serve) listens on N loopback ports and answers every connection
(HTTP 200 with Connection: close, or just accept-and-close for TCP). This process runs one
`HealthChecker` with N backends and measures its own CPU (user + system, all threads) over a
bounded window after a warm-up interval. The baseline is the same checker with a no-op probe:
the cost of N trio tasks ticking at the same interval, so the ratio shows what the probes add.

    make bench-health                     # 1,000 backends, TCP and HTTP, 10 s windows
    .venv/bin/python bench/health.py --backends 200 --kinds https --seconds 5

The last line is `checks_per_s=<n> cpu=<percent of one core>% baseline_cpu=<percent>%
ratio=<cpu / baseline_cpu>x passed=<passing checks>/<checks>` for the last kind measured (HTTP by
default, the dearer of the two required), against the no-op-probe baseline of the same run. A
failed check costs less than a passing one (a refusal or a timeout does less work than a full
exchange), so if any check fails the figures do not measure what they claim: the run then prints
a warning instead of that line and exits 1.
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import random
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio  # noqa: E402

from healthcheck.config import BackendConfig, CheckConfig, ServiceHealthConfig  # noqa: E402
from healthcheck.probe import Attempt, ProbeResult, ProbeTarget  # noqa: E402
from healthcheck.runner import HealthChecker  # noqa: E402

HTTP_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n"


# -- the servers (child process) -----------------------------------------------------------------

class _Http(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if b"\r\n\r\n" in self.buf:
            self.transport.write(HTTP_RESPONSE)  # type: ignore[attr-defined]
            self.transport.close()


class _Tcp(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def eof_received(self) -> None:
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        pass


async def _serve(n: int, tls: tuple[str, str] | None) -> None:
    import ssl
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    loop = asyncio.get_running_loop()
    ctx = None
    if tls:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(*tls)
    ports: dict[str, list[int]] = {}
    for kind, proto in (("http", _Http), ("tcp", _Tcp)):
        ports[kind] = []
        for _ in range(n):
            srv = await loop.create_server(proto, "127.0.0.1", 0, backlog=256)
            ports[kind].append(srv.sockets[0].getsockname()[1])
    if ctx is not None:
        ports["https"] = []
        for _ in range(n):
            srv = await loop.create_server(_Http, "127.0.0.1", 0, backlog=256, ssl=ctx)
            ports["https"].append(srv.sockets[0].getsockname()[1])
    print(json.dumps(ports), flush=True)
    await loop.run_in_executor(None, sys.stdin.read)  # until the parent closes our stdin


# -- the checker (this process) ------------------------------------------------------------------

@dataclass
class Measurement:
    kind: str
    checks: int  # runs in the measurement window
    failures: int  # failed runs in the measurement window
    failures_total: int  # failed runs since the checker started (warm-up included)
    wall_s: float
    cpu_s: float
    sys_s: float
    errors: dict[str, int]  # last error text -> checks that failed at least once

    @property
    def checks_per_s(self) -> float:
        return self.checks / self.wall_s

    @property
    def cpu_percent(self) -> float:
        return 100 * self.cpu_s / self.wall_s


def _cpu_s() -> tuple[float, float]:
    """(user + system, system) CPU seconds of this process, all threads."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime, r.ru_stime


def _service(kind: str, ports: list[int], interval_ms: int) -> ServiceHealthConfig:
    check: dict[str, object] = {"kind": kind, "interval_ms": interval_ms, "timeout_ms": interval_ms // 2,
                                "rise": 2, "fall": 3}
    if kind == "https":
        check["verify"] = False
    localhost = ipaddress.IPv4Address("127.0.0.1")
    return ServiceHealthConfig(f"bench-{kind}", localhost, ports[0], (CheckConfig.from_dict(check, "checks[0]"),),
                               tuple(BackendConfig(localhost, p) for p in ports), need=1, through_vip=False)


async def _noop_probe(check: CheckConfig, target: ProbeTarget, attempt: Attempt) -> ProbeResult:
    return ProbeResult(True, 0.0)


async def _measure(kind: str, ports: list[int], interval_ms: int, seconds: float, noop: bool = False) -> Measurement:
    svc = _service(kind, ports, interval_ms)
    checker = (HealthChecker([svc], probe_fn=_noop_probe, rng=random.Random(1)) if noop
               else HealthChecker([svc], rng=random.Random(1)))

    def totals() -> tuple[int, int, dict[str, int]]:
        runs = fails = 0
        errors: dict[str, int] = {}
        for s in checker.snapshot():
            for b in s.backends:
                for c in b.checks:
                    runs += c.runs
                    fails += c.failures
                    if c.failures:
                        errors[str(c.last_error)] = errors.get(str(c.last_error), 0) + 1
        return runs, fails, errors

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_drain, checker)
        await nursery.start(checker.run)
        await trio.sleep(2 * interval_ms / 1000)  # every check has run at least once; connections warm
        runs0, fails0, _ = totals()
        cpu0, wall0 = _cpu_s(), time.monotonic()
        await trio.sleep(seconds)
        cpu1, wall1 = _cpu_s(), time.monotonic()
        runs1, fails1, errors = totals()
        nursery.cancel_scope.cancel()
    return Measurement("idle-loop" if noop else kind, runs1 - runs0, fails1 - fails0, fails1, wall1 - wall0,
                       cpu1[0] - cpu0[0], cpu1[1] - cpu0[1], errors)


def failure_warning(results: list[Measurement]) -> str | None:
    """None if every check passed, else why the CPU figures cannot be trusted."""
    failed = [m for m in results if m.failures_total]
    if not failed:
        return None
    parts = [f"{m.kind}: {m.failures_total} failed checks ({m.failures} of {m.checks} in the window), "
             f"errors {m.errors}" for m in failed]
    return ("WARNING: checks failed, so the CPU figures are not the cost of passing checks (a failed check "
            "is cheaper): " + "; ".join(parts))


async def _drain(checker: HealthChecker) -> None:
    async for _ in checker.events:
        pass


def _make_cert(workdir: Path) -> tuple[str, str]:
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", "key.pem", "-out", "cert.pem", "-days", "1", "-subj", "/CN=bench"],
                   cwd=workdir, check=True, capture_output=True, timeout=30)
    return str(workdir / "cert.pem"), str(workdir / "key.pem")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", type=int, default=1000)
    ap.add_argument("--interval-ms", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=10.0, help="measurement window per kind (max 20)")
    ap.add_argument("--kinds", default="tcp,http", help="comma separated: tcp, http, https")
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--tls", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        asyncio.run(_serve(args.serve, tuple(args.tls) if args.tls else None))
        return 0
    seconds = min(args.seconds, 20.0)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    import tempfile
    with tempfile.TemporaryDirectory(prefix="lbnode-bench-health-") as tmp:
        cmd = [sys.executable, __file__, "--serve", str(args.backends)]
        if "https" in kinds:
            cmd += ["--tls", *_make_cert(Path(tmp))]
        server = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            line = server.stdout.readline() if server.stdout else ""
            if not line:
                print("bench-health: server failed to start", file=sys.stderr)
                return 1
            ports = json.loads(line)
            print(f"bench-health: {args.backends} backends at {args.interval_ms} ms, {seconds:.0f} s windows, "
                  f"servers in pid {server.pid}, checker pid {os.getpid()}")
            base = trio.run(_measure, "tcp", ports["tcp"], args.interval_ms, seconds / 2, True)
            print(f"baseline {base.kind}: {base.checks_per_s:.0f} ticks/s cpu={base.cpu_percent:.1f}% "
                  f"(kernel {100 * base.sys_s / base.wall_s:.1f}%) "
                  f"(no-op probe, same task count)")
            results = []
            for kind in kinds:
                m = trio.run(_measure, kind, ports[kind], args.interval_ms, seconds)
                results.append(m)
                ratio = m.cpu_percent / base.cpu_percent if base.cpu_percent > 0 else float("inf")
                per_check_us = 1e6 * m.cpu_s / max(m.checks, 1)
                print(f"{kind}: checks_per_s={m.checks_per_s:.0f} cpu={m.cpu_percent:.1f}% "
                      f"(kernel {100 * m.sys_s / m.wall_s:.1f}%; {per_check_us:.0f} us CPU per check, "
                      f"{ratio:.1f}x the idle loop), "
                      f"failed={m.failures} in the window, {m.failures_total} in all {m.errors or ''}")
        finally:
            if server.stdin:
                server.stdin.close()
            try:
                server.wait(timeout=5)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    warning = failure_warning(results)
    if warning is not None:
        print(f"bench-health: {warning}", file=sys.stderr)
        return 1
    last = results[-1]
    ratio = last.cpu_percent / base.cpu_percent if base.cpu_percent > 0 else float("inf")
    print(f"checks_per_s={last.checks_per_s:.0f} cpu={last.cpu_percent:.1f}% baseline_cpu={base.cpu_percent:.1f}% "
          f"ratio={ratio:.2f}x passed={last.checks - last.failures}/{last.checks}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
