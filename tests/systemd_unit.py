"""Run a systemd unit's ExecStart as systemd would, without systemd (it is not PID 1 here).

`Unit.parse` reads a unit file (sections, repeated keys, `\\` continuations). `Unit.exec_argv`
expands a command line the way systemd.service(5) does for the parts our unit uses: `%i` and `%%`,
`${VAR}` (one word) and `$VAR` (split into words; nothing if unset) from the EnvironmentFile.
`Unit.sandbox_argv` wraps it with what the [Service] section asks for and what can be reproduced
with util-linux: the user (setpriv --reuid/--regid --clear-groups), the capabilities (ambient,
inheritable and bounding set exactly as listed), NoNewPrivileges, RuntimeDirectory (a directory
owned by the user bind-mounted, with its submounts, at /run/<name> in a private mount namespace) and ProtectSystem=full
(/usr, /boot and /etc read-only). PrivateTmp and ProtectHome are not reproduced.
"""
from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

_VAR = re.compile(r"\$\{(\w+)\}")
_PREFIXES = "+-@:!"


@dataclass(frozen=True)
class Unit:
    path: Path
    sections: Mapping[str, Mapping[str, tuple[str, ...]]]

    @classmethod
    def parse(cls, path: Path) -> Unit:
        sections: dict[str, dict[str, list[str]]] = {}
        current: dict[str, list[str]] | None = None
        pending = ""
        for raw in path.read_text().splitlines():
            line = pending + raw.strip()
            pending = ""
            if line.endswith("\\"):
                pending = line[:-1] + " "
                continue
            if not line or line[0] in "#;":
                continue
            if line.startswith("[") and line.endswith("]"):
                current = sections.setdefault(line[1:-1], {})
                continue
            key, sep, value = line.partition("=")
            if current is None or not sep:
                raise ValueError(f"{path}: cannot parse {raw!r}")
            current.setdefault(key.strip(), []).append(value.strip())
        return cls(path, {s: {k: tuple(v) for k, v in keys.items()} for s, keys in sections.items()})

    def values(self, key: str, section: str = "Service") -> tuple[str, ...]:
        return self.sections.get(section, {}).get(key, ())

    def value(self, key: str, section: str = "Service") -> str:
        values = self.values(key, section)
        if len(values) != 1:
            raise KeyError(f"{self.path}: [{section}] {key} is set {len(values)} times, expected once")
        return values[0]

    def capabilities(self) -> dict[str, frozenset[str]]:
        """AmbientCapabilities and CapabilityBoundingSet, as sets of CAP_ names."""
        return {key: frozenset(" ".join(self.values(key)).split())
                for key in ("AmbientCapabilities", "CapabilityBoundingSet")}

    def exec_prefixes(self, key: str, index: int = 0) -> str:
        """The special prefixes of the `index`th `key` command line: `+` (full privileges), `-`
        (failure ignored), `@`, `:`, `!`."""
        line = self.values(key)[index]
        return line[:len(line) - len(line.lstrip(_PREFIXES))]

    def exec_argv(self, key: str, instance: str, env: Mapping[str, str], index: int = 0) -> list[str]:
        """The `index`th `key` command line (ExecStart, ExecReload...) for unit instance `instance`,
        without its prefixes (`exec_prefixes`)."""
        line = self.values(key)[index].lstrip(_PREFIXES)
        line = line.replace("%%", "\0").replace("%i", instance).replace("\0", "%")
        argv: list[str] = []
        for word in shlex.split(line):
            bare = re.fullmatch(r"\$(\w+)", word)
            if bare:  # $VAR alone: split into words, nothing if unset
                argv.extend(env.get(bare.group(1), "").split())
            else:
                argv.append(_VAR.sub(lambda m: env[m.group(1)], word))
        return argv

    def sandbox_argv(self, command: Sequence[str], *, uid: int, gid: int, runtime_dir: Path) -> list[str]:
        """`command` run as the [Service] section says (see the module doc)."""
        caps = self.capabilities()
        ambient = ",".join(f"+{c.lower().removeprefix('cap_')}" for c in sorted(caps["AmbientCapabilities"]))
        bounding = ",".join(f"+{c.lower().removeprefix('cap_')}" for c in sorted(caps["CapabilityBoundingSet"]))
        setpriv = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
                   f"--inh-caps=-all,{ambient}", f"--ambient-caps=-all,{ambient}", f"--bounding-set=-all,{bounding}"]
        if self.value("NoNewPrivileges") == "yes":
            setpriv.append("--no-new-privs")
        # --rbind: with what is mounted in it (the unit's bpffs), as the service's mount namespace,
        # a copy of the host's, shows /run/lbnode.
        mounts = [f"mount --rbind {shlex.quote(str(runtime_dir))} /run/{self.value('RuntimeDirectory')}"]
        if self.value("ProtectSystem") == "full":
            mounts += [f"mount --bind {d} {d} && mount -o remount,bind,ro {d}" for d in ("/usr", "/boot", "/etc")
                       if Path(d).is_dir()]
        script = " && ".join([*mounts, 'exec "$@"'])
        return ["unshare", "--mount", "--propagation", "private", "sh", "-ec", script, "sh", *setpriv, *command]


def read_env_file(path: Path) -> dict[str, str]:
    """An EnvironmentFile: KEY=VALUE lines, # comments."""
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip().strip('"')
    return env
