"""What every benchmark runs on: a testbed, the generator and the sink on its
hosts, and a node (re)started for each configuration measured; one trial of
traffic on flows of its own, accounted for frame by frame and checked
against the NFs' counts (accounting.py); the zero-loss search and the
XDP-only ceilings."""
from __future__ import annotations

import dataclasses
import os
import platform
import socket
import threading
import time
from typing import Any, Callable

from ...control import node_client as nodectl
from ...dataplane.rules import Policy, parse_chain
from ...formats import flowkey
from ...formats.config import NodeConfig
from ...kern import layouts as L
from ...kern.maps import NodeMaps
from ..testbed import Testbed, TestbedConfig
from . import cpu
from .accounting import account, nf_checks, snapshot
from .load import GEN_CPU, GEN_NICE, IPPROTO_TCP, IPPROTO_UDP, Generator, Sink, make_frame

POLL = 0.02  # polling interval while waiting for flows / policy (always with a deadline)
FIRST_PORT = 10000
DPORT = {True: 80, False: 9}  # TCP (HTTP) and UDP (discard); +1 each time the source ports wrap
IDLE_TIMEOUT = 3.0  # a trial's actors go soon after it: every trial has flows of its own
# Offload trials: a few frames per flow first, until every flow is offloaded, then the load: the rate of
# decided flows (the first frames of a flow at millions per second would all queue for Python first).
WARMUP_SECONDS = 0.25  # at WARMUP_PPS: ~20 frames per flow (a generator call has ~20 ms of setup)
WARMUP_PPS = 5_000
MODES = {"flows": "NFX_MODE_FLOWS", "bypass": "NFX_MODE_BYPASS", "lookup": "NFX_MODE_LOOKUP"}
CEILINGS = {
    "bypass": "the switch in bypass mode: ext0 -> ext1 in XDP, no parsing, no flow lookup, no runtime",
    "lookup": "the switch's flow path without a runtime: parse, flow lookup and placement, counters, "
              "then ext0 -> ext1 in XDP",
}
WHERE = (f"the generator runs on CPU {GEN_CPU} at nice {GEN_NICE} (a runtime sharing that CPU comes first); "
         f"a veth runs its peer's receive processing on the sending CPU, so "
         f"the switch's ext0 path (and, in the ceilings, the sink) runs there too, in softirq; each runtime's "
         f"transmit path (sw-rtN, ext1, the sink) runs on that runtime's CPU")

# A runtime on the generator's CPU is starved by its softirq for a few tenths of a second
# under load: with the default 3 missed heartbeats (0.3 s) it was marked failed, alive, and a
# migration to it rolled back.  Crashes are seen by the supervisor (the process exits), not here.
MISS_LIMIT = 10
FAILURE_DETECTION = (f"a runtime is marked failed after {MISS_LIMIT} missed heartbeats (default 3): one on the "
                     f"generator's CPU can be starved that long by its softirq, alive; crashes are detected "
                     f"by the supervisor when the process exits")


def runtimes_label(n: int) -> str:
    return f"{n} runtime{'s' if n > 1 else ''}"


def rt_status(name: str, rt_id: int) -> dict:
    """Runtime rt_id's own status ({} if it does not answer)."""
    return nodectl.runtime_query(name, rt_id, "status", timeout=1.0) or {}


@dataclasses.dataclass(frozen=True)
class Flows:
    """A trial's flows: source ports base..base+count-1 to one destination port."""
    base: int
    count: int
    dport: int
    tcp: bool

    @property
    def proto(self) -> int:
        return IPPROTO_TCP if self.tcp else IPPROTO_UDP

    def keys(self, src: str, dst: str) -> set[str]:
        """The flows' canonical keys (hex), as the runtimes name them."""
        s, d = (flowkey.V4_MAPPED + socket.inet_aton(a.split("/")[0]) for a in (src, dst))
        dp = self.dport.to_bytes(2, "big")
        return {flowkey.canonical(s, p.to_bytes(2, "big"), d, dp, self.proto)[0].hex()
                for p in range(self.base, self.base + self.count)}

    def describe(self) -> dict:
        return {"proto": "tcp" if self.tcp else "udp", "source_ports": [self.base, self.base + self.count - 1],
                "dport": self.dport, "flows": self.count}


class BackgroundLoad:
    """The generator run in a thread while the benchmark acts on the node.  It
    cannot be stopped early: `seconds` must cover the whole trial."""

    def __init__(self, gen: Generator, frame: bytes, **run: Any):
        self.result: dict | None = None
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, args=(gen, frame), kwargs=run,
                                        name="bench-generator", daemon=True)
        self._thread.start()

    def _run(self, gen: Generator, frame: bytes, **run: Any) -> None:
        try:
            self.result = gen.run(frame, **run)
        except Exception as e:  # reported with the trial
            self.error = repr(e)

    def running(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def outcome(self) -> dict | None:
        """The generator's answer (None: still running); RuntimeError if it failed."""
        if self.error is not None:
            raise RuntimeError(f"generator: {self.error}")
        return self.result


class Bench:
    """A testbed, a generator, a sink, and a node restarted per configuration."""

    def __init__(self, name: str = "bench", flows: int = 64, size: int = 64, batch: int = 64,
                 idle_timeout: float = IDLE_TIMEOUT, progress: Callable[[dict], None] | None = None,
                 hosts: int = 0):
        """progress: called with a summary of every trial as it ends (the CLI
        prints it on a terminal; this layer prints nothing); hosts: worker
        hosts on the testbed (node_up_hosts puts runtimes on them)."""
        if os.geteuid() != 0:
            raise SystemExit("error: benchmarks need root")
        self.name, self.flows, self.size, self.batch, self.idle_timeout = name, flows, size, batch, idle_timeout
        self.progress, self.measuring_now, self.trials_run, self.started = progress, "", 0, time.monotonic()
        self.tb = Testbed(TestbedConfig(name=name, hosts=hosts))
        if self.tb.is_up():
            nodectl.stop(name)
            self.tb.down()
        self.gen = self.sink = None
        self.port, self.wraps = FIRST_PORT, 0
        self.rt_ids: list[int] = []
        self.workers: dict[int, str] = {}  # worker host -> its namespace, for the node running now
        self.mode, self.chain, self.placement = "flows", [], {}
        self.offload = "off"
        self.observe = False          # the chain's rule asks for observe mode
        self.full_observation = False  # a trial is lossless only if no copy was lost either
        self.tb.up()
        try:
            self.show = self.tb.show()
            self.hosts = self.show["hosts"]
            self.namespaces = {"src": self.hosts["src"]["netns"], "node": self.show["namespaces"]["node"],
                               "dst": self.hosts["dst"]["netns"]}
            self.sink = Sink(self.hosts["dst"]["netns"], self.hosts["dst"]["ifname"])
            self.gen = Generator(self.hosts["src"]["netns"], self.hosts["src"]["ifname"])
        except Exception:
            self.close()
            raise

    def __enter__(self) -> Bench:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def report(self, benchmark: str, load: dict, **more: Any) -> dict:
        """The head of a benchmark's JSON: what ran, on what machine, with what load."""
        return {"benchmark": benchmark, "machine": self.machine(),
                "load": {"generator_cpu": GEN_CPU, "where": WHERE, "failure_detection": FAILURE_DETECTION, **load},
                **more}

    def machine(self) -> dict:
        name = platform.processor()
        try:
            with open("/proc/cpuinfo") as f:
                name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
        except OSError:
            pass
        return {"cpus": os.cpu_count(), "kernel": platform.release(), "cpu": name}

    # --- flows and frames ------------------------------------------------------
    def new_flows(self, n: int, tcp: bool) -> Flows:
        """`n` flows no node has seen: the next source ports; when they run
        out, the ports start over towards a new destination port."""
        if self.port + n > 65536:
            self.port, self.wraps = FIRST_PORT, self.wraps + 1
        fl = Flows(self.port, n, DPORT[tcp] + self.wraps, tcp)
        self.port += n
        return fl

    def frame(self, fl: Flows) -> bytes:
        return make_frame(self.hosts["src"], self.hosts["dst"], tcp=fl.tcp, dport=fl.dport, size=self.size)

    def keys(self, fl: Flows) -> set[str]:
        return fl.keys(self.hosts["src"]["ipv4"], self.hosts["dst"]["ipv4"])

    # --- the node ----------------------------------------------------------------
    def node_up(self, runtimes: int, mode: str = "flows", **config: Any) -> None:
        """A fresh node: `runtimes` runtimes off the generator's CPU where
        possible, the switch in `mode`; `config`: NodeConfig fields."""
        nodectl.stop(self.name)
        cores, note = cpu.runtime_cores(runtimes, GEN_CPU)
        config = {"batch": self.batch, "idle_timeout": self.idle_timeout, "offload": "off",
                  "miss_limit": MISS_LIMIT,
                  **{k: v for k, v in config.items() if v is not None}}
        cfg = NodeConfig(name=self.name, netns=self.namespaces["node"], runtimes=runtimes, cores=cores, **config)
        nodectl.put_policy(self.name, Policy())
        nodectl.start(cfg)
        self.rt_ids, self.workers = cfg.runtime_ids, {}
        self.mode, self.chain, self.offload = mode, [], config["offload"]
        self.observe = False
        self.placement = {"generator_cpu": GEN_CPU, "runtime_cpus": dict(enumerate(cores)), "note": note}
        with NodeMaps(self.name) as maps:
            maps.write_config(mode=L.C[MODES[mode]])

    def node_up_hosts(self, ingress: int, workers: dict[int, int], **config: Any) -> None:
        """A fresh node across the testbed's hosts: `ingress` runtimes on the
        ingress host, workers[h] on worker host h, each runtime on a CPU of
        its own where possible (the generator's last)."""
        nodectl.stop(self.name)
        self.workers = {}
        fab = self.show["fabric"]
        count = ingress + sum(workers.values())
        cores, note = cpu.runtime_cores(count, GEN_CPU)
        config = {"batch": self.batch, "idle_timeout": self.idle_timeout, "offload": "off",
                  "miss_limit": MISS_LIMIT, **{k: v for k, v in config.items() if v is not None}}
        cfg = NodeConfig(name=self.name, netns=self.namespaces["node"], runtimes=ingress, cores=cores[:ingress] or
                         cores, hosts=",".join(h["ipv4"] for h in fab["hosts"]), fabric_port=fab["hosts"][0]["ifname"],
                         **config)
        nodectl.put_policy(self.name, Policy())
        nodectl.start(cfg)
        ids, placed, used = cfg.runtime_ids, dict(zip(cfg.runtime_ids, cores)), ingress
        for h, n in sorted(workers.items()):
            ns = fab["hosts"][h]["netns"]
            wcfg = dataclasses.replace(cfg, cores=cores[used:used + n])
            state = nodectl.start_worker(wcfg, h, ns, runtimes=n)
            new = [r["id"] for r in state["runtimes"]]
            placed.update(zip(new, cores[used:used + n]))
            ids, used = ids + new, used + n
            self.workers[h] = ns
        self.rt_ids = ids
        self.mode, self.chain, self.offload, self.observe = "flows", [], config["offload"], False
        self.placement = {"generator_cpu": GEN_CPU, "runtime_cpus": placed, "note": note,
                          "hosts": {rt: rt // L.C["NFX_RUNTIMES_PER_HOST"] for rt in ids}}

    def set_chain(self, chain: list[str], timeout: float = 10.0, nf_config: dict | None = None,
                  observe: bool = False) -> None:
        """New flows get `chain` (NFs configured by `nf_config`, in observe
        mode if `observe`); returns once every runtime has it and is
        registered in the controller's view (a migration target, a replica peer)."""
        ids = self.rt_ids
        before = [rt_status(self.name, i).get("policy_version") or 0 for i in ids]
        nodectl.put_policy(self.name, Policy(default_chain=parse_chain(chain), nf_config=nf_config or {},
                                             default_observe=observe))
        deadline = time.monotonic() + timeout
        while True:
            sts = [rt_status(self.name, i) for i in ids]
            if all((st.get("policy_version") or 0) > v and st.get("registered") for st, v in zip(sts, before)):
                self.chain, self.observe = list(chain), observe
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"runtimes did not take the policy within {timeout}s: {sts}")
            time.sleep(POLL)

    def node_with_chain(self, runtimes: int, chain: list[str], **node: Any) -> None:
        """A fresh node (no flows of earlier trials) with `chain` in force."""
        self.node_up(runtimes, **node)
        self.set_chain(chain)

    # --- trials --------------------------------------------------------------------
    def snap(self) -> dict:
        return snapshot(self.name, self.rt_ids, self.sink, self.namespaces["node"],
                        {"generator": self.gen.p.pid, "harness": os.getpid()}, workers=self.workers,
                        fabric_ns=self.show.get("fabric", {}).get("netns") if self.workers else None)

    def begin(self, fl: Flows) -> list[dict]:
        """Before a trial's load: the sink counts `fl` from now; the first snapshot."""
        self.sink.expect(self.hosts["dst"]["ipv4"].split("/")[0], fl.proto, fl.dport, fl.base,
                         fl.base + fl.count - 1)
        return [self.snap()]

    def settle(self, timeout: float = 5.0) -> None:
        """Frames in flight drain within milliseconds, a busy runtime's backlog
        a little later: wait until the sink and the runtimes stop moving."""
        last, deadline = None, time.monotonic() + timeout
        while time.monotonic() < deadline:
            sts = [rt_status(self.name, i) for i in self.rt_ids]
            now = (self.sink.counts(), [(st.get("frames"), st.get("sent_later"), (st.get("offload") or {}).get("copies"))
                                        for st in sts])
            if now == last and not any((st.get("xsk") or {}).get("rx_pending") for st in sts):
                return
            last = now
            time.sleep(0.05)  # polling until the counts stop moving

    def measuring(self, label: str) -> None:
        """What the next trials measure (the progress reports name it)."""
        self.measuring_now = label

    def end(self, snaps: list[dict], fl: Flows, g: dict | None, rate: float | None = None,
            strict: bool = True, role: str = "trial") -> dict:
        """After the load: settle, the last snapshot, where every frame went,
        the NFs' checks, the CPU placement; valid or why not."""
        self.settle()
        snaps = snaps + [self.snap()]
        g = g or {"sent": 0, "seconds": 0.0}
        acc = account(snaps, g["sent"], g.get("failed", 0))
        secs = g["seconds"] or 1e-9
        out = {"requested_pps": rate or None, "seconds": round(g["seconds"], 3), "flows": fl.describe(),
               "offered_mpps": acc["offered"] / secs / 1e6, "forwarded_mpps": acc["forwarded"] / secs / 1e6, **acc}
        problems = []
        if acc["offered"] <= 0:
            problems.append("nothing offered")
        if acc["unaccounted"]:
            problems.append(f"{acc['unaccounted']} frames unaccounted for")
        if self.mode == "flows":
            out["nf_checks"] = nf_checks(self.name, self.rt_ids, self.keys(fl), self.chain, acc, strict=strict,
                                         observe=self.observe)
            problems += out["nf_checks"].get("problems", [])
        usage = cpu.report(snaps[0]["cpu"], snaps[-1]["cpu"])
        usage["per_process_s"]["generator"].update(self_reported_user_s=g.get("cpu_user_s"),
                                                   self_reported_system_s=g.get("cpu_system_s"))
        out["cpu"] = {"placement": self.placement, **usage,
                      "runtime_cpu": cpu.runtime_cpu(usage, {rt: d.get("frames", 0) for rt, d in
                                                             acc["runtimes"].items()})}
        lossless = acc["lost"] == 0 and not (self.full_observation and acc.get("observe_lost"))
        out.update(valid=not problems, invalid_because=problems, zero_loss=not problems and lossless,
                   disturbed=cpu.disturbance(usage, self.placement))
        self.trials_run += 1
        if self.progress:
            self.progress({"trial": self.trials_run, "elapsed_s": time.monotonic() - self.started,
                           "measuring": self.measuring_now, "role": role, "requested_pps": out["requested_pps"],
                           "offered_mpps": out["offered_mpps"], "lost": out["lost"], "valid": out["valid"]})
        return out

    def trial(self, rate: float, seconds: float, tcp: bool, role: str = "trial") -> dict:
        """`seconds` of traffic at `rate` frames/s (0: as fast as the generator
        goes) on flows of its own; with offload on and a chain that can be
        offloaded, a warm-up first (WARMUP_SECONDS at WARMUP_PPS), counted in the trial."""
        fl = self.new_flows(self.flows, tcp)
        snaps = self.begin(fl)
        offloadable = "http_parser" not in self.chain or self.observe
        warm = self.warm_up(fl) if self.offload == "on" and offloadable else None
        g = self.gen.run(self.frame(fl), rate=rate, seconds=seconds, base=fl.base, flows=fl.count, tcp=tcp,
                         first=warm["sent"] if warm is not None else 0)
        if warm is not None:
            g = dict(g, sent=g["sent"] + warm["sent"], failed=g.get("failed", 0) + warm.get("failed", 0),
                     warmup_sent=warm["sent"])
        return self.end(snaps, fl, g, rate, role=role)

    def warm_up(self, fl: Flows, timeout: float = 5.0) -> dict:
        """A few frames per flow, then wait until each is offloaded."""
        def offloaded() -> int:
            return sum((rt_status(self.name, i).get("offload") or {}).get("offloaded", 0)
                       for i in self.rt_ids)
        before = offloaded()
        warm = self.gen.run(self.frame(fl), rate=WARMUP_PPS, seconds=WARMUP_SECONDS, base=fl.base,
                            flows=fl.count, tcp=fl.tcp)
        deadline = time.monotonic() + timeout
        while offloaded() - before < fl.count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the trial's {fl.count} flows were not all offloaded within {timeout}s")
            time.sleep(POLL)
        return warm

    def zero_loss(self, tcp: bool, seconds: float = 1.0, steps: int = 7, step_downs: int = 3,
                  reruns: int = 2, max_pps: float | None = None) -> dict:
        """The highest offered rate with no loss: a binary search over the
        requested rate, then a second trial at the best rate to confirm it
        (10% lower each time it does not, at most `step_downs` times).  A
        trial counts as lossless only if it is valid and offered something;
        rates are the measured offered rates.  A trial that lost frames while
        other load took a CPU is run again (at most `reruns` times): what it
        measured was that load.  Every trial run is in `trials`.  max_pps:
        the search's upper bound, if lower than the full-speed trial's."""
        trials = []

        def run(rate: float, role: str) -> dict:
            for attempt in range(reruns + 1):
                t = dict(self.trial(rate, seconds, tcp, role), role=role, index=len(trials))
                trials.append(t)
                if t["zero_loss"] or not t["disturbed"] or attempt == reruns or not rate:
                    return t
                t["rerun"] = True
            return t

        top = run(0, "full speed")
        lo, hi = 0.0, max(top["forwarded"], top["offered"] * 0.01) / (top["seconds"] or 1) * 1.3
        if max_pps:  # the caller knows the answer lies far below what the node forwards
            hi = min(hi, max_pps)
        best = None
        for _ in range(steps):
            mid = (lo + hi) / 2
            t = run(mid, "search")
            if t["zero_loss"]:
                lo, best = mid, t
            else:
                hi = mid
        first, rate, pair = best, (lo if best else None), None
        for _ in range(2 * step_downs + 1):
            if rate is None or pair:
                break
            t = run(rate, "confirmation" if first else "search (step down)")
            if not t["zero_loss"]:
                first, rate = None, rate * 0.9
            elif first is None:
                first = t
            else:
                pair = (first, t)
        return {"zero_loss_mpps": min(p["offered_mpps"] for p in pair) if pair else 0.0,
                "confirmed": bool(pair), "confirming_trials": [p["index"] for p in pair or ()],
                "search_best_mpps": best["offered_mpps"] if best else 0.0,
                "max_forwarded_mpps": top["forwarded_mpps"], "full_speed_lost": top["lost"],
                "generator_limited": top["valid"] and top["lost"] == 0,
                "trial_seconds": seconds, "search_steps": steps, "trial_count": len(trials),
                "invalid_trials": sum(1 for t in trials if not t["valid"]),
                "disturbed_trials": sum(1 for t in trials if t["disturbed"]),
                "rerun_trials": sum(1 for t in trials if t.get("rerun")), "trials": trials}

    def ceilings(self, seconds: float, tcp: bool = False, steps: int | None = None) -> dict:
        """The XDP-only ceilings (bypass; lookup: with the switch's flow path),
        each one trial at full speed or, with `steps`, the zero-loss search.
        A ceiling that lost nothing at full speed is the generator's limit."""
        out = {}
        for mode in ("bypass", "lookup"):
            self.node_up(1, mode=mode)
            self.measuring(f"xdp-ceiling ({mode})")
            m = self.trial(0, seconds, tcp) if steps is None else self.zero_loss(tcp, seconds, steps)
            if steps is None:
                m["generator_limited"] = m["valid"] and m["lost"] == 0
            m.update(label=f"xdp-ceiling ({mode})", mode=mode, includes=CEILINGS[mode], runtimes=0)
            out[mode] = m
        return out

    def close(self) -> None:
        if self.gen:
            self.gen.close()
        if self.sink:
            self.sink.close()
        nodectl.stop(self.name)
        self.tb.down()


def ratios(value: float, ceilings: dict, key: str) -> dict:
    """`value` over each ceiling's `key` figure."""
    return {f"ratio_to_{mode}_ceiling": (value / c[key] if c.get(key) else None) for mode, c in ceilings.items()}
