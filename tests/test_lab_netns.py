"""The lab's own guarantees: unique names, real connectivity, and teardown even on failure."""
from __future__ import annotations

import pytest

from examples.lab.netns import Lab, run

pytestmark = pytest.mark.netns


def _netns_names() -> set[str]:
    return {line.split()[0] for line in run(["ip", "netns", "list"]).stdout.splitlines() if line.strip()}


def test_lab_connects_namespaces_and_tears_down_on_failure() -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with Lab(prefix="lbt") as lab:
            a, b = lab.netns("a"), lab.netns("b")
            lab.veth(a, "eth0", b, "eth0")
            lab.addr(a, "eth0", "192.0.2.1/24")
            lab.addr(b, "eth0", "192.0.2.2/24")
            lab.ns_run(a, "ping", "-c", "1", "-W", "2", "192.0.2.2")
            sleeper = lab.spawn(b, "sleep", "300")
            created = {a, b}
            assert created <= _netns_names()
            raise RuntimeError("boom")
    assert not (created & _netns_names())
    assert sleeper.poll() is not None
