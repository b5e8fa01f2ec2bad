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
    assert (DATA / "good" / "example.yaml").read_text() == (Path(__file__).parents[1] / "examples" / "lbnode.yaml").read_text()


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
    (tmp_path / "short.key").write_text("too short")
    with pytest.raises(ConfigError, match=r"sync.key_file: key in .* is 9 bytes, need >= 16"):
        load_text(text.format(key=tmp_path / "short.key"), NODE_IP)
    (tmp_path / "good.key").write_text("a-long-enough-shared-key")
    assert load_text(text.format(key=tmp_path / "good.key"), NODE_IP).sync is not None


def test_services_beyond_the_data_planes_limits_are_refused() -> None:
    from cluster.config import load_text

    ports = list(range(1, 130))
    text = f"services: [{{name: big, vips: [192.0.2.1, 192.0.2.2], ports: {ports}, backends: [{{address: 10.0.0.1}}]}}]"
    with pytest.raises(ConfigError, match=r"^services: 258 \(VIP, port\) services, the data plane holds 256"):
        load_text(text, NODE_IP)
