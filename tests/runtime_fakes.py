"""A runtime without sockets, for unit tests of its control side (migration,
replication, queries): a stand-in for its control endpoint that encodes what
it is given as the real one would and lets the test answer each request, and
a stand-in for its AF_XDP socket."""
from __future__ import annotations

from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from nfactor_xdp.dataplane.packet import classify
from nfactor_xdp.dataplane.rules import Policy
from nfactor_xdp.dataplane.runtime import Runtime
from nfactor_xdp.formats.config import NodeConfig
from nfactor_xdp.formats.messages import Message, MsgType, encode

KEY = b"k" * 32
AGENT = ("127.0.0.1", 9)


class Peers:
    """The runtime's control endpoint, without a socket: every message is
    encoded as the real endpoint does (a body too big for a control message
    raises MessageError), a None address fails as a socket's sendto() does,
    and requests wait until the test answers them."""

    def __init__(self):
        self.sent: list[tuple] = []     # (addr, type, body)
        self.waiting: list[tuple] = []  # (addr, type, body, on_reply, on_timeout)

    def send(self, addr, msg_type, body, rid=None):
        encode(msg_type, rid or 1, "rt0", body, KEY)
        if addr is None:
            raise TypeError("sendto(): an address is needed, not None")
        self.sent.append((addr, msg_type, body))
        return 1

    def reply(self, msg, addr, body):
        self.sent.append((addr, MsgType.REPLY, body))
        return msg.rid

    def request(self, addr, msg_type, body, on_reply, timeout=0.2, retries=3, on_timeout=None):
        self.send(addr, msg_type, body)
        self.waiting.append((addr, msg_type, body, on_reply, on_timeout))
        return 1

    def answer(self, body=None, only=None, addr=None) -> int:
        """Answer every waiting request (of type `only`, to `addr`), and those
        their answers make; `body` is the reply (default ok) or a function of
        the request's body.  Returns how many."""
        n = 0
        while True:
            todo = [w for w in self.waiting if (only is None or w[1] == only) and (addr is None or w[0] == addr)]
            if not todo:
                return n
            for w in todo:
                self.waiting.remove(w)
                reply = body(w[2]) if callable(body) else {"ok": True} if body is None else body
                w[3](Message(MsgType.REPLY, 1, "peer", reply, 0))
                n += 1

    def time_out(self, only=None) -> int:
        """Let waiting requests (of type `only`) time out."""
        todo = [w for w in self.waiting if only is None or w[1] == only]
        for w in todo:
            self.waiting.remove(w)
            if w[4] is not None:
                w[4](1)
        return len(todo)

    def to(self, msg_type, addr=None) -> list[tuple]:
        return [(a, body) for a, t, body in self.sent if t == msg_type and (addr is None or a == addr)]


class Sock:
    """What the runtime's AF_XDP socket offers it, for frames fed one at a time."""

    rx_packets = 0

    def __init__(self):
        self.sent: list[bytes] = []

    def send_frame(self, data) -> bool:
        self.sent.append(bytes(data))
        return True

    def reclaim(self) -> int:
        return 0


def view(me_state="running", peer_state="running", peer_addr=("127.0.0.1", 2), more=()) -> dict:
    """Runtime 0 (the one under test) and its peer 1 (none if peer_state is
    None); `more`: further entries."""
    rts = [{"id": 0, "state": me_state, "addr": ["127.0.0.1", 1]}]
    if peer_state:
        rts.append({"id": 1, "state": peer_state, "addr": list(peer_addr)})
    return {"version": 1, "runtimes": rts + list(more)}


def runtime(policy=None, **cfg) -> tuple[Runtime, Peers]:
    """Runtime 0, its peer 1 running; no replication unless snapshot_every is given."""
    cfg.setdefault("snapshot_every", 0)
    rt = Runtime(NodeConfig(name="t", **cfg), 0,
                 policy=Policy.from_dict(policy or {"default_chain": ["flow_monitor"]}))
    rt.xsk, ep = Sock(), Peers()
    rt.migrator.attach(ep, AGENT)
    rt.replicator.attach(ep)
    set_view(rt, view())
    return rt, ep


def set_view(rt: Runtime, body: dict) -> None:
    """The controller pushes a view."""
    rt.on_control(Message(MsgType.VIEW, 1, "controller", body, 0), None)


def udp(sport=5000, payload=b"x") -> memoryview:
    return memoryview(bytearray(bytes(Ether() / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=sport, dport=53)
                                      / payload)))


def flow(rt: Runtime, sport=5000):
    """The actor of a UDP flow, after its first frame."""
    assert rt.handle(udp(sport))
    return rt.flows.get(classify(udp(sport))[1])
