"""The ECMP lab (examples/lab/ecmp.py) with its backends and router running, for netns tests; and
reading a node's HTTP listener (/metrics, /api/v1/status) from inside its namespace."""
from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from prometheus_client.parser import text_string_to_metric_families

from examples.lab.ecmp import EcmpLab
from examples.lab.netns import Lab

L = TypeVar("L", bound=EcmpLab)


@contextmanager
def running_ecmp_lab(tmp_path: Path, prefix: str, cls: type[L]) -> Iterator[L]:
    """Namespaces, backends and BIRD up; everything torn down on exit, even on failure."""
    with Lab(prefix=prefix) as lab:
        e = cls(lab, tmp_path)
        try:
            e.start_backends()
            e.start_router()
            yield e
        finally:
            e.close()


NODE_URL = "http://127.0.0.1:9473"  # the default listener, on the node namespace's own loopback


def http_get(e: EcmpLab, node: str, path: str) -> bytes:
    """GET from inside the node's namespace (the listener is on its loopback)."""
    code = ("import sys, urllib.request; "
            f"sys.stdout.buffer.write(urllib.request.urlopen({NODE_URL + path!r}, timeout=10).read())")
    proc = subprocess.run(["ip", "netns", "exec", e.nodes[node].ns, sys.executable, "-c", code],
                          capture_output=True, timeout=30, check=True)
    return proc.stdout


def metric_values(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The samples of metric `name` in exposition `text`: sorted label pairs -> value."""
    return {tuple(sorted(s.labels.items())): s.value
            for f in text_string_to_metric_families(text) for s in f.samples if s.name == name}
