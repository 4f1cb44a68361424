"""The runtime query socket: replies, and hostile or broken clients that get
an error and never stop the server."""
import socket
import struct

import msgpack
import pytest

from nfactor_xdp.formats import query as rtctl
@pytest.fixture
def server(tmp_path):
    calls = []

    def handler(req):
        calls.append(req)
        if req["op"] == "boom":
            raise ValueError("boom")
        return {"ok": True, "echo": req.get("x")}

    srv = rtctl.Server(str(tmp_path / "rt.sock"), handler)
    yield srv
    srv.close()


def _raw(srv, payload: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        s.connect(srv.path)
        s.sendall(payload)
        srv.serve_pending()
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        return data


def _reply(data: bytes):
    (n,) = struct.unpack("!I", data[:4])
    return msgpack.unpackb(data[4:4 + n])


def test_request_reply(server):
    body = msgpack.packb({"op": "ping", "x": 7})
    assert _reply(_raw(server, struct.pack("!I", len(body)) + body)) == {"ok": True, "echo": 7}


@pytest.mark.parametrize("payload", [
    struct.pack("!I", 3) + b"\xc1\xc1\xc1",                # not msgpack
    struct.pack("!I", 1 << 30),                            # oversized
    struct.pack("!I", 2) + msgpack.packb([1]),             # not a map
    struct.pack("!I", 1) + msgpack.packb({}),              # truncated body
    b"\x00\x00",                                           # truncated length
])
def test_bad_requests_get_errors_and_the_server_goes_on(server, payload):
    data = _raw(server, payload)
    if data:
        assert _reply(data)["ok"] is False
    assert server.errors >= 1
    body = msgpack.packb({"op": "ping"})
    assert _reply(_raw(server, struct.pack("!I", len(body)) + body))["ok"] is True


def test_handler_exception_is_an_error_reply(server):
    body = msgpack.packb({"op": "boom"})
    reply = _reply(_raw(server, struct.pack("!I", len(body)) + body))
    assert reply["ok"] is False and "boom" in reply["error"]


def test_client_reports_a_missing_runtime(tmp_path):
    with pytest.raises(rtctl.QueryError):
        rtctl.request(str(tmp_path / "nothing.sock"), "ping", timeout=0.5)
