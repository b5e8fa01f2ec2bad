"""Flow-sync configuration: one frozen dataclass, validated once, errors naming the key path.

``SyncConfig.from_dict(data, path)`` takes what ``yaml.safe_load`` produced for the ``sync:``
node (``path`` is where it sits, e.g. ``"sync"``) and raises `ConfigError` (bpf.validate) with the key path;
unknown keys are errors.

Keys. The shared key is read from ``key_file`` (and, during a rotation, a second accepted key
from ``next_key_file``) at load time (``with_keys``): a missing, short or group/other-accessible
key file (refused as ssh refuses a private key) stops the node before it starts, and a reload
that cannot read its keys is refused. The key bytes loaded are part of the config (``keys``, so
a SIGHUP after the file's contents changed is a changed config), but never part of its repr
or of the normalised form `lbnode check-config` prints. The node signs with the key of
``key_file`` and accepts both; rotation is in the README ("Flow sync").

    sync: {group: 239.255.76.66, port: 7946, key_file: /etc/lbnode/sync.key, batch_ms: 2}
"""
from __future__ import annotations

import dataclasses
import ipaddress
import os
import stat
from dataclasses import dataclass, field
from typing import Any

from bpf.structs import IPAddress
from bpf.validate import ConfigError, Validator
from cluster.sync.codec import Keyring

DEFAULT_GROUP = ipaddress.IPv4Address("239.255.76.66")  # organisation-local scope (RFC 2365)
DEFAULT_PORT = 7946
MIN_KEY_BYTES = 16
MAX_KEY_FILE_BYTES = 4096
_v = Validator()


@dataclass(frozen=True, slots=True)
class SyncConfig:
    """Where and how flows are shared between the nodes of a cluster."""

    key_file: str
    next_key_file: str | None = None  # a second key accepted (never signed with): rotations
    enabled: bool = True
    group: IPAddress = DEFAULT_GROUP  # multicast group (unused when `peers` is set)
    port: int = DEFAULT_PORT
    interface: str | None = None  # None: the node's interface (--if)
    peers: tuple[IPAddress, ...] = ()  # non-empty: unicast to these instead of multicast
    batch_ms: int = 2  # how long a new flow may wait for companions in one datagram
    refresh_s: float = 30.0  # long-lived flows are re-sent this often so peers' LRU keeps them
    resync_timeout_s: float = 5.0  # bulk resync at start-up gives up (with a warning) after this
    heartbeat_s: float = 1.0  # heartbeat (digest, sequence) interval; a peer is dead after 3 missed
    digest_mismatch_blocks: bool = False  # a view mismatch with a live peer delays advertising
    # The keys read from the files (`with_keys`); None until read. Compared, never printed (a
    # leading underscore keeps it out of the normalised form).
    _keyring: Keyring | None = field(default=None, repr=False)

    _KEYS = frozenset({"enabled", "group", "port", "interface", "peers", "key_file", "next_key_file", "batch_ms",
                       "refresh_s", "resync_timeout_s", "heartbeat_s", "digest_mismatch_blocks"})

    @property
    def unicast(self) -> bool:
        return bool(self.peers)

    @property
    def keys(self) -> Keyring | None:
        """The keys read at load (None if the files were not read)."""
        return self._keyring

    @classmethod
    def from_dict(cls, data: Any, path: str = "sync") -> SyncConfig:
        data = _v.mapping(data, path)
        _v.no_unknown(data, cls._KEYS, path)
        enabled = _v.boolean(data, "enabled", path, True)
        key_file = data.get("key_file")
        if key_file is None:
            if enabled:
                raise ConfigError(f"{path}.key_file", "is required")
            key_file = ""
        elif not isinstance(key_file, str) or not key_file:
            raise ConfigError(f"{path}.key_file", f"must be a file path, got {key_file!r}")
        next_key_file = data.get("next_key_file")
        if next_key_file is not None and (not isinstance(next_key_file, str) or not next_key_file):
            raise ConfigError(f"{path}.next_key_file", f"must be a file path, got {next_key_file!r}")
        group = _v.address(data.get("group", str(DEFAULT_GROUP)), f"{path}.group")
        if not group.is_multicast:
            raise ConfigError(f"{path}.group", f"must be a multicast address, got {group}")
        if group.version != 4:
            raise ConfigError(f"{path}.group", f"only IPv4 multicast is supported, got {group}")
        port = _v.integer(data, "port", path, DEFAULT_PORT, 1, 65535)
        interface = data.get("interface")
        if interface is not None and (not isinstance(interface, str) or not interface or len(interface) > 15):
            raise ConfigError(f"{path}.interface", f"must be an interface name, got {interface!r}")
        raw_peers = _v.sequence(data.get("peers", []), f"{path}.peers")
        peers = tuple(_v.address(p, f"{path}.peers[{i}]") for i, p in enumerate(raw_peers))
        for i, p in enumerate(peers):
            if p.version != 4 or p.is_multicast or p.is_unspecified:
                raise ConfigError(f"{path}.peers[{i}]", f"must be a unicast IPv4 address, got {p}")
            if p in peers[:i]:
                raise ConfigError(f"{path}.peers[{i}]", f"duplicate peer {p}")
        batch_ms = _v.integer(data, "batch_ms", path, 2, 0, 1000)
        refresh_s = _v.number(data, "refresh_s", path, 30.0, 1.0, 3600.0)
        resync_timeout_s = _v.number(data, "resync_timeout_s", path, 5.0, 0.0, 600.0)
        heartbeat_s = _v.number(data, "heartbeat_s", path, 1.0, 0.05, 60.0)
        blocks = _v.boolean(data, "digest_mismatch_blocks", path, False)
        return cls(key_file=key_file, next_key_file=next_key_file, enabled=enabled, group=group, port=port,
                   interface=interface, peers=peers, batch_ms=batch_ms, refresh_s=refresh_s,
                   resync_timeout_s=resync_timeout_s, heartbeat_s=heartbeat_s, digest_mismatch_blocks=blocks)

    def load_keys(self, path: str = "sync") -> Keyring:
        """The keys of `key_file` (signs) and `next_key_file` (also accepted), read now."""
        current = read_key(self.key_file, f"{path}.key_file")
        if self.next_key_file is None:
            return Keyring(current)
        nxt = read_key(self.next_key_file, f"{path}.next_key_file")
        try:
            return Keyring(current, nxt)
        except ValueError as exc:
            raise ConfigError(f"{path}.next_key_file", f"{exc} ({self.next_key_file} and {self.key_file})") from None

    def unreadable_keys(self, path: str = "sync") -> list[KeyFileUnreadable]:
        """`lbnode check-config --offline`: each key file checked as `load_keys` reads it, but the
        ones that cannot be read on this machine (they live on the target host) are returned
        instead of raised. A key that can be read and is bad (too open, too short) still raises."""
        unreadable: list[KeyFileUnreadable] = []
        for key, file in (("key_file", self.key_file), ("next_key_file", self.next_key_file)):
            if file is not None:
                try:
                    read_key(file, f"{path}.{key}")
                except KeyFileUnreadable as err:
                    unreadable.append(err)
        if not unreadable:
            self.load_keys(path)  # both readable: also the checks across the two keys
        return unreadable

    def differs_only_in_keys(self, other: SyncConfig) -> bool:
        """True if `other` is this config but for its key files or their contents (a key
        rotation step: applied to a running FlowSync with `set_keys`, no restart)."""
        return self != other and dataclasses.replace(self, key_file=other.key_file, next_key_file=other.next_key_file,
                                                     _keyring=other._keyring) == other

    def with_keys(self, path: str = "sync") -> SyncConfig:
        """This config with its keys read from the files (see `load_keys`)."""
        return dataclasses.replace(self, _keyring=self.load_keys(path))


class KeyFileUnreadable(ConfigError):
    """A key file that cannot be opened or read here (missing, no permission): on the node an
    error like any other, a warning for `lbnode check-config --offline`."""


def read_key(file: str, path: str) -> bytes:
    """A key file's bytes (surrounding whitespace stripped; >= MIN_KEY_BYTES). Like ssh with a
    private key, a file that group or others can access is refused: the key signs for the cluster."""
    try:
        fd = os.open(file, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise KeyFileUnreadable(path, f"cannot read {file}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)  # of the file opened, not of the path (which may change meanwhile)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(path, f"{file} is not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise ConfigError(path, f"permissions {mode:04o} for {file} are too open: a key must not be "
                                        f"accessible by group or others (chmod 600 {file})")
        raw = os.read(fd, MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise KeyFileUnreadable(path, f"cannot read {file}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(raw) > MAX_KEY_FILE_BYTES:
        raise ConfigError(path, f"{file} is longer than {MAX_KEY_FILE_BYTES} bytes: not a key file?")
    key = raw.strip()
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(path, f"key in {file} is {len(key)} bytes, need >= {MIN_KEY_BYTES}")
    return key
