"""examples/systemd/lbnode@.service works as written: its ExecStart, user and capabilities.

systemd is not PID 1 on the test machines, so systemd cannot start the unit. Instead the test
parses the unit and runs its ExecStart line for instance `eth0` as systemd would
(tests/systemd_unit.py): as a non-root uid (65534 standing in for User=lbnode), with exactly the
unit's ambient capabilities and bounding set, no new privileges, /run/lbnode from RuntimeDirectory
and /usr, /boot, /etc read-only, LBNODE_IP from the EnvironmentFile. Two substitutions, both
paths: the venv's `lbnode` script is `python -m cluster.cli` from this checkout, and /etc/lbnode/
is a temporary directory laid out as the README's set-up leaves /etc/lbnode (config, env file, a
key made by `lbnode keygen`).

The unit's ExecStartPre (`+`: as root, in the host's mount namespace) runs as systemd would run it,
as root in the test's own mount namespace, with the same stand-in for /run/lbnode (the directory
bind-mounted there for the node) and uid 65534 for the unit's user: it mounts the unit's bpffs in
that directory, which the node's namespace then shows at /run/lbnode/bpffs, as systemd's would.

In the ECMP lab (BIRD router, real backends) the node must attach XDP, pin its program and maps
in that bpffs (owned by its user), answer `lbnode status` on its default socket, announce the VIP
to BIRD and forward HTTP through it; the unit's ExecReload must reload it. An upgrade's restart
(`lbnode stop --keep-forwarding`, then ExecStartPre and ExecStart again) must adopt the pinned flow
table; the unit's KillSignal must drain, detach and remove the pins within TimeoutStopSec.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from bpf.loader import attached_program_id
from bpf.pinned import is_bpffs
from cluster import status
from examples.lab.ecmp import REPO, EcmpLab
from examples.lab.netns import wait_until
from tests.ecmp_lab import running_ecmp_lab
from tests.systemd_unit import Unit, read_env_file

UNIT = REPO / "examples" / "systemd" / "lbnode@.service"
VENV_LBNODE = "/opt/lbnode/bin/lbnode"
NOBODY = 65534
CAP_BITS = {"CAP_NET_ADMIN": 12, "CAP_NET_RAW": 13, "CAP_SYS_ADMIN": 21, "CAP_PERFMON": 38, "CAP_BPF": 39}


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A temp dir that uid 65534 can traverse (pytest's tmp_path is under a 0700 directory)."""
    path = Path(tempfile.mkdtemp(prefix="lbnode-unit-"))
    try:
        path.chmod(0o755)
        yield path
    finally:
        # What the unit's ExecStartPre mounted in it first (the bpffs: its pins go with it).
        inside = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
                  if line.split()[4].startswith(f"{path}/")]
        for mount_point in sorted(inside, reverse=True):
            subprocess.run(["umount", "-l", mount_point], check=False, timeout=30)
        shutil.rmtree(path, ignore_errors=True)


def cap_mask(names: frozenset[str]) -> int:
    return sum(1 << CAP_BITS[n] for n in names)


def proc_status(pid: int) -> dict[str, str]:
    text = Path(f"/proc/{pid}/status").read_text()
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


@pytest.mark.unit
def test_unit_declares_what_the_node_needs() -> None:
    unit = Unit.parse(UNIT)
    caps = unit.capabilities()
    assert caps["AmbientCapabilities"] == caps["CapabilityBoundingSet"] == {"CAP_BPF", "CAP_NET_ADMIN",
                                                                            "CAP_PERFMON"}
    assert unit.value("User") != "root" and unit.value("ExecReload") == "/bin/kill -HUP $MAINPID"
    assert unit.value("Restart") == "on-failure" and unit.value("StartLimitBurst", "Unit")
    assert "network-online.target" in unit.value("After", "Unit") and "network-online.target" in unit.value(
        "Wants", "Unit")
    config = yaml.safe_load((REPO / "examples" / "lbnode.yaml").read_text())
    drain_s = config["drain_s"] + config["bgp"]["graceful_shutdown_wait_s"]
    assert float(unit.value("TimeoutStopSec")) > drain_s + 5, "systemd would SIGKILL a draining node"


@pytest.mark.unit
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` (offline: it needs no running systemd) finds no error or warning.
    It checks that ExecStart's binary exists, so the copy verified points it at an executable."""
    if shutil.which("systemd-analyze") is None:
        pytest.fail("needs systemd-analyze (Debian's systemd package)")
    copy = tmp_path / "lbnode@.service"
    copy.write_text(UNIT.read_text().replace(VENV_LBNODE, sys.executable))
    result = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stderr.strip(), result


@pytest.mark.netns
def test_exec_start_runs_with_only_the_units_capabilities(tmp_path: Path, world_dir: Path) -> None:
    unit = Unit.parse(UNIT)
    with running_ecmp_lab(tmp_path, "lbu", EcmpLab) as e:
        host = e.nodes["node1"]
        # /etc/lbnode as the README's set-up leaves it.
        etc, run_dir = world_dir / "etc-lbnode", world_dir / "run-lbnode"
        etc.mkdir(mode=0o750)
        run_dir.mkdir()
        os.makedirs("/run/lbnode", exist_ok=True)  # the mount point (every node run creates it)
        keygen = subprocess.run([sys.executable, "-m", "cluster.cli", "keygen", str(etc / "sync.key")], cwd=REPO,
                                capture_output=True, text=True, timeout=30)
        assert keygen.returncode == 0, keygen
        config = e.node_config("node1")
        config["sync"]["key_file"] = "/etc/lbnode/sync.key"
        text = yaml.safe_dump(config).replace("/etc/lbnode/", f"{etc}/")
        (etc / "eth0.yaml").write_text(text)
        (etc / "eth0.env").write_text(f"# this node's address on eth0\nLBNODE_IP={host.ip4}\n")
        # Owners and modes as .ci/install-host leaves them: the node reads the config as a member
        # of the directory's group, and only the key is its own.
        os.chown(etc, 0, NOBODY)
        os.chown(etc / "eth0.yaml", 0, NOBODY)
        (etc / "eth0.yaml").chmod(0o640)
        os.chown(etc / "sync.key", NOBODY, NOBODY)
        os.chown(run_dir, NOBODY, NOBODY)  # RuntimeDirectory= belongs to User=

        env = read_env_file(Path(unit.value("EnvironmentFile").replace("%i", "eth0").replace("/etc/lbnode", str(etc))))
        argv = unit.exec_argv("ExecStart", "eth0", env)
        assert argv[0] == VENV_LBNODE and argv[1:] == ["--ip", host.ip4, "--if", "eth0", "--config",
                                                      "/etc/lbnode/eth0.yaml"], argv
        # ExecStartPre as systemd runs a `+` command: as root, in the host's mount namespace, where
        # /run/lbnode is the RuntimeDirectory; run_dir stands in for it (as etc for /etc/lbnode), and
        # uid 65534 for the unit's user.
        owner = f"{unit.value('User')}:{unit.value('Group')}"
        pre = unit.exec_argv("ExecStartPre", "eth0", env)
        assert "+" in unit.exec_prefixes("ExecStartPre") and owner in " ".join(pre), pre
        exec_start_pre = [w.replace("/run/lbnode", str(run_dir)).replace(owner, f"{NOBODY}:{NOBODY}") for w in pre]

        def start_pre() -> None:
            done = subprocess.run(exec_start_pre, capture_output=True, text=True, timeout=30)
            assert done.returncode == 0 and not done.stderr, done
            assert is_bpffs(run_dir / "bpffs") and (run_dir / "bpffs").stat().st_uid == NOBODY

        # A hardened host filters by reverse path; checks through the VIP need it off, so the node
        # (as uid 65534: CAP_NET_ADMIN is what lets it write net sysctls) turns it off, then back.
        rp_filter = ("net.ipv4.conf.all.rp_filter", "net.ipv4.conf.eth0.rp_filter")

        def rp_filters() -> list[str]:
            return e.lab.ns_run(host.ns, "sysctl", "-n", *rp_filter).stdout.split()

        e.lab.ns_run(host.ns, "sysctl", "-qw", *(f"{k}=1" for k in rp_filter))
        lbnode = [sys.executable, "-m", "cluster.cli"]
        # The README's check before the first start (as root, with the real key: not --offline).
        checked = subprocess.run([*lbnode, "check-config", "--ip", host.ip4, str(etc / "eth0.yaml")], cwd=REPO,
                                 capture_output=True, text=True, timeout=60)
        assert checked.returncode == 0 and not checked.stderr, checked
        command = [*lbnode, *(a.replace("/etc/lbnode", str(etc)) for a in argv[1:])]
        # The operator's `lbnode ...` as root, seeing /run/lbnode as the node does.
        as_operator = ["unshare", "--mount", "--propagation", "private", "sh", "-ec",
                       f'mount --rbind {run_dir} /run/lbnode && exec "$@"', "sh", *lbnode]
        sock = run_dir / "eth0.sock"  # the default /run/lbnode/<if>.sock, inside the RuntimeDirectory
        pin_name = f"lbnode/{os.stat(f'/run/netns/{host.ns}').st_ino}-eth0"  # <netns inode>-<if>
        pin_dir = run_dir / "bpffs" / pin_name

        def start(name: str) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
            """systemctl start: ExecStartPre, then ExecStart; returns the node and its pins once serving."""
            start_pre()
            log_path = tmp_path / f"{name}.log"
            with open(log_path, "wb") as log:
                node = e.lab.spawn(host.ns, *unit.sandbox_argv(command, uid=NOBODY, gid=NOBODY, runtime_dir=run_dir),
                                   cwd=REPO, stdout=log, stderr=log)

            def serving() -> dict[str, Any] | None:
                try:
                    doc = status.query(str(sock))["node"]
                except OSError:
                    assert node.poll() is None, (f"the node exited {node.returncode}:\n"
                                                 f"{log_path.read_text(errors='replace')[-3000:]}")
                    return None
                return doc["pins"] if doc["state"] == "serving" else None

            pins = wait_until(serving, timeout_s=60, what=f"{name} serving")
            assert pins is not None
            # Pinned in the unit's bpffs, by the unit's user: a restart keeps the flow table.
            assert pins["dir"] == f"/run/lbnode/bpffs/{pin_name}", (pins, log_path.read_text(errors="replace"))
            assert "cannot pin" not in log_path.read_text(errors="replace")
            owners = {p.name: p.stat().st_uid for p in [pin_dir, *pin_dir.iterdir()]}
            assert set(owners.values()) == {NOBODY} and {"prog", "layout", "flows"} <= owners.keys(), owners
            return node, pins

        node, pins = start("node1")
        assert pins["adopted_flows"] == 0 and pins["note"] == "no pinned state", pins
        # The process (the same PID: every wrapper execs) runs as the unit says, nothing more.
        caps = unit.capabilities()
        st = proc_status(node.pid)
        assert st["Uid"].split()[0] == str(NOBODY) and st["NoNewPrivs"].strip() == "1", st
        assert int(st["CapEff"], 16) == cap_mask(caps["AmbientCapabilities"]), st["CapEff"]
        assert int(st["CapBnd"], 16) == cap_mask(caps["CapabilityBoundingSet"]), st["CapBnd"]

        assert attached_program_id("eth0", netns=host.ns) != 0
        assert rp_filters() == ["0", "0"]
        # The README's `lbnode status --if eth0`.
        shown = subprocess.run([*as_operator, "status", "--if", "eth0"], cwd=REPO, capture_output=True, text=True,
                               timeout=30)
        assert shown.returncode == 0 and "web/192.0.2.10:80" in shown.stdout, shown
        e.wait_next_hops({host.ip4}, timeout_s=30)
        spread = e.http_spread(10)
        assert spread["ok"] == 10, spread

        # ExecReload, with $MAINPID the node: a SIGHUP reload that rereads the config and the key.
        reload = unit.exec_argv("ExecReload", "eth0", {**env, "MAINPID": str(node.pid)})
        assert reload == ["/bin/kill", "-HUP", str(node.pid)]
        subprocess.run(reload, check=True, timeout=10)
        wait_until(lambda: status.query(str(sock))["node"]["reloads"]["ok"] == 1, timeout_s=20, what="reloaded")

        # An upgrade: `lbnode stop --keep-forwarding` (the operator, as root, in the node's network
        # namespace: the lock is per namespace), then the unit started again.
        stopped = subprocess.run(["ip", "netns", "exec", host.ns, *as_operator, "stop", "--keep-forwarding", "--if",
                                  "eth0"], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert stopped.returncode == 0 and "program attached and pins kept" in stopped.stdout, stopped
        assert node.wait(timeout=30) == 0
        left = attached_program_id("eth0", netns=host.ns)
        assert left != 0 and (pin_dir / "flows").exists()
        node, pins = start("node1-restarted")
        assert pins["adopted_flows"] >= 1 and "flows" in pins["reused"] and pins["note"] is None, pins
        assert attached_program_id("eth0", netns=host.ns) not in (0, left)  # its new program, on the old maps
        e.wait_next_hops({host.ip4}, timeout_s=30)
        spread = e.http_spread(10)
        assert spread["ok"] == 10, spread
        print(f"\nrestart: adopted {pins['adopted_flows']} flows from {pins['dir']}")

        # Stop: KillSignal drains (routes withdrawn, forwarding for drain_s), detaches and unpins in time.
        signal_name = unit.value("KillSignal")
        assert re.fullmatch(r"SIG[A-Z]+", signal_name)
        node.send_signal(getattr(signal, signal_name))
        assert node.wait(timeout=float(unit.value("TimeoutStopSec"))) == 0
        assert attached_program_id("eth0", netns=host.ns) == 0
        assert rp_filters() == ["1", "1"]
        assert not pin_dir.exists()
        e.wait_next_hops(set(), timeout_s=10)
