"""Fuzzing the control-message decoder (formats/messages.py `decode`).

    nfactorctl fuzz messages --count 1000000     (the full run; the suite runs a sample)

Frames come from generators of two kinds.  Unauthenticated: noise, noise
behind a good magic, valid frames with bit flips, truncated or extended,
sizes around the limits.  Authenticated (MAC-valid for the key, as a peer
holding the cluster key could send): header fields rewritten, msgpack bodies
mutated or replaced by noise, and msgpack edge cases built by hand (huge
declared lengths, deep nesting, huge maps, ext types, bad UTF-8, odd keys,
integers at the edges, bodies of the wrong shape).

The decoder passes if every frame is either a Message or a MessageError
(anything else is a finding), no frame takes longer than `slow_ms`, and every
accepted message encodes again and decodes to the same thing.
"""
from __future__ import annotations

import collections
import hashlib
import hmac
import random
import struct
import time

import msgpack

from ..formats import messages as m

KEY = bytes(range(32))
NOW_MS = 1_700_000_000_000
MAX_FINDINGS = 20  # examples kept per kind of finding


def _sign(header_and_body: bytes, key: bytes = KEY) -> bytes:
    return header_and_body + hmac.new(key, header_and_body, hashlib.sha256).digest()


def _header(rng, msg_type=None, ts=None, magic=m.MAGIC, version=m.VERSION) -> bytes:
    msg_type = rng.choice(list(m.MsgType)) if msg_type is None else msg_type
    return m.HEADER.pack(magic, version, int(msg_type), NOW_MS if ts is None else ts)


def _scalar(rng):
    return rng.choice([None, True, False, 0, -1, 2**63 - 1, -2**63, 2**64 - 1, 1.5, float("inf"), float("nan"),
                       "", "x" * rng.randrange(40), b"\x00\xff", rng.randrange(-1000, 1000)])


def _value(rng, depth: int = 0):
    r = rng.random()
    if depth > 3 or r < 0.5:
        return _scalar(rng)
    if r < 0.75:
        return [_value(rng, depth + 1) for _ in range(rng.randrange(5))]
    return {rng.choice(["a", "b", "id", "key", 7, b"k"]): _value(rng, depth + 1) for _ in range(rng.randrange(5))}


def valid(rng) -> bytes:
    body = {f"k{i}": _value(rng) for i in range(rng.randrange(6))}
    return m.encode(rng.choice(list(m.MsgType)), rng.randrange(2**64), rng.choice(["rt0", "controller", "x" * 50]),
                    body, KEY, ts_ms=NOW_MS)


# --- unauthenticated frames ------------------------------------------------------

def noise(rng):
    return rng.randbytes(rng.randrange(0, 300))


def noise_at_limits(rng):
    size = rng.choice([m.MIN_FRAME, m.MAX_FRAME]) + rng.randint(-3, 3)
    return rng.randbytes(max(0, size))


def magic_noise(rng):
    return m.MAGIC + bytes([m.VERSION]) + rng.randbytes(rng.randrange(0, 300))


def bit_flips(rng):
    frame = valid(rng)
    buf = bytearray(frame)
    while buf == frame:  # two flips of one bit cancel out
        for _ in range(rng.randint(1, 8)):
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
    return bytes(buf)


def truncated(rng):
    frame = valid(rng)
    return frame[:rng.randrange(len(frame))]


def extended(rng):
    return valid(rng) + rng.randbytes(rng.randint(1, 64))


# --- authenticated frames (a peer holding the key) ----------------------------------

def header_fields(rng):
    frame = valid(rng)
    magic = rng.choice([m.MAGIC, m.MAGIC, b"XN", rng.randbytes(2)])
    version = rng.choice([m.VERSION, m.VERSION, 0, 2, 255])
    msg_type = rng.choice([rng.randrange(256), int(rng.choice(list(m.MsgType)))])
    ts = rng.choice([NOW_MS, NOW_MS + rng.randint(-40_000, 40_000), 0, 2**64 - 1])
    return _sign(struct.pack("!2sBBQ", magic, version, msg_type, ts) + frame[m.HEADER.size:-m.MAC_SIZE])


def body_mutated(rng):
    body = bytearray(valid(rng)[m.HEADER.size:-m.MAC_SIZE])
    for _ in range(rng.randint(1, 4)):
        op, i = rng.randrange(3), rng.randrange(len(body) + 1)
        if op == 0 and i < len(body):
            body[i] = rng.randrange(256)
        elif op == 1:
            body[i:i] = bytes([rng.randrange(256)])
        elif i < len(body):
            del body[i]
    return _sign(_header(rng) + bytes(body))


def body_noise(rng):
    return _sign(_header(rng) + rng.randbytes(rng.randrange(0, 500)))


def _huge_length(rng) -> bytes:
    """A container or string whose declared length is far past the data."""
    tag, fmt = rng.choice([(0xdd, "!I"), (0xdf, "!I"), (0xdb, "!I"), (0xc6, "!I"), (0xdc, "!H"), (0xde, "!H"),
                           (0xda, "!H"), (0xc5, "!H")])
    n = rng.choice([2**32 - 1, 2**31, 65535, 1000]) if fmt == "!I" else rng.choice([65535, 1000])
    return bytes([tag]) + struct.pack(fmt, n) + rng.randbytes(rng.randrange(0, 20))


def _nested(rng) -> bytes:
    depth = rng.choice([10, 100, 511, 512, 1023, 1024, 1025, 5000, 20000])
    opener = rng.choice([b"\x91", b"\x81\xa1k"])  # one-element array, or map {"k": ...}
    return opener * depth + b"\xc0"


def _huge_map(rng) -> bytes:
    n = rng.randrange(1000, 12000)
    head = b"\xde" + struct.pack("!H", n) if n < 65536 else b"\xdf" + struct.pack("!I", n)
    if rng.random() < 0.5:
        return head + b"".join(msgpack.packb(i) + b"\xc0" for i in range(n))  # distinct keys
    return head + (b"\xa1k\xc0" * n)  # one key, n times


def _ext(rng) -> bytes:
    """Ext types, -1 (msgpack's timestamp) with lengths it does and does not take among them."""
    data = rng.randbytes(rng.choice([1, 2, 4, 8, 12, 16]))
    code = rng.choice([-1, 0, 5, 127, -128]) & 0xff
    fixext = {1: 0xd4, 2: 0xd5, 4: 0xd6, 8: 0xd7, 16: 0xd8}
    if len(data) in fixext and rng.random() < 0.5:
        return bytes([fixext[len(data)], code]) + data
    return bytes([0xc7, len(data), code]) + data


def _shaped(rng) -> bytes:
    """The outer {rid, from, body} map with one field wrong or odd."""
    obj = {"rid": rng.choice([0, 1, 2**64 - 1, -1, 2**63, 1.0, True, "1", None]),
           "from": rng.choice(["rt0", "", "\u00e9" * 100, b"rt0", 0, None, ["x"]]),
           "body": rng.choice([{}, {"id": 0}, [], None, "body", {i: i for i in range(50)}, {None: 1, 1.5: 2}])}
    if rng.random() < 0.2:
        obj["extra"] = 1
    if rng.random() < 0.2:
        del obj[rng.choice(list(obj))]
    return msgpack.packb(obj, use_bin_type=True)


def _odd_keys(rng) -> bytes:
    """Keys msgpack allows and Python may not: arrays, maps (unhashable), nil, floats, bytes."""
    key = rng.choice([b"\x91\x01", b"\x81\x01\x02", b"\xc0", b"\xcb" + struct.pack("!d", float("nan")), b"\xc4\x01k"])
    return b"\x83\xa3rid\x01\xa4from\xa1t\xa4body\x81" + key + b"\x01"


def _bad_utf8(rng) -> bytes:
    bad = rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82"])
    return b"\x83\xa3rid\x01\xa4from" + bytes([0xa0 | len(bad)]) + bad + b"\xa4body\x80"


EDGES = (_huge_length, _nested, _huge_map, _ext, _shaped, _odd_keys, _bad_utf8)


def msgpack_edges(rng):
    payload = rng.choice(EDGES)(rng)
    room = m.MAX_FRAME - m.HEADER.size - m.MAC_SIZE
    if len(payload) > room and rng.random() < 0.5:
        payload = payload[:room]  # just under the limit (else it is refused as oversized)
    return _sign(_header(rng) + payload)


def wrong_lengths(rng):
    """Valid pieces glued at the wrong places: two frames, a MAC too many or too few."""
    a, b = valid(rng), valid(rng)
    return rng.choice([a + b, a + a[-m.MAC_SIZE:], a[:-1], _sign(a[:m.HEADER.size]), _sign(a)])


GENERATORS = {g.__name__: g for g in (noise, noise_at_limits, magic_noise, bit_flips, truncated, extended,
                                      header_fields, body_mutated, body_noise, msgpack_edges, wrong_lengths)}
# frames without a valid MAC: accepting one would be a forgery
UNAUTHENTICATED = {"noise", "noise_at_limits", "magic_noise", "bit_flips", "truncated", "extended"}


def _same(a: m.Message, b: m.Message) -> bool:
    # packed again rather than ==: NaN is not equal to itself
    return (a.type, a.rid, a.sender, a.ts) == (b.type, b.rid, b.sender, b.ts) and \
        msgpack.packb(a.body, use_bin_type=True) == msgpack.packb(b.body, use_bin_type=True)


def run(count: int, seed: int = 0, slow_ms: float = 50.0) -> dict:
    """Feed `count` frames to decode; the report counts outcomes per generator
    and lists findings (anything but Message or MessageError, slow decodes,
    accepted messages that do not survive encode + decode, and any frame
    without a valid MAC accepted)."""
    rng = random.Random(seed)
    names = list(GENERATORS)
    outcomes: dict[str, collections.Counter] = {n: collections.Counter() for n in names}
    findings: dict[str, list] = collections.defaultdict(list)
    found = collections.Counter()
    worst, worst_by, total, t0 = 0.0, None, 0.0, time.monotonic()

    def finding(kind: str, name: str, frame: bytes, detail: str) -> None:
        found[kind] += 1
        if len(findings[kind]) < MAX_FINDINGS:
            findings[kind].append({"generator": name, "detail": detail, "frame_head": frame[:80].hex(),
                                   "frame_len": len(frame)})

    for i in range(count):
        name = names[i % len(names)]
        frame = GENERATORS[name](rng)
        start = time.perf_counter()
        try:
            msg = m.decode(frame, KEY, now_ms=NOW_MS)
            outcome = "accepted"
        except m.MessageError as e:
            msg, outcome = None, e.reason
        except Exception as e:  # the finding this fuzzer is for
            msg, outcome = None, "crash"
            finding("crash", name, frame, f"{type(e).__name__}: {e}"[:300])
        took = (time.perf_counter() - start) * 1000
        total += took
        if took > worst:
            worst, worst_by = took, name
        if took > slow_ms:
            finding("slow", name, frame, f"{took:.1f} ms")
        outcomes[name][outcome] += 1
        if msg is not None and name in UNAUTHENTICATED:
            finding("forged", name, frame, "accepted without a valid MAC")
        if msg is not None:
            try:
                again = m.decode(m.encode(msg.type, msg.rid, msg.sender, msg.body, KEY, ts_ms=msg.ts), KEY,
                                 now_ms=NOW_MS)
                if not _same(msg, again):
                    finding("round_trip", name, frame, "decoded, encoded again, decoded differently")
            except m.MessageError as e:
                outcomes[name][f"accepted_not_reencodable_{e.reason}"] += 1  # e.g. float32 grown past the limit
            except Exception as e:
                finding("round_trip", name, frame, f"re-encoding raised {type(e).__name__}: {e}"[:300])
    return {"count": count, "seed": seed, "seconds": round(time.monotonic() - t0, 2),
            "decode_ms": {"max": round(worst, 3), "max_in": worst_by, "mean": round(total / max(count, 1), 4)},
            "slow_ms_limit": slow_ms, "outcomes": {n: dict(c) for n, c in outcomes.items()},
            "findings": dict(found), "examples": dict(findings), "ok": not found}
