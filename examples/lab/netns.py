"""Namespaces, veths, bridges and processes for the lab and the netns tests.

A `Lab` owns everything it creates: namespaces carry a per-run unique suffix so concurrent runs
never collide, processes are tracked by PID, and `close()` (also on exceptions, via `with`)
kills the processes and deletes the namespaces. Commands go through `ip netns exec`, so every
interface index is resolved inside the namespace that owns the device.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")


class LabError(Exception):
    """A lab command failed; carries the command and its output."""


def run(cmd: Sequence[str], *, check: bool = True, timeout_s: float = 30.0) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(cmd)} -> exit {proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def wait_until(predicate: Callable[[], T], *, timeout_s: float, interval_s: float = 0.05, what: str = "condition") -> T:
    """Poll `predicate` until it returns something truthy; raise TimeoutError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


@dataclass
class Lab:
    """Owner of a set of namespaces and processes; use as a context manager."""

    prefix: str = "lb"
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    namespaces: list[str] = field(default_factory=list)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def __enter__(self) -> Lab:
        # Nodes run under `ip netns exec`, whose private /sys hides /sys/fs/bpf: a bpffs here
        # (host namespace) is where their pins outlive them (bpf/pinned.py).
        from bpf.pinned import ensure_shared_bpffs

        ensure_shared_bpffs()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def netns(self, role: str) -> str:
        """Create a namespace for `role` with loopback up; returns its unique name."""
        name = f"{self.prefix}-{role}-{self.run_id}"
        run(["ip", "netns", "add", name])
        self.namespaces.append(name)
        self.ns_run(name, "ip", "link", "set", "lo", "up")
        return name

    def ns_run(self, ns: str, *cmd: str, check: bool = True,
               timeout_s: float = 30.0) -> subprocess.CompletedProcess[str]:
        return run(["ip", "netns", "exec", ns, *cmd], check=check, timeout_s=timeout_s)

    def veth(self, ns_a: str, name_a: str, ns_b: str, name_b: str, *, queues: int = 1) -> None:
        """A veth pair with one end in each namespace, both up. Created in ns_a, so no root-namespace device exists."""
        q = str(queues)
        self.ns_run(ns_a, "ip", "link", "add", name_a, "numtxqueues", q, "numrxqueues", q,
                    "type", "veth", "peer", "name", name_b, "netns", ns_b, "numtxqueues", q, "numrxqueues", q)
        self.ns_run(ns_a, "ip", "link", "set", name_a, "up")
        self.ns_run(ns_b, "ip", "link", "set", name_b, "up")

    def bridge(self, ns: str, name: str, ports: Sequence[str]) -> None:
        self.ns_run(ns, "ip", "link", "add", name, "type", "bridge")
        # No STP delay: ports forward at once.
        self.ns_run(ns, "ip", "link", "set", name, "type", "bridge", "forward_delay", "0", "stp_state", "0")
        for port in ports:
            self.ns_run(ns, "ip", "link", "set", port, "master", name)
        self.ns_run(ns, "ip", "link", "set", name, "up")

    def addr(self, ns: str, dev: str, cidr: str) -> None:
        self.ns_run(ns, "ip", "addr", "add", cidr, "dev", dev)

    def mac(self, ns: str, dev: str) -> str:
        return self.ns_run(ns, "cat", f"/sys/class/net/{dev}/address").stdout.strip()

    def spawn(self, ns: str, *cmd: str, **popen_kwargs: object) -> subprocess.Popen[bytes]:
        """Start a process inside `ns`; it is killed by PID when the lab closes."""
        popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc: subprocess.Popen[bytes] = subprocess.Popen(  # type: ignore[call-overload]
            ["ip", "netns", "exec", ns, *cmd], start_new_session=True, **popen_kwargs)
        self.processes.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], *, timeout_s: float = 5.0) -> int | None:
        """SIGTERM the process group, then SIGKILL after `timeout_s`; returns the exit code."""
        if proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(timeout=timeout_s)
        return proc.returncode

    def close(self) -> None:
        errors = []
        for proc in reversed(self.processes):
            try:
                self.stop(proc)
            except Exception as exc:  # keep tearing down the rest
                errors.append(f"pid {proc.pid}: {exc}")
        self.processes.clear()
        for ns in reversed(self.namespaces):
            _kill_namespace_pids(ns)
            _remove_pins(ns)
            deleted = run(["ip", "netns", "delete", ns], check=False)
            if deleted.returncode != 0:
                errors.append(f"netns {ns}: {deleted.stderr.strip()}")
        self.namespaces.clear()
        if errors:
            raise LabError("lab teardown: " + "; ".join(errors))


def _remove_pins(ns: str) -> None:
    """What a killed node of this namespace left pinned in bpffs (the host's: it outlives the
    namespace, and a flow table holds tens of MB)."""
    from bpf.pinned import remove_netns_pins

    try:
        remove_netns_pins(os.stat(f"/run/netns/{ns}").st_ino)
    except OSError:
        pass


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _kill_namespace_pids(ns: str) -> None:
    """SIGKILL anything still running in `ns` (a daemon that forked away from our PID)."""
    pids = run(["ip", "netns", "pids", ns], check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def read_line(proc: subprocess.Popen[bytes], *, timeout_s: float) -> str:
    """One line of a child's stdout, or TimeoutError: a hung child never hangs the caller."""
    import selectors

    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout_s):
            raise TimeoutError(f"pid {proc.pid}: no output within {timeout_s}s")
    line = proc.stdout.readline()
    if not line:
        raise LabError(f"pid {proc.pid}: exited ({proc.poll()}) before writing a line")
    return line.decode().rstrip("\n")
