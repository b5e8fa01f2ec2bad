""".ci/install-host, staged into a temporary root: the venv, the command, /etc/lbnode, the unit.

What runs for real: the script itself, unchanged, with `--root`; Debian's python3 making the venv
with the system site packages (so bcc imports); `pip install` of a copy of this checkout (built with
setuptools, not editable); `lbnode keygen`, `lbnode --help` and `check-config --offline` from the
installed venv; `systemctl --root` enabling the instance.

What this machine cannot do, and the test stands in for: there is no network, so pip cannot fetch
lbnode's dependencies from PyPI. The test makes the venv first and gives it a .pth file pointing at
a directory of links to the development venv's dependencies (not its pip, setuptools or lbnode),
then passes `--pip-args "--no-index --no-deps --no-build-isolation"` (Debian's setuptools and wheel
build it). The install script reuses the venv it finds. Packages, the user and a running systemd
are what `--root` skips by design.
"""
from __future__ import annotations

import os
import pwd
import stat
import subprocess
import sysconfig
from pathlib import Path

import pytest

from cluster.sync.config import read_key

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / ".ci" / "install-host"
NOT_DEPENDENCIES = ("lbnode", "__editable__", "pip", "setuptools", "_distutils_hack", "distutils-precedence",
                    "pkg_resources", "__pycache__")


def offline_venv(root: Path) -> Path:
    """/opt/lbnode made as the script makes it, plus the development venv's dependencies."""
    venv = root / "opt" / "lbnode"
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120)
    deps = root.parent / f"{root.name}-deps"
    deps.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.startswith(NOT_DEPENDENCIES):
            (deps / entry.name).symlink_to(entry)
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "offline-test-dependencies.pth").write_text(f"{deps}\n")
    return venv


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_install_host_into_a_staged_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    venv = offline_venv(root)
    user = "nobody" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
    args = [str(SCRIPT), "--root", str(root), "--if", "eth7", "--ip", "10.0.0.5", "--user", user,
            "--pip-args", "--no-index --no-deps --no-build-isolation"]
    before = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--ignored"], capture_output=True,
                            text=True, check=True).stdout
    result = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING" not in result.stdout, result.stdout  # bcc imports in the venv
    # Not the unit's user: its User= and the owner of its bpffs (ExecStartPre) need a drop-in.
    assert "override User=, Group= and ExecStartPre=" in result.stdout, result.stdout
    # pip built from a copy: the checkout has no new build/ or egg-info.
    assert subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--ignored"], capture_output=True,
                          text=True, check=True).stdout == before

    # The venv runs the installed lbnode (not this checkout) and sees Debian's bcc.
    python = venv / "bin" / "python"
    where = subprocess.run([str(python), "-c", "import bcc, cluster.cli; print(cluster.cli.__file__)"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=60)
    assert where.returncode == 0, where.stderr
    assert where.stdout.strip().startswith(str(venv / "lib")), where.stdout
    helped = subprocess.run([str(venv / "bin" / "lbnode"), "--help"], capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0 and "--ip" in helped.stdout and "keygen" in helped.stdout
    link = root / "usr" / "local" / "bin" / "lbnode"
    assert os.readlink(link) == "/opt/lbnode/bin/lbnode"  # where the venv is on the host

    etc = root / "etc" / "lbnode"
    owner = pwd.getpwnam(user)
    assert mode(etc) == 0o750 and etc.stat().st_gid == owner.pw_gid
    key = etc / "sync.key"
    assert mode(key) == 0o600 and key.stat().st_uid == owner.pw_uid
    assert len(read_key(str(key), "sync.key_file")) == 64
    assert mode(etc / "eth7.yaml") == 0o640
    assert (etc / "eth7.yaml").read_text() == (REPO / "examples" / "lbnode.yaml").read_text()
    assert "LBNODE_IP=10.0.0.5" in (etc / "eth7.env").read_text().splitlines()
    unit = root / "etc" / "systemd" / "system" / "lbnode@.service"
    assert unit.read_text() == (REPO / "examples" / "systemd" / "lbnode@.service").read_text()
    wants = root / "etc" / "systemd" / "system" / "multi-user.target.wants" / "lbnode@eth7.service"
    assert os.readlink(wants) == "/etc/systemd/system/lbnode@.service"

    # The next node: the cluster's key copied in first (as the README says), then the same script,
    # which keeps that key and only gives it to the service user.
    root2 = tmp_path / "root2"
    offline_venv(root2)
    key2 = root2 / "etc" / "lbnode" / "sync.key"
    subprocess.run(["install", "-D", "-m", "0600", str(key), str(key2)], check=True, timeout=30)
    again = subprocess.run([*args[:2], str(root2), *args[3:]], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert key2.read_bytes() == key.read_bytes() and mode(key2) == 0o600 and key2.stat().st_uid == owner.pw_uid
    assert mode(key2.parent) == 0o750


def test_install_host_refuses_half_an_interface(tmp_path: Path) -> None:
    result = subprocess.run([str(SCRIPT), "--root", str(tmp_path), "--if", "eth7"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and "--if needs --ip" in result.stderr
    assert list(tmp_path.iterdir()) == []
