"""bench/health.py must not report a CPU figure measured on failing checks (they are cheaper)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

BENCH = Path(__file__).resolve().parent.parent / "bench" / "health.py"


def _bench(kill_servers: bool) -> tuple[int, str, str]:
    """A tiny run; with `kill_servers` the server process dies once announced, so checks fail."""
    cmd = [sys.executable, str(BENCH), "--backends", "3", "--interval-ms", "200", "--seconds", "1", "--kinds", "tcp"]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            first = proc.stdout.readline()
            m = re.search(r"servers in pid (\d+),", first)
            assert m, first
            if kill_servers:
                os.kill(int(m.group(1)), signal.SIGKILL)
            out, err = proc.communicate(timeout=60)
        except BaseException:
            proc.kill()
            raise
    return proc.returncode, first + out, err


def test_passing_checks_give_the_figure() -> None:
    code, out, err = _bench(kill_servers=False)
    assert code == 0, (out, err)
    last = re.fullmatch(r"checks_per_s=\d+ cpu=[0-9.]+% baseline_cpu=([0-9.]+)% ratio=([0-9.]+)x passed=(\d+)/(\d+)",
                        out.splitlines()[-1])
    assert last, out
    assert float(last[1]) > 0 and float(last[2]) > 0, out  # a ratio to a baseline measured in this run
    assert int(last[4]) > 0 and last[3] == last[4], out  # every check in the window passed
    assert "WARNING" not in err


def test_failing_checks_give_a_warning_and_exit_1() -> None:
    code, out, err = _bench(kill_servers=True)
    assert code == 1, (out, err)
    assert not out.splitlines()[-1].startswith("checks_per_s="), out  # no summary line to parse
    assert "WARNING: checks failed, so the CPU figures are not the cost of passing checks" in err
    assert re.search(r"tcp: \d+ failed checks .*'refused': 3", err), err
