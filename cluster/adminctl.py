"""The node's runtime admin commands: the AdminState (cluster.admin), its file, its timer, its log.

The node hands every control request but `status` to `AdminControl.apply`, and reconciles when
it says the state changed; `run` moves disabled VIPs from *withdrawn* to *stopped* when their
grace ends. Every change is logged at WARNING (an operator's action changes what the node
serves) and written to the state file, atomically (a temporary file renamed over it), so that a
node that restarts starts with it (see cluster.admin for what survives what).
"""
from __future__ import annotations

import json
import logging
import math
import os
import pwd
import time
from collections.abc import Callable
from typing import Any

import trio

from cluster import control
from cluster.admin import AdminError, AdminState, Mark
from cluster.config import NodeConfig
from cluster.status import Peer

log = logging.getLogger(__name__)


class AdminControl:
    def __init__(self, path: str | None) -> None:
        """`path`: the state file (None: kept in memory only). Read here, before the loop runs."""
        self.path = path
        self.state = load(path) if path is not None else AdminState()
        self._changed = trio.Event()  # wakes `run` when a deadline may have moved
        self._save_lock = trio.Lock()  # one writer at a time, each writing the latest state

    async def apply(self, request: control.Request, peer: Peer, config: NodeConfig) -> dict[str, Any]:
        """Carry out one command; the reply's fields. Raises control.Refused (AdminError)."""
        mark = Mark(who(request.user, peer), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        state = self.state
        extra: dict[str, Any] = {}
        if isinstance(request, control.Drain):
            new, changed = state.drain(config, request.backend, request.service, mark)
        elif isinstance(request, control.Undrain):
            new, changed = state.undrain(config, request.backend, request.service)
        elif isinstance(request, control.Disable):
            new, changed = state.disable(config, request.vip, mark, trio.current_time() + request.grace_s)
            if changed:
                extra["grace_s"] = request.grace_s
        elif isinstance(request, control.Enable):
            new, changed = state.enable(config, request.vip)
        else:
            raise AdminError(f"{type(request).__name__.lower()}: not an admin command")
        command = type(request).__name__.lower()
        if changed:
            log.warning("%s by %s: %s", command, mark.by, ", ".join(changed))
            self.state = new
            self._changed.set()
            extra["persisted"] = await self._save()
        else:
            log.info("%s by %s: nothing to change", command, mark.by)
        return {"changed": changed, "admin": self.state.document(), **extra}

    async def run(self, on_change: Callable[[], None]) -> None:
        """Stop new flows for each disabled VIP when its grace ends; `on_change` then (reconcile)."""
        while True:
            deadline = self.state.next_deadline()
            with trio.move_on_at(math.inf if deadline is None else deadline):
                await self._changed.wait()
            self._changed = trio.Event()
            self.state, due = self.state.advance(trio.current_time())
            if due:
                log.warning("disabled %s: grace over, no new flows for it now (pinned flows go on)",
                            ", ".join(str(v) for v in due))
                on_change()

    async def _save(self) -> bool:
        if self.path is None:
            return False
        try:
            async with self._save_lock:  # two commands at once: the last write has the latest state
                await trio.to_thread.run_sync(save, self.path, self.state)
            return True
        except OSError as exc:
            # The change holds in this process; only a restart would forget it. Refusing a drain
            # because /run is full would be worse.
            log.error("admin state: cannot write %s, a restart would forget this change: %s", self.path, exc)
            return False


def who(user: str | None, peer: Peer) -> str:
    """The operator as recorded: the name the client gave (say, $SUDO_USER) and what the kernel says."""
    try:
        account = pwd.getpwuid(peer.uid).pw_name
    except KeyError:
        account = str(peer.uid)
    name = user if user is not None else account
    return f"{name} (uid {peer.uid}, pid {peer.pid})"


def load(path: str) -> AdminState:
    """The state a previous run of this node left; empty if none. A file that cannot be read is
    moved aside (`.bad`) and the node starts with nothing drained, saying so loudly: refusing to
    start would turn a bad file into an outage."""
    try:
        with open(path, "rb") as f:
            state = AdminState.from_json(json.loads(f.read(1 << 20)))
    except FileNotFoundError:
        return AdminState()
    except (OSError, ValueError, AdminError) as exc:
        log.error("admin state: cannot read %s, starting with nothing drained or disabled (kept as %s.bad): %s",
                  path, path, exc)
        try:
            os.replace(path, path + ".bad")
        except OSError:
            pass
        return AdminState()
    doc = state.document()
    for entry in doc["drained"]:
        log.warning("admin state from %s: %s drained in %s (by %s at %s)", path, entry["backend"], entry["service"],
                    entry["by"], entry["at"])
    for entry in doc["disabled"]:
        log.warning("admin state from %s: VIP %s disabled (by %s at %s)", path, entry["vip"], entry["by"], entry["at"])
    return state


def save(path: str, state: AdminState) -> None:
    """Write atomically: readers (a restarting node) see the old file or the new one."""
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(state.to_json(), f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
