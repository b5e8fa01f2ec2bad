"""`python -m tests.console_server PORT`: the node's HTTP listener over a unit-built status
document (tests/web_fixtures.py) whose counters grow with every request, with load-aware
weights ({configured, observed, effective, multiplier}), a backend disabled in the config, one drained and a
VIP disabled at run time (tests/web_fixtures.py admin_state), for the console's browser test.
Prints "ready" once listening on 127.0.0.1:PORT (run it in a lab namespace)."""
from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import trio

from cluster import metrics
from cluster.config import HttpConfig
from cluster.status_doc import document
from cluster.web import Listener
from tests.web_fixtures import FakeSource, admin_state, unit_inputs

# As cluster.status_doc.weight_doc writes them for a load-aware service (a static one has no multiplier).
WEIGHTS = {"10.0.0.11:80": {"configured": 2, "observed": 0.25, "effective": 3, "multiplier": 1.5, "agent": None},
           "10.0.0.12:80": {"configured": 1, "observed": 0.6, "effective": 0.5, "multiplier": 0.5, "agent": None},
           "10.0.0.13:80": {"configured": 1, "observed": 0.15, "effective": 1, "multiplier": 1.0, "agent": None}}


def build(source: FakeSource) -> dict[str, Any]:
    doc = document(unit_inputs(admin_state()), source)  # 10.0.0.12 drained, the dns VIP disabled
    for b in doc["services"][0]["backends"]:
        b["weight"] = WEIGHTS[b["backend"]]
    return doc


async def main(port: int) -> None:
    source = FakeSource()

    async def status() -> bytes:
        return json.dumps(build(source), default=str).encode() + b"\n"

    def metrics_build() -> Callable[[], bytes]:
        doc = build(source)
        return lambda: metrics.render(metrics.Snapshot(doc))

    listener = Listener(status, metrics_build)
    async with trio.open_nursery() as nursery:
        await nursery.start(listener.run, HttpConfig(port=port))
        print("ready", flush=True)


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]))
