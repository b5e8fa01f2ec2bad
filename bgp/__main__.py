"""Run a speaker from a YAML config: `python -m bgp speaker.yaml [--control-stdin]`.

Announces the config's `announce` routes, and on SIGTERM/SIGINT shuts down gracefully
(GRACEFUL_SHUTDOWN + wait if configured, withdraw all, Cease 6/2) and exits 0. With
`--control-stdin` it also reads commands, one per line: `announce PREFIX [med=N] [local_pref=N]
[community=A:B]...`, `withdraw PREFIX`, `status`, `shutdown`. Prints `ready` once started (for
scripts); `status` prints one line `status {JSON}`: per peer, BGP state and counters, and BFD state
and counters where configured; plus BFD packets dropped, by reason.
"""
from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import logging
import os
import signal
import sys
from pathlib import Path

import trio
import yaml

from bgp import config as bgp_config
from bgp.errors import BgpError
from bgp.rib import RouteAttrs
from bgp.speaker import Speaker

log = logging.getLogger("bgp")


def parse_command(line: str) -> tuple[str, ipaddress.IPv4Network | ipaddress.IPv6Network | None, RouteAttrs]:
    words = line.split()
    if not words:
        return "", None, RouteAttrs()
    verb = words[0]
    if verb in ("shutdown", "status"):
        return verb, None, RouteAttrs()
    if verb not in ("announce", "withdraw") or len(words) < 2:
        raise BgpError(f"unknown command {line!r}")
    attrs: dict[str, object] = {"communities": [], "large_communities": []}
    for word in words[2:]:
        key, _, value = word.partition("=")
        if key in ("med", "local_pref"):
            attrs[key] = int(value)
        elif key in ("community", "large_community"):
            attrs[key + "s"].append(value)  # type: ignore[attr-defined]
        else:
            raise BgpError(f"unknown attribute {key!r}")
    return verb, ipaddress.ip_network(words[1]), bgp_config.parse_attrs(attrs, "command.")


async def _control(speaker: Speaker, done: trio.Event) -> None:
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    buf = b""
    async with stdin:
        while True:
            data = await stdin.receive_some(4096)
            if not data:
                return
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                try:
                    verb, prefix, attrs = parse_command(line.decode())
                except (BgpError, ValueError) as exc:
                    print(f"error: {exc}", flush=True)
                    continue
                if verb == "announce" and prefix is not None:
                    speaker.announce(prefix, attrs)
                elif verb == "withdraw" and prefix is not None:
                    speaker.withdraw(prefix)
                elif verb == "shutdown":
                    done.set()
                elif verb == "status":
                    status = {"peers": [dataclasses.asdict(p) for p in speaker.snapshot()],
                              "bfd_drops": speaker.bfd.drops if speaker.bfd is not None else {}}
                    print("status " + json.dumps(status), flush=True)
                    continue
                if verb:
                    print(f"ok {verb}", flush=True)


async def amain(cfg: bgp_config.SpeakerConfig, control_stdin: bool) -> None:
    speaker = Speaker(cfg)
    for prefix, attrs in cfg.announce:
        speaker.announce(prefix, attrs)
    done = trio.Event()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(speaker.run)

            async def wait_signal() -> None:
                async for signum in signals:
                    log.info("signal %s: shutting down", signal.Signals(signum).name)
                    done.set()
                    return

            nursery.start_soon(wait_signal)
            if control_stdin:
                nursery.start_soon(_control, speaker, done)
            print("ready", flush=True)
            await done.wait()
            await speaker.shutdown()
            nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bgp", description=__doc__.splitlines()[0])
    ap.add_argument("config", type=Path)
    ap.add_argument("--control-stdin", action="store_true")
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = bgp_config.load(yaml.safe_load(args.config.read_text()))
    except (BgpError, OSError, yaml.YAMLError) as exc:
        print(f"{args.config}: {exc}", file=sys.stderr)
        return 2
    trio.run(amain, cfg, args.control_stdin)
    return 0


if __name__ == "__main__":
    sys.exit(main())
