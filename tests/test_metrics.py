"""The metrics endpoint's collector without a node (no root): what a status
dict (node_client.status, as `status --json` shows it) becomes, the runtimes'
bounded histograms, and their sum over a runtime's processes."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from nfactor_xdp.control.metrics import HistogramCarry, NodeCollector, families
from nfactor_xdp.control.node_client import NodeCtlError
from nfactor_xdp.dataplane.histogram import MIGRATION_MS, Histogram
from nfactor_xdp.formats.config import ConfigError, NodeConfig


def hist(counts, le=(1, 10), total=None):
    return {"le": list(le), "counts": list(counts), "count": sum(counts),
            "sum": float(sum(counts)) if total is None else total}


def runtime(rt_id: int, pid: int, live: bool = True, recovery=(0, 1, 0)) -> dict:
    rt = {"id": rt_id, "pid": pid, "core": rt_id, "port": f"rt{rt_id}", "restarts": 1, "state": "running",
          "switch_state": "running", "load": {"cpu": 0.25, "rss": 30_000_000, "flows": 3},
          "switch": {"to_rt_packets": 100, "to_rt_bytes": 6400, "from_rt_packets": 90, "from_rt_bytes": 5760,
                     "flows_placed": 3, "to_socket": 100, "no_socket": 2},
          "live": live}
    if live:
        rt.update({
            "frames": 100, "forwarded": 80, "sent_later": 4, "markers": 1, "flows": 3, "recovering": False,
            "held": {"migration": 4, "recovery": 0, "fragments": 0},
            "dropped": {"chain": 10, "not_flow": 5, "tx_ring_full": 0},
            "flows_created": 7, "flows_expired": 4, "flows_evicted": 0, "switch_entries_deleted": 4,
            "uptime": 12.5, "control_errors": 0,
            "limits": {"flows": {"limit": 100, "unit": "flows", "evicted": 2, "refused": 1},
                       "migrations_at_once": {"limit": 1000, "unit": "outgoing migrations", "queued": 6}},
            "xsk": {"rx_dropped": 3, "rx_ring_full": 1, "rx_packets": 100, "tx_packets": 84, "rx_bytes": 6400,
                    "tx_bytes": 5376, "free_frames": 2000, "fill_queued": 48, "zero_copy": False,
                    "tx_budget_set": True},
            "migration": {"out_started": 2, "out_succeeded": 2, "in_progress": 0, "not_migratable": 0,
                          "flow_ms": hist((1, 1, 0))},
            "replication": {"snapshots_sent": 9, "pending": 1, "holding": {"1": 5},
                            "recovery": {"phase": "done", "seconds": 0.002, "actors": 3},
                            "snapshot_bytes": hist((0, 8, 1)), "recovery_seconds": hist(recovery)},
        })
    return rt


STATUS = {
    "node": "n1", "phase": "running", "supervisor_alive": True,
    "xdp_modes": {"ext0": "native", "rt0": "native"}, "redirect_error_tracer": True,
    "switch": {"rx_ext": 200, "to_runtime": 195, "drop_bad_ip": 5, "flow_new": 6}, "switch_flows": 6,
    "switch_agent": {"restarts": 0}, "metrics": {"restarts": 2},
    "controller": {"alive": True, "view_version": 7, "rejected": {"bad_mac": 3}, "restarts": 1,
                   "stats": {"heartbeats": 40, "failures_detected": 1, "replayed_ops": 2, "restarted_at": 1.7e9}},
    "runtimes": [runtime(0, 100), runtime(1, 101, live=False)],
}


def samples(fams) -> dict:
    """(sample name, labels without node and host) -> value, through the text format."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(type("C", (), {"collect": lambda self: fams})())
    out = {}
    for fam in text_string_to_metric_families(generate_latest(reg).decode()):
        for s in fam.samples:
            assert s.labels.pop("node") == "n1" and s.labels.pop("host") == "h1", s
            out[s.name, tuple(sorted(s.labels.items()))] = s.value
    return out


def get(m: dict, name: str, **labels):
    return m[name, tuple(sorted((k, str(v)) for k, v in labels.items()))]


def test_a_status_dict_becomes_metrics_with_the_same_figures():
    m = samples(families(STATUS, "h1"))
    assert get(m, "nfactor_node_up") == 1
    assert get(m, "nfactor_switch_events_total", counter="rx_ext") == 200
    assert get(m, "nfactor_switch_events_total", counter="drop_bad_ip") == 5
    assert get(m, "nfactor_switch_flows") == 6
    assert get(m, "nfactor_xdp_attached_info", port="ext0", mode="native") == 1
    # the runtime's frame accounting: the same numbers as its status
    r = {"runtime": 0}
    assert get(m, "nfactor_runtime_frames_received_total", **r) == 100
    assert get(m, "nfactor_runtime_frames_forwarded_total", **r) == 80
    assert get(m, "nfactor_runtime_frames_sent_later_total", **r) == 4
    assert get(m, "nfactor_runtime_frames_markers_total", **r) == 1
    assert get(m, "nfactor_runtime_frames_held_total", reason="migration", **r) == 4
    assert get(m, "nfactor_runtime_frames_dropped_total", reason="chain", **r) == 10
    assert get(m, "nfactor_runtime_frames_dropped_total", reason="not_flow", **r) == 5
    assert get(m, "nfactor_runtime_flows", **r) == 3
    assert get(m, "nfactor_runtime_flows_created_total", **r) == 7
    assert get(m, "nfactor_runtime_cpu_ratio", **r) == 0.25
    assert get(m, "nfactor_runtime_resident_memory_bytes", **r) == 30_000_000
    assert get(m, "nfactor_runtime_state", state="running", **r) == 1
    assert get(m, "nfactor_runtime_state", state="failed", **r) == 0
    assert get(m, "nfactor_runtime_restarts_total", **r) == 1
    # limits: the bound, what it cost (counters), what waits (a gauge)
    assert get(m, "nfactor_runtime_limit", limit="flows", **r) == 100
    assert get(m, "nfactor_runtime_limit_hits_total", limit="flows", counter="evicted", **r) == 2
    assert get(m, "nfactor_runtime_limit_queued", limit="migrations_at_once", **r) == 6
    assert ("nfactor_runtime_limit_hits_total", (("counter", "queued"), ("limit", "migrations_at_once"),
                                                 ("runtime", "0"))) not in m
    # switch per runtime, AF_XDP rings
    assert get(m, "nfactor_switch_runtime_frames_total", counter="no_socket", **r) == 2
    assert get(m, "nfactor_switch_runtime_bytes_total", counter="to_rt_bytes", **r) == 6400
    assert get(m, "nfactor_switch_runtime_flows_placed_total", **r) == 3
    assert get(m, "nfactor_xsk_ring_events_total", counter="rx_dropped", **r) == 3
    assert get(m, "nfactor_xsk_frames_total", direction="tx", **r) == 84
    assert get(m, "nfactor_xsk_ring_frames", ring="fill_queued", **r) == 48
    assert get(m, "nfactor_xsk_zero_copy", **r) == 0
    # replication, migration, controller
    assert get(m, "nfactor_replication_events_total", counter="snapshots_sent", **r) == 9
    assert get(m, "nfactor_replication_pending_flows", **r) == 1
    assert get(m, "nfactor_replication_held_snapshots", peer="1", **r) == 5
    assert get(m, "nfactor_recovery_last_seconds", **r) == 0.002
    assert get(m, "nfactor_migration_events_total", counter="out_succeeded", **r) == 2
    assert get(m, "nfactor_controller_events_total", counter="heartbeats") == 40
    assert get(m, "nfactor_controller_replayed_ops") == 2
    assert get(m, "nfactor_controller_rejected_messages_total", reason="bad_mac") == 3
    assert get(m, "nfactor_process_restarts_total", process="metrics") == 2
    # only counters and gauges that are numbers: no "unit", no "phase", no booleans as counters
    assert not [k for k in m if "unit" in dict(k[1]).values() or k[0].endswith("tx_budget_set_total")]


def test_a_runtime_that_does_not_answer_is_down_without_live_figures():
    m = samples(families(STATUS, "h1"))
    r = {"runtime": 1}
    assert get(m, "nfactor_runtime_up", **r) == 0
    assert get(m, "nfactor_runtime_up", runtime=0) == 1
    # what the switch and the controller know of it is still there
    assert get(m, "nfactor_switch_runtime_frames_total", counter="to_rt_packets", **r) == 100
    assert get(m, "nfactor_runtime_cpu_ratio", **r) == 0.25
    assert not [k for k in m if k[0].startswith("nfactor_runtime_frames") and ("runtime", "1") in k[1]]


def test_histograms_are_cumulative_with_sum_and_count():
    m = samples(families(STATUS, "h1"))
    name = "nfactor_replication_snapshot_size_bytes"
    assert get(m, f"{name}_bucket", le="1.0", runtime=0) == 0
    assert get(m, f"{name}_bucket", le="10.0", runtime=0) == 8
    assert get(m, f"{name}_bucket", le="+Inf", runtime=0) == 9
    assert get(m, f"{name}_count", runtime=0) == 9 and get(m, f"{name}_sum", runtime=0) == 9
    assert get(m, "nfactor_migration_flow_duration_milliseconds_count", runtime=0) == 2
    assert get(m, "nfactor_recovery_duration_seconds_count", runtime=0) == 1


def test_the_histogram_keeps_counts_only_in_fixed_buckets():
    h = Histogram(MIGRATION_MS)
    for v in (0.1, 0.5, 0.6, 7, 1e9):
        h.observe(v)
    d = h.to_dict()
    assert d["le"] == list(MIGRATION_MS) and len(d["counts"]) == len(MIGRATION_MS) + 1
    assert d["counts"][0] == 2  # le is inclusive: 0.5 is in the first bucket
    assert d["counts"][1] == 1 and d["counts"][MIGRATION_MS.index(10)] == 1 and d["counts"][-1] == 1
    assert d["count"] == 5 and d["sum"] == pytest.approx(1e9 + 8.2)
    for _ in range(10_000):
        h.observe(3)
    assert len(h.to_dict()["counts"]) == len(MIGRATION_MS) + 1  # bounded, whatever it sees


def test_histograms_add_up_over_a_runtimes_processes():
    """Each runtime process observes its recovery once, as it starts: the
    endpoint sums its processes' histograms, so every recovery counts."""
    carry = HistogramCarry()
    rec = "nfactor_recovery_duration_seconds"
    assert carry.update([runtime(0, 100)])[0][rec]["count"] == 1
    assert carry.update([runtime(0, 100)])[0][rec]["count"] == 1  # the same process: nothing added
    assert carry.update([runtime(0, 100, live=False)])[0][rec]["count"] == 1  # down: what it showed last
    second = carry.update([runtime(0, 200, recovery=(1, 0, 0))])[0][rec]  # restarted: a new pid
    assert second["count"] == 2 and second["counts"] == [1, 1, 0]
    m = samples(families(STATUS, "h1", {0: carry.update([runtime(0, 200, recovery=(1, 0, 0))])[0]}))
    assert get(m, f"{rec}_count", runtime=0) == 2
    assert ("nfactor_recovery_duration_seconds_count", (("runtime", "1"),)) not in m
    # other bounds (another version's runtime): its own histogram alone
    other = runtime(0, 300)
    other["replication"]["recovery_seconds"] = hist((1, 1), le=(5,))
    assert carry.update([other])[0][rec]["le"] == [5]


def test_the_collector_says_the_node_is_down_when_it_has_no_status():
    def no_node():
        raise NodeCtlError("node 'n1' is not up")
    m = samples(NodeCollector("n1", "h1", status=no_node).collect())
    assert get(m, "nfactor_node_up") == 0
    assert ("nfactor_scrape_duration_seconds", ()) in m


def test_the_collector_scrapes_the_status_each_time():
    calls = []

    def status():
        calls.append(1)
        s = copy.deepcopy(STATUS)
        s["switch"]["rx_ext"] += 100 * len(calls)
        return s
    reg = CollectorRegistry(auto_describe=False)
    reg.register(NodeCollector("n1", "h1", status=status))
    assert not calls  # nothing asked at registration
    first, second = (generate_latest(reg).decode() for _ in range(2))
    assert 'nfactor_switch_events_total{counter="rx_ext",host="h1",node="n1"} 300.0' in first
    assert 'nfactor_switch_events_total{counter="rx_ext",host="h1",node="n1"} 400.0' in second


def test_the_endpoint_is_off_by_default_and_its_address_is_checked():
    cfg = NodeConfig()
    assert cfg.metrics_port == 0 and cfg.metrics_address == "127.0.0.1"
    NodeConfig(metrics_port=9500, metrics_address="::").validate()
    with pytest.raises(ConfigError, match="metrics_port"):
        NodeConfig(metrics_port=70000).validate()
    with pytest.raises(ConfigError, match="metrics_address"):
        NodeConfig(metrics_port=9500, metrics_address="localhost; rm").validate()


def test_the_grafana_dashboard_is_importable_json_on_these_metrics():
    with open(Path(__file__).resolve().parent.parent / "docs" / "grafana-dashboard.json") as f:
        dash = json.load(f)
    assert isinstance(dash["schemaVersion"], int) and dash["title"] and dash["panels"]
    assert {v["name"]: v["type"] for v in dash["templating"]["list"]}["datasource"] == "datasource"
    produced = {name for name, _ in samples(families(STATUS, "h1"))}
    for p in dash["panels"]:
        assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]
        for t in p["targets"]:
            used = set(re.findall(r"nfactor_\w+", t["expr"]))
            assert used and used <= produced, (p["title"], used - produced)
