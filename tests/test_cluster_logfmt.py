"""`lbnode --log-format json|text` (cluster.logfmt): one JSON object per line with the node's identity
on each, structured `extra=` fields and the traceback; the text format carries the same identity."""
from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator

import pytest

from cluster import cli, logfmt

pytestmark = pytest.mark.unit

IDENTITY = {"interface": "eth0", "ip": "10.0.0.1"}


@pytest.fixture
def logger() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    out = io.StringIO()
    log = logging.getLogger("lbnode.test.logfmt")
    log.propagate = False
    log.setLevel(logging.DEBUG)
    yield log, out
    log.handlers.clear()


def lines(out: io.StringIO) -> list[str]:
    return out.getvalue().splitlines()


def test_json_lines_carry_identity_message_extra_fields_and_exceptions(
        logger: tuple[logging.Logger, io.StringIO]) -> None:
    log, out = logger
    log.addHandler(logfmt.handler("json", IDENTITY, out))
    log.info("%s: %s -> %s", "10.0.0.254", "OpenConfirm", "Established")
    log.warning("drain by %s", "alice", extra={"backend": "10.0.0.11", "changed": ["web 10.0.0.11"]})
    try:
        raise ValueError('bad "value"\nsecond line')
    except ValueError:
        log.exception("apply failed")
    first, second, third = (json.loads(line) for line in lines(out))  # one object per line, newlines escaped
    assert list(first) == ["ts", "level", "interface", "ip", "logger", "msg"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["ts"])
    assert first | {"ts": None} == {"ts": None, "level": "INFO", "interface": "eth0", "ip": "10.0.0.1",
                                    "logger": "lbnode.test.logfmt",
                                    "msg": "10.0.0.254: OpenConfirm -> Established"}
    assert (second["level"], second["backend"], second["changed"]) == ("WARNING", "10.0.0.11", ["web 10.0.0.11"])
    assert third["level"] == "ERROR" and third["msg"] == "apply failed"
    assert third["exc"].startswith("Traceback") and 'ValueError: bad "value"\nsecond line' in third["exc"]


def test_values_that_are_not_json_are_written_as_text(logger: tuple[logging.Logger, io.StringIO]) -> None:
    log, out = logger
    log.addHandler(logfmt.handler("json", IDENTITY, out))
    log.info("x", extra={"where": frozenset({3}), "peer": ("10.0.0.254", 179)})
    line = json.loads(lines(out)[0])
    assert line["where"] == "frozenset({3})" and line["peer"] == ["10.0.0.254", 179]


def test_the_text_format_has_the_same_identity_first(logger: tuple[logging.Logger, io.StringIO]) -> None:
    log, out = logger
    log.addHandler(logfmt.handler("text", IDENTITY, out))
    log.info("ready: serving %d services", 1)
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO eth0/10\.0\.0\.1 lbnode\.test\.logfmt: "
                        r"ready: serving 1 services", lines(out)[0])


def test_an_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="log format must be one of text, json, got 'xml'"):
        logfmt.handler("xml", IDENTITY)


def test_the_cli_takes_log_format() -> None:
    args = cli.run_parser().parse_args(["--ip", "10.0.0.1", "--if", "eth0", "--log-format", "json"])
    assert args.log_format == "json"
    assert cli.run_parser().parse_args(["--ip", "10.0.0.1", "--if", "eth0"]).log_format == "text"
    with pytest.raises(SystemExit):
        cli.run_parser().parse_args(["--ip", "10.0.0.1", "--if", "eth0", "--log-format", "xml"])


def test_configure_replaces_the_root_handlers() -> None:
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    try:
        logfmt.configure("json", logging.INFO, IDENTITY)
        assert len(root.handlers) == 1 and isinstance(root.handlers[0].formatter, logfmt.JsonFormatter)
        assert root.level == logging.INFO
    finally:
        root.handlers[:] = saved
        root.setLevel(level)
