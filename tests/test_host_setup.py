"""Setting up a host: `lbnode keygen` and `lbnode check-config --offline`, and the example config's
own first line, run exactly as it is printed there."""
from __future__ import annotations

import os
import shlex
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from cluster import cli, keygen
from cluster.config import ConfigError, load_file
from cluster.sync.codec import key_id
from cluster.sync.config import MIN_KEY_BYTES, read_key

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "lbnode.yaml"
NODE_IP = cli.parse_ip("192.0.2.1")


def lbnode(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    """The `lbnode` command of this checkout (the venv's script runs cluster.cli:main)."""
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_the_examples_own_validate_command_works_on_a_fresh_clone() -> None:
    first = EXAMPLE.read_text().splitlines()[0]
    command = shlex.split(first.split("Validate with:", 1)[1])
    assert command[0] == "lbnode", first
    result = lbnode(*command[1:])
    assert result.returncode == 0, result.stderr
    assert '"services"' in result.stdout
    # The key file named in the example is not on this machine: a warning, with where it is named.
    assert "warning" in result.stderr and "sync.key_file: cannot read /etc/lbnode/sync.key" in result.stderr
    assert "lbnode.yaml:" in result.stderr


def test_offline_still_validates_everything_else(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(EXAMPLE.read_text().replace("weight: 2", "weight: -2"))
    result = lbnode("check-config", "--offline", str(bad))
    assert result.returncode == 2 and "services[0].backends[1].weight" in result.stderr, result.stderr


def test_offline_refuses_a_key_that_is_there_and_bad(tmp_path: Path) -> None:
    """--offline forgives a key file that is not on this machine, not one that is and is wrong."""
    key = tmp_path / "sync.key"
    key.write_text("x" * 32)
    key.chmod(0o644)
    config = tmp_path / "node.yaml"
    config.write_text(f"sync: {{key_file: {key}, next_key_file: {tmp_path}/missing.key}}\n")
    warnings: list[ConfigError] = []
    with pytest.raises(ConfigError, match="too open"):
        load_file(config, NODE_IP, warn=warnings.append)
    key.chmod(0o600)
    loaded = load_file(config, NODE_IP, warn=warnings.append)
    assert loaded.sync is not None and loaded.sync.keys is None
    assert [str(w) for w in warnings] == [
        f"sync.next_key_file: cannot read {tmp_path}/missing.key: No such file or directory ({config}:1)"]
    # Both readable, but the same key twice: the check across the two keys still runs.
    (tmp_path / "missing.key").write_text("x" * 32)
    (tmp_path / "missing.key").chmod(0o600)
    with pytest.raises(ConfigError, match="same key"):
        load_file(config, NODE_IP, warn=warnings.append)
    # Without --offline the missing key is the error it always was.
    (tmp_path / "missing.key").unlink()
    with pytest.raises(ConfigError, match="next_key_file: cannot read"):
        load_file(config, NODE_IP)


def test_keygen_writes_a_0600_key_the_node_accepts(tmp_path: Path) -> None:
    path = tmp_path / "sync.key"
    old = os.umask(0)  # the mode comes from open(), not from a lenient umask
    try:
        result = lbnode("keygen", str(path))
    finally:
        os.umask(old)
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = read_key(str(path), "sync.key_file")
    assert len(key) == 2 * keygen.KEY_BYTES >= MIN_KEY_BYTES and int(key, 16) >= 0
    assert f"key id {key_id(key):08x}" in result.stdout
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind
    # A second run never replaces it: the cluster may be signing with it.
    again = lbnode("keygen", str(path))
    assert again.returncode == 2 and "exists" in again.stderr
    assert read_key(str(path), "sync.key_file") == key


def test_keygen_keys_differ_and_a_strict_umask_still_leaves_the_owner_able_to_read(tmp_path: Path) -> None:
    old = os.umask(0o377)
    try:
        keys = {keygen.write_key(str(tmp_path / f"k{i}")) for i in range(5)}
    finally:
        os.umask(old)
    assert len(keys) == 5
    assert {stat.S_IMODE((tmp_path / f"k{i}").stat().st_mode) for i in range(5)} == {0o600}


def test_keygen_refuses_a_dangling_symlink_and_a_missing_directory(tmp_path: Path) -> None:
    link = tmp_path / "sync.key"
    link.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(keygen.KeygenError, match="exists"):
        keygen.write_key(str(link))
    assert not (tmp_path / "elsewhere").exists()
    with pytest.raises(keygen.KeygenError, match="cannot create a file in"):
        keygen.write_key(str(tmp_path / "nope" / "sync.key"))


def test_two_keygens_racing_for_one_path_one_wins(tmp_path: Path) -> None:
    path = str(tmp_path / "sync.key")
    outcomes: list[bytes | str] = []
    barrier = threading.Barrier(8)

    def one() -> None:
        barrier.wait()
        try:
            outcomes.append(keygen.write_key(path))
        except keygen.KeygenError as err:
            outcomes.append(str(err))

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    won = [o for o in outcomes if isinstance(o, bytes)]
    assert len(outcomes) == 8 and len(won) == 1
    assert read_key(path, "k") == won[0]
