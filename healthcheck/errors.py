"""The health-check package's exceptions: one base, typed subclasses."""
from __future__ import annotations


class HealthCheckError(Exception):
    """Base of every error raised by `healthcheck`."""


class ConfigError(HealthCheckError):
    """Invalid check configuration; names the key path, e.g. `checks[0].timeout_ms`.

    `path` and `reason` are kept apart so a YAML loader can re-render the message with a line
    number: ``f"{err.path}: {err.reason} (node.yaml:31)"``.
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class HttpParseError(HealthCheckError):
    """A health-check response that is not valid HTTP/1.x; the message is the probe's reason."""


class SteeringError(HealthCheckError):
    """Setting up (or tearing down) the through-VIP routing failed; carries the command output."""
