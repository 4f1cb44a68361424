"""The endpoint on UNIX datagram sockets (what the processes of a node use):
request/reply, the socket file's life (a dead process's replaced, a live
one's refused), another user kept out, a burst queued, and requests acted on
once (a retry or a replay gets the first reply).  The tests marked root
change users or raise the namespace's datagram queue."""
from __future__ import annotations

import os
import socket
import stat
import subprocess

import pytest

from nfactor_xdp.formats.messages import Endpoint, MsgType, encode
from tests.test_messages import KEY, pump


@pytest.fixture
def unix_pair(tmp_path):
    d = tmp_path / "ctl"
    d.mkdir(mode=0o700)
    a = Endpoint(str(d / "a.sock"), KEY, "client")
    b = Endpoint(str(d / "b.sock"), KEY, "server")
    yield a, b
    a.close()
    b.close()


def test_unix_endpoint_request_reply_and_its_socket_file(unix_pair, tmp_path):
    a, b = unix_pair
    assert a.address == str(tmp_path / "ctl" / "a.sock") and stat.S_ISSOCK(os.stat(a.address).st_mode)
    replies = []
    rid = a.request(b.address, MsgType.PING, {"n": 1}, on_reply=replies.append)
    pump({a: None, b: lambda msg, addr: b.reply(msg, addr, {"from": addr})}, lambda: replies, what="reply", tick=[a])
    assert replies[0].rid == rid and replies[0].body == {"from": a.address}
    a.close()
    assert not os.path.exists(str(tmp_path / "ctl" / "a.sock"))  # removed with its endpoint


def test_unix_endpoint_replaces_a_dead_process_socket_never_a_live_one(tmp_path):
    path = str(tmp_path / "x.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dead.bind(path)
    dead.close()  # the file stays, like that of a process killed with -9
    with Endpoint(path, KEY, "x") as ep:
        with pytest.raises(OSError, match="in use by a running process"):
            Endpoint(path, KEY, "y")
        assert os.path.exists(path)
        other = tmp_path / "file"
        other.write_text("not a socket")
        with pytest.raises(OSError, match="not a socket"):
            Endpoint(str(other), KEY, "z")
        assert ep.address == path
    assert not os.path.exists(path)


@pytest.mark.root
def test_unix_endpoint_cannot_be_reached_by_another_user(unix_pair):
    a, b = unix_pair
    code = ("import socket, sys\n"
            "s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n"
            "try:\n    s.sendto(b'NX' + bytes(60), sys.argv[1])\nexcept PermissionError:\n    sys.exit(13)\n")
    r = subprocess.run(["/usr/bin/python3", "-c", code, b.address], user=65534, group=65534, extra_groups=[],
                       cwd="/", capture_output=True, text=True, timeout=30)
    assert r.returncode == 13, r.stderr
    r = subprocess.run(["/usr/bin/python3", "-c", code, b.address], capture_output=True, timeout=30)  # root can
    assert r.returncode == 0
    pump({b: None}, lambda: sum(b.rejected.values()) == 1, what="root's frame")


@pytest.mark.root
def test_unix_endpoint_queues_a_burst(unix_pair):
    """A UNIX datagram socket queues net.unix.max_dgram_qlen datagrams (10 by
    default): root raises it, so a burst (1000 migrations at once) waits
    rather than fails with EAGAIN."""
    a, b = unix_pair
    for i in range(3000):
        a.send(b.address, MsgType.MIGRATE_CREATE, {"i": i})
    assert a.counters["sent"] == 3000 and not [k for k in a.counters if k.startswith("send_")]
    got = []
    pump({b: lambda msg, addr: got.append(msg.body["i"])}, lambda: len(got) == 3000, what="the burst")
    assert got == list(range(3000))


def test_a_request_retried_or_replayed_is_handled_once(unix_pair):
    a, b = unix_pair
    handled, replies = [], []

    def serve(msg, addr):
        handled.append(msg.rid)
        b.reply(msg, addr, {"n": len(handled)})

    rid = a.request(b.address, MsgType.RUNTIME_ADD, {}, on_reply=replies.append)
    pump({a: None, b: serve}, lambda: replies, what="reply", tick=[a])
    frame = encode(MsgType.RUNTIME_KILL, 77, "client", {"id": 0}, KEY)
    for _ in range(3):
        a.send(b.address, MsgType.RUNTIME_ADD, {}, rid=rid)  # retries of the first
        a.sock.sendto(frame, b.address)                        # a captured frame, replayed
    # copies of 77 read in the same batch as the first find it in progress: dropped, unanswered
    pump({a: None, b: serve}, lambda: b.counters["duplicate_request_answered"] + b.counters["duplicate_request"] == 5
         and a.counters["duplicate_reply"] == 3, what="the copies")
    assert handled == [rid, 77]  # each request ran once; the retries got the first answer again
    # the same rid from another sender is another request
    with Endpoint(os.path.join(os.path.dirname(a.address), "c.sock"), KEY, "other") as c:
        c.send(b.address, MsgType.RUNTIME_ADD, {}, rid=rid)
        pump({b: serve}, lambda: len(handled) == 3, what="the other sender's request")


def test_request_cache_acts_once_while_in_progress_expires_and_is_bounded():
    from nfactor_xdp.formats.request_cache import IN_PROGRESS, RequestCache
    c = RequestCache(window_ms=30_000, max_entries=3)
    assert c.seen("rt0", 1, ts_ms=1000, now_ms=1000) is None              # new: handle it
    assert c.seen("rt0", 1, ts_ms=1200, now_ms=1200) is IN_PROGRESS       # a retry while it runs
    c.answered("rt0", 1, {"ok": True})
    assert c.seen("rt0", 1, ts_ms=1500, now_ms=1500) == {"ok": True}      # a retry after: the reply
    assert c.seen("rt0", 1, ts_ms=1500, now_ms=31_400) == {"ok": True}    # the retry's timestamp keeps it
    assert c.seen("rt0", 1, ts_ms=1500, now_ms=31_600) is None            # past every copy's window: forgotten
    for rid in (2, 3, 4, 5):  # (rt0, 1) expired; four new ones for three places
        c.seen("rt1", rid, ts_ms=40_000, now_ms=40_000)
    assert len(c) == 3 and c.evicted == 1
