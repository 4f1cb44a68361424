"""The node's Prometheus endpoint, scraped from the node's namespace (where
it listens) under UDP traffic: its counters move, they agree with `status
--json` once traffic stops, it is off unless asked for, and a runtime that
hangs or dies during a scrape does not hold it up."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from nfactor_xdp.formats import config as nodeconf
from nfactor_xdp.kern import netns
from tests.helpers import Proc, run_tool, wait_for

pytestmark = [pytest.mark.root, pytest.mark.netns]

PORT = 9500
SCRAPE_BOUND = 3.0  # seconds: a runtime that does not answer costs at most its query timeout (0.5 s)


def scrape(node, timeout: float = 10.0) -> tuple[dict, float]:
    """(labels without node/host -> value per sample name, seconds it took)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with netns.entered(node.cfg.netns):  # the connection's socket is made in the node's namespace
        t0 = time.monotonic()
        body = opener.open(f"http://127.0.0.1:{PORT}/metrics", timeout=timeout).read().decode()
        took = time.monotonic() - t0
    out: dict = {}
    for fam in text_string_to_metric_families(body):
        for s in fam.samples:
            labels = dict(s.labels)
            assert labels.pop("node") == node.name and labels.pop("host") == socket.gethostname()
            out[s.name, tuple(sorted(labels.items()))] = s.value
    return out, took


def get(m: dict, name: str, **labels) -> float:
    return m[name, tuple(sorted((k, str(v)) for k, v in labels.items()))]


def figures(st: dict) -> dict:
    """What the test compares: every switch counter, the flow table, and each
    runtime's frame accounting and flows, as `status --json` has them."""
    out = {("switch", c): v for c, v in st["switch"].items()}
    out["switch_flows"] = st["switch_flows"]
    for rt in st["runtimes"]:
        i = rt["id"]
        for k in ("frames", "forwarded", "sent_later", "markers", "flows"):
            out[i, k] = rt[k]
        out.update({(i, "held", r): v for r, v in rt["held"].items()})
        out.update({(i, "dropped", r): v for r, v in rt["dropped"].items()})
        out.update({(i, "switch", c): v for c, v in rt["switch"].items()})
    return out


def metric_figures(m: dict, st: dict) -> dict:
    """The same figures, read from a scrape."""
    out = {("switch", c): get(m, "nfactor_switch_events_total", counter=c) for c in st["switch"]}
    out["switch_flows"] = get(m, "nfactor_switch_flows")
    names = {"frames": "nfactor_runtime_frames_received_total", "forwarded": "nfactor_runtime_frames_forwarded_total",
             "sent_later": "nfactor_runtime_frames_sent_later_total",
             "markers": "nfactor_runtime_frames_markers_total", "flows": "nfactor_runtime_flows"}
    for rt in st["runtimes"]:
        i = rt["id"]
        for k, name in names.items():
            out[i, k] = get(m, name, runtime=i)
        out.update({(i, "held", r): get(m, "nfactor_runtime_frames_held_total", runtime=i, reason=r)
                    for r in rt["held"]})
        out.update({(i, "dropped", r): get(m, "nfactor_runtime_frames_dropped_total", runtime=i, reason=r)
                    for r in rt["dropped"]})
        for c in rt["switch"]:
            name = ("nfactor_switch_runtime_flows_placed_total" if c == "flows_placed" else
                    "nfactor_switch_runtime_bytes_total" if c.endswith("_bytes") else
                    "nfactor_switch_runtime_frames_total")
            out[i, "switch", c] = get(m, name, runtime=i, **({} if c == "flows_placed" else {"counter": c}))
    return out


def test_counters_move_under_traffic_and_agree_with_status_json(node_factory):
    n = node_factory(2, metrics_port=PORT, offload="off")  # every frame through the runtimes' counters
    assert n.status()["metrics"]["restarts"] == 0
    wait_for(lambda: _answers(n), timeout=15, what="the metrics endpoint")
    flows, packets = 8, 500
    sink = Proc(n.dst_ns, "udp-sink", "--expect", str(flows * packets), "--timeout", "40", "--brief").wait_ready()
    sender = Proc(n.src_ns, "udp-send", "--dst", n.dst_ip, "--flows", str(flows), "--packets", str(packets),
                  "--pps", "1000", "--brief")

    def received(m):
        return sum(get(m, "nfactor_runtime_frames_received_total", runtime=i) for i in (0, 1))
    first = wait_for(lambda: (m := scrape(n)[0]) and received(m) > 0 and m, timeout=20, what="traffic in a scrape")
    second = wait_for(lambda: (m := scrape(n)[0]) and received(m) > received(first) and m, timeout=20,
                      what="counters moving")
    assert received(second) < flows * packets, "all traffic was through before the second scrape: nothing tested"
    for name, labels in (("nfactor_switch_events_total", {"counter": "rx_ext"}),
                         ("nfactor_switch_events_total", {"counter": "to_ext"}),
                         ("nfactor_xsk_frames_total", {"runtime": 0, "direction": "rx"})):
        assert get(second, name, **labels) > get(first, name, **labels), name
    assert sum(get(second, "nfactor_runtime_flows", runtime=i) for i in (0, 1)) == flows
    assert sender.result()["sent"] == flows * packets
    assert sink.result()["received"] == flows * packets

    # A quiet moment: two statuses that agree, a scrape between them, all three the same.
    # (A host's ARP or neighbour discovery can move a switch counter at any time: try again then.)
    def agreeing():
        before = n.status()
        m, _ = scrape(n)
        after = n.status()
        want = figures(before)
        return want == figures(after) and (want, metric_figures(m, before), m)
    want, got, m = wait_for(agreeing, timeout=30, interval=0.5, what="a quiet moment")
    assert got == want
    assert want[0, "frames"] + want[1, "frames"] == flows * packets
    assert want["switch", "rx_ext"] >= flows * packets
    for i in (0, 1):
        assert get(m, "nfactor_runtime_up", runtime=i) == 1
        assert get(m, "nfactor_runtime_state", runtime=i, state="running") == 1
        assert get(m, "nfactor_recovery_duration_seconds_count", runtime=i) == 1  # each runtime recovered as it started
        assert get(m, "nfactor_replication_snapshot_size_bytes_count", runtime=i) > 0  # every K=10 packets
    assert get(m, "nfactor_node_up") == 1
    # from the controller's view: its runtimes' last heartbeats (none yet just after a controller restart)
    wait_for(lambda: (m := scrape(n)[0]) and get(m, "nfactor_controller_up") == 1 and all(
        m.get(("nfactor_runtime_resident_memory_bytes", (("runtime", str(i)),)), 0) > 1e6 for i in (0, 1)),
        timeout=10, what="the runtimes' load in the controller's view")

    # a migration shows in the per-flow latency histogram
    moved = n.cli("migrate", "--name", n.name, "--from", "0", "--to", "1", "--all", "--json")
    assert moved.returncode == 0, moved.stderr
    m, _ = scrape(n)
    done = get(m, "nfactor_migration_events_total", runtime=0, counter="out_succeeded")
    assert done == get(m, "nfactor_migration_flow_duration_milliseconds_count", runtime=0) > 0
    assert get(m, "nfactor_migration_flow_duration_milliseconds_bucket", runtime=0, le="+Inf") == done


def _answers(n) -> bool:
    try:
        scrape(n, timeout=2)
        return True
    except OSError:
        return False


def _backlog(n, rt_id: int) -> int:
    """Connections waiting in the listen queue of runtime `rt_id`'s query socket."""
    path = nodeconf.runtime_socket(n.name, rt_id)
    out = subprocess.run(["ip", "netns", "exec", n.cfg.netns, "ss", "-Hxl", "src", path], capture_output=True,
                         text=True, check=True).stdout.split()
    return int(out[2])  # Netid State Recv-Q (for a listener: the queue) ...


def test_the_endpoint_is_off_by_default(node):
    st = node.status()
    assert "metrics" not in st and st["config"]["metrics_port"] == 0
    listening = subprocess.run(["ip", "netns", "exec", node.cfg.netns, "ss", "-Htln"], capture_output=True,
                               text=True, check=True).stdout
    assert listening.strip() == "", listening
    with pytest.raises(OSError):
        scrape(node, timeout=2)


def test_a_runtime_hung_or_killed_mid_scrape_does_not_hold_up_the_scrape(node_factory):
    n = node_factory(2, metrics_port=PORT)
    wait_for(lambda: _answers(n), timeout=15, what="the metrics endpoint")
    sink = Proc(n.dst_ns, "udp-sink", "--idle", "1", "--timeout", "20").wait_ready()
    run_tool(n.src_ns, "udp-send", "--dst", n.dst_ip, "--flows", "4", "--packets", "20", "--brief")
    sink.result()
    pid = n.status()["runtimes"][0]["pid"]
    os.kill(pid, signal.SIGSTOP)  # hung: its query socket takes the connection and never answers
    try:
        m, took = scrape(n)
        assert took < SCRAPE_BOUND, took
        assert get(m, "nfactor_runtime_up", runtime=0) == 0 and get(m, "nfactor_runtime_up", runtime=1) == 1
        assert get(m, "nfactor_runtime_frames_received_total", runtime=1) >= 0
        # killed while a scrape waits for it
        result: dict = {}
        waiting = _backlog(n, 0)  # connections the stopped runtime has not accepted
        scraper = threading.Thread(target=lambda: result.update(zip(("m", "took"), scrape(n))))
        scraper.start()
        wait_for(lambda: _backlog(n, 0) > waiting, timeout=SCRAPE_BOUND, what="the scrape to wait for runtime 0")
    finally:
        os.kill(pid, signal.SIGKILL)
    scraper.join(timeout=10)
    assert not scraper.is_alive() and result["took"] < SCRAPE_BOUND, result.get("took")
    assert get(result["m"], "nfactor_runtime_up", runtime=1) == 1
    # the supervisor restarts it; its new process's recovery adds to the old one's
    m = wait_for(lambda: (m := scrape(n)[0]) and get(m, "nfactor_runtime_up", runtime=0) == 1
                 and get(m, "nfactor_runtime_state", runtime=0, state="running") == 1 and m,
                 timeout=30, what="runtime 0 back")
    assert get(m, "nfactor_runtime_restarts_total", runtime=0) == 1
    assert get(m, "nfactor_recovery_duration_seconds_count", runtime=0) == 2
    assert get(m, "nfactor_recovery_last_flows", runtime=0) >= 1  # its flows came back from the snapshots
