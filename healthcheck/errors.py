"""The health-check package's exceptions: one base, typed subclasses."""
from __future__ import annotations

from bpf import validate


class HealthCheckError(Exception):
    """Base of every error raised by `healthcheck`."""


class ConfigError(validate.ConfigError, HealthCheckError):
    """Invalid check configuration; names the key path, e.g. `checks[0].timeout_ms`.

    The shared config error (bpf.validate), kept under this package's base: `path` and `reason`
    are apart so the node's YAML loader can add the line (``node.yaml:31``).
    """


class HttpParseError(HealthCheckError):
    """A health-check response that is not valid HTTP/1.x; the message is the probe's reason."""


class SteeringError(HealthCheckError):
    """Setting up (or tearing down) the through-VIP routing failed; carries the command output."""
