"""The `lbnode` command.

    lbnode --ip 10.0.0.5 --if ens192 [--config PATH] [--xdp native|generic] [--status-socket PATH]
    lbnode check-config PATH [--ip IP]     validate, print the normalised config
    lbnode status [--if IF | --socket PATH] [--json]   ask a running node
    lbnode stop --if IF [--keep-forwarding]   stop a node (SIGTERM; SIGUSR2 leaves it forwarding)
    lbnode cleanup [--if IF]                  detach and unpin what stopped nodes left (bpffs)

Exit codes: 0 ok, 1 the node failed while running, 2 bad command line, interface, address or
config (with a one-line reason on stderr).
"""
from __future__ import annotations

import argparse
import fcntl
import ipaddress
import json
import logging
import os
import sys

import trio

from bpf.loader import XdpMode
from bpf.structs import IPAddress
from cluster import status
from cluster.config import ConfigError, NodeConfig, load_file, normalised

log = logging.getLogger("lbnode")

LOCK_ATTEMPTS = 10


class UsageError(Exception):
    """Bad input from the operator: exit code 2 with this one-line message."""


def run_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lbnode",
        description="XDP layer-4 load balancer node (layer-2 direct server return, active/active behind ECMP). "
                    "Also: `lbnode check-config PATH`, `lbnode status`.")
    parser.add_argument("--ip", required=True, help="this node's address: BGP router id, next hop and sync source")
    parser.add_argument("--if", dest="interface", required=True, help="interface to attach the XDP program to")
    parser.add_argument("--config", help="YAML config file (see examples/lbnode.yaml)")
    parser.add_argument("--xdp", choices=[m.value for m in XdpMode], help="XDP attach mode (overrides the config)")
    parser.add_argument("--status-socket", help="unix socket for `lbnode status` (default /run/lbnode/<if>.sock)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def parse_ip(text: str) -> IPAddress:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise UsageError(f"--ip: not an IP address: {text!r}") from None


def load_config(path: str | None, ip: IPAddress) -> NodeConfig:
    if path is None:
        return NodeConfig(services=())
    try:
        return load_file(path, ip)
    except ConfigError as err:
        raise UsageError(f"config: {err}") from None


def run_node(argv: list[str]) -> int:
    from cluster.components import interface_mac, local_addresses
    from cluster.node import Node, NodeArgs

    args = run_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ip = parse_ip(args.ip)
    mac = interface_mac(args.interface)
    if mac is None:
        raise UsageError(f"--if: no interface {args.interface!r} in this network namespace")
    if ip not in local_addresses():
        raise UsageError(f"--ip: {ip} is not an address of this host")
    config = load_config(args.config, ip)
    lock_fd, lock_path = interface_lock(args.interface)  # held (and released by the kernel) for the process's life
    node = Node(NodeArgs(ip=ip, ifname=args.interface, mac=mac, config_path=args.config,
                         status_socket=args.status_socket or status.default_socket(args.interface),
                         xdp=XdpMode(args.xdp) if args.xdp else None), config)
    try:
        trio.run(node.run)
    finally:
        os.unlink(lock_path)  # while still held: a node starting now locks a new file
        os.close(lock_fd)
    return 0


def interface_lock(ifname: str) -> tuple[int, str]:
    """Hold /run/lbnode/<netns>-<ifname>.lock: a second node on the same interface would replace
    the first one's XDP program (and unlink its status socket) while the first still advertises.

    A node that exits unlinks the file while it still holds the lock. So a lock won on a file
    that is no longer at `path` (opened just before that unlink) is worth nothing: another node
    may lock the new file. Only a lock on the file that `path` names now counts."""
    os.makedirs(status.RUN_DIR, mode=0o750, exist_ok=True)
    path = lock_path(ifname)
    for _ in range(LOCK_ATTEMPTS):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UsageError(f"--if: another lbnode is running on {ifname} in this network namespace "
                             f"({path})") from None
        try:
            if os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())  # for `lbnode stop`
                return fd, path
        except FileNotFoundError:
            pass
        os.close(fd)  # we locked a file the previous owner had just unlinked: try the new one
    raise UsageError(f"--if: could not lock {path}: it keeps being replaced")


def lock_path(ifname: str) -> str:
    netns = os.stat("/proc/self/ns/net").st_ino  # interface names repeat across namespaces
    return f"{status.RUN_DIR}/{netns}-{ifname}.lock"


def check_config(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lbnode check-config", description="Validate a config file and "
                                     "print it normalised (every default filled in) as JSON.")
    parser.add_argument("path")
    parser.add_argument("--ip", default="192.0.2.1", help="the node's --ip (BGP defaults); default %(default)s")
    args = parser.parse_args(argv)
    config = load_config(args.path, parse_ip(args.ip))
    print(json.dumps(masked(normalised(config)), indent=2, sort_keys=True))
    return 0


SECRET_KEYS = frozenset({"md5_password"})


def masked(data: object) -> object:
    """The normalised config with secrets replaced (it is printed, and pasted into tickets)."""
    if isinstance(data, dict):
        return {k: ("********" if k in SECRET_KEYS and v is not None else masked(v)) for k, v in data.items()}
    if isinstance(data, list):
        return [masked(v) for v in data]
    return data


def show_status(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lbnode status", description="Show a running node's state.")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--if", dest="interface", help="the node's interface (its socket is /run/lbnode/<if>.sock)")
    where.add_argument("--socket", help="the node's --status-socket")
    parser.add_argument("--json", action="store_true", help="the raw JSON document")
    args = parser.parse_args(argv)
    try:
        path = args.socket or (status.default_socket(args.interface) if args.interface else status.find_socket())
    except OSError as exc:
        raise UsageError(f"status: {exc}") from None
    try:
        snapshot = status.query(path)
    except OSError as exc:
        raise UsageError(f"status: cannot reach a node at {path}: {exc.strerror or exc}") from None
    print(json.dumps(snapshot, indent=2) if args.json else status.render(snapshot))
    return 0


def stop_node(argv: list[str]) -> int:
    from cluster.stopctl import stop

    return stop(argv)


def cleanup(argv: list[str]) -> int:
    from cluster.stopctl import cleanup

    return cleanup(argv)


COMMANDS = {"check-config": check_config, "status": show_status, "stop": stop_node, "cleanup": cleanup}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = COMMANDS.get(argv[0]) if argv else None
    try:
        return command(argv[1:]) if command else run_node(argv)
    except UsageError as err:
        print(f"lbnode: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # `python -m cluster.cli` runs this file as __main__, a second copy of the module: run the
    # one every import sees, or an error raised as cluster.cli.UsageError would escape main().
    from cluster import cli

    sys.exit(cli.main())
