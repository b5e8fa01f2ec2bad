"""The ECMP lab (examples/lab/ecmp.py) with its backends and router running, for netns tests."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

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
