"""Node config golden tests: tests/data/config/good/*.yaml load to the normalised form in the
matching .json; bad/*.yaml are refused with the error (key path and line) in their first line.
The test only compares: `make golden` (tests/golden_config.py) rewrites the .json files."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.config import ConfigError, load_file
from tests.golden_config import DATA, GOOD, NODE_IP, render

pytestmark = pytest.mark.unit

BAD = sorted((DATA / "bad").glob("*.yaml"))


@pytest.mark.parametrize("path", GOOD, ids=[p.stem for p in GOOD])
def test_good_config_normalises_to_golden(path: Path) -> None:
    golden = path.with_suffix(".json")
    assert golden.exists(), f"{golden.name} missing: run `make golden` and review the diff"
    assert render(path) == json.loads(golden.read_text()), "normalised form changed; if on purpose, run `make golden`"


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_bad_config_is_refused_with_path_and_line(path: Path) -> None:
    expected = path.read_text().splitlines()[0].removeprefix("# expect: ")
    with pytest.raises(ConfigError) as caught:
        load_file(path, NODE_IP)
    assert str(caught.value).replace(str(path), path.name) == expected


def test_examples_lbnode_yaml_is_the_example_golden() -> None:
    """The annotated example in examples/ is the one the golden test checks."""
    assert (DATA / "good" / "example.yaml").read_text() == \
        (Path(__file__).parents[1] / "examples" / "lbnode.yaml").read_text()


def test_bgp_defaults_come_from_the_node_ip() -> None:
    text = "bgp: {local_as: 65001, peers: [{address: 10.99.0.254, asn: 65000}]}\nservices: []\n"
    from cluster.config import load_text

    config = load_text(text, NODE_IP)
    assert config.bgp is not None
    assert (str(config.bgp.router_id), str(config.bgp.next_hop_v4)) == ("10.99.0.5", "10.99.0.5")


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_file(tmp_path / "nope.yaml", NODE_IP)


def test_sync_key_is_read_at_load_so_a_bad_key_is_a_config_error(tmp_path: Path) -> None:
    """A missing or short key must refuse the config (exit 2, refused reload), not crash later."""
    from cluster.config import load_text

    text = "sync: {{key_file: {key}}}\nservices: []\n"
    with pytest.raises(ConfigError, match=r"sync.key_file: cannot read .*nope.key"):
        load_text(text.format(key=tmp_path / "nope.key"), NODE_IP)
    key_file(tmp_path / "short.key", "too short")
    with pytest.raises(ConfigError, match=r"sync.key_file: key in .* is 9 bytes, need >= 16"):
        load_text(text.format(key=tmp_path / "short.key"), NODE_IP)
    key_file(tmp_path / "good.key", "a-long-enough-shared-key")
    assert load_text(text.format(key=tmp_path / "good.key"), NODE_IP).sync is not None


def key_file(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o660])
def test_a_key_file_group_or_others_can_access_is_refused_naming_it(tmp_path: Path, mode: int) -> None:
    """As ssh refuses a private key others can read: the error names the key path, the file and the line."""
    from cluster.config import load_text

    key = key_file(tmp_path / "sync.key", "a-long-enough-shared-key", mode)
    nxt = key_file(tmp_path / "next.key", "another-long-enough-key", 0o600)
    text = f"services: []\nsync:\n  key_file: {key}\n"
    with pytest.raises(ConfigError) as caught:
        load_text(text, NODE_IP, "node.yaml")
    assert str(caught.value) == (f"sync.key_file: permissions {mode:04o} for {key} are too open: a key must not be "
                                 f"accessible by group or others (chmod 600 {key}) (node.yaml:3)")
    key.chmod(0o600)
    nxt.chmod(mode)
    with pytest.raises(ConfigError, match=rf"^sync.next_key_file: permissions {mode:04o} for {nxt} are too open.*"
                                          r"\(node.yaml:4\)$"):
        load_text(text + f"  next_key_file: {nxt}\n", NODE_IP, "node.yaml")
    nxt.chmod(0o400)
    assert load_text(text + f"  next_key_file: {nxt}\n", NODE_IP, "node.yaml").sync is not None


def test_the_keys_read_are_part_of_the_config_but_never_of_its_printed_forms(tmp_path: Path) -> None:
    """A SIGHUP compares configs: new key contents behind the same path must make a changed config."""
    from cluster.config import load_text, normalised

    key = key_file(tmp_path / "sync.key", "a-long-enough-shared-key")
    nxt = key_file(tmp_path / "next.key", "the-next-key-of-the-rotation")
    text = f"sync: {{key_file: {key}, next_key_file: {nxt}}}\nservices: []\n"
    first, again = load_text(text, NODE_IP), load_text(text, NODE_IP)
    assert first.sync is not None and first.sync.keys is not None
    assert first == again and first.sync.keys.next == b"the-next-key-of-the-rotation"
    key_file(key, "a-new-key-behind-the-same-path")
    changed = load_text(text, NODE_IP)
    assert changed != first and changed.sync is not None and changed.sync.key_file == first.sync.key_file
    for shown in (repr(changed), str(normalised(changed))):
        assert "a-new-key" not in shown and "the-next-key" not in shown
    assert "_keyring" not in normalised(changed)["sync"] and normalised(changed) == normalised(first)
    # What the node re-keys in place (no sync restart), and what it does not.
    import dataclasses
    assert changed.sync.differs_only_in_keys(first.sync) and not first.sync.differs_only_in_keys(again.sync)
    assert not dataclasses.replace(changed.sync, port=1).differs_only_in_keys(first.sync)
    key_file(nxt, "a-new-key-behind-the-same-path")
    with pytest.raises(ConfigError, match=r"^sync.next_key_file: the current and the next key are the same key"):
        load_text(text, NODE_IP)


def test_services_beyond_the_data_planes_limits_are_refused() -> None:
    from cluster.config import load_text

    ports = list(range(1, 130))
    text = f"services: [{{name: big, vips: [192.0.2.1, 192.0.2.2], ports: {ports}, backends: [{{address: 10.0.0.1}}]}}]"
    with pytest.raises(ConfigError, match=r"^services: 258 \(VIP, port\) services, the data plane holds 256"):
        load_text(text, NODE_IP)
