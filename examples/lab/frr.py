"""The ECMP lab with FRR instead of BIRD as the router: zebra, bgpd and bfdd running examples/frr.conf.

The daemons run in the router namespace as FRR's own user, with every path they use (vty sockets,
the zserv socket, bfdd's control socket, pid files) in a private state directory, so nothing
touches /etc/frr or /var/run/frr and two labs never meet. The config is applied the way an
integrated /etc/frr/frr.conf is, through vtysh (`vtysh -f`), verbatim. Their logs go to the lab's
work directory (frr-<daemon>.log).
"""
from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from examples.lab.ecmp import EcmpLab
from examples.lab.hosts import REPO
from examples.lab.netns import LabError, wait_until

FRR_CONF = REPO / "examples" / "frr.conf"
FRR_BIN = Path("/usr/lib/frr")
DAEMONS = ("zebra", "bfdd", "bgpd")  # zebra first: the others connect to its zserv socket


class FrrEcmpLab(EcmpLab):
    """EcmpLab whose router is FRR. `start_router` starts the daemons and applies the config."""

    state: Path | None = None

    def start_router(self) -> None:
        # FRR drops to its own user: its state directory must be its own, on a path it can reach
        # (pytest's tmp_path is under a 0700 directory).
        self.state = Path(tempfile.mkdtemp(prefix="lbnode-frr-"))
        self.state.chmod(0o755)
        os.chown(self.state, pwd.getpwnam("frr").pw_uid, grp.getgrnam("frr").gr_gid)
        common = ["--vty_socket", str(self.state), "-z", str(self.state / "zserv.api"), "-u", "frr", "-g", "frr",
                  "-P", "0", "--log", "stdout"]
        for daemon in DAEMONS:
            extra = ["--bfdctl", str(self.state / "bfdd.sock")] if daemon == "bfdd" else []
            empty = self.state / f"{daemon}.conf"
            empty.write_text("")  # configured through vtysh below, as an integrated frr.conf is
            with open(self.workdir / f"frr-{daemon}.log", "ab") as log:
                self.lab.spawn(self.router, str(FRR_BIN / daemon), "-f", str(empty), "-i",
                               str(self.state / f"{daemon}.pid"), *common, *extra, stdout=log, stderr=log)
            vty = self.state / f"{daemon}.vty"
            wait_until(vty.exists, timeout_s=20, what=f"FRR {daemon} vty socket")
        applied = self.vtysh("-f", str(FRR_CONF))
        if applied.returncode != 0 or applied.stderr.strip():
            raise LabError(f"vtysh -f {FRR_CONF}: exit {applied.returncode}: {applied.stdout} {applied.stderr}")

    def vtysh(self, *args: str) -> subprocess.CompletedProcess[str]:
        assert self.state is not None
        return self.lab.ns_run(self.router, "vtysh", "--vty_socket", str(self.state), *args, check=False)

    def bgp_established(self) -> set[str]:
        """Neighbours whose BGP session is Established."""
        out = self.vtysh("-c", "show bgp ipv4 unicast summary json").stdout
        peers = json.loads(out or "{}").get("peers", {})
        return {addr for addr, p in peers.items() if p.get("state") == "Established"}

    def bfd_up(self) -> set[str]:
        """Peers whose BFD session is up."""
        out = self.vtysh("-c", "show bfd peers json").stdout
        return {p["peer"] for p in json.loads(out or "[]") if p.get("status") == "up"}

    def route_lines(self) -> str:
        return self.lab.ns_run(self.router, "ip", "route", "show", "192.0.2.10").stdout

    def wait_next_hops_timed(self, expected: set[str], timeout_s: float) -> float:
        """Seconds until the router's kernel next hops for the VIP are `expected`."""
        start = time.monotonic()
        self.wait_next_hops(expected, timeout_s=timeout_s)
        return time.monotonic() - start

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self.state is not None:
                shutil.rmtree(self.state, ignore_errors=True)

