"""Control messages: frame round trips, every rejection reason, fuzzing, the
endpoint over UDP (floods, request/reply, retries, timeouts; over UNIX
sockets and requests acted on once: test_endpoint_unix.py) and the cluster
key file.  Loopback sockets and a tmp_path key file; the test marked root
changes a file's owner."""
from __future__ import annotations

import collections
import hashlib
import hmac
import multiprocessing
import os
import random
import select
import socket
import stat
import struct
import threading
import time

import msgpack
import pytest

from nfactor_xdp.formats import messages as m
from nfactor_xdp.formats.messages import (ClusterKey, ClusterKeyError, Endpoint, MessageError, MessageTimeout,
                                  MsgType, decode, encode)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
LOOPBACK = ("127.0.0.1", 0)


def craft(key=KEY, msg_type=int(MsgType.PING), ts=None, payload=None, magic=b"NX", version=m.VERSION):
    """A frame built by hand, MAC-valid for `key` whatever its contents."""
    ts = m._now_ms() if ts is None else ts
    if payload is None:
        payload = msgpack.packb({"rid": 1, "from": "t", "body": {}})
    signed = struct.pack("!2sBBQ", magic, version, msg_type, ts) + payload
    return signed + hmac.new(key, signed, hashlib.sha256).digest()


def reason_of(data, key=KEY, now_ms=None) -> str:
    with pytest.raises(MessageError) as ei:
        decode(data, key, now_ms=now_ms)
    return ei.value.reason


def pump(handlers: dict, until, timeout: float = 5.0, what: str = "condition", tick=()):
    """Drive endpoints like an event loop until `until()` holds or the deadline passes:
    poll their sockets, hand each received message to its handler, tick requesters."""
    deadline = time.monotonic() + timeout
    poller = select.poll()
    for ep in handlers:
        poller.register(ep.fileno(), select.POLLIN)
    while not until():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        poller.poll(20)
        for ep, handle in handlers.items():
            for msg, addr in ep.receive():
                if handle is not None:
                    handle(msg, addr)
        for ep in tick:
            ep.tick()


@pytest.fixture
def pair():
    a = Endpoint(LOOPBACK, KEY, "client")
    b = Endpoint(LOOPBACK, KEY, "server")
    yield a, b
    a.close()
    b.close()


# --- frames --------------------------------------------------------------------

@pytest.mark.parametrize("msg_type", list(MsgType))
def test_round_trip_every_type(msg_type):
    body = {"n": 1, "neg": -5, "big": 2**63, "s": "héllo", "b": b"\x00\xff", "l": [1, [2, {"x": None}]],
            "f": 1.5, "t": True, 7: "int key"}
    frame = encode(msg_type, 42, "runtime-3", body, KEY, ts_ms=1_700_000_000_000)
    msg = decode(frame, KEY, now_ms=1_700_000_000_000)
    assert (msg.type, msg.rid, msg.sender, msg.body, msg.ts) == (msg_type, 42, "runtime-3", body, 1_700_000_000_000)
    assert isinstance(msg.type, MsgType)


def test_decode_uses_wall_clock_by_default():
    msg = decode(encode(MsgType.HEARTBEAT, 0, "sup", {}, KEY), KEY)
    assert abs(msg.ts - time.time() * 1000) < 5000


def test_frame_layout():
    frame = encode(MsgType.STATUS, 9, "cli", {"a": 1}, KEY, ts_ms=123)
    assert frame[:12] == struct.pack("!2sBBQ", b"NX", 1, 9, 123)
    assert msgpack.unpackb(frame[12:-32]) == {"rid": 9, "from": "cli", "body": {"a": 1}}
    assert frame[-32:] == hmac.new(KEY, frame[:-32], hashlib.sha256).digest()


def test_truncated():
    frame = encode(MsgType.PING, 1, "t", {}, KEY)
    assert reason_of(b"") == "truncated"
    assert reason_of(b"NX") == "truncated"
    assert reason_of(frame[:m.MIN_FRAME - 1]) == "truncated"


def test_bad_magic():
    assert reason_of(craft(magic=b"XN")) == "bad_magic"


def test_bad_version():
    assert reason_of(craft(version=2)) == "bad_version"
    assert reason_of(craft(version=0)) == "bad_version"


def test_bad_mac():
    frame = bytearray(encode(MsgType.PING, 1, "t", {"x": 1}, KEY))
    assert decode(bytes(frame), KEY).body == {"x": 1}
    frame[-1] ^= 0x01
    assert reason_of(bytes(frame)) == "bad_mac"
    frame[-1] ^= 0x01
    frame[20] ^= 0x80  # a body byte
    assert reason_of(bytes(frame)) == "bad_mac"


def test_wrong_key():
    assert reason_of(encode(MsgType.PING, 1, "t", {}, OTHER_KEY)) == "bad_mac"


def test_stale_both_directions():
    now = 1_700_000_000_000
    for ts in (now - m.MAX_SKEW_MS - 1, now + m.MAX_SKEW_MS + 1, 0, 2**64 - 1):
        assert reason_of(encode(MsgType.PING, 1, "t", {}, KEY, ts_ms=ts), now_ms=now) == "stale"
    for ts in (now - m.MAX_SKEW_MS, now + m.MAX_SKEW_MS):  # the edge of the window is still accepted
        assert decode(encode(MsgType.PING, 1, "t", {}, KEY, ts_ms=ts), KEY, now_ms=now).ts == ts


def test_oversized():
    assert reason_of(b"NX" + bytes(m.MAX_FRAME)) == "oversized"
    with pytest.raises(MessageError, match="oversized.*60000") as ei:
        encode(MsgType.RULES, 1, "ctl", {"blob": b"x" * m.MAX_FRAME}, KEY)
    assert ei.value.reason == "oversized"
    # the largest frame that fits is accepted
    frame = encode(MsgType.RULES, 1, "ctl", {"blob": b""}, KEY)
    fill = m.MAX_FRAME - len(frame) - 1  # the bin8 length header becomes bin16: 1 byte more
    frame = encode(MsgType.RULES, 1, "ctl", {"blob": b"x" * fill}, KEY)
    assert len(frame) == m.MAX_FRAME
    assert len(decode(frame, KEY).body["blob"]) == fill
    with pytest.raises(MessageError, match="60001 bytes"):
        encode(MsgType.RULES, 1, "ctl", {"blob": b"x" * (fill + 1)}, KEY)


def test_mac_valid_but_not_msgpack():
    assert reason_of(craft(payload=b"\xc1")) == "bad_body"          # a byte msgpack never uses
    assert reason_of(craft(payload=b"\x92\x01")) == "bad_body"      # array cut short
    good = msgpack.packb({"rid": 1, "from": "t", "body": {}})
    assert reason_of(craft(payload=good + b"\x00")) == "bad_body"   # trailing data
    assert reason_of(craft(payload=b"\xa2\xff\xfe")) == "bad_body"  # invalid UTF-8 string
    assert reason_of(craft(payload=msgpack.packb(msgpack.ExtType(5, b"x")))) == "bad_body"
    assert reason_of(craft(payload=b"")) == "bad_body"              # header + MAC only


@pytest.mark.parametrize("obj", [
    [1, "t", {}],
    "just a string",
    {"rid": 1, "from": "t"},
    {"rid": 1, "from": "t", "body": {}, "extra": 1},
    {"rid": "1", "from": "t", "body": {}},
    {"rid": True, "from": "t", "body": {}},
    {"rid": -1, "from": "t", "body": {}},
    {"rid": 1.0, "from": "t", "body": {}},
    {"rid": 1, "from": b"t", "body": {}},
    {"rid": 1, "from": None, "body": {}},
    {"rid": 1, "from": "t", "body": [1, 2]},
    {"rid": 1, "from": "t", "body": None},
])
def test_mac_valid_body_of_wrong_shape(obj):
    assert reason_of(craft(payload=msgpack.packb(obj, use_bin_type=True))) == "bad_body"


def test_unknown_type():
    assert reason_of(craft(msg_type=99)) == "unknown_type"
    assert reason_of(craft(msg_type=0)) == "unknown_type"
    with pytest.raises(MessageError) as ei:
        encode(99, 1, "t", {}, KEY)
    assert ei.value.reason == "unknown_type"


def test_not_bytes_is_a_message_error():
    assert reason_of("NX not bytes") == "bad_body"
    assert reason_of(None) == "bad_body"
    assert decode(memoryview(encode(MsgType.PING, 3, "t", {}, KEY)), KEY).rid == 3


def test_encode_refuses_bad_fields():
    for args in [(-1, "t", {}), (True, "t", {}), (2**64, "t", {}), (1, b"t", {}), (1, "t", [1]),
                 (1, "t", {"s": {1, 2}}), (1, "t", {"o": object()})]:
        with pytest.raises(MessageError) as ei:
            encode(MsgType.PING, *args, KEY)
        assert ei.value.reason == "bad_body"


def test_fuzz_random_frames_all_rejected():
    rng = random.Random(20240601)
    valid = encode(MsgType.VIEW, 7, "fuzz", {"a": [1, 2, 3], "b": "x" * 20}, KEY)
    reasons = collections.Counter()
    for i in range(10_000):
        kind = i % 5
        if kind == 0:    # pure noise
            data = rng.randbytes(rng.randrange(0, 200))
        elif kind == 1:  # noise behind a good magic and version: reaches the MAC check
            data = b"NX\x01" + rng.randbytes(rng.randrange(0, 200))
        elif kind == 2:  # bit flips in a valid frame (header, body or MAC)
            buf = bytearray(valid)
            while bytes(buf) == valid:
                for _ in range(rng.randint(1, 4)):
                    buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
            data = bytes(buf)
        elif kind == 3:  # a valid frame cut short or with bytes appended
            if rng.random() < 0.5:
                data = valid[:rng.randrange(len(valid))]
            else:
                data = valid + rng.randbytes(rng.randint(1, 40))
        else:            # sizes around the limit
            data = rng.randbytes(m.MAX_FRAME + rng.randint(-50, 50))
        try:
            decode(data, KEY)
        except MessageError as e:
            reasons[e.reason] += 1
        else:
            pytest.fail(f"fuzz frame {i} was accepted: {data!r}")
    assert sum(reasons.values()) == 10_000
    assert set(reasons) <= set(m.REASONS)
    assert {"truncated", "bad_magic", "bad_version", "bad_mac", "oversized"} <= set(reasons)


def test_fuzz_mac_valid_bodies_never_raise_anything_else():
    """Bodies an authenticated peer could send (mutated msgpack, noise): only
    MessageError or a Message, never another exception out of msgpack."""
    rng = random.Random(7)
    seeds = [msgpack.packb(o, use_bin_type=True) for o in (
        {"rid": 1, "from": "t", "body": {"k": [1, 2.5, "s", b"b", None, {"n": -3}]}},
        {"rid": 2**63, "from": "x" * 40, "body": {i: [i] * 3 for i in range(10)}},
        [[[[[]]]]],
    )]
    outcomes = collections.Counter()
    for i in range(3000):
        if i % 3 == 0:
            payload = rng.randbytes(rng.randrange(0, 100))
        else:
            buf = bytearray(rng.choice(seeds))
            for _ in range(rng.randint(1, 3)):
                buf[rng.randrange(len(buf))] = rng.randrange(256)
            payload = bytes(buf)
        try:
            decode(craft(payload=payload), KEY)
            outcomes["accepted"] += 1
        except MessageError as e:
            outcomes[e.reason] += 1
    assert set(outcomes) <= {"accepted", "bad_body"}
    assert outcomes["bad_body"] > 1000
    # deep nesting goes through msgpack's own limits, and comes out as bad_body too
    assert reason_of(craft(payload=b"\x91" * 10_000)) == "bad_body"


# --- endpoint ------------------------------------------------------------------

def test_endpoint_send_receive(pair):
    a, b = pair
    assert a.address[0] == "127.0.0.1" and a.address[1] > 0
    rid = a.send(b.address, MsgType.HEARTBEAT, {"seq": 1})
    got = []
    pump({b: lambda msg, addr: got.append((msg, addr))}, lambda: got, what="heartbeat")
    msg, addr = got[0]
    assert (msg.type, msg.rid, msg.sender, msg.body) == (MsgType.HEARTBEAT, rid, "client", {"seq": 1})
    assert addr == a.address
    assert a.send(b.address, MsgType.HEARTBEAT, {}) == rid + 1  # rids count up per endpoint
    assert a.send(b.address, MsgType.HEARTBEAT, {}, rid=5) == 5
    pump({b: lambda msg, addr: got.append((msg, addr))}, lambda: len(got) == 3, what="two more")
    assert [g[0].rid for g in got] == [rid, rid + 1, 5]
    assert b.receive() == []  # nothing left: returns at once
    assert a.counters["sent"] == 3 and b.counters["received"] == 3 and not b.rejected


def test_endpoint_flood_of_junk_counted_valid_message_still_received(pair):
    a, b = pair
    junk_kinds = {
        "truncated": lambda i: b"NX\x01",
        "bad_magic": lambda i: b"ZZ" + bytes(60),
        "bad_version": lambda i: craft(version=9),
        "bad_mac": lambda i: craft(key=OTHER_KEY),
        "stale": lambda i: craft(ts=m._now_ms() - 60_000),
        "bad_body": lambda i: craft(payload=b"\xc1"),
        "unknown_type": lambda i: craft(msg_type=77),
        "oversized": lambda i: bytes(m.MAX_FRAME + 1),
    }
    names = list(junk_kinds)
    raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    got = []
    sent = 0
    try:
        for i in range(5000):
            raw.sendto(junk_kinds[names[i % len(names)]](i), b.address)
            sent += 1
            if i == 2500:
                a.send(b.address, MsgType.STATUS, {"in": "the middle"})
                sent += 1
            if sent % 50 == 0 or i == 4999:  # drain in step so the socket buffer never overflows
                pump({b: lambda msg, addr: got.append(msg)},
                     lambda: sum(b.rejected.values()) + len(got) == sent, what=f"{sent} datagrams")
    finally:
        raw.close()
    assert [(g.type, g.body) for g in got] == [(MsgType.STATUS, {"in": "the middle"})]
    assert b.rejected == {name: 5000 // len(names) for name in names}


def test_request_reply_over_loopback(pair):
    a, b = pair
    replies = []

    def serve(msg, addr):
        assert msg.type == MsgType.PING
        b.reply(msg, addr, {"pong": msg.body["n"] * 2})

    rid = a.request(b.address, MsgType.PING, {"n": 21}, on_reply=replies.append)
    assert a.pending == 1
    pump({a: lambda msg, addr: pytest.fail(f"reply returned by receive(): {msg}"), b: serve},
         lambda: replies, what="reply", tick=[a])
    assert len(replies) == 1
    assert (replies[0].type, replies[0].rid, replies[0].sender, replies[0].body) == \
        (MsgType.REPLY, rid, "server", {"pong": 42})
    assert a.pending == 0 and a.next_timeout() is None


def test_retries_then_reply_calls_on_reply_once(pair):
    a, b = pair
    replies, timeouts, seen = [], [], []

    def serve(msg, addr):
        seen.append((msg, addr))  # answered later

    t0 = time.monotonic()
    rid = a.request(b.address, MsgType.STATUS, {}, on_reply=replies.append, timeout=0.2, retries=3,
                    on_timeout=timeouts.append)
    pump({b: serve}, lambda: len(seen) == 1, what="first request")
    a.tick(now=t0 + 0.1)  # before the timeout: nothing
    assert a.counters["resent"] == 0
    a.tick(now=t0 + 1)    # timed out: second attempt, which the server drops (still in progress)
    pump({b: serve}, lambda: b.counters["duplicate_request"] == 1, what="second request")
    a.tick(now=t0 + 2)    # third attempt, the same
    pump({b: serve}, lambda: b.counters["duplicate_request"] == 2, what="third request")
    b.reply(seen[0][0], seen[0][1], {"ok": True})
    pump({a: None, b: serve}, lambda: replies, what="reply")
    assert [m.rid for m, _ in seen] == [rid]  # the handler saw the request once
    assert [r.rid for r in replies] == [rid] and timeouts == []

    # the same reply again (e.g. to a retry the server answered twice) is ignored
    b.send(a.address, MsgType.REPLY, {"ok": "again"}, rid=rid)
    pump({a: None}, lambda: a.counters["duplicate_reply"] == 1, what="duplicate")
    assert len(replies) == 1 and a.rejected["unexpected_reply"] == 0
    # a reply nobody asked for is counted as unexpected and dropped
    b.send(a.address, MsgType.REPLY, {}, rid=rid + 1000)
    pump({a: None}, lambda: a.rejected["unexpected_reply"] == 1, what="unexpected reply")
    assert len(replies) == 1
    a.tick(now=t0 + 100)  # nothing pending: no resend, no timeout
    assert a.counters["resent"] == 2 and timeouts == []


def test_timeout_after_last_retry(pair):
    a, b = pair
    replies, timeouts, seen = [], [], []
    rid = a.request(b.address, MsgType.RUNTIME_STOP, {"id": 1}, on_reply=replies.append,
                    timeout=0.2, retries=2, on_timeout=timeouts.append)
    t0 = time.monotonic()
    assert 0 <= a.next_timeout(now=t0) <= 0.2
    for step in (1, 2):
        a.tick(now=t0 + step)
        assert timeouts == []
    pump({b: lambda msg, addr: seen.append(msg)}, lambda: b.counters["duplicate_request"] == 2,
         what="three attempts")
    assert len(seen) == 1  # the retries reached the server, not its handler
    a.tick(now=t0 + 2.1)  # last attempt's timeout not yet passed
    assert timeouts == []
    a.tick(now=t0 + 3)
    assert timeouts == [rid] and a.pending == 0 and a.counters["request_timeout"] == 1
    a.tick(now=t0 + 4)
    assert timeouts == [rid]
    # a reply arriving after the timeout is late, not a surprise, and not delivered
    b.reply(seen[0], a.address, {})
    pump({a: None}, lambda: a.counters["duplicate_reply"] == 1, what="late reply")
    assert replies == [] and a.rejected["unexpected_reply"] == 0


def test_call_gets_reply_from_responder_thread(pair):
    a, b = pair
    stop = threading.Event()

    def serve():
        poller = select.poll()
        poller.register(b.fileno(), select.POLLIN)
        while not stop.is_set():
            poller.poll(20)
            for msg, addr in b.receive():
                b.reply(msg, addr, {"echo": msg.body})

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        msg = a.call(b.address, MsgType.STATUS, {"q": "all"}, timeout=0.5, retries=3)
    finally:
        stop.set()
        t.join(5)
    assert msg.type == MsgType.REPLY and msg.body == {"echo": {"q": "all"}} and msg.sender == "server"


def test_call_timeout_raises_naming_the_address(pair):
    a, silent = pair
    host, port = silent.address
    start = time.monotonic()
    with pytest.raises(MessageTimeout, match=f"{host}:{port}.*STATUS.*3 attempts"):
        a.call(silent.address, MsgType.STATUS, {}, timeout=0.05, retries=2)
    assert time.monotonic() - start >= 0.15
    seen = []
    pump({silent: lambda msg, addr: seen.append(msg.rid)}, lambda: silent.counters["duplicate_request"] == 2,
         what="3 attempts")
    assert len(seen) == 1  # one request, retried: the handler sees it once


def test_call_against_wrong_key_times_out_and_receiver_counts_bad_mac():
    with Endpoint(LOOPBACK, KEY, "cli") as a, Endpoint(LOOPBACK, OTHER_KEY, "node") as b:
        with pytest.raises(MessageTimeout, match="cluster key"):
            a.call(b.address, MsgType.PING, {}, timeout=0.02, retries=1)
        pump({b: None}, lambda: b.rejected["bad_mac"] == 2, what="bad_mac count")


def test_send_errors_are_counted_not_raised(pair):
    a, _ = pair
    a.send(("255.255.255.255", 9), MsgType.PING, {})   # broadcast without SO_BROADCAST
    a.send(("127.0.0.1", 0), MsgType.PING, {})          # port 0: EINVAL
    assert sum(v for k, v in a.counters.items() if k.startswith("send_")) == 2
    assert a.counters["sent"] == 0


def test_send_refuses_unencodable_body(pair):
    a, b = pair
    with pytest.raises(MessageError, match="oversized"):
        a.send(b.address, MsgType.SNAPSHOT, {"blob": bytes(70_000)})


def test_endpoint_rejects_bad_key():
    with pytest.raises(ValueError):
        Endpoint(LOOPBACK, b"short", "x")


# --- cluster key ---------------------------------------------------------------

def test_key_created_0600_in_0700_dir_whatever_the_umask(tmp_path):
    path = tmp_path / "lib" / "cluster.key"
    old = os.umask(0o777)  # the most hostile umask: mode bits come only from chmod
    try:
        key = ClusterKey.load_or_create(str(path))
    finally:
        os.umask(old)
    assert len(key) == 32 and path.read_bytes() == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert os.listdir(path.parent) == ["cluster.key"]  # no temporary file left
    assert ClusterKey.load_or_create(str(path)) == key  # reused
    assert ClusterKey.load(str(path)) == key


def test_existing_parent_dir_mode_left_alone(tmp_path):
    tmp_path.chmod(0o755)
    ClusterKey.load_or_create(str(tmp_path / "cluster.key"))
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o755


def test_key_readable_by_others_refused(tmp_path):
    path = tmp_path / "cluster.key"
    ClusterKey.load_or_create(str(path))
    path.chmod(0o644)
    with pytest.raises(ClusterKeyError, match=f"{path}.*0644.*chmod 600 {path}"):
        ClusterKey.load_or_create(str(path))
    path.chmod(0o640)
    with pytest.raises(ClusterKeyError, match="chmod 600"):
        ClusterKey.load(str(path))


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_key_of_wrong_length_refused(tmp_path, size):
    path = tmp_path / "cluster.key"
    path.write_bytes(b"k" * size)
    path.chmod(0o600)
    with pytest.raises(ClusterKeyError, match=f"{path} has {size}.*expected 32"):
        ClusterKey.load_or_create(str(path))
    assert path.read_bytes() == b"k" * size  # never overwritten


def test_key_directory_refused(tmp_path):
    path = tmp_path / "cluster.key"
    path.mkdir(mode=0o700)
    with pytest.raises(ClusterKeyError, match="not a regular file"):
        ClusterKey.load_or_create(str(path))


def test_lost_creation_race_reads_the_winners_key(tmp_path, monkeypatch):
    """Another process links its key in between our load attempt and our link."""
    path = tmp_path / "cluster.key"
    winner = os.urandom(32)
    real_link = os.link

    def link_after_winner(src, dst):
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, winner)
        os.close(fd)
        return real_link(src, dst)  # raises FileExistsError now

    monkeypatch.setattr(m.os, "link", link_after_winner)
    assert ClusterKey.load_or_create(str(path)) == winner
    assert os.listdir(tmp_path) == ["cluster.key"]


def _create_key(path, barrier, out):
    barrier.wait()
    out.put(ClusterKey.load_or_create(path))


def test_concurrent_creators_agree_on_one_key(tmp_path):
    ctx = multiprocessing.get_context("fork")
    n = 8
    for round_no in range(3):
        path = str(tmp_path / f"r{round_no}" / "cluster.key")
        barrier, out = ctx.Barrier(n), ctx.Queue()
        procs = [ctx.Process(target=_create_key, args=(path, barrier, out)) for _ in range(n)]
        for p in procs:
            p.start()
        keys = [out.get(timeout=30) for _ in range(n)]
        for p in procs:
            p.join(30)
            assert p.exitcode == 0
        assert len(set(keys)) == 1 and len(keys[0]) == 32
        with open(path, "rb") as f:
            assert f.read() == keys[0]
        assert os.listdir(os.path.dirname(path)) == ["cluster.key"]


def test_key_behind_a_symlink_refused(tmp_path):
    real = tmp_path / "real.key"
    ClusterKey.load_or_create(str(real))
    link = tmp_path / "cluster.key"
    link.symlink_to(real)
    with pytest.raises(ClusterKeyError, match=f"{link} is a symlink"):
        ClusterKey.load(str(link))
    with pytest.raises(ClusterKeyError, match="symlink"):
        ClusterKey.load_or_create(str(link))
    dangling = tmp_path / "dangling.key"
    dangling.symlink_to(tmp_path / "nowhere")  # create must not write through it either
    with pytest.raises(ClusterKeyError, match="symlink"):
        ClusterKey.load_or_create(str(dangling))
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.root
def test_key_of_another_owner_refused(tmp_path):
    path = tmp_path / "cluster.key"
    ClusterKey.load_or_create(str(path))
    os.chown(path, 65534, 65534)
    with pytest.raises(ClusterKeyError, match=f"{path} is owned by uid 65534, not by this user.*chown 0 {path}"):
        ClusterKey.load(str(path))
    os.chown(path, 0, 0)
    assert len(ClusterKey.load(str(path))) == 32


def test_fuzz_sample_of_control_messages_finds_nothing():
    """A bounded sample of `nfactorctl fuzz messages` (which runs 1,000,000 by default)."""
    from nfactor_xdp.tools.fuzz_messages import GENERATORS, run
    report = run(30_000, seed=20240602)
    assert report["ok"], report["examples"]
    assert set(report["outcomes"]) == set(GENERATORS)
    seen = collections.Counter()
    for outcomes in report["outcomes"].values():
        seen.update(outcomes)
    assert seen["accepted"] > 100 and set(m.REASONS) <= set(seen)  # every reason, and real messages, reached


def test_fuzz_messages_command_reports_json():
    import json

    from click.testing import CliRunner

    from nfactor_xdp.cli import main
    r = CliRunner().invoke(main, ["fuzz", "messages", "--count", "500", "--seed", "3"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert report["count"] == 500 and report["ok"] and report["findings"] == {}


def test_each_request_is_retried_at_its_own_deadline_whatever_else_is_pending(pair):
    """tick() scans only once the earliest deadline has come: a short request
    made after a long one, or in a timeout callback, is still retried on time."""
    a, b = pair
    t0 = time.monotonic()
    slow = a.request(b.address, MsgType.STATUS, {}, on_reply=lambda m: None, timeout=50, retries=1)
    a.tick(now=t0 + 1)
    assert a.counters["resent"] == 0
    later = []

    def again(rid):  # a new request from a timeout callback
        later.append(a.request(b.address, MsgType.STATUS, {}, on_reply=lambda m: None, timeout=0.5, retries=1))
    fast = a.request(b.address, MsgType.STATUS, {}, on_reply=lambda m: None, timeout=0.2, retries=0,
                     on_timeout=again)
    a.tick(now=t0 + 0.1)
    assert a.counters["resent"] == 0
    a.tick(now=t0 + 2)  # the fast one times out; its callback asks again (due 0.5 s after it ran)
    assert a.counters["request_timeout"] == 1 and len(later) == 1 and a.counters["resent"] == 0
    a.tick(now=t0 + 2.2)  # the new one's deadline has passed: resent, due again at t0 + 2.7
    assert a.counters["resent"] == 1
    a.tick(now=t0 + 2.5)
    assert a.counters["resent"] == 1 and a.pending == 2
    a.tick(now=t0 + 3)  # its last attempt timed out
    assert a.counters["request_timeout"] == 2 and a.pending == 1
    a.tick(now=t0 + 60)  # the slow one's deadline
    assert a.counters["resent"] == 2 and a.pending == 1
    assert fast != slow
