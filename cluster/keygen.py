"""`lbnode keygen PATH`: write a new random flow-sync key, mode 0600, never over an existing file.

The key is 32 random bytes written as 64 hex digits and a newline. `read_key`
(cluster/sync/config.py) strips surrounding whitespace and uses the rest as the HMAC key, so the
text form loses nothing (256 bits of entropy; raw bytes could start or end with whitespace that
the reader would strip), survives copy and paste between hosts, and is well above the 16-byte
minimum.

Creation is atomic in both senses that matter for a secret:
- no window with a wider mode: the file is created with mode 0600 by `open` itself (the umask
  can only narrow it; `fchmod` then undoes a umask that narrowed it too far for the owner);
- no half-written key under PATH, and no overwrite: the key is written and fsynced to a
  temporary file in the same directory, then hard-linked to PATH. `link` fails if PATH exists
  (even as a dangling symlink), so two concurrent runs cannot both win, and an existing key
  (which the cluster may be signing with) is never replaced.
"""
from __future__ import annotations

import argparse
import os
import secrets
import sys

from cluster.sync.codec import key_id
from cluster.sync.config import MIN_KEY_BYTES

KEY_BYTES = 32
assert KEY_BYTES >= MIN_KEY_BYTES


class KeygenError(Exception):
    """The key could not be written; the message says why (exit code 2)."""


def new_key() -> bytes:
    """The bytes written to a key file: 64 hex digits and a newline."""
    return secrets.token_hex(KEY_BYTES).encode() + b"\n"


def write_key(path: str) -> bytes:
    """Write a new key to `path` (mode 0600, atomically, refusing to overwrite); returns the key
    as `read_key` will load it (without the newline)."""
    key = new_key()
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise KeygenError(f"cannot create a file in {directory}: {exc.strerror}") from None
    try:
        try:
            os.fchmod(fd, 0o600)  # a umask like 0277 would have left the owner unable to read it
            os.write(fd, key)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path, follow_symlinks=False)
        except FileExistsError:
            raise KeygenError(f"{path} exists: not replacing a key the cluster may be using "
                              f"(for a rotation write a new file, see the README)") from None
        except OSError as exc:
            raise KeygenError(f"cannot create {path}: {exc.strerror}") from None
    finally:
        os.unlink(tmp)
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)  # the new name survives a crash
    finally:
        os.close(dir_fd)
    return key.strip()


def keygen(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lbnode keygen", description="Write a new random flow-sync key (sync.key_file) to PATH, mode 0600. "
        "Refuses to overwrite an existing file. Copy the same file to every node of the cluster.")
    parser.add_argument("path")
    args = parser.parse_args(argv)
    try:
        key = write_key(args.path)
    except KeygenError as err:
        print(f"lbnode: keygen: {err}", file=sys.stderr)
        return 2
    print(f"wrote a new sync key to {args.path} (key id {key_id(key):08x}, as `lbnode status` shows it)")
    return 0
