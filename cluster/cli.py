"""The `lbnode` command.

    lbnode --ip 10.0.0.5 --if ens192 [--config PATH] [--xdp native|generic] [--status-socket PATH]
    lbnode check-config [--offline] PATH [--ip IP]   validate, print the normalised config
    lbnode keygen PATH                     write a new flow-sync key (mode 0600, never overwrites)
    lbnode status [--if IF | --socket PATH] [--json]   ask a running node
    lbnode drain|undrain BACKEND [--service NAME] [--if IF | --socket PATH]   runtime admin state
    lbnode disable VIP [--grace-s S] | enable VIP [--if IF | --socket PATH]    (root; see README)
    lbnode stop --if IF [--keep-forwarding]   stop a node (SIGTERM; SIGUSR2 leaves it forwarding)
    lbnode cleanup [--if IF]                  detach and unpin what stopped nodes left (bpffs)

Exit codes: 0 ok, 1 the node failed while running, 2 bad command line, interface, address or
config (with a one-line reason on stderr).
"""
from __future__ import annotations

import argparse
import fcntl
import functools
import ipaddress
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import trio

from bpf.loader import XdpMode
from bpf.pinned import netns_inode
from bpf.structs import IPAddress
from cluster import control, logfmt, status
from cluster.config import ConfigError, NodeConfig, load_file, normalised
from cluster.keygen import keygen

log = logging.getLogger("lbnode")

LOCK_ATTEMPTS = 10


class UsageError(Exception):
    """Bad input from the operator: exit code 2 with this one-line message."""


def run_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lbnode",
        description="XDP layer-4 load balancer node (layer-2 direct server return, active/active behind ECMP). "
                    "Also: `lbnode check-config [--offline] PATH`, `lbnode status`, `lbnode keygen PATH`, "
                    "`lbnode drain|undrain BACKEND`, `lbnode disable|enable VIP`.")
    parser.add_argument("--ip", required=True, help="this node's address: BGP router id, next hop and sync source")
    parser.add_argument("--if", dest="interface", required=True, help="interface to attach the XDP program to")
    parser.add_argument("--config", help="YAML config file (see examples/lbnode.yaml)")
    parser.add_argument("--xdp", choices=[m.value for m in XdpMode], help="XDP attach mode (overrides the config)")
    parser.add_argument("--status-socket", help="unix socket for `lbnode status` (default /run/lbnode/<if>.sock)")
    parser.add_argument("--admin-state", help="file keeping `lbnode drain/disable` state across restarts "
                        "(default /run/lbnode/<netns>-<if>.admin.json: a reboot forgets it)")
    parser.add_argument("--log-format", choices=logfmt.FORMATS, default="text",
                        help="text (default), or json: one object per line for log shippers")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def parse_ip(text: str) -> IPAddress:
    return parse_address(text, "--ip")


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
    logfmt.configure(args.log_format, logging.DEBUG if args.verbose else logging.INFO,
                     {"interface": args.interface, "ip": args.ip})
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
                         xdp=XdpMode(args.xdp) if args.xdp else None,
                         admin_state=args.admin_state or admin_state_path(args.interface)), config)
    try:
        trio.run(node.run)
    except BaseExceptionGroup as group:
        if (error := start_error(group)) is not None:
            raise error from None
        raise
    finally:
        os.unlink(lock_path)  # while still held: a node starting now locks a new file
        os.close(lock_fd)
    return 0


def start_error(group: BaseExceptionGroup[BaseException]) -> UsageError | None:
    """The config cannot run on this host, found only once the node starts (the HTTP listener's
    address is taken or not local): bad config, so exit 2 with its one line. The node has
    stopped and detached by then. Anything else in the group is a failure: None."""
    from cluster.web import WebError

    web, rest = group.split(WebError)
    if web is None or rest is not None:
        return None
    first: BaseException = web
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return UsageError(str(first))


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


def run_file(ifname: str, suffix: str) -> str:
    """/run/lbnode/<netns inode>-<ifname><suffix>: interface names repeat across namespaces."""
    return f"{status.RUN_DIR}/{netns_inode()}-{ifname}{suffix}"


def admin_state_path(ifname: str) -> str:
    """Next to the interface lock, and named the same way."""
    return run_file(ifname, ".admin.json")


def lock_path(ifname: str) -> str:
    return run_file(ifname, ".lock")


def check_config(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lbnode check-config", description="Validate a config file and "
                                     "print it normalised (every default filled in) as JSON.")
    parser.add_argument("path")
    parser.add_argument("--ip", default="192.0.2.1", help="the node's --ip (BGP defaults); default %(default)s")
    parser.add_argument("--offline", action="store_true", help="validating before deployment: key files "
                        "missing or unreadable on this machine are warnings on stderr, not errors")
    args = parser.parse_args(argv)
    if args.offline:
        try:
            config = load_file(args.path, parse_ip(args.ip), warn=lambda err: print(
                f"lbnode: warning: config: {err} (not on this machine: --offline)", file=sys.stderr))
        except ConfigError as err:
            raise UsageError(f"config: {err}") from None
    else:
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


def socket_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--if", dest="interface", help="the node's interface (its socket is /run/lbnode/<if>.sock)")
    where.add_argument("--socket", help="the node's --status-socket")
    parser.add_argument("--json", action="store_true", help="the raw JSON reply")
    return parser


def ask(args: argparse.Namespace, what: str, req: control.Request) -> dict[str, Any]:
    """One request to the node that --if/--socket names (or the only one on this host)."""
    try:
        path = args.socket or (status.default_socket(args.interface) if args.interface else status.find_socket())
    except OSError as exc:
        raise UsageError(f"{what}: {exc}") from None
    try:
        return status.request(path, req)
    except control.ReplyError as exc:
        raise UsageError(f"{what}: {exc}") from None
    except OSError as exc:
        raise UsageError(f"{what}: cannot reach a node at {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise UsageError(f"{what}: the node at {path} answered something else: {exc}") from None


def show_status(argv: list[str]) -> int:
    args = socket_parser("lbnode status", "Show a running node's state.").parse_args(argv)
    snapshot = ask(args, "status", control.Status())["status"]
    print(json.dumps(snapshot, indent=2) if args.json else status.render(snapshot))
    return 0


def stop_node(argv: list[str]) -> int:
    from cluster.stopctl import stop

    return stop(argv)


def cleanup(argv: list[str]) -> int:
    from cluster.stopctl import cleanup

    return cleanup(argv)


def admin_command(cmd: str, argv: list[str]) -> int:
    """drain/undrain BACKEND [--service NAME], disable VIP [--grace-s S], enable VIP."""
    backend = cmd in ("drain", "undrain")
    parser = socket_parser(f"lbnode {cmd}", {
        "drain": "Take a backend out of the hash for new flows (its pinned flows go on), until undrained.",
        "undrain": "Let a drained backend take new flows again.",
        "disable": "Withdraw a VIP's route, then (after --grace-s) take no new flows for it; pinned flows go on.",
        "enable": "Undo `disable`: the VIP takes new flows and is announced again."}[cmd])
    parser.add_argument("backend" if backend else "vip", help="an IP address")
    if backend:
        parser.add_argument("--service", help="only in this config service (default: every service listing it)")
    if cmd == "disable":
        parser.add_argument("--grace-s", type=float, default=control.DEFAULT_GRACE_S,
                            help="keep taking new flows this long after the withdrawal (default %(default)s)")
    args = parser.parse_args(argv)
    address = parse_address(args.backend if backend else args.vip, "backend" if backend else "vip")
    user = os.environ.get("SUDO_USER")  # the operator behind sudo; the node adds uid and pid itself
    req: control.Request
    if cmd == "drain":
        req = control.Drain(address, args.service, user)
    elif cmd == "undrain":
        req = control.Undrain(address, args.service, user)
    elif cmd == "disable":
        req = control.Disable(address, args.grace_s, user)
    else:
        req = control.Enable(address, user)
    reply = ask(args, cmd, req)
    if args.json:
        print(json.dumps(reply, indent=2))
    else:
        print(f"{cmd}: {', '.join(reply['changed'])}" if reply["changed"] else f"{cmd}: nothing to change")
    return 0


def parse_address(text: str, what: str) -> IPAddress:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise UsageError(f"{what}: not an IP address: {text!r}") from None


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "check-config": check_config, "status": show_status, "keygen": keygen, "stop": stop_node, "cleanup": cleanup,
    **{cmd: functools.partial(admin_command, cmd) for cmd in ("drain", "undrain", "disable", "enable")}}


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
