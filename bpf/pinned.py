"""Where a node's program and maps live between runs: a directory in bpffs, and its layout.

Theory of operation. The node never compiles: a short-lived child (bpf/compile_child.py)
compiles with bcc, loads the program, pins it and every map under the node's `PinDir`, hands
their fds to the node over a unix socket (SCM_RIGHTS), and exits, taking bcc's ~120 MB of LLVM
with it. The node works on them by fd (bpf/syscall.py). Because the pinned maps outlive the
process, a node that is restarted (upgraded, killed with -9) finds its flow table, its
consistent-hash tables and its counters, and keeps every connection. Where it cannot pin (no
bpffs, no rights), the child still compiles and hands the fds over: nothing is kept then.

Where. bpffs is per *mount*, not per network namespace, so the directory is keyed by both:
`<bpffs>/lbnode/<netns inode>-<ifname>/`, as cluster/cli.py's interface lock is. Two nodes on
`eth0` in two namespaces never see each other's pins. An inode number can be reused by a later
namespace, so the layout record also holds the namespace's cookie (SO_NETNS_COOKIE, never
reused within a boot): pins left by a deleted namespace are discarded, not adopted.
`<bpffs>` is /run/lbnode/bpffs where a bpffs is mounted there, else /sys/fs/bpf where one is
(systemd mounts it at boot), else bpffs is mounted at /sys/fs/bpf. /run/lbnode/bpffs is lbnode's
own bpffs, for two kinds of node. One run by `ip netns exec` (the lab's) gets a private mount
namespace with a fresh /sys, in which the host's /sys/fs/bpf is not visible, and a bpffs it
mounted there would die with the process (and the pins with it); /run is not remounted, so a
bpffs mounted at /run/lbnode/bpffs in the host's namespace (`ensure_shared_bpffs`; the lab does
it) is seen by every node started that way. And one run as an unprivileged user (the systemd
unit: examples/systemd/lbnode@.service): systemd mounts /sys/fs/bpf with mode 0700, which that
user cannot even traverse, so the unit's ExecStartPre (run as root) mounts a bpffs instance at
/run/lbnode/bpffs and gives it to the unit's user. "Mounted" means the path *is* a bpffs (its
device is one of /proc/self/mountinfo's bpf mounts), not merely that mountinfo lists a bpf
mount there: a mount can be covered by another one over a parent directory (a bind mount of
/run/lbnode), and pinning into the plain directory below fails with EPERM.

Where pinning fails anyway (no bpffs and no CAP_SYS_ADMIN to mount one, a directory this user
may not write, pins of another user), the node still runs, unpinned: the child hands the fds
over in every case, the node logs a warning and `lbnode status` says `not pinned (why)` in
`node.pins.note`. A load balancer that forwards but forgets its flows on a restart is better
than one that does not start; the warning says how to fix it.

What is in it. `prog` (the XDP program), one pin per map of lbnode.h (`MAP_SPECS`), and two
maps user space creates: `index_state` (which service and backend indexes are in use, owned by
which service, or retired: how a restarted DataPlane rebuilds its bookkeeping) and `layout`
(a JSON record: format version, the netns cookie, and one signature per map: its kernel shape
plus the text of the C types and flag constants it holds). A map is reused only if its
signature is unchanged; the forwarding state (flows, services, tables, backends,
index_state) is reused all together or not at all, because flows name indexes in the others.
One exception, because operators change it: a flow table of another size (`flows.table_size`)
with the same types is *migrated*: its entries are copied into the new table (a smaller one
keeps what fits; LRU order is lost), and the rest of the forwarding state is adopted.
Counters, the pin windows and the event ring are reused one by one. So a header change that
only adds counter fields keeps every flow and resets those counters; a change to the flow
struct starts empty, and says so (log and `lbnode status`).

Which state is left behind (see README "State in bpffs"):
- `lbnode stop` / SIGTERM: drain, detach, remove the pins: nothing is left.
- `lbnode stop --keep-forwarding` (SIGUSR2): the program stays attached and forwards with the
  pinned maps while no node runs; the next start adopts them and replaces the program.
- SIGKILL, a crash of the process: both stay; the next start adopts them.
- A node that stops on an error detaches (a node that cannot be supervised must not forward)
  but keeps the pins, so a restart by its supervisor keeps the flows.
- `lbnode cleanup [--if IF]` detaches and removes whatever is left.
"""
from __future__ import annotations

import enum
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bpf.loader import BPF_DIR, BpfError, CompileError, Limits

log = logging.getLogger(__name__)

BPFFS_MOUNT = "/sys/fs/bpf"
SHARED_BPFFS = "/run/lbnode/bpffs"
LAYOUT_VERSION = 1
LAYOUT_VALUE_SIZE = 4096
PROG_PIN = "prog"
LAYOUT_PIN = "layout"
INDEX_STATE_PIN = "index_state"
SO_NETNS_COOKIE = 71

# index_state values: 0 never used (no stale flow can name it), RETIRED (stale flows may remain:
# quarantined until a maintenance pass), else in use (a backend: its service index + 1).
INDEX_FREE = 0
INDEX_RETIRED = 0xFFFFFFFF
SERVICE_IN_USE = 1

# Maps whose contents name each other's indexes: adopted together or not at all.
FORWARDING_GROUP = ("services", "service_slots", "vips", "ch_tables", "backends", "flows", INDEX_STATE_PIN)

# The C types and constant prefixes (lbnode.h) whose text a map's signature covers.
_MAP_TYPES: dict[str, tuple[str, ...]] = {
    "services": ("struct service_key",),
    "service_slots": ("struct service", "SERVICE_F_", "CH_TABLE_BITS"),
    "vips": ("struct vip_key",),
    "ch_tables": ("NO_BACKEND", "CH_TABLE_BITS", "MAX_SERVICES"),
    "backends": ("struct backend", "BACKEND_F_"),
    "flows": ("struct flow_key", "struct flow", "FLOW_F_"),
    "config": ("struct lb_config",),
    "service_stats": ("struct service_stats",),
    "backend_stats": ("struct backend_stats",),
    "stats": ("enum lb_stat",),
    "pin_windows": ("struct pin_window",),
    "flow_events": ("struct flow_event", "EVENT_"),
}


class Leave(enum.Enum):
    """What a stopping node leaves behind (see the module docstring)."""

    NOTHING = "nothing"  # detach and unpin
    PINS = "pins"  # detach, keep the maps for the next start
    FORWARDING = "forwarding"  # program attached and pins: forwards while no node runs


class PinError(BpfError):
    """bpffs is unusable, or the pins cannot be made or opened."""


# ---- where ---------------------------------------------------------------------------------------


def _bpffs_devices(mountinfo: str = "/proc/self/mountinfo") -> set[int]:
    """The device numbers of the bpffs mounts of this mount namespace."""
    try:
        text = Path(mountinfo).read_text()
    except OSError:
        return set()
    devices = set()
    for line in text.splitlines():
        fields = line.split()
        if len(fields) > 4 and " - bpf " in line:
            major, _, minor = fields[2].partition(":")
            devices.add(os.makedev(int(major), int(minor)))
    return devices


def is_bpffs(path: str | Path, mountinfo: str = "/proc/self/mountinfo") -> bool:
    """Is `path` in a bpffs? By its device, so a bpf mount that another mount covers (listed in
    mountinfo at that path, but no longer reachable there) does not count."""
    try:
        return os.stat(path).st_dev in _bpffs_devices(mountinfo)
    except OSError:
        return False


def mounted_bpffs_roots() -> list[Path]:
    """The roots pins may be under, in the order `bpffs_root` prefers them; only mounted ones."""
    return [Path(root) for root in (SHARED_BPFFS, BPFFS_MOUNT) if is_bpffs(root)]


def _host_mount_ns() -> bool | None:
    """Are we in PID 1's mount namespace? None: cannot tell (no access to PID 1's)."""
    try:
        return os.stat("/proc/self/ns/mnt").st_ino == os.stat("/proc/1/ns/mnt").st_ino
    except OSError:
        return None


def bpffs_root() -> Path:
    """The bpffs directory pins go to: lbnode's own /run/lbnode/bpffs, else /sys/fs/bpf, else
    bpffs is mounted at /sys/fs/bpf (see the module docstring)."""
    mounted = mounted_bpffs_roots()
    if mounted:
        return mounted[0]
    _mount(BPFFS_MOUNT)
    if not _host_mount_ns():
        log.warning("bpffs was mounted at %s in what may be a private mount namespace (ip netns exec?): pins made "
                    "there die with it, and a restarted node starts empty. Mount bpffs at %s or %s in the host's "
                    "mount namespace", BPFFS_MOUNT, BPFFS_MOUNT, SHARED_BPFFS)
    return Path(BPFFS_MOUNT)


def ensure_shared_bpffs() -> Path:
    """Mount bpffs at /run/lbnode/bpffs unless it is: call it in the host's mount namespace
    before starting nodes with `ip netns exec` (the lab does), whose private /sys hides
    /sys/fs/bpf, so that their pins outlive them."""
    if not is_bpffs(SHARED_BPFFS):
        os.makedirs(SHARED_BPFFS, mode=0o700, exist_ok=True)
        _mount(SHARED_BPFFS)
    return Path(SHARED_BPFFS)


def _mount(mount_point: str) -> None:
    cmd = ["mount", "-t", "bpf", "bpf", mount_point]
    log.info("bpffs is not mounted: %s", " ".join(cmd))
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        raise PinError(f"cannot mount bpffs at {mount_point} ({' '.join(cmd)}): {detail}") from exc


def netns_inode() -> int:
    return os.stat("/proc/self/ns/net").st_ino


def netns_cookie() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        return int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")


@dataclass(frozen=True, slots=True)
class PinDir:
    """The pins of the node on `ifname` in this network namespace."""

    path: Path
    ifname: str

    @classmethod
    def for_interface(cls, ifname: str, root: Path | None = None) -> PinDir:
        if not ifname or "/" in ifname or ifname in (".", ".."):
            raise PinError(f"not an interface name: {ifname!r}")
        base = (root or bpffs_root()) / "lbnode"
        return cls(base / f"{netns_inode()}-{ifname}", ifname)

    def pin(self, name: str) -> str:
        return str(self.path / name)

    def exists(self) -> bool:
        return (self.path / LAYOUT_PIN).exists() or (self.path / PROG_PIN).exists()

    def prepare(self) -> None:
        """Create the directory; PinError if this process cannot pin there (no bpffs, no rights:
        a node without CAP_SYS_ADMIN cannot mount bpffs, nor create directories in a root-owned one)."""
        try:
            os.makedirs(self.path, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise PinError(f"cannot create {self.path}: {exc.strerror or exc}") from exc
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise PinError(f"cannot pin in {self.path}: not writable by uid {os.geteuid()}")
        if not is_bpffs(self.path):  # BPF_OBJ_PIN would fail with EPERM
            raise PinError(f"cannot pin in {self.path}: not in a bpffs")

    def remove(self) -> None:
        """Unpin everything (the objects go once nothing else holds them)."""
        shutil.rmtree(self.path, ignore_errors=True)
        if self.path.exists():
            raise PinError(f"{self.path}: could not remove every pin")


def remove_netns_pins(netns_inode: int, root: Path | None = None) -> list[Path]:
    """Remove the pin directories of every interface of one namespace (a lab being torn down)."""
    if root is None:  # only where bpffs is mounted already: nothing can be pinned elsewhere
        return [d for r in mounted_bpffs_roots() for d in remove_netns_pins(netns_inode, r)]
    base = root / "lbnode"
    gone = []
    for d in sorted(base.glob(f"{netns_inode}-*")) if base.is_dir() else []:
        shutil.rmtree(d, ignore_errors=True)
        gone.append(d)
    return gone


# ---- layout ------------------------------------------------------------------------------------


def _type_texts(header: str) -> dict[str, str]:
    """`struct x` / `enum x` -> its definition, and every #define name -> its line."""
    out = {f"{m.group(1)} {m.group(2)}": m.group(0)
           for m in re.finditer(r"^(struct|enum) (\w+) \{.*?^\};", header, re.S | re.M)}
    out.update({m.group(1): m.group(0) for m in re.finditer(r"^#define (\w+).*$", header, re.M)})
    return out


FLOW_TYPES = "flows@types"  # the flow table's signature without its size: what a migration needs


def map_signature(name: str, shape: Sequence[int], header: str) -> str:
    """What must not change for a pinned map to be reused (see the module docstring)."""
    texts = _type_texts(header)
    parts = [name, repr(tuple(shape))]
    for item in _MAP_TYPES.get(name.split("@")[0], ()):
        parts += [texts[k] for k in sorted(texts) if k == item or (item.endswith("_") and k.startswith(item))]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class Layout:
    """The record pinned as `layout`."""

    version: int
    netns_cookie: int
    ifname: str
    maps: dict[str, str]  # map name -> signature
    limits: dict[str, int] = field(default_factory=dict)

    def encode(self) -> bytes:
        raw = json.dumps({"version": self.version, "netns_cookie": self.netns_cookie, "ifname": self.ifname,
                          "maps": self.maps, "limits": self.limits}, sort_keys=True).encode()
        if len(raw) > LAYOUT_VALUE_SIZE:
            raise PinError(f"layout record of {len(raw)} bytes exceeds {LAYOUT_VALUE_SIZE}")
        return raw.ljust(LAYOUT_VALUE_SIZE, b"\0")

    @classmethod
    def decode(cls, raw: bytes) -> Layout:
        doc = json.loads(raw.rstrip(b"\0").decode())
        return cls(int(doc["version"]), int(doc["netns_cookie"]), str(doc["ifname"]),
                   {str(k): str(v) for k, v in doc["maps"].items()}, {str(k): int(v) for k, v in doc["limits"].items()})


@dataclass(frozen=True, slots=True)
class BuildReport:
    """What the compile child did (one JSON line on its stdout)."""

    pin_dir: str
    prog_id: int
    reused: tuple[str, ...]  # maps adopted from the previous run
    fresh: tuple[str, ...]  # maps created empty (or filled by a migration)
    note: str  # why the forwarding state was not adopted, or how the flows were migrated ("": adopted as is)
    adopted_flows: bool = False  # the forwarding state is the previous run's (its flows reused or migrated)
    migrated_flows: int = 0  # flows copied into a flow table of another size
    pin_error: str = ""  # why pinning failed (the build is good, but nothing is pinned: "": pinned, or not asked)

    def to_json(self) -> str:
        return json.dumps({"pin_dir": self.pin_dir, "prog_id": self.prog_id, "reused": list(self.reused),
                           "fresh": list(self.fresh), "note": self.note, "adopted_flows": self.adopted_flows,
                           "migrated_flows": self.migrated_flows, "pin_error": self.pin_error})

    @classmethod
    def from_json(cls, line: str) -> BuildReport:
        doc = json.loads(line)
        return cls(str(doc["pin_dir"]), int(doc["prog_id"]), tuple(doc["reused"]), tuple(doc["fresh"]),
                   str(doc["note"]), bool(doc["adopted_flows"]), int(doc["migrated_flows"]), str(doc["pin_error"]))


@dataclass
class ChildBuild:
    """What the compile child handed over: its report and the fds (now this process's)."""

    report: BuildReport
    prog_fd: int
    map_fds: dict[str, int]


def build_in_child(pins: PinDir | None, ifname: str, limits: Limits, extra_cflags: Sequence[str] = (),
                   timeout_s: float = 300.0) -> ChildBuild:
    """Run the compile child (blocking, seconds: call it from a worker thread); it passes the
    program's and the maps' fds back over a unix socket (SCM_RIGHTS), so this works without
    bpffs too (`pins` None: nothing is pinned or adopted). A refused program raises
    CompileError with the child's message (the verifier's log included)."""
    cmd = [sys.executable, "-m", "bpf.compile_child", "--ifname", ifname, "--limits", json.dumps(limits_dict(limits))]
    if pins is not None:
        cmd += ["--pin-dir", str(pins.path)]
    cmd += [f"--cflag={flag}" for flag in extra_cflags]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(BPF_DIR.parent), *filter(None, [env.get("PYTHONPATH")])])
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours:
        try:
            with theirs:
                done = subprocess.run([*cmd, "--send-fds", str(theirs.fileno())], capture_output=True, text=True,
                                      timeout=timeout_s, env=env, cwd=BPF_DIR.parent, pass_fds=(theirs.fileno(),))
        except subprocess.TimeoutExpired as exc:
            raise CompileError(f"compile child: no result after {timeout_s:.0f} s ({' '.join(cmd)})") from exc
        noise = [line for line in done.stderr.splitlines() if "modprobe" not in line]
        if done.returncode != 0:
            raise CompileError(f"compile child exited with {done.returncode}: "
                               + ("\n".join(noise[-60:]).strip() or "(no output)"))
        ours.setblocking(False)
        try:
            message, fds, flags, _ = socket.recv_fds(ours, 1 << 16, 64)
        except BlockingIOError:
            raise CompileError("compile child exited without handing over its fds: " + "\n".join(noise[-20:])) from None
    try:
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise ValueError("message or fds cut short")
        doc = json.loads(message)
        names = list(doc["maps"])
        if len(fds) != 1 + len(names):
            raise ValueError(f"{len(fds)} fds for {1 + len(names)} objects")
        return ChildBuild(BuildReport.from_json(doc["report"]), fds[0], dict(zip(names, fds[1:], strict=True)))
    except (ValueError, KeyError, TypeError) as exc:  # json.JSONDecodeError is a ValueError
        for fd in fds:  # none of them is handed on: close them all
            os.close(fd)
        raise CompileError(f"compile child's hand-over is unusable: {exc}") from None


def limits_dict(limits: Limits) -> dict[str, int]:
    return {name: getattr(limits, name) for name in Limits.__dataclass_fields__}
