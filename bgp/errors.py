"""Typed errors of the bgp package: one base, and a decode error that *is* a NOTIFICATION."""
from __future__ import annotations

from enum import IntEnum

from bpf import validate


class BgpError(Exception):
    """Base of every error the bgp package raises."""


class ConfigError(validate.ConfigError, BgpError):
    """Invalid speaker configuration: the shared config error (bpf.validate), with its key path
    (`peers[1].hold_time_s`) and reason apart, kept under this package's base."""


class ErrorCode(IntEnum):
    """NOTIFICATION error codes (RFC 4271 §4.5, RFC 7313 for 7)."""

    MESSAGE_HEADER = 1
    OPEN_MESSAGE = 2
    UPDATE_MESSAGE = 3
    HOLD_TIMER_EXPIRED = 4
    FSM = 5
    CEASE = 6
    ROUTE_REFRESH = 7


class DecodeError(BgpError):
    """A received message is malformed or unacceptable.

    Carries exactly what the NOTIFICATION must say (RFC 4271 §6): `code`, `subcode` and `data`.
    """

    def __init__(self, code: int, subcode: int, data: bytes = b"", reason: str = "") -> None:
        self.code = code
        self.subcode = subcode
        self.data = data
        self.reason = reason
        super().__init__(f"{code}/{subcode}: {reason}" if reason else f"{code}/{subcode}")


_NOTIFICATION_SUBCODES: dict[int, dict[int, str]] = {
    1: {1: "Connection Not Synchronized", 2: "Bad Message Length", 3: "Bad Message Type"},
    2: {1: "Unsupported Version Number", 2: "Bad Peer AS", 3: "Bad BGP Identifier",
        4: "Unsupported Optional Parameter", 6: "Unacceptable Hold Time", 7: "Unsupported Capability"},
    3: {1: "Malformed Attribute List", 2: "Unrecognized Well-known Attribute", 3: "Missing Well-known Attribute",
        4: "Attribute Flags Error", 5: "Attribute Length Error", 6: "Invalid ORIGIN Attribute",
        8: "Invalid NEXT_HOP Attribute", 9: "Optional Attribute Error", 10: "Invalid Network Field",
        11: "Malformed AS_PATH"},
    5: {1: "in OpenSent", 2: "in OpenConfirm", 3: "in Established"},  # RFC 6608
    6: {1: "Maximum Number of Prefixes Reached", 2: "Administrative Shutdown", 3: "Peer De-configured",
        4: "Administrative Reset", 5: "Connection Rejected", 6: "Other Configuration Change",
        7: "Connection Collision Resolution", 8: "Out of Resources", 9: "Hard Reset", 10: "BFD Down"},
}


def notification_text(code: int, subcode: int) -> str:
    """`"Cease/Administrative Shutdown"` for 6/2 (RFC 4271 §4.5, RFC 4486, RFC 6608, RFC 9384)."""
    try:
        name = ErrorCode(code).name.replace("_", " ").title().replace("Fsm", "FSM")
    except ValueError:
        return f"unknown code {code}"
    sub = _NOTIFICATION_SUBCODES.get(code, {}).get(subcode)
    return f"{name}/{sub}" if sub else name if subcode == 0 else f"{name}/subcode {subcode}"
