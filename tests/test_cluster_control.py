"""The control socket's protocol (cluster.control): requests round-trip, bad ones are refused with a
message that says why, replies wrap the status document without re-encoding it."""
from __future__ import annotations

import ipaddress
import json

import pytest

from cluster import control
from cluster.control import Disable, Drain, Enable, ProtocolError, Status, Undrain

pytestmark = pytest.mark.unit

ip = ipaddress.ip_address


@pytest.mark.parametrize("request_", [
    Status(), Status("alice"),
    Drain(ip("10.0.0.11")), Drain(ip("10.0.0.11"), "web", "alice"), Drain(ip("2001:db8::11"), "web"),
    Undrain(ip("10.0.0.11")), Undrain(ip("10.0.0.11"), "api"),
    Disable(ip("192.0.2.10")), Disable(ip("192.0.2.10"), 0.0, "bob"), Disable(ip("2001:db8::10"), 12.5),
    Enable(ip("192.0.2.10")), Enable(ip("192.0.2.10"), "bob"),
])
def test_requests_round_trip(request_: control.Request) -> None:
    line = control.encode_request(request_)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line)["v"] == control.VERSION
    assert control.decode_request(line) == request_
    assert control.decode_request(line.rstrip(b"\n")) == request_


def test_the_wire_form_is_the_documented_one() -> None:
    assert json.loads(control.encode_request(Drain(ip("10.0.0.11"), "web"))) == {
        "v": 1, "cmd": "drain", "backend": "10.0.0.11", "service": "web"}
    assert control.decode_request(b'{"v":1,"cmd":"status"}') == Status()
    assert control.decode_request(b'{"v": 1, "cmd": "disable", "vip": "192.0.2.10"}') == Disable(
        ip("192.0.2.10"), control.DEFAULT_GRACE_S)
    # Fields a reader does not know are ignored (a newer client adding one is not a new version).
    assert control.decode_request(b'{"v":1,"cmd":"enable","vip":"192.0.2.10","reason":"maint"}') == Enable(
        ip("192.0.2.10"))


@pytest.mark.parametrize(("line", "error"), [
    (b'{"v":1,"cmd":"frobnicate"}',
     "unknown command 'frobnicate' (known: disable, drain, enable, status, undrain)"),
    (b'{"v":2,"cmd":"status"}', "unsupported protocol version 2 (this node speaks 1)"),
    (b'{"cmd":"status"}', "unsupported protocol version None (this node speaks 1)"),
    (b'{"v":true,"cmd":"status"}', "unsupported protocol version True (this node speaks 1)"),
    (b'{"v":"1","cmd":"status"}', "unsupported protocol version '1' (this node speaks 1)"),
    (b'{"v":1}', "'cmd' must be a string"),
    (b'{"v":1,"cmd":7}', "'cmd' must be a string"),
    (b'[1]', "request must be a JSON object, got list"),
    (b'drain 10.0.0.11', "request is not JSON"),
    (b'\xff\xfe', "request is not JSON"),
    (b'{"v":1,"cmd":"drain"}', "drain: 'backend' is required (an IP address)"),
    (b'{"v":1,"cmd":"drain","backend":"b1"}', "drain: 'backend': not an IP address: 'b1'"),
    (b'{"v":1,"cmd":"undrain","backend":11}', "undrain: 'backend' is required (an IP address)"),
    (b'{"v":1,"cmd":"drain","backend":"10.0.0.11","service":""}', "drain: 'service' must be a printable string"),
    (b'{"v":1,"cmd":"drain","backend":"10.0.0.11","user":"a\\nb"}', "drain: 'user' must be a printable string"),
    (b'{"v":1,"cmd":"disable"}', "disable: 'vip' is required (an IP address)"),
    (b'{"v":1,"cmd":"disable","vip":"192.0.2.10","grace_s":-1}', "disable: 'grace_s' must be a number 0..300"),
    (b'{"v":1,"cmd":"disable","vip":"192.0.2.10","grace_s":"2"}', "disable: 'grace_s' must be a number 0..300"),
    (b'{"v":1,"cmd":"disable","vip":"192.0.2.10","grace_s":true}', "disable: 'grace_s' must be a number 0..300"),
    (b'{"v":1,"cmd":"disable","vip":"192.0.2.10","grace_s":301}', "disable: 'grace_s' must be a number 0..300"),
    (b'{"v":1,"cmd":"status","pad":"' + b"x" * control.MAX_REQUEST_BYTES + b'"}', "request longer than 4096 bytes"),
])
def test_bad_requests_are_refused_saying_why(line: bytes, error: str) -> None:
    with pytest.raises(ProtocolError) as info:
        control.decode_request(line)
    assert str(info.value).startswith(error), str(info.value)
    assert isinstance(info.value, control.Refused)


def test_replies() -> None:
    assert control.decode_reply(control.encode_ok({"changed": ["web 10.0.0.11"]})) == {
        "v": 1, "ok": True, "changed": ["web 10.0.0.11"]}
    with pytest.raises(control.ReplyError, match="^unknown command 'x'$"):
        control.decode_reply(control.encode_error("unknown command 'x'"))
    assert json.loads(control.encode_error("nope")) == {"v": 1, "ok": False, "error": "nope"}
    bare = b'{"node": {"state": "serving"}}\n'  # a node from before the protocol: the bare document
    with pytest.raises(ValueError, match="not a control reply"):
        control.decode_reply(bare)
    assert control.decode_reply(bare, to_status=True) == {"v": 0, "ok": True, "status": {"node": {"state": "serving"}}}
    with pytest.raises(ValueError, match="not a control reply"):
        control.decode_reply(b'{"services": []}\n', to_status=True)
    with pytest.raises(ValueError, match="version 2"):
        control.decode_reply(b'{"v": 2, "ok": true}\n')


def test_the_status_reply_wraps_the_encoded_document_as_is() -> None:
    document = json.dumps({"node": {"state": "serving"}, "services": [{"name": "web/192.0.2.10:80"}]}).encode() + b"\n"
    reply = control.encode_status_reply(document)
    assert reply.endswith(b"}\n") and reply.count(b"\n") == 1
    assert control.decode_reply(reply) == {"v": 1, "ok": True, "status": json.loads(document)}


def test_only_state_changes_are_mutating() -> None:
    assert not control.is_mutating(Status())
    assert all(control.is_mutating(r) for r in (Drain(ip("10.0.0.1")), Undrain(ip("10.0.0.1")),
                                                Disable(ip("192.0.2.1")), Enable(ip("192.0.2.1"))))
