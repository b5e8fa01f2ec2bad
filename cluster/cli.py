"""The `lbnode` command. The node itself arrives with the cluster issue; until then this only
describes itself, so the console script exists and its contract is visible."""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lbnode",
        description="XDP layer-4 load balancer node (layer-2 direct server return, active/active behind ECMP).",
    )
    parser.add_argument("--ip", help="this node's address: BGP router id, next hop and gossip source")
    parser.add_argument("--if", dest="interface", help="interface to attach the XDP program to")
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("--xdp", choices=("native", "generic"), default="native", help="XDP attach mode")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.ip is None or args.interface is None:
        build_parser().print_help()
        return 0
    print("lbnode: the cluster node is not built yet; see `python -m bpf.serve --help` for the data plane alone",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
