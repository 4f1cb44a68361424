"""The node's Prometheus endpoint: `nfactorctl up --metrics-port 9500`
(`--metrics-address`, default 127.0.0.1), served at /metrics in the node's
network namespace.

    python -m nfactor_xdp.control.metrics --config-json CONFIG

Its own process, started and restarted by the supervisor like the switch
agent: a scrape waits on every runtime and on the controller (up to about a
second when one does not answer) and walks the switch's flow table, and none
of that may delay the supervisor's loop; a fault here never touches the guard.

Every scrape reads `node_client.status()`, the very dict `nfactorctl status
--json` shows, so a figure means the same in both.  A runtime that does not
answer within RUNTIME_TIMEOUT is reported down (`nfactor_runtime_up 0`)
without its live figures.  Every family carries the labels `node` and `host`.
Counters are the processes' own: a restarted runtime starts again from zero
(a counter reset, which rate() handles), except the histograms, which are
summed over the processes of each runtime id this endpoint has seen: every
runtime process observes its recovery once, as it starts, so a reset would
hide each new one.
"""
from __future__ import annotations

import signal
import socket
import sys
import threading
import time

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from .. import logs
from ..dataplane.view import FAILED, LEAVING, RUNNING, STARTING
from ..errors import NFactorError
from ..formats import config as nodeconf
from ..formats.config import process_args
from ..kern import layouts as L
from . import node_client

RUNTIME_TIMEOUT = 0.5  # seconds a scrape waits for each runtime (all asked at once)
VIEW_STATES = (STARTING, RUNNING, LEAVING, FAILED, "unknown")  # "unknown": not in the view, or no controller
# the AF_XDP socket's ring counters: the kernel's XDP_STATISTICS, then the socket's own
XSK_RING_COUNTERS = ("rx_dropped", "rx_invalid_descs", "tx_invalid_descs", "rx_ring_full",
                     "rx_fill_ring_empty_descs", "tx_ring_empty_descs", "tx_dropped_ring_full", "inject_no_frame",
                     "tx_kick_errors")
XSK_RING_LEVELS = ("free_frames", "fill_queued", "tx_queued", "rx_pending")
# a live runtime's own figures: (kind, name, its key in the runtime's status, help); frames: where every
# frame it received went (Runtime.packet_counts), with held and dropped by reason
RUNTIME_FIGURES = (
    ("counter", "nfactor_runtime_frames_received_total", "frames", "Frames the runtime received."),
    ("counter", "nfactor_runtime_frames_forwarded_total", "forwarded", "Frames the runtime forwarded as they came."),
    ("counter", "nfactor_runtime_frames_sent_later_total", "sent_later", "Held frames the runtime sent later."),
    ("counter", "nfactor_runtime_frames_markers_total", "markers", "Migration markers the runtime consumed."),
    ("gauge", "nfactor_runtime_flows", "flows", "Flows (actors) in the runtime."),
    ("counter", "nfactor_runtime_flows_created_total", "flows_created", "Flows the runtime created."),
    ("counter", "nfactor_runtime_flows_expired_total", "flows_expired", "Flows the runtime released: ended or idle."),
    ("counter", "nfactor_runtime_flows_evicted_total", "flows_evicted", "Flows given up for new ones (max_flows)."),
    ("counter", "nfactor_runtime_switch_entries_deleted_total", "switch_entries_deleted",
     "Switch entries the runtime deleted (ended flows)."),
    ("counter", "nfactor_runtime_control_errors_total", "control_errors",
     "Errors handling control messages and timers."),
    ("gauge", "nfactor_runtime_uptime_seconds", "uptime", "Seconds since the runtime process started."),
)
# name -> (where the runtime's status keeps it, help)
HISTOGRAMS = {
    "nfactor_migration_flow_duration_milliseconds": (
        ("migration", "flow_ms"), "Each migrated flow's migration, first message to completion (source side)."),
    "nfactor_replication_snapshot_size_bytes": (
        ("replication", "snapshot_bytes"), "Encoded size of each flow snapshot sent to a replica."),
    "nfactor_recovery_duration_seconds": (
        ("replication", "recovery_seconds"), "A runtime's recovery of its flows' state as it starts."),
}

KINDS = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily}

log = logs.get("metrics")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class Families:
    """Metric families being built for one scrape; every one is labelled
    node and host first, then its own labels, in the order first given."""

    def __init__(self, node: str, host: str):
        self.base = [node, host]
        self.fams: dict[str, tuple] = {}  # name -> (family, its own label names)

    def _family(self, cls, name: str, doc: str, labels: dict):
        """The family `name` and the label values for it, in its label order."""
        if name not in self.fams:
            self.fams[name] = (cls(name, doc, labels=["node", "host", *labels]), list(labels))
        fam, names = self.fams[name]
        return fam, self.base + [str(labels[k]) for k in names]

    def add(self, kind: str, name: str, doc: str, value, **labels) -> None:
        if not _number(value):
            return  # a figure this status does not have (an older runtime, a process down)
        fam, values = self._family(KINDS[kind], name, doc, labels)
        fam.add_metric(values, value)

    def counter(self, name: str, doc: str, value, **labels) -> None:
        self.add("counter", name, doc, value, **labels)

    def gauge(self, name: str, doc: str, value, **labels) -> None:
        self.add("gauge", name, doc, value, **labels)

    def counters(self, name: str, doc: str, values: dict, skip=(), label: str = "counter", **labels) -> None:
        """One sample per numeric entry of `values`, its key as `label`."""
        for k, v in (values or {}).items():
            if k not in skip:
                self.counter(name, doc, v, **labels, **{label: k})

    def histogram(self, name: str, doc: str, hist: dict, **labels) -> None:
        fam, values = self._family(HistogramMetricFamily, name, doc, labels)
        cumulative, buckets = 0, []
        for le, n in zip([*hist["le"], "+Inf"], hist["counts"]):
            cumulative += n
            buckets.append((le if le == "+Inf" else repr(float(le)), cumulative))
        fam.add_metric(values, buckets, hist["sum"])

    def all(self) -> list:
        return [fam for fam, _ in self.fams.values()]


def _switch(f: Families, s: dict) -> None:
    f.counters("nfactor_switch_events_total", "The XDP switch's verdicts, classes and drop reasons "
               "(`nfactorctl status --all-counters` explains each counter).", s.get("switch"))
    f.gauge("nfactor_switch_flows", "Entries in the switch's flow table.", s.get("switch_flows"))
    for port, mode in (s.get("xdp_modes") or {}).items():
        f.gauge("nfactor_xdp_attached_info", "Each port's XDP program and its attach mode (native: in the "
                "driver; generic: after the stack's skb).", 1, port=port, mode=mode)
    f.gauge("nfactor_switch_tracer_attached", "1 if the tracer that counts redirect_err, socket_full and "
            "xmit_drop is attached.", int(bool(s.get("redirect_error_tracer"))))


def _controller(f: Families, s: dict) -> None:
    ctl = s.get("controller") or {}
    f.gauge("nfactor_controller_up", "1 if the controller answered.", int(bool(ctl.get("alive"))))
    stats = dict(ctl.get("stats") or {})
    f.gauge("nfactor_controller_start_time_seconds", "When the controller started (Unix time).",
            stats.pop("restarted_at", None))
    f.gauge("nfactor_controller_replayed_ops", "Log operations replayed at the controller's start.",
            stats.pop("replayed_ops", None))
    f.counters("nfactor_controller_events_total", "The controller's heartbeats, registrations, failures "
               "detected, exits reported, scaling decisions and view pushes.", stats)
    f.counters("nfactor_controller_rejected_messages_total", "Control messages the controller refused, by "
               "reason.", ctl.get("rejected"), label="reason")
    f.gauge("nfactor_controller_view_version", "Version of the controller's view.", ctl.get("view_version"))
    for proc in ("controller", "switch_agent", "metrics"):
        f.counter("nfactor_process_restarts_total", "Restarts of the node's processes by the supervisor.",
                  (s.get(proc) or {}).get("restarts"), process=proc)


def _runtime(f: Families, rt: dict) -> None:
    r = {"runtime": rt["id"]}
    f.gauge("nfactor_runtime_up", "1 if the runtime answered this scrape's status query.", int(bool(rt.get("live"))),
            **r)
    f.gauge("nfactor_runtime_info", "A runtime's core and port.", 1, core=rt.get("core"), port=rt.get("port"), **r)
    f.counter("nfactor_runtime_restarts_total", "Restarts of the runtime by the supervisor.", rt.get("restarts"), **r)
    for state in VIEW_STATES:
        f.gauge("nfactor_runtime_state", "The runtime's state in the controller's view (1: the current one).",
                int(rt.get("state") == state), state=state, **r)
    for state in L.RT_STATES.values():
        f.gauge("nfactor_runtime_switch_state", "The runtime's state in the switch's table (1: the current one).",
                int(rt.get("switch_state") == state), state=state, **r)
    load = rt.get("load") or {}
    f.gauge("nfactor_runtime_cpu_ratio", "Share of one core the runtime used (its last heartbeat).", load.get("cpu"),
            **r)
    f.gauge("nfactor_runtime_resident_memory_bytes", "The runtime's RSS (its last heartbeat).", load.get("rss"), **r)
    sw = dict(rt.get("switch") or {})
    f.counter("nfactor_switch_runtime_flows_placed_total", "New flows the switch placed on the runtime.",
              sw.pop("flows_placed", None), **r)
    for k, v in sw.items():
        if k.endswith("_bytes"):
            f.counter("nfactor_switch_runtime_bytes_total", "Bytes the switch sent to (to_rt) and got back from "
                      "(from_rt) the runtime's port.", v, counter=k, **r)
        else:
            f.counter("nfactor_switch_runtime_frames_total", "Frames through the runtime's port (to_rt, from_rt) "
                      "and at its AF_XDP socket (to_socket; no_socket: dropped, no socket).", v, counter=k, **r)
    if not rt.get("live"):
        return
    for kind, name, key, doc in RUNTIME_FIGURES:
        f.add(kind, name, doc, rt.get(key), **r)
    f.gauge("nfactor_runtime_recovering", "1 while the runtime recovers its flows' state.",
            int(bool(rt.get("recovering"))), **r)
    f.counters("nfactor_runtime_frames_held_total", "Frames the runtime held (migration, recovery, fragments).",
               rt.get("held"), label="reason", **r)
    f.counters("nfactor_runtime_frames_dropped_total", "Frames the runtime dropped, by reason (chain: the NFs' "
               "verdicts).", rt.get("dropped"), label="reason", **r)
    for limit, d in (rt.get("limits") or {}).items():
        f.gauge("nfactor_runtime_limit", "Each bound on what the runtime holds (README: Limits).", d.get("limit"),
                limit=limit, **r)
        f.gauge("nfactor_runtime_limit_queued", "Outgoing migrations waiting for the concurrency bound.",
                d.get("queued"), limit=limit, **r)
        f.counters("nfactor_runtime_limit_hits_total", "What a bound cost when hit (evicted, refused, dropped, "
                   "shed).", d, skip=("limit", "unit", "queued"), limit=limit, **r)
    _xsk(f, rt.get("xsk") or {}, r)
    _replication(f, rt.get("replication") or {}, rt.get("migration") or {}, r)
    took = rt.get("takeover") or {}
    f.counters("nfactor_takeover_events_total", "Crashed peers' flows this runtime took over (taken) or left "
               "(offloaded, elsewhere, gone, had_actor), snapshots and peers taken from, agent timeouts, ...",
               took, skip=("enabled", "working", "seconds"), **r)
    f.gauge("nfactor_takeover_last_seconds", "How long the runtime's last takeover of a crashed peer's flows "
            "took (its own work).", took.get("seconds"), **r)
    off = rt.get("offload") or {}
    f.gauge("nfactor_runtime_offloaded_flows", "The runtime's flows the switch handles alone now (offload).",
            off.get("flows"), **r)
    f.counters("nfactor_runtime_offload_events_total", "Flows offloaded and revoked, frames punted and late, "
               "slots short, grace periods, ... (docs/offload.md).", off,
               skip=("enabled", "flows", "free_slots", "returning", "observing", "ring_most_behind"),
               **r)
    f.gauge("nfactor_runtime_observed_flows", "The runtime's flows in observe mode (their NFs read copies).",
            off.get("observing"), **r)
    f.gauge("nfactor_runtime_observe_ring_most_behind_bytes", "The most the runtime's observe ring reader has "
            "been behind the switch, in bytes (the ring holds 4 MiB; beyond, copies are lost).",
            off.get("ring_most_behind"), **r)


def _xsk(f: Families, xs: dict, r: dict) -> None:
    for k in XSK_RING_COUNTERS:
        f.counter("nfactor_xsk_ring_events_total", "The AF_XDP socket's ring counters (kernel XDP_STATISTICS: "
                  "rx_dropped, rx_ring_full, ...; the socket's own: tx_dropped_ring_full, ...).", xs.get(k),
                  counter=k, **r)
    for d in ("rx", "tx"):
        f.counter("nfactor_xsk_frames_total", "Frames through the AF_XDP socket.", xs.get(f"{d}_packets"),
                  direction=d, **r)
        f.counter("nfactor_xsk_bytes_total", "Bytes through the AF_XDP socket.", xs.get(f"{d}_bytes"), direction=d,
                  **r)
    for k in XSK_RING_LEVELS:
        f.gauge("nfactor_xsk_ring_frames", "Frames in each ring of the AF_XDP socket now.", xs.get(k), ring=k, **r)
    f.gauge("nfactor_xsk_zero_copy", "1 if the AF_XDP socket runs in zero-copy mode.", int(bool(xs.get("zero_copy"))),
            **r)


def _replication(f: Families, rep: dict, mig: dict, r: dict) -> None:
    rec = rep.get("recovery") or {}
    f.counters("nfactor_replication_events_total", "Snapshots sent, stored for peers, refused, shed, ...",
               rep, skip=("pending",), **r)
    f.gauge("nfactor_replication_pending_flows", "Flows due a snapshot.", rep.get("pending"), **r)
    for peer, n in (rep.get("holding") or {}).items():
        f.gauge("nfactor_replication_held_snapshots", "Snapshots the runtime holds for each peer.", n, peer=peer,
                **r)
    f.gauge("nfactor_recovery_last_seconds", "How long the runtime's last recovery took.", rec.get("seconds"), **r)
    f.gauge("nfactor_recovery_last_flows", "Flows the runtime's last recovery brought back.", rec.get("actors"), **r)
    f.counters("nfactor_migration_events_total", "Migrations started, succeeded, failed, markers, frames "
               "buffered and replayed, ...", mig, skip=("in_progress", "not_migratable"), **r)
    f.gauge("nfactor_migration_in_progress_flows", "Flows migrating out of the runtime now.", mig.get("in_progress"),
            **r)
    f.gauge("nfactor_migration_not_migratable_flows", "Flows whose state is too big to move.",
            mig.get("not_migratable"), **r)


def families(s: dict, host: str, hists: dict | None = None) -> list:
    """The metric families of one `node_client.status()` dict.  hists: rt id
    -> {histogram name: histogram dict} (HistogramCarry); default: the
    runtimes' own, as their status has them."""
    f = Families(s["node"], host)
    f.gauge("nfactor_node_up", "1 if the node's supervisor runs and the node is running.",
            int(bool(s.get("supervisor_alive")) and s.get("phase") == "running"))
    _switch(f, s)
    _controller(f, s)
    for rt in s.get("runtimes", []):
        _runtime(f, rt)
        mine = (hists or {}).get(rt["id"]) if hists is not None else own_histograms(rt)
        for name, h in (mine or {}).items():
            if h:
                f.histogram(name, HISTOGRAMS[name][1], h, runtime=rt["id"])
    return f.all()


def own_histograms(rt: dict) -> dict:
    """{name: histogram dict} as a runtime's status entry has them (none when it did not answer)."""
    out = {}
    for name, ((part, key), _) in HISTOGRAMS.items():
        h = (rt.get(part) or {}).get(key) if rt.get("live") else None
        if isinstance(h, dict):
            out[name] = h
    return out


def merge(a: dict | None, b: dict | None) -> dict | None:
    if a is None or b is None or a["le"] != b["le"]:
        return b if b is not None else a  # other bounds (another version): the newer alone
    return {"le": a["le"], "counts": [x + y for x, y in zip(a["counts"], b["counts"])],
            "count": a["count"] + b["count"], "sum": a["sum"] + b["sum"]}


class HistogramCarry:
    """Per runtime id, the histograms of its earlier processes (told apart by
    pid) added to the current one's; a runtime that does not answer keeps
    what it showed last."""

    def __init__(self):
        self.base: dict[int, dict] = {}               # rt id -> {name: histogram} of its earlier processes
        self.last: dict[int, tuple[int, dict]] = {}   # rt id -> (pid, {name: histogram}) as last seen
        self.lock = threading.Lock()                  # scrapes may run at once (one thread each)

    def update(self, runtimes: list[dict]) -> dict[int, dict]:
        out = {}
        with self.lock:
            for rt in runtimes:
                rid, mine = rt["id"], own_histograms(rt)
                prev = self.last.get(rid)
                if mine:
                    if prev and prev[0] != rt.get("pid"):
                        base = self.base.setdefault(rid, {})
                        for name, h in prev[1].items():
                            base[name] = merge(base.get(name), h)
                    self.last[rid] = (rt.get("pid"), mine)
                current = self.last.get(rid, (None, {}))[1]
                base = self.base.get(rid, {})
                out[rid] = {name: merge(base.get(name), current.get(name)) for name in HISTOGRAMS}
        return out


class NodeCollector:
    """A prometheus_client collector: one node_client.status() per scrape."""

    def __init__(self, name: str, host: str | None = None, timeout: float = RUNTIME_TIMEOUT, status=None):
        self.name, self.host = name, host or socket.gethostname()
        self.status = status or (lambda: node_client.status(name, timeout=timeout))
        self.carry = HistogramCarry()

    def describe(self):
        return []  # nothing to ask at registration: the node is asked on each scrape

    def collect(self):
        t0 = time.monotonic()
        try:
            s = self.status()
        except (NFactorError, OSError) as e:
            log.warning("no status of node %s: %s", self.name, e)
            f = Families(self.name, self.host)
            f.gauge("nfactor_node_up", "1 if the node's supervisor runs and the node is running.", 0)
            out = f.all()
        else:
            out = families(s, self.host, self.carry.update(s.get("runtimes", [])))
        took = GaugeMetricFamily("nfactor_scrape_duration_seconds", "How long this scrape took to ask the node.",
                                 labels=["node", "host"])
        took.add_metric([self.name, self.host], time.monotonic() - t0)
        return [*out, took]


def serve(cfg: nodeconf.NodeConfig):
    """Listen on the configured address and port (a thread answers scrapes); returns the server."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(cfg.name))
    server, _ = start_http_server(cfg.metrics_port, cfg.metrics_address, registry=registry)
    return server


def main(argv: list[str] | None = None) -> int:
    cfg, _ = process_args("nfactor-metrics", __doc__, argv)
    logs.setup("metrics", **cfg.log_options("metrics"))
    # SIGTERM/SIGINT stay blocked (as the supervisor started us) in every thread; sigwait takes them here
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM, signal.SIGINT])
    try:
        server = serve(cfg)
    except OSError as e:
        why = f"cannot listen on {cfg.metrics_address} port {cfg.metrics_port}: {e}"
        log.error("%s", why)
        nodeconf.write_exit_reason(cfg.name, "metrics", why)
        return 1
    log.info("serving /metrics on %s port %d", cfg.metrics_address, cfg.metrics_port)
    signal.sigwait([signal.SIGTERM, signal.SIGINT])
    server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
