"""The benchmarks' real-NIC guard: their traffic stays inside namespaces created for the run.

The check the netns test tier makes (tests/conftest.py), for benchmarks: the root namespace's physical
interfaces (those backed by a device) may send no more than a handful of packets while a
benchmark runs; otherwise it fails, whatever sent them (a parallel download fails it too).
"""
from __future__ import annotations

from pathlib import Path

TX_BUDGET = 50  # packets; what the machine's own chatter sends during a run of a few minutes


def real_nic_tx_packets() -> dict[str, int]:
    counts = {}
    for dev in Path("/sys/class/net").iterdir():
        if (dev / "device").exists():
            counts[dev.name] = int((dev / "statistics" / "tx_packets").read_text())
    return counts


class RealNicGuard:
    """`with RealNicGuard(): ...` raises on exit if a real NIC sent more than TX_BUDGET packets."""

    def __enter__(self) -> RealNicGuard:
        self._before = real_nic_tx_packets()
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None:
            return
        for name, count in real_nic_tx_packets().items():
            sent = count - self._before.get(name, count)
            if sent > TX_BUDGET:
                raise RuntimeError(f"real NIC {name} sent {sent} packets during the benchmark (budget {TX_BUDGET})")
