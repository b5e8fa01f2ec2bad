"""`lbnode stop` and `lbnode cleanup`: how an operator ends a node, and removes what it left.

    lbnode stop --if IF [--keep-forwarding] [--timeout S]
    lbnode cleanup [--if IF]

`stop` finds the node on IF in this network namespace by its interface lock (which holds its
PID), sends SIGTERM (drain, detach, unpin: nothing is left) or, with --keep-forwarding,
SIGUSR2 (routes withdrawn, the program left attached forwarding with the pinned maps, for an
upgrade: the next start adopts them), and waits for the process to exit.
`cleanup` is for what a killed or keep-forwarding node left in bpffs (bpf/pinned.py): it
detaches the pinned program from its interface (only if that program is still the one
attached) and removes the pins, for IF or every interface of this namespace, in every bpffs
root (/run/lbnode/bpffs, /sys/fs/bpf). Run as root, it removes pins of any owner (the systemd
unit's belong to its user). It refuses while
a node runs on that interface.
"""
from __future__ import annotations

import argparse
import fcntl
import os
import signal
import time

from bpf import syscall
from bpf.loader import AttachError, Attachment, XdpMode, attached_program_id, detach
from bpf.pinned import PROG_PIN, PinDir, PinError, mounted_bpffs_roots, netns_inode
from cluster.cli import UsageError, lock_path


def _running_pid(ifname: str) -> int | None:
    """The PID of the node holding IF's lock in this namespace, None if none runs."""
    path = lock_path(ifname)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.read(fd, 64).decode(errors="replace").strip()
            if not text.isdigit():
                raise UsageError(f"stop: a node holds {path} but wrote no PID in it (an older lbnode?)") from None
            return int(text)
        return None  # nobody holds it: a stale file
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    """Still running: a zombie (exited, not yet reaped by its parent) is not."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def stop(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lbnode stop", description="Stop the node on an interface.")
    parser.add_argument("--if", dest="interface", required=True)
    parser.add_argument("--keep-forwarding", action="store_true",
                        help="leave the XDP program attached, forwarding with the pinned maps (for an upgrade)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the exit (default 60)")
    args = parser.parse_args(argv)
    pid = _running_pid(args.interface)
    if pid is None:
        raise UsageError(f"stop: no lbnode runs on {args.interface} in this network namespace")
    os.kill(pid, signal.SIGUSR2 if args.keep_forwarding else signal.SIGTERM)
    deadline = time.monotonic() + args.timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            raise UsageError(f"stop: node {pid} on {args.interface} still runs after {args.timeout:.0f} s")
        time.sleep(0.05)
    left = "program attached and pins kept" if args.keep_forwarding else "detached, pins removed"
    print(f"lbnode on {args.interface} (pid {pid}) stopped: {left}")
    return 0


def cleanup_interface(pins: PinDir) -> str:
    """Detach the pinned program from its interface if it is still attached there; unpin all."""
    outcome = "nothing attached"
    prog_path = pins.path / PROG_PIN
    if prog_path.exists():
        fd = syscall.obj_get(str(prog_path))
        try:
            ours = syscall.prog_id(fd)
        finally:
            os.close(fd)
        try:
            current = attached_program_id(pins.ifname)
        except AttachError:
            current = 0  # the interface is gone: nothing to detach
        if current == ours:
            detach(Attachment(pins.ifname, None, XdpMode.NATIVE, ours))
            outcome = f"detached program id {ours}"
        elif current:
            outcome = f"program id {current} attached there is not the pinned one ({ours}): left in place"
    pins.remove()
    return outcome


def cleanup(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lbnode cleanup", description="Detach and unpin what stopped nodes left.")
    parser.add_argument("--if", dest="interface", help="only this interface (default: every one in this namespace)")
    args = parser.parse_args(argv)
    try:
        # Every mounted root, not only the one a node would pick now: pins a node left in
        # /sys/fs/bpf before /run/lbnode/bpffs was mounted (bpf/pinned.py) are found too.
        roots = mounted_bpffs_roots()
        if not roots:
            print("nothing pinned: no bpffs is mounted")
        dirs = []
        for root in roots:
            if args.interface:
                dirs.append(PinDir.for_interface(args.interface, root))
            elif (root / "lbnode").is_dir():
                prefix = f"{netns_inode()}-"
                dirs += [PinDir(d, d.name[len(prefix):]) for d in sorted((root / "lbnode").glob(prefix + "*"))]
        for pins in dirs:
            if _running_pid(pins.ifname) is not None:
                raise UsageError(f"cleanup: a node runs on {pins.ifname}: stop it first (lbnode stop --if "
                                 f"{pins.ifname})")
            if not pins.path.exists():
                print(f"{pins.ifname}: nothing pinned ({pins.path})")
                continue
            print(f"{pins.ifname}: {cleanup_interface(pins)}; removed {pins.path}")
    except (PinError, OSError) as exc:
        raise UsageError(f"cleanup: {exc}") from None
    return 0
