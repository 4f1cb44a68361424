"""Control messages between the node's processes (controller, runtimes,
supervisor, CLI), one per datagram: on UNIX datagram sockets in the node's
run directory (root only) between the processes of one node, on UDP between
hosts.

A frame is:

    header  struct "!2sBBQ": b"NX", VERSION, message type, sender's wall clock in ms
    body    msgpack {"rid": int request id, "from": str sender, "body": map}
    mac     32-byte HMAC-SHA256 of header + body with the cluster key

Every process of the cluster shares the key (`ClusterKey`).  The MAC is
checked before the body is unpacked, so unauthenticated bytes never reach
msgpack.  The timestamp limits replay of captured frames to a window of
MAX_SKEW_MS, and within it the receiving `Endpoint` acts once on a request
(sender, request id): a retry or replay gets the first reply again.

`Endpoint` is a non-blocking socket for event loops: `send`, `receive`
(drains, never raises, counts rejected frames by reason), `request` + `tick`
for requests with timeouts and retries, and a blocking `call` for CLIs.
"""
from __future__ import annotations

import collections
import enum
import errno
import hashlib
import hmac
import os
import random
import select
import struct
import time
from dataclasses import dataclass
from typing import Any, Callable

import msgpack
from .. import logs
from ..errors import NFactorError
# the key lives in cluster_key.py; importers of ClusterKey from here keep working
from .cluster_key import KEY_SIZE, ClusterKey, ClusterKeyError  # noqa: F401
from . import dgram
from .request_cache import IN_PROGRESS, RequestCache

MAGIC = b"NX"
VERSION = 1
HEADER = struct.Struct("!2sBBQ")
MAC_SIZE = 32
MIN_FRAME = HEADER.size + MAC_SIZE
MAX_FRAME = 60_000        # whole frame; stays under the UDP datagram limit
MAX_SKEW_MS = 30_000
_U64 = 1 << 64
log = logs.get("messages")

REASONS = ("truncated", "bad_magic", "bad_version", "bad_mac", "stale",
           "oversized", "bad_body", "unknown_type")


class MsgType(enum.IntEnum):
    HEARTBEAT = 1
    VIEW = 2
    RULES = 3
    REGISTER = 4
    REPLY = 5
    RUNTIME_ADD = 6
    RUNTIME_STOP = 7
    RUNTIME_KILL = 8
    STATUS = 9
    PING = 10
    RUNTIME_EXITED = 11  # supervisor -> controller: a runtime process died (used by node.py/controller.py)
    HOST_ALIVE = 12  # a worker host's supervisor -> controller: the host lives, and its runtimes' pids
    HOST_FENCED = 13  # controller -> a fenced host's supervisor: kill these runtimes (their flows are taken)
    # 20-29: flow migration
    MIGRATE_CREATE = 20
    MIGRATE_MOVE = 21
    MIGRATE_STATE = 22
    MIGRATE_DONE = 23
    # 30-39: replication
    SNAPSHOT = 30
    SNAPSHOT_FETCH = 31
    FLOW_TAKE = 32  # runtime -> switch agent: point a crashed peer's flows here (dataplane/takeover.py)
    FLOW_END = 33  # a worker host's runtime -> switch agent: delete these ended flows' entries if still its own
    SWITCH_SET = 34  # a controller on a worker host -> switch agent: a runtime's state, a host's fence


class MessageError(NFactorError):
    """A frame that cannot be encoded or was rejected; `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class MessageTimeout(NFactorError, TimeoutError):
    pass


@dataclass
class Message:
    type: MsgType
    rid: int
    sender: str
    body: dict
    ts: int  # sender's wall clock, ms


# --- frames --------------------------------------------------------------------

def _mac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def _now_ms() -> int:
    return int(time.time() * 1000)


def _is_uint(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < _U64


def encode(msg_type: int, rid: int, sender: str, body: dict, key: bytes,
           ts_ms: int | None = None) -> bytes:
    try:
        msg_type = MsgType(msg_type)
    except ValueError:
        raise MessageError("unknown_type", f"no message type {msg_type!r}") from None
    ts_ms = _now_ms() if ts_ms is None else ts_ms
    if not (_is_uint(rid) and _is_uint(ts_ms) and isinstance(sender, str) and isinstance(body, dict)):
        raise MessageError("bad_body", "rid and ts must be ints in [0, 2**64), sender a str, body a dict")
    try:
        packed = msgpack.packb({"rid": rid, "from": sender, "body": body}, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise MessageError("bad_body", f"body cannot be packed: {e}") from None
    frame = HEADER.pack(MAGIC, VERSION, msg_type, ts_ms) + packed
    if len(frame) + MAC_SIZE > MAX_FRAME:
        raise MessageError("oversized", f"{msg_type.name} frame would be {len(frame) + MAC_SIZE} bytes, "
                                        f"limit is {MAX_FRAME}")
    return frame + _mac(key, frame)


def _no_ext(code, data):
    raise ValueError("extension types are not allowed")


def decode(data: bytes, key: bytes, now_ms: int | None = None) -> Message:
    """Parse and authenticate a frame; raises only MessageError."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MessageError("bad_body", "frame is not bytes")
    data = bytes(data)
    if len(data) > MAX_FRAME:
        raise MessageError("oversized")
    if len(data) < MIN_FRAME:
        raise MessageError("truncated")
    magic, version, type_no, ts = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise MessageError("bad_magic")
    if version != VERSION:
        raise MessageError("bad_version", f"version {version}")
    signed, mac = data[:-MAC_SIZE], data[-MAC_SIZE:]
    if not hmac.compare_digest(mac, _mac(key, signed)):
        raise MessageError("bad_mac")
    now_ms = _now_ms() if now_ms is None else now_ms
    if abs(ts - now_ms) > MAX_SKEW_MS:
        raise MessageError("stale", f"timestamp {ts - now_ms:+d} ms from now")
    try:
        msg_type = MsgType(type_no)
    except ValueError:
        raise MessageError("unknown_type", f"type {type_no}") from None
    try:
        # strict_map_key=False: any body encode() can pack must decode back
        obj = msgpack.unpackb(signed[HEADER.size:], raw=False, strict_map_key=False, ext_hook=_no_ext)
    except Exception as e:  # msgpack raises many kinds (ExtraData, ValueError, UnicodeDecodeError...)
        raise MessageError("bad_body", f"not msgpack: {type(e).__name__}") from None
    if not (isinstance(obj, dict) and obj.keys() == {"rid", "from", "body"}
            and _is_uint(obj["rid"]) and isinstance(obj["from"], str) and isinstance(obj["body"], dict)):
        raise MessageError("bad_body", "not a {rid, from, body} map")
    return Message(msg_type, obj["rid"], obj["from"], obj["body"], ts)


# --- endpoint ------------------------------------------------------------------

@dataclass
class _Pending:
    addr: Any
    msg_type: MsgType
    body: dict
    on_reply: Callable[[Message], Any]
    on_timeout: Callable[[int], Any] | None
    timeout: float
    retries: int
    deadline: float
    attempts: int = 1


def _errname(e: OSError) -> str:
    return errno.errorcode.get(e.errno, type(e).__name__) if e.errno else type(e).__name__


class Endpoint:
    """A non-blocking datagram socket speaking this protocol: UNIX (bound to
    a path; only who may enter its directory can send to it) or UDP.

    Counters: `rejected` (frames dropped by decode reason, plus
    "unexpected_reply"), `counters` (sent, received, send/recv errors by
    errno name, duplicate replies and requests, request timeouts...).
    """

    BUFFER = 8 << 20   # room for bursts (thousands of migrations at once); root may exceed the sysctl limits
    DONE_MEMORY = 1024  # completed rids remembered to tell duplicate replies from unexpected ones

    def __init__(self, bind: str | tuple[str, int], key: bytes, sender: str):
        """`bind`: a path (UNIX; a dead process's socket file there is
        replaced), or (host, port) (UDP; port 0 picks a free one, see `address`)."""
        if not isinstance(key, bytes) or len(key) != KEY_SIZE:
            raise ValueError(f"cluster key must be {KEY_SIZE} bytes")
        self.key = key
        self.sender = sender
        self.path = bind if isinstance(bind, str) else None
        self.sock = dgram.open_socket(bind, self.BUFFER)
        self._inode = os.stat(self.path).st_ino if self.path is not None else None
        self.requests = RequestCache(MAX_SKEW_MS)
        self.rejected: collections.Counter = collections.Counter()
        self.counters: collections.Counter = collections.Counter()
        # random start: a restarted process won't match replies meant for its predecessor,
        # and its requests are not taken for its predecessor's by the receivers' request caches
        self._next_rid = random.randrange(1, 1 << 62)
        self._pending: dict[int, _Pending] = {}
        # no pending request's deadline is earlier (it may be later: answered ones are not taken
        # out): tick() is called every turn of an event loop, and scans only when one may be due
        self._next_deadline = float("inf")
        self._done: collections.OrderedDict[int, None] = collections.OrderedDict()

    @property
    def address(self) -> str | tuple[str, int]:
        return self.path if self.path is not None else self.sock.getsockname()[:2]

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()
        if self.path is not None:
            try:
                if os.stat(self.path).st_ino == self._inode:  # still ours, not a successor's
                    os.unlink(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _new_rid(self) -> int:
        rid = self._next_rid
        self._next_rid = self._next_rid + 1 if self._next_rid < (1 << 63) else 1
        return rid

    def send(self, addr, msg_type: int, body: dict, rid: int | None = None) -> int:
        """Send one message (to each of a list of addresses); returns its rid.
        Encoding errors (a bug) raise MessageError; socket errors are counted,
        never raised (UDP is lossy anyway)."""
        if rid is None:
            rid = self._new_rid()
        frame = encode(msg_type, rid, self.sender, body, self.key)
        if isinstance(addr, list):  # every controller of a node on several hosts: only the leader listens
            for a in addr:
                self._sendto(frame, a)
            return rid
        self._sendto(frame, addr)
        return rid

    def _sendto(self, frame: bytes, addr) -> None:
        if addr is None:  # from an unbound UNIX socket: nowhere to answer
            self.counters["send_no_address"] += 1
            return
        try:
            self.sock.sendto(frame, addr)
            self.counters["sent"] += 1
        except OSError as e:
            self.counters[f"send_{_errname(e)}"] += 1

    def reply(self, msg: Message, addr, body: dict) -> int:
        """Answer `msg` (received from `addr`) with `body`, under its rid;
        a retry or replay of `msg` gets this reply again."""
        self.requests.answered(msg.sender, msg.rid, body)
        return self.send(addr, MsgType.REPLY, body, rid=msg.rid)

    def receive(self, max_n: int = 64) -> list[tuple[Message, Any]]:
        """Read up to `max_n` datagrams that are waiting; return the valid
        messages with their source address.  Replies to our requests go to
        their callbacks instead; a request seen before is not returned again
        (its reply, if any, is re-sent).  Never raises, nor do the callbacks
        it runs (their errors are counted)."""
        out = []
        for _ in range(max_n):
            try:
                data, addr = self.sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                # e.g. ECONNREFUSED reported for an earlier send: not about this read
                self.counters[f"recv_{_errname(e)}"] += 1
                if isinstance(e, ConnectionError):
                    continue
                break
            now_ms = _now_ms()
            try:
                msg = decode(data, self.key, now_ms)
            except MessageError as e:
                self.rejected[e.reason] += 1
                continue
            self.counters["received"] += 1
            if msg.type == MsgType.REPLY:
                self._route_reply(msg)
                continue
            earlier = self.requests.seen(msg.sender, msg.rid, msg.ts, now_ms)
            if earlier is None:
                out.append((msg, addr))
            elif earlier is IN_PROGRESS:
                self.counters["duplicate_request"] += 1
            else:
                self.counters["duplicate_request_answered"] += 1
                self.send(addr, MsgType.REPLY, earlier, rid=msg.rid)
        return out

    def _route_reply(self, msg: Message) -> None:
        p = self._pending.pop(msg.rid, None)
        if p is None:
            if msg.rid in self._done:
                self.counters["duplicate_reply"] += 1  # a reply to a retry, or a late one
            else:
                self.rejected["unexpected_reply"] += 1
            return
        self._mark_done(msg.rid)
        self._callback(p.on_reply, msg, p.msg_type)

    def _callback(self, fn, arg, msg_type: MsgType) -> None:
        """A request's callback.  Its errors are counted (callback_errors) and
        logged, never raised: a bug in one must not stop the event loop
        reading this socket, nor lose the other messages of its read."""
        try:
            fn(arg)
        except Exception as e:
            self.counters["callback_errors"] += 1
            log.error("callback of a %s request failed: %s: %s", msg_type.name, type(e).__name__, e)

    def _mark_done(self, rid: int) -> None:
        self._done[rid] = None
        if len(self._done) > self.DONE_MEMORY:
            self._done.popitem(last=False)

    def request(self, addr, msg_type: int, body: dict, on_reply: Callable[[Message], Any],
                timeout: float = 0.2, retries: int = 3,
                on_timeout: Callable[[int], Any] | None = None) -> int:
        """Send a request and track it: `receive()` hands its reply to
        `on_reply(msg)`; `tick()` re-sends it (same rid) every `timeout`
        seconds up to `retries` times, then calls `on_timeout(rid)`."""
        rid = self.send(addr, msg_type, body)
        deadline = time.monotonic() + timeout
        self._pending[rid] = _Pending(addr, MsgType(msg_type), body, on_reply, on_timeout,
                                      timeout, retries, deadline)
        if deadline < self._next_deadline:
            self._next_deadline = deadline
        return rid

    def tick(self, now: float | None = None) -> None:
        """Re-send or expire requests whose timeout passed (`now`: time.monotonic())."""
        now = time.monotonic() if now is None else now
        if now < self._next_deadline:
            return
        for rid, p in list(self._pending.items()):
            if now < p.deadline:
                continue
            if p.attempts <= p.retries:
                p.attempts += 1
                p.deadline = now + p.timeout
                self.counters["resent"] += 1
                self.send(p.addr, p.msg_type, p.body, rid=rid)  # fresh timestamp, same rid
            else:
                del self._pending[rid]
                self._mark_done(rid)  # a reply arriving later is late, not unexpected
                self.counters["request_timeout"] += 1
                if p.on_timeout is not None:
                    self._callback(p.on_timeout, rid, p.msg_type)
        self._next_deadline = min((p.deadline for p in self._pending.values()), default=float("inf"))

    def next_timeout(self, now: float | None = None) -> float | None:
        """Seconds until `tick()` has something to do (None: no request pending), for poll()."""
        if not self._pending:
            return None
        now = time.monotonic() if now is None else now
        return max(0.0, min(p.deadline for p in self._pending.values()) - now)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def call(self, addr, msg_type: int, body: dict, timeout: float = 0.5, retries: int = 3) -> Message:
        """Blocking request for CLIs and tests: the reply, or MessageTimeout.
        Other messages arriving meanwhile are dropped (counted as "dropped_during_call")."""
        result: dict[str, Any] = {}
        self.request(addr, msg_type, body, on_reply=lambda m: result.setdefault("reply", m),
                     timeout=timeout, retries=retries,
                     on_timeout=lambda rid: result.setdefault("timeout", rid))
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        while not result:
            wait = self.next_timeout()
            poller.poll(0 if wait is None else int(wait * 1000) + 1)
            for _ in self.receive():
                self.counters["dropped_during_call"] += 1
            if not result:
                self.tick()
        if "reply" in result:
            return result["reply"]
        raise MessageTimeout(
            f"no reply from {_fmt_addr(addr)} to {MsgType(msg_type).name} after "
            f"{retries + 1} attempts {timeout}s apart (is the process there, and does it "
            f"use the same cluster key?)")


def _fmt_addr(addr) -> str:
    return f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) and len(addr) >= 2 else str(addr)

