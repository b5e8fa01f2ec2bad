"""Typed errors of the bgp package: one base, and a decode error that *is* a NOTIFICATION."""
from __future__ import annotations

from enum import IntEnum


class BgpError(Exception):
    """Base of every error the bgp package raises."""


class ConfigError(BgpError):
    """Invalid speaker configuration; the message starts with the key path (`peers[1].hold_time_s: ...`)."""


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
