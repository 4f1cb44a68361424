"""Test and demo traffic with real sockets, run inside the testbed's host
namespaces (`ip netns exec NS python -m nfactor_xdp.tools.traffic ...`); each tool
prints one JSON object when done.

  udp-sink    receive sequence-numbered datagrams, optionally echo them back
  udp-send    send K sequence-numbered datagrams on each of N flows, paced,
              and collect the echoes
  http-serve  a threaded HTTP server that serves N bytes of a seeded stream
  http-get    fetch URLs over many TCP connections, checking size and digest
  frames-send     send raw Ethernet frames (hex, a JSON list on stdin)
  frames-sniff    capture the frames an interface receives from one MAC

Payload of a datagram: magic, flow id, sequence number, then padding.
"""
from __future__ import annotations

import argparse
import hashlib
import http.server
import json
import random
import select
import socket
import socketserver
import struct
import sys
import time
import urllib.request

MAGIC = 0x4E464158  # "NFAX"
HDR = struct.Struct("!III")


def _socket(family: int, bind: tuple, rcvbuf: int = 8 << 20) -> socket.socket:
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, rcvbuf)
    if bind[1]:  # a port of our choosing; never for an ephemeral one, which two sockets could then share
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(bind)
    return s


def _family(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def udp_sink(a) -> dict:
    s = _socket(_family(a.bind), (a.bind, a.port))
    s.setblocking(False)
    seqs: dict[str, list[int]] = {}
    bad = received = 0
    deadline = time.monotonic() + a.timeout
    last = time.monotonic()
    print(json.dumps({"ready": True}), flush=True)
    while time.monotonic() < deadline:
        if a.expect and received >= a.expect:
            break
        if a.idle and received and time.monotonic() - last > a.idle:
            break
        r, _, _ = select.select([s], [], [], 0.05)
        if not r:
            continue
        while True:
            try:
                data, peer = s.recvfrom(65535)
            except BlockingIOError:
                break
            received += 1
            last = time.monotonic()
            if len(data) < HDR.size or HDR.unpack_from(data)[0] != MAGIC:
                bad += 1
                continue
            _, flow, seq = HDR.unpack_from(data)
            seqs.setdefault(f"{peer[0]}:{peer[1]}", []).append(seq)
            if a.echo:
                s.sendto(data, peer)
    if a.brief:
        return {"received": received, "bad": bad, "flows": _brief(seqs)}
    return {"received": received, "bad": bad, "flows": seqs}


def _brief(seqs: dict[str, list[int]]) -> dict:
    """Per flow: how many, and whether they came exactly once and in order."""
    return {k: {"count": len(v), "in_order": v == list(range(len(v)))} for k, v in seqs.items()}


def udp_send(a) -> dict:
    fam = _family(a.dst)
    bind = a.src or ("::" if fam == socket.AF_INET6 else "0.0.0.0")
    socks = [_socket(fam, (bind, a.base_port + i if a.base_port else 0)) for i in range(a.flows)]
    for s in socks:
        s.setblocking(False)
    pad = b"\0" * max(0, a.size - HDR.size)
    interval = 1.0 / a.pps if a.pps else 0.0
    echoes: dict[str, list[int]] = {}
    sent = 0
    start = time.monotonic()

    def drain(timeout: float) -> None:
        r, _, _ = select.select(socks, [], [], timeout)
        for s in r:
            while True:
                try:
                    data = s.recv(65535)
                except BlockingIOError:
                    break
                if len(data) >= HDR.size:
                    _, flow, seq = HDR.unpack_from(data)
                    echoes.setdefault(str(s.getsockname()[1]), []).append(seq)

    for seq in range(a.packets):
        for i, s in enumerate(socks):
            while True:
                try:
                    s.sendto(HDR.pack(MAGIC, i, seq) + pad, (a.dst, a.port))
                    break
                except BlockingIOError:
                    drain(0.001)
            sent += 1
            if interval:
                # until this datagram's send time: an echo arriving ends drain() early
                while (ahead := start + sent * interval - time.monotonic()) > 0:
                    drain(ahead)
        if a.echo and not interval:
            drain(0)
    if a.echo:
        deadline = time.monotonic() + a.echo_wait
        while time.monotonic() < deadline and sum(map(len, echoes.values())) < sent:
            drain(0.05)
    ports = {str(s.getsockname()[1]): i for i, s in enumerate(socks)}
    return {"sent": sent, "flows": a.flows, "packets": a.packets, "ports": ports,
            "elapsed": time.monotonic() - start, "echoed": sum(map(len, echoes.values())),
            "echoes": _brief(echoes) if a.brief else echoes}


def _stream(seed: int, size: int):
    rnd = random.Random(seed)
    left = size
    while left:
        n = min(left, 65536)
        yield rnd.randbytes(n)
        left -= n


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are two writes: no delayed-ACK stall between them

    def do_GET(self):  # /<bytes>/<seed>
        try:
            _, size, seed = self.path.split("/")[:3]
            size, seed = int(size), int(seed)
        except ValueError:
            size, seed = 1024, 0
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(size))
        self.end_headers()
        for chunk in _stream(seed, size):
            self.wfile.write(chunk)

    def log_message(self, *args):
        pass


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def http_serve(a) -> dict:
    srv_cls = _Server
    if ":" in a.bind:
        srv_cls = type("_Server6", (_Server,), {"address_family": socket.AF_INET6})
    srv = srv_cls((a.bind, a.port), _Handler)
    print(json.dumps({"ready": True}), flush=True)
    srv.timeout = 0.2
    deadline = time.monotonic() + a.timeout
    while time.monotonic() < deadline:
        srv.handle_request()
    return {"served": True}


def http_get(a) -> dict:
    host = f"[{a.host}]" if ":" in a.host else a.host
    results = []
    deadline = time.monotonic() + a.duration if a.duration else None
    i = 0
    while True:
        seed = a.seed + i
        url = f"http://{host}:{a.port}/{a.size}/{seed}"
        expect = hashlib.sha256(b"".join(_stream(seed, a.size))).hexdigest()
        t0 = time.monotonic()
        try:
            with urllib.request.urlopen(url, timeout=a.timeout) as r:
                h = hashlib.sha256()
                n = 0
                while chunk := r.read(65536):
                    h.update(chunk)
                    n += len(chunk)
            results.append({"seed": seed, "bytes": n, "ok": n == a.size and h.hexdigest() == expect,
                            "seconds": round(time.monotonic() - t0, 4)})
        except OSError as e:
            results.append({"seed": seed, "ok": False, "error": str(e)})
        i += 1
        if deadline is None and i >= a.count:
            break
        if deadline is not None and time.monotonic() >= deadline:
            break
    return {"requests": len(results), "ok": sum(r["ok"] for r in results), "results": results}


def _keepalive_client(sock, host: str, size: int, until: float, count: int, rate: float, out: dict) -> None:
    """Requests on one kept-alive connection until `until` or `count`, at
    most `rate` per second (0: one after the other); each response checked
    (status 200, Content-Length bytes of body)."""
    req = f"GET /{size}/1 HTTP/1.1\r\nHost: {host}\r\nUser-Agent: nfactor-http-load\r\n\r\n".encode()
    f = sock.makefile("rb")
    next_at = time.monotonic()
    while (not count or out["requests"] < count) and time.monotonic() < until:
        if rate:
            next_at += 1 / rate
            wait = next_at - time.monotonic()
            if wait > 0:
                time.sleep(wait)
        out["requests"] += 1
        try:
            sock.sendall(req)
            status = f.readline().split(b" ", 2)
            length = None
            while (line := f.readline()) not in (b"\r\n", b"\n", b""):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            body = f.read(length or 0)
        except OSError as e:
            out["errors"].append(str(e))
            return
        if len(status) >= 2 and status[1] == b"200" and length == size and len(body) == size:
            out["ok"] += 1
        else:
            out["errors"].append(f"bad response: {status!r}, {length} bytes announced, {len(body)} read")
            return


def http_load(a) -> dict:
    """HTTP/1.1 keep-alive load: `connections` connections, each sending
    requests one after the other for `duration` seconds (or `count` each).
    Prints {"ready"} once connected, {"done", ...} with the counts when the
    load ends, then holds the connections open for `hold` seconds (so their
    flows can be looked at before they end) and returns the counts."""
    import threading
    fam = _family(a.host)
    socks = []
    for _ in range(a.connections):
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.settimeout(a.timeout)
        s.connect((a.host, a.port))
        socks.append(s)
    print(json.dumps({"ready": True}), flush=True)
    until = time.monotonic() + (a.duration or 1e9)
    outs = [{"requests": 0, "ok": 0, "errors": []} for _ in socks]
    threads = [threading.Thread(target=_keepalive_client,
                                args=(s, a.host, a.size, until, a.count, a.rate / len(socks), o))
               for s, o in zip(socks, outs)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    result = {"requests": sum(o["requests"] for o in outs), "ok": sum(o["ok"] for o in outs),
              "errors": [e for o in outs for e in o["errors"]][:10], "elapsed": round(elapsed, 3),
              "per_connection": [o["ok"] for o in outs]}
    print(json.dumps({"done": True, **result}), flush=True)
    time.sleep(a.hold)
    for s in socks:
        s.close()
    return result


def tcp_hostile(a) -> dict:
    """Send something hostile to an HTTP server over one TCP connection."""
    rnd = random.Random(a.seed)
    if a.mode == "huge-header":
        parts = [b"GET /huge HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * a.size + b"\r\n\r\n"]
    elif a.mode == "junk":
        parts = [rnd.randbytes(a.size)]
    elif a.mode == "bytewise":
        req = b"GET /bytewise/path HTTP/1.1\r\nHost: byte.example\r\nConnection: close\r\n\r\n"
        parts = [req[i:i + 1] for i in range(len(req))]
    else:
        raise SystemExit(f"unknown mode {a.mode}")
    fam = _family(a.host)
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.settimeout(a.timeout)
    s.connect((a.host, a.port))
    sent = 0
    reply = b""
    try:
        for part in parts:
            try:
                s.sendall(part)
            except (BrokenPipeError, ConnectionResetError):
                break  # the server gave up on us first: that is an answer too
            sent += len(part)
            if len(parts) > 1:
                time.sleep(0.002)  # pacing: one segment per byte on the wire
        try:
            while chunk := s.recv(65536):
                reply += chunk
                if a.mode == "bytewise" and b"\r\n\r\n" in reply and len(reply) > 100:
                    break
        except (socket.timeout, ConnectionResetError):
            pass
    finally:
        s.close()
    return {"sent": sent, "reply_bytes": len(reply), "status_line": reply.split(b"\r\n", 1)[0].decode(errors="replace")}


def frames_send(a) -> dict:
    frames = [bytes.fromhex(h) for h in json.load(sys.stdin)]
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
        s.bind((a.ifname, 0))
        for f in frames:
            s.send(f)
            time.sleep(a.gap)
    return {"sent": len(frames)}


_SOL_PACKET, _PACKET_AUXDATA = 263, 8
_TP_STATUS_VLAN_VALID, _TP_STATUS_VLAN_TPID_VALID = 1 << 4, 1 << 6
_AUXDATA = struct.Struct("=IIIHHHH")  # struct tpacket_auxdata (the part that matters)


def frames_sniff(a) -> dict:
    """Frames from --src-mac as they arrived, their outer VLAN tag put back
    (the kernel takes it off before a packet socket sees the frame)."""
    src = bytes.fromhex(a.src_mac.replace(":", ""))
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))  # ETH_P_ALL
    s.setsockopt(_SOL_PACKET, _PACKET_AUXDATA, 1)
    s.bind((a.ifname, 0))
    s.settimeout(0.05)
    frames = []
    deadline = time.monotonic() + a.duration
    print(json.dumps({"ready": True}), flush=True)
    while time.monotonic() < deadline and len(frames) < a.max:
        try:
            data, anc, _, addr = s.recvmsg(65535, socket.CMSG_SPACE(_AUXDATA.size))
        except socket.timeout:
            continue
        if data[6:12] != src or addr[2] == socket.PACKET_OUTGOING:
            continue
        for level, kind, raw in anc:
            if level == _SOL_PACKET and kind == _PACKET_AUXDATA and len(raw) >= _AUXDATA.size:
                status, _, _, _, _, tci, tpid = _AUXDATA.unpack_from(raw)
                if status & _TP_STATUS_VLAN_VALID:
                    tpid = tpid if status & _TP_STATUS_VLAN_TPID_VALID else 0x8100
                    data = data[:12] + struct.pack("!HH", tpid, tci) + data[12:]
        frames.append(data.hex())
    s.close()
    return {"frames": frames}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="nfactor-traffic", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("udp-sink")
    p.add_argument("--bind", default="0.0.0.0")
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--expect", type=int, default=0, help="stop after this many datagrams")
    p.add_argument("--idle", type=float, default=0.0, help="stop after this long without datagrams")
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--echo", action="store_true")
    p.add_argument("--brief", action="store_true", help="per-flow counts instead of sequence lists")
    p = sub.add_parser("udp-send")
    p.add_argument("--dst", required=True)
    p.add_argument("--src")
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--flows", type=int, default=10)
    p.add_argument("--packets", type=int, default=100)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--pps", type=float, default=2000.0, help="total send rate (0: as fast as possible)")
    p.add_argument("--base-port", type=int, default=0)
    p.add_argument("--echo", action="store_true")
    p.add_argument("--echo-wait", type=float, default=5.0)
    p.add_argument("--brief", action="store_true", help="per-flow counts instead of sequence lists")
    p = sub.add_parser("http-serve")
    p.add_argument("--bind", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--timeout", type=float, default=60.0)
    p = sub.add_parser("http-get")
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--size", type=int, default=1 << 20)
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--duration", type=float, default=0.0, help="repeat requests for this long instead")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--timeout", type=float, default=20.0)
    p = sub.add_parser("http-load")
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--connections", type=int, default=4)
    p.add_argument("--size", type=int, default=100, help="response body bytes")
    p.add_argument("--duration", type=float, default=0.0, help="seconds of load (0: --count requests each)")
    p.add_argument("--count", type=int, default=0, help="requests per connection (0: for --duration)")
    p.add_argument("--rate", type=float, default=0.0, help="requests per second in all (0: as fast as they go)")
    p.add_argument("--hold", type=float, default=0.0, help="seconds to keep the connections open after the load")
    p.add_argument("--timeout", type=float, default=20.0)
    p = sub.add_parser("tcp-hostile")
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--mode", choices=["huge-header", "junk", "bytewise"], required=True)
    p.add_argument("--size", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--timeout", type=float, default=10.0)
    p = sub.add_parser("frames-send")
    p.add_argument("--ifname", default="eth0")
    p.add_argument("--gap", type=float, default=0.001, help="seconds between two frames")
    p = sub.add_parser("frames-sniff")
    p.add_argument("--ifname", default="eth0")
    p.add_argument("--src-mac", required=True)
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--max", type=int, default=10_000)
    a = ap.parse_args(argv)
    fn = {"udp-sink": udp_sink, "udp-send": udp_send, "http-serve": http_serve, "http-get": http_get,
          "http-load": http_load, "tcp-hostile": tcp_hostile, "frames-send": frames_send, "frames-sniff": frames_sniff}[a.cmd]
    print(json.dumps(fn(a)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
