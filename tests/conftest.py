"""Test tiers and the guards every privileged test runs under.

Tiers are markers: `unit` (pure), `bpf` (XDP program via BPF_PROG_TEST_RUN) and `netns` (real
namespaces and processes). `make test` runs all of them. A tier whose prerequisite is missing
*fails*; it is skipped only when named in LBNODE_SKIP_TIERS (comma separated), and then the run
says so in its summary.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from examples.lab.netguard import real_nic_tx_packets

TIERS = ("unit", "bpf", "netns")
SKIPPED_TIERS = frozenset(t.strip() for t in os.environ.get("LBNODE_SKIP_TIERS", "").split(",") if t.strip())

# A netns test may not make the machine's real NICs send more than this many packets.
REAL_NIC_TX_BUDGET = 20


def _bpf_prerequisite() -> str | None:
    if os.geteuid() != 0:
        return "needs root (CAP_BPF + CAP_NET_ADMIN)"
    try:
        import bcc  # noqa: F401
    except ImportError:
        return "needs Debian's python3-bpfcc in a venv made with --system-site-packages (run `make setup`)"
    if not Path(f"/lib/modules/{os.uname().release}/build").exists():
        return f"needs kernel headers at /lib/modules/{os.uname().release}/build (run `make setup`)"
    return None


def _netns_prerequisite() -> str | None:
    missing = _bpf_prerequisite()
    if missing:
        return missing
    for tool in ("ip", "ethtool"):
        if shutil.which(tool) is None:
            return f"needs `{tool}` (run `make setup`)"
    return None


PREREQUISITES = {"unit": lambda: None, "bpf": _bpf_prerequisite, "netns": _netns_prerequisite}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        tiers = [m.name for m in item.iter_markers() if m.name in TIERS]
        if len(tiers) != 1:
            raise pytest.UsageError(f"{item.nodeid}: needs exactly one tier marker of {TIERS}, has {tiers}")


def pytest_runtest_setup(item: pytest.Item) -> None:
    tier = next(m.name for m in item.iter_markers() if m.name in TIERS)
    if tier in SKIPPED_TIERS:
        pytest.skip(f"tier '{tier}' opted out by LBNODE_SKIP_TIERS")
    missing = PREREQUISITES[tier]()
    if missing:
        pytest.fail(f"tier '{tier}' {missing}; set LBNODE_SKIP_TIERS={tier} to opt out explicitly", pytrace=False)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # type: ignore[no-untyped-def]
    if SKIPPED_TIERS:
        terminalreporter.write_line(f"NOTE: tiers opted out by LBNODE_SKIP_TIERS: {', '.join(sorted(SKIPPED_TIERS))}")


@pytest.fixture(autouse=True)
def real_nic_stays_quiet(request: pytest.FixtureRequest) -> Iterator[None]:
    """Netns tests must keep their traffic inside their namespaces: fail if a real NIC talked."""
    if request.node.get_closest_marker("netns") is None:
        yield
        return
    before = real_nic_tx_packets()
    yield
    after = real_nic_tx_packets()
    for name, count in after.items():
        sent = count - before.get(name, count)
        assert sent <= REAL_NIC_TX_BUDGET, f"real NIC {name} sent {sent} packets during a netns test"
