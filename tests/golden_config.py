"""`make golden`: rewrite the expected normalised form of tests/data/config/good/*.yaml.

The golden test (tests/test_cluster_config.py) only compares; it never writes. After a change
that is meant to alter the normalised config, run this, read the diff of the .json files, and
commit them with the change.
"""
from __future__ import annotations

import ipaddress
import json
import sys
from pathlib import Path
from typing import Any

from cluster.config import load_file, normalised

DATA = Path(__file__).parent / "data" / "config"
NODE_IP = ipaddress.ip_address("10.99.0.5")
GOOD = sorted((DATA / "good").glob("*.yaml"))


def render(path: Path) -> Any:
    """The normalised form of one good config, as its golden .json holds it."""
    return normalised(load_file(path, NODE_IP, check_files=False))  # the example's key is not on this machine


def main() -> int:
    for path in GOOD:
        golden = path.with_suffix(".json")
        text = json.dumps(render(path), indent=2, sort_keys=True) + "\n"
        changed = not golden.exists() or golden.read_text() != text
        golden.write_text(text)
        print(f"{golden.relative_to(DATA.parents[2])}: {'updated' if changed else 'unchanged'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
