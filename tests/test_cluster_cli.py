"""The lbnode command: the interface lock (one node per interface, also while a node exits as another starts),
check-config output, the exit code of a node whose config cannot run here."""
from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import pytest

from cluster import cli, components, logfmt, node, status
from tests.test_node_unit import World

pytestmark = pytest.mark.unit


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(status, "RUN_DIR", str(tmp_path))
    return tmp_path


def test_a_second_lock_on_the_same_interface_is_refused(run_dir: Path) -> None:
    fd, path = cli.interface_lock("eth9")
    try:
        with pytest.raises(cli.UsageError, match="another lbnode is running on eth9"):
            cli.interface_lock("eth9")
    finally:
        os.unlink(path)
        os.close(fd)


def test_a_lock_won_on_a_file_its_owner_just_unlinked_does_not_count(run_dir: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The race: we open the lock file, its owner exits (unlinks, then unlocks), we lock the
    unlinked file; a third node would then lock a new file at the same path. We must retry."""
    real_open = os.open
    opened: list[int] = []

    def open_then_owner_exits(path: str, flags: int, mode: int = 0o777) -> int:
        fd = real_open(path, flags, mode)
        if not opened:
            os.unlink(path)  # the previous owner's exit, between our open and our check
        opened.append(fd)
        return fd

    monkeypatch.setattr(cli.os, "open", open_then_owner_exits)
    fd, path = cli.interface_lock("eth9")
    monkeypatch.setattr(cli.os, "open", real_open)
    try:
        assert len(opened) == 2, "the lock on the unlinked file was given up and taken again"
        assert os.fstat(fd).st_ino == os.stat(path).st_ino
        with pytest.raises(cli.UsageError):  # and it really excludes the next node
            cli.interface_lock("eth9")
    finally:
        os.unlink(path)
        os.close(fd)


def test_check_config_masks_the_md5_password(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "node.yaml"
    config.write_text("bgp:\n  local_as: 65001\n  peers:\n"
                      "    - {address: 10.0.0.254, asn: 65000, md5_password: s3cret-key}\n"
                      "services: []\n")
    assert cli.main(["check-config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "s3cret-key" not in out and '"md5_password": "********"' in out


def test_a_node_whose_http_listener_cannot_bind_exits_2_with_the_one_line_reason(
        run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    """`lbnode` itself, started with the node's fakes (tests/test_node_unit.py World): the
    address is taken, found only at start-up; the node stops and detaches, and the command
    says so on one line with the bad-config exit code, not a traceback."""
    world = World()
    real_node = node.Node
    monkeypatch.setattr(node, "Node", lambda args, config: real_node(args, config, world.components()))
    monkeypatch.setattr(components, "interface_mac", lambda ifname: "02:00:00:00:00:05")
    monkeypatch.setattr(components, "local_addresses", lambda: {cli.parse_ip("10.0.0.5")})
    monkeypatch.setattr(logfmt, "configure", lambda *args: None)  # pytest's handlers stay
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "node.yaml"
        config.write_text(f'http: {{listen: "127.0.0.1:{port}"}}\n')
        with caplog.at_level(logging.INFO):
            code = cli.main(["--ip", "10.0.0.5", "--if", "fake0", "--config", str(config),
                             "--status-socket", str(tmp_path / "status.sock")])
    assert code == 2
    in_use = f"lbnode: http.listen: cannot listen on 127.0.0.1:{port}: Address already in use\n"
    assert capsys.readouterr().err == in_use
    assert world.dp is not None and world.dp.closed
    assert not [r for r in caplog.records if r.exc_info], "no traceback logged"
    assert sorted(os.listdir(run_dir)) == ["node.yaml"], "the interface lock and the status socket are gone"
