"""The `flows` query answers in pages (no root, a runtime without an AF_XDP
socket): each page takes bounded time whatever the number of flows, the pages
together name every flow once, and the runtime's loop forwards frames
between two pages."""
from __future__ import annotations

import gc
import itertools
import os
import threading
import time

from nfactor_xdp.dataplane.packet import classify
from nfactor_xdp.dataplane.rules import Policy
from nfactor_xdp.dataplane.runtime import Runtime
from nfactor_xdp.formats import query
from nfactor_xdp.formats.config import NodeConfig
from tests.runtime_fakes import udp

HEARTBEAT_WINDOW = NodeConfig().heartbeat * NodeConfig().miss_limit


BASE = classify(udp())[1]


def key(i: int) -> bytes:
    """Flow i's key: flows differ in their first address."""
    return i.to_bytes(16, "big") + BASE[16:]


def runtime_with_flows(n: int) -> Runtime:
    rt = Runtime(NodeConfig(name="t"), 0, policy=Policy.from_dict({"default_chain": ["flow_monitor"]}))
    for i in range(n):
        rt.flows.add(rt.make_actor(key(i), 0, 1, 0))
    return rt


def pages(ask, **args):
    """Every page of the flows query; yields (reply, seconds it took)."""
    cursor = None
    while True:
        t = time.perf_counter()
        reply = ask({"op": "flows", **args, **({"cursor": cursor} if cursor else {})})
        yield reply, time.perf_counter() - t
        cursor = reply.get("cursor")
        if not cursor:
            return


def test_a_hundred_thousand_flows_in_pages_of_bounded_time_each_named_once():
    rt = runtime_with_flows(100_000)
    seen, worst, n = [], 0.0, 0
    gc.disable()  # a full collection of 100,000 actors' objects (~0.1 s) is not the query's time
    try:
        for reply, took in pages(rt.on_request):
            assert reply["ok"]
            seen += [f["key"] for f in reply["flows"]]
            worst, n = max(worst, took), n + 1
    finally:
        gc.enable()
    assert len(seen) == len(set(seen)) == 100_000 and set(seen) == {k.hex() for k in rt.flows}
    assert n > 1 and worst < HEARTBEAT_WINDOW / 3, (n, worst)
    print(f"\nMEASURED {n} pages, the slowest {worst * 1000:.1f} ms")


def test_flows_that_come_and_go_between_pages_are_named_at_most_once():
    rt = runtime_with_flows(5000)
    keys = list(rt.flows)
    gone = set(keys[::7])
    seen = []
    for i, (reply, _) in enumerate(pages(rt.on_request, limit=300)):
        seen += [f["key"] for f in reply["flows"]]
        if i == 2:
            for k in gone:
                rt.flows.remove(k)
            for j in range(100):  # new flows meanwhile
                rt.flows.add(rt.make_actor(key(10**6 + j), 0, 1, 0))
    assert len(seen) == len(set(seen))
    alive = {k.hex() for k in keys} - {k.hex() for k in gone}
    assert alive <= set(seen) <= {k.hex() for k in rt.flows} | {k.hex() for k in gone}


class LoadedSocket:
    """An AF_XDP socket that always has a batch of frames for the runtime."""

    def __init__(self):
        self.r, self.w = os.pipe()
        os.write(self.w, b"x")  # always readable
        self.fd = self.r
        self.batches = 0

    def forward_batch(self, handler, max_n: int = 64) -> int:
        self.batches += 1
        return max_n

    def close(self):
        os.close(self.r)
        os.close(self.w)


def test_the_runtime_forwards_frames_between_two_pages(tmp_path):
    rt = runtime_with_flows(20_000)
    rt.xsk = sock = LoadedSocket()
    at = []  # batches forwarded when each page was asked

    def on_request(req):
        at.append(sock.batches)
        return Runtime.on_request(rt, req)

    rt.ctl = query.Server(str(tmp_path / "rt.sock"), on_request)
    loop = threading.Thread(target=rt.run)
    loop.start()
    try:
        seen = []
        for reply, _ in pages(lambda req: query.request(str(tmp_path / "rt.sock"), timeout=10.0, **req)):
            seen += reply["flows"]
    finally:
        rt.stopping = True
        loop.join(10)
        rt.ctl.close()
        sock.close()
    assert len(seen) == 20_000 and len(at) > 1
    assert all(b > a for a, b in itertools.pairwise(at)), at  # frames went through between every two pages


def test_the_client_fetches_every_page(monkeypatch):
    from nfactor_xdp.control import node_client
    rt = runtime_with_flows(4321)
    asked = []

    def ask(name, rt_id, op, timeout=0.5, **args):
        asked.append(args)
        return rt.on_request({"op": op, **args})

    monkeypatch.setattr(node_client, "runtime_query", ask)
    got = node_client.runtime_flows("t", 0, detail=False)
    assert sorted(f["key"] for f in got) == sorted(k.hex() for k in rt.flows) and len(asked) > 1
    assert len(node_client.runtime_flows("t", 0, limit=700, detail=False)) == 700
