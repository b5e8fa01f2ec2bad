"""Asking a `python -m bgp --control-stdin` process for its state (netns tests' helper).

The speaker answers `status` with one line `status {JSON}` on its stdout, which the tests send
to the process's log file: per peer, the BGP state and counters (established_count, ...) and BFD.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from examples.lab.netns import wait_until


def speaker_status(proc: subprocess.Popen[bytes], log: Path, what: str) -> dict[str, Any]:
    """Send `status` to the speaker `proc` and return its answer, read from `log`."""
    assert proc.stdin is not None
    seen = log.read_text(errors="replace").count("\nstatus ")
    proc.stdin.write(b"status\n")
    proc.stdin.flush()

    def answer() -> str:
        lines = ("\n" + log.read_text(errors="replace")).split("\nstatus ")[1:]
        return lines[seen].split("\n", 1)[0] if len(lines) > seen else ""
    status: dict[str, Any] = json.loads(wait_until(answer, timeout_s=5, what=f"{what} status"))
    return status
