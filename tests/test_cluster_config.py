"""Node config golden tests: tests/data/config/good/*.yaml load to the normalised form in the
matching .json; bad/*.yaml are refused with the error (key path and line) in their first line."""
from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path

import pytest

from cluster.config import ConfigError, load_file, normalised

pytestmark = pytest.mark.unit

DATA = Path(__file__).parent / "data" / "config"
NODE_IP = ipaddress.ip_address("10.99.0.5")
GOOD = sorted((DATA / "good").glob("*.yaml"))
BAD = sorted((DATA / "bad").glob("*.yaml"))


@pytest.mark.parametrize("path", GOOD, ids=[p.stem for p in GOOD])
def test_good_config_normalises_to_golden(path: Path) -> None:
    got = normalised(load_file(path, NODE_IP))
    golden = path.with_suffix(".json")
    if os.environ.get("LBNODE_UPDATE_GOLDEN"):
        golden.write_text(json.dumps(got, indent=2, sort_keys=True) + "\n")
    assert got == json.loads(golden.read_text())


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
