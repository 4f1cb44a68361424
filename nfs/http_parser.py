"""http_parser: an HTTP/1.x observer.  It follows each TCP flow's two byte
streams, parses requests (ORIG direction) and responses (REPLY direction)
across packet boundaries, and records what it saw.  It never drops a packet.

Flow state (a plain dict, so the default msgpack serialize() carries it over
a migration, half-parsed header included):

    requests    [{"method", "path", "host", "version"}, ...]  the most recent
                max_records requests (strings, bytes that are not UTF-8 escaped
                as \\xNN; long fields cut to max_field_bytes *encoded* bytes, so
                the state stays within nf.MAX_STATE_BYTES with the defaults)
    responses   [{"status": int, "reason", "version"}, ...]   likewise
    n_requests, n_responses   totals (records dropped from the lists included)
    errors      [{"dir": "orig"|"reply", "error": str}, ...]   the first max_errors
    n_errors    total errors; every error stops parsing its direction (desync)
    special     [[ordinal, "HEAD"|"CONNECT"], ...]   requests whose response
                is parsed differently, not yet answered (at most max_records)
    answered    final (non-1xx) responses seen: the ordinal of the request the
                next final response answers (responses come in request order)
    dirs        [orig, reply], each {"seq": next expected TCP sequence number
                (-1 = not known yet), "mode": see below, "buf": bytes of an
                incomplete header block / chunk line (<= max_header_bytes),
                "left": body or chunk bytes still to skip (trailer bytes read,
                in "trailer" mode), "desync": bool}

Modes: header (waiting for a start line), body (skipping "left" bytes),
chunk_size / chunk_data / chunk_end / trailer (chunked body), close (a body
delimited by the end of the connection: nothing more to parse), tunnel (after
101 Switching Protocols, CONNECT or the HTTP/2 preface: not HTTP/1.x any more).

Offload: observe mode only.  It never drops nor rewrites a packet, so it
answers "forward, observe payload": where the flow's rule asks for observe
mode (`rules add --observe`), the switch forwards the flow in XDP and feeds
the parser copies of the frames with payload; elsewhere it needs every packet
inline.  Copies the switch could not deliver (observe ring full) are counted
in observe_gaps; the stream then shows a sequence gap and that direction
stops being parsed (desync), as after a lost packet inline.

Config: max_header_bytes (8192), max_records (32), max_errors (8),
max_field_bytes (256).
"""
from __future__ import annotations

from nfactor_xdp.dataplane.nf import NetworkFunction, NFError, register
from nfactor_xdp.dataplane.offload_spec import FORWARD, OBSERVE_PAYLOAD, Offload
from nfactor_xdp.dataplane.packet import TCP, TCP_RST, TCP_SYN

HEADER, BODY, CLOSE, TUNNEL = "header", "body", "close", "tunnel"
CHUNK_SIZE, CHUNK_DATA, CHUNK_END, TRAILER = "chunk_size", "chunk_data", "chunk_end", "trailer"
_STOPPED = (CLOSE, TUNNEL)
_DIR_NAMES = ("orig", "reply")

_MASK = 0xFFFFFFFF
_HALF = 0x80000000

# RFC 9110 tchar, minus the letters and digits (checked by translate(None, ...))
_TCHAR = (b"!#$%&'*+-.^_`|~0123456789"
          b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_HEX = b"0123456789abcdefABCDEF"
_DIGITS = b"0123456789"
_MAX_METHOD = 24
_VERSIONS = frozenset(b"HTTP/%d.%d" % (a, b) for a in range(10) for b in range(10))
_METHODS = frozenset((b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH"))
_TEXT = {b: b.decode() for b in _METHODS | _VERSIONS}  # their str, without decoding each time
_SUMMARY_LAST = 5

_OBSERVE = Offload(FORWARD, observe=OBSERVE_PAYLOAD)
DEFAULTS = {"max_header_bytes": 8192, "max_records": 32, "max_errors": 8, "max_field_bytes": 256}


def _request_line(line: bytes):
    """(method, target, version) of a request line, or None if it is not one."""
    parts = line.split()
    if len(parts) != 3 or parts[2] not in _VERSIONS:
        return None
    method = parts[0]
    if method not in _METHODS and (len(method) > _MAX_METHOD or method.translate(None, _TCHAR)):
        return None
    return parts


def _status_line(line: bytes):
    """(version, status, reason) of a status line, or None if it is not one."""
    parts = line.split(b" ", 2)
    if len(parts) < 2 or parts[0] not in _VERSIONS or len(parts[1]) != 3 or parts[1].translate(None, _DIGITS):
        return None
    return parts[0], int(parts[1]), parts[2].strip() if len(parts) == 3 else b""


def _looks_like_start(blob: bytes, start: int, end: int, is_request: bool) -> bool:
    """Could blob[start:end], the beginning of a header block, start an HTTP message?"""
    nl = blob.find(b"\n", start, end)
    if nl >= 0:  # the start line is complete: it must be a valid one
        line = blob[start:nl].rstrip(b"\r")
        return (_request_line(line) if is_request else _status_line(line)) is not None
    if not is_request:
        head = blob[start:min(end, start + 5)]
        return head == b"HTTP/"[:len(head)]
    # the method so far, split as the whole line will be (on any whitespace)
    tokens = blob[start:min(end, start + _MAX_METHOD + 1)].split(None, 1)
    if not tokens:
        return True
    return len(tokens[0]) <= _MAX_METHOD and not tokens[0].translate(None, _TCHAR)


def _values(block: bytes, low: bytes, name: bytes) -> list:
    """Every value of the field `name` ("\\nname:", lowercase) in a header block."""
    values = []
    i = low.find(name)
    while i >= 0:
        i += len(name)
        e = low.find(b"\n", i)  # always found: a block ends with an empty line
        values.append(block[i:e].strip())
        i = low.find(name, e)
    return values


def _push(lst: list, item, cap: int) -> None:
    lst.append(item)
    if len(lst) > cap:
        del lst[:len(lst) - cap]


@register
class HttpParser(NetworkFunction):
    name = "http_parser"
    type_id = 3
    config_keys = frozenset(DEFAULTS)

    max_header_bytes = DEFAULTS["max_header_bytes"]
    max_records = DEFAULTS["max_records"]
    max_errors = DEFAULTS["max_errors"]
    max_field_bytes = DEFAULTS["max_field_bytes"]

    def init(self, config: dict) -> None:
        config = self.check_config(config)
        values = {**DEFAULTS, **config}
        for key, value in values.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise NFError(f"http_parser.{key}: must be a positive integer, not {value!r}")
        if values["max_header_bytes"] < 64:
            raise NFError("http_parser.max_header_bytes: must be at least 64")
        for key, value in values.items():  # all checked: apply
            setattr(self, key, value)
        self.config = config

    def allocate_flow_state(self) -> dict:
        return {
            "requests": [], "responses": [], "n_requests": 0, "n_responses": 0,
            "errors": [], "n_errors": 0, "special": [], "answered": 0,
            "dirs": [{"seq": -1, "mode": HEADER, "buf": b"", "left": 0, "desync": False},
                     {"seq": -1, "mode": HEADER, "buf": b"", "left": 0, "desync": False}],
        }

    def offload(self, state) -> Offload:
        return _OBSERVE  # copies of the frames with payload suffice (SYNs come inline, before any offload)

    def absorb(self, state, counts) -> None:
        lost = sum(counts.observe_lost)
        if lost:
            state["observe_gaps"] = state.get("observe_gaps", 0) + lost

    # --- per packet: the TCP stream ------------------------------------------
    def process_packet(self, pkt, state) -> bool:
        if pkt.proto != TCP:
            return True
        start, end = pkt.bounds()
        n = end - start
        if not n:  # pure ACK (or FIN/RST): only a SYN tells us anything
            d = state["dirs"][pkt.direction]
            if d["seq"] < 0 and pkt.tcp_flags & TCP_SYN:
                d["seq"] = (pkt.seq + 1) & _MASK
            return True
        direction = pkt.direction
        d = state["dirs"][direction]
        mode = d["mode"]
        if d["desync"] or mode in _STOPPED:
            return True
        f, l4 = pkt.frame, pkt.l4  # a segment with payload has its TCP header (l4 >= 0)
        flags = f[l4 + 13]
        if flags & TCP_RST:  # data on a RST is a diagnostic, not stream content
            return True
        seq = (f[l4 + 4] << 24) | (f[l4 + 5] << 16) | (f[l4 + 6] << 8) | f[l4 + 7]
        if flags & TCP_SYN:  # data on a SYN (TCP Fast Open) starts after the SYN
            seq = (seq + 1) & _MASK
            if d["seq"] < 0:
                d["seq"] = seq
        expected = d["seq"]
        if expected < 0:
            expected = seq
        old = (expected - seq) & _MASK
        if old:
            if old >= _HALF:  # data after a hole: lost or reordered, we cannot parse on
                self._fail(state, d, direction, f"seq gap ({(seq - expected) & _MASK} bytes missing)")
                return True
            if old >= n:      # a pure retransmission
                return True
            start += old  # overlap: keep the new bytes only
            n -= old
        d["seq"] = (expected + n) & _MASK
        if (mode == BODY or mode == CHUNK_DATA) and d["left"] >= n:  # all body: no copy
            d["left"] -= n
            if not d["left"]:
                d["mode"] = HEADER if mode == BODY else CHUNK_END
            return True
        data = bytes(f[start:start + n])
        if (mode == HEADER and not d["buf"] and n <= self.max_header_bytes and data[-4:] == b"\r\n\r\n"
                and data.find(b"\n\r\n") == n - 3 and data.find(b"\n\n") < 0 and data[0] != 13 and data[0] != 10):
            # The common case: the segment is one whole header block (what _header
            # would find, without its search for where the block ends)
            self._message(state, d, direction, data)
        else:
            self._feed(state, d, direction, data)
        return True

    # --- the HTTP/1.x byte stream ------------------------------------------------
    def _feed(self, state: dict, d: dict, direction: int, data: bytes) -> None:
        pos, n = 0, len(data)
        while pos < n and not d["desync"]:
            mode = d["mode"]
            if mode == HEADER:
                pos = self._header(state, d, direction, data, pos, n)
            elif mode == BODY or mode == CHUNK_DATA:
                take = min(d["left"], n - pos)
                pos += take
                d["left"] -= take
                if not d["left"]:
                    d["mode"] = HEADER if mode == BODY else CHUNK_END
            elif mode == CHUNK_SIZE or mode == CHUNK_END or mode == TRAILER:
                line, pos = self._line(state, d, direction, data, pos, n)
                if line is not None:
                    self._chunk_line(state, d, direction, mode, line)
            else:  # close, tunnel: nothing more to parse in this direction
                return

    def _line(self, state, d, direction, data, pos, n):
        """One line of a chunked body (without its CR LF), or None if incomplete."""
        i = data.find(b"\n", pos)
        if i < 0:
            buf = d["buf"] + data[pos:]
            if len(buf) > self.max_header_bytes:
                self._fail(state, d, direction, "chunk line too long")
            else:
                d["buf"] = buf
            return None, n
        line = data[pos:i]
        if d["buf"]:
            line = d["buf"] + line
            d["buf"] = b""
        if line[-1:] == b"\r":
            line = line[:-1]
        return line, i + 1

    def _chunk_line(self, state, d, direction, mode, line: bytes) -> None:
        if mode == CHUNK_SIZE:
            size = line.split(b";", 1)[0].strip(b" \t")
            if not size or len(size) > 16 or size.translate(None, _HEX):
                self._fail(state, d, direction, "bad chunk size")
                return
            d["left"] = int(size, 16)
            d["mode"] = CHUNK_DATA if d["left"] else TRAILER
        elif mode == CHUNK_END:
            if line:
                self._fail(state, d, direction, "bad chunk end")
            else:
                d["mode"] = CHUNK_SIZE
        elif line:  # a trailer field: skipped, but bounded like a header block
            d["left"] += len(line) + 2
            if d["left"] > self.max_header_bytes:
                self._fail(state, d, direction, "header too large")
        else:  # the empty line that ends the message
            d["mode"] = HEADER
            d["left"] = 0

    def _header(self, state, d, direction, data: bytes, pos: int, n: int) -> int:
        """Look for the end of a header block starting at data[pos] (after d["buf"]);
        parse it when complete, else keep it in d["buf"].  Returns the new pos."""
        limit = self.max_header_bytes
        is_request = direction == 0
        buf = d["buf"]
        if buf:
            blob = buf + data[pos:pos + limit + 4]
            start, search = 0, max(0, len(buf) - 2)
        else:
            while pos < n and (data[pos] == 13 or data[pos] == 10):  # empty lines between messages
                pos += 1
            if pos == n:
                return n
            blob, start, search = data, pos, pos
        bound = start + limit + 4
        end = blob.find(b"\n\r\n", search, bound)
        if end >= 0:
            lf = blob.find(b"\n\n", search, end + 1)
            end = lf + 2 if lf >= 0 else end + 3
        else:
            end = blob.find(b"\n\n", search, bound)
            if end >= 0:
                end += 2
        if end < 0:  # incomplete: keep it, if it is small and looks like HTTP
            total = len(buf) + n - pos
            if not _looks_like_start(blob, start, min(len(blob), bound), is_request):
                self._fail(state, d, direction, "not http")
            elif total > limit:
                self._fail(state, d, direction, "header too large")
            else:
                d["buf"] = blob[start:] if not buf else blob
            return n
        d["buf"] = b""
        block = blob[start:end]
        new_pos = pos + end - len(buf) if buf else end
        if len(block) > limit:
            self._fail(state, d, direction,
                       "header too large" if _looks_like_start(block, 0, len(block), is_request) else "not http")
            return new_pos
        self._message(state, d, direction, block)
        return new_pos

    def _message(self, state, d, direction: int, block: bytes) -> None:
        """A complete header block (start line to empty line, within the limit)."""
        line = block[:block.find(b"\n")].rstrip(b"\r")
        if direction == 0:
            self._request(state, d, line, block)
        else:
            self._response(state, d, line, block)

    @staticmethod
    def _fields(block: bytes) -> tuple:
        """(Host, [Content-Length values], Transfer-Encoding) of a header block
        (None when absent).  Field names are matched at line starts of the
        lowercased block: faster than splitting it into lines."""
        low = block.lower()
        i = low.find(b"\nhost:")
        host = block[i + 6:low.find(b"\n", i + 6)].strip() if i >= 0 else None  # the first Host
        lengths = codings = None
        if low.find(b"\ncontent-length:") >= 0:
            lengths = [v.strip() for value in _values(block, low, b"\ncontent-length:") for v in value.split(b",")]
        if low.find(b"\ntransfer-encoding:") >= 0:
            codings = b",".join(_values(block, low, b"\ntransfer-encoding:")).lower()
        return host, lengths, codings

    def _text(self, b: bytes) -> str:
        """A recorded field: at most max_field_bytes once encoded, which is
        what the flow's state carries (a byte that is not UTF-8 becomes the
        four characters of its escape, so cutting the bytes is not enough)."""
        limit = self.max_field_bytes
        b = b[:limit]
        if b.isascii():
            return b.decode("ascii")
        text = b.decode("utf-8", "backslashreplace")
        if len(text.encode()) <= limit:
            return text
        lo, hi = 0, len(b)  # the longest prefix that fits (found by halving; it always fits)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if len(b[:mid].decode("utf-8", "backslashreplace").encode()) <= limit:
                lo = mid
            else:
                hi = mid - 1
        return b[:lo].decode("utf-8", "backslashreplace")

    def _content_length(self, state, d, direction, lengths: list):
        first = lengths[0]
        if (not first or len(first) > 18 or first.translate(None, _DIGITS)
                or any(v != first for v in lengths)):
            self._fail(state, d, direction, "bad content-length")
            return None
        return int(first)

    def _body(self, state, d, direction, lengths, te) -> None:
        """Set the mode for a message body given its framing headers."""
        if te is not None:
            if te.rsplit(b",", 1)[-1].strip() == b"chunked":
                d["mode"] = CHUNK_SIZE
            elif direction == 0:  # a request body needs a length
                self._fail(state, d, direction, "bad transfer-encoding")
            else:
                d["mode"] = CLOSE
        elif lengths is not None:
            length = self._content_length(state, d, direction, lengths)
            if length:
                d["mode"], d["left"] = BODY, length
        elif direction == 1:
            d["mode"] = CLOSE

    def _request(self, state, d, line: bytes, block: bytes) -> None:
        parts = _request_line(line)
        if parts is None:
            self._fail(state, d, 0, "not http")
            return
        method, target, version = parts
        host, lengths, te = self._fields(block)
        text = _TEXT.get(method) or method.decode("ascii")
        limit = self.max_field_bytes
        requests = state["requests"]
        requests.append({"method": text,
                         "path": target.decode() if len(target) <= limit and target.isascii() else self._text(target),
                         "host": (host.decode() if len(host) <= limit and host.isascii() else self._text(host))
                         if host else "", "version": _TEXT[version]})
        if len(requests) > self.max_records:
            del requests[:len(requests) - self.max_records]
        ordinal = state["n_requests"]
        state["n_requests"] = ordinal + 1
        if method == b"PRI" and version == b"HTTP/2.0":  # HTTP/2 with prior knowledge
            self._tunnel(state)
            return
        if text == "HEAD" or text == "CONNECT":
            _push(state["special"], [ordinal, text], self.max_records)
            if text == "CONNECT":  # what follows is tunnel data (or, after a refusal, lost to us)
                d["mode"], d["buf"] = TUNNEL, b""
                return
        self._body(state, d, 0, lengths, te)

    def _response(self, state, d, line: bytes, block: bytes) -> None:
        parts = _status_line(line)
        if parts is None:
            self._fail(state, d, 1, "not http")
            return
        version, status, reason = parts
        _push(state["responses"], {"status": status, "reason": self._text(reason),
                                   "version": version.decode("ascii")}, self.max_records)
        state["n_responses"] += 1
        if status < 200:  # interim: no body, and the final response is still to come
            if status == 101:
                self._tunnel(state)
            return
        answered = state["answered"]
        state["answered"] = answered + 1
        special = state["special"]
        while special and special[0][0] < answered:
            del special[0]
        method = None
        if special and special[0][0] == answered:
            method = special.pop(0)[1]
        if method == "HEAD" or status == 204 or status == 304:
            return
        if method == "CONNECT" and status < 300:
            self._tunnel(state)
            return
        _, lengths, te = self._fields(block)
        self._body(state, d, 1, lengths, te)

    # --- bookkeeping ---------------------------------------------------------------
    @staticmethod
    def _tunnel(state) -> None:
        for d in state["dirs"]:
            d["mode"], d["buf"], d["left"] = TUNNEL, b"", 0

    def _fail(self, state, d, direction: int, error: str) -> None:
        d["desync"] = True
        d["buf"] = b""
        d["left"] = 0
        state["n_errors"] += 1
        if len(state["errors"]) < self.max_errors:
            state["errors"].append({"dir": _DIR_NAMES[direction], "error": error})

    def summary(self, state) -> dict:
        dirs = state["dirs"]
        return {
            "n_requests": state["n_requests"],
            "n_responses": state["n_responses"],
            "last_requests": [f"{r['method']} {r['path'][:64]}" for r in state["requests"][-_SUMMARY_LAST:]],
            "last_statuses": [r["status"] for r in state["responses"][-_SUMMARY_LAST:]],
            "errors": [f"{e['dir']}: {e['error']}" for e in state["errors"]],
            "n_errors": state["n_errors"],
            "in_sync": {name: not d["desync"] for name, d in zip(_DIR_NAMES, dirs)},
            "mode": {name: d["mode"] for name, d in zip(_DIR_NAMES, dirs)},
            "observe_gaps": state.get("observe_gaps", 0),
        }
