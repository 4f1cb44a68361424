"""What every benchmark runs on: a testbed, the generator and the sink on its
hosts, and a node (re)started for each configuration measured; one trial of
traffic, the zero-loss search, the XDP-only ceiling and the node's status."""
from __future__ import annotations

import os
import platform
import threading
import time
from typing import Any

from ...control import node_client as nodectl
from ...dataplane.rules import Policy, parse_chain
from ...formats.config import NodeConfig
from ...kern import layouts as L
from ...kern.maps import NodeMaps
from ..testbed import Testbed, TestbedConfig
from .load import Generator, Sink, make_frame

POLL = 0.02  # polling interval while waiting for flows / policy (always with a deadline)


def runtimes_label(n: int) -> str:
    return f"{n} runtime{'s' if n > 1 else ''}"


def rt_status(name: str, rt_id: int) -> dict:
    """Runtime rt_id's own status ({} if it does not answer)."""
    return nodectl.runtime_query(name, rt_id, "status", timeout=1.0) or {}


def proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (the first is the
    state, field 3 of proc(5)); None if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _cpu_times(pids: list[int]) -> tuple[float, float]:
    tick = os.sysconf("SC_CLK_TCK")
    user = system = 0.0
    for pid in pids:
        fields = proc_stat(pid)
        if fields:
            user += int(fields[11]) / tick
            system += int(fields[12]) / tick
    return user, system


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

    def __init__(self, name: str = "bench", flows: int = 64, size: int = 64, batch: int = 64):
        if os.geteuid() != 0:
            raise SystemExit("error: benchmarks need root")
        self.name, self.flows, self.size, self.batch = name, flows, size, batch
        self.tb = Testbed(TestbedConfig(name=name))
        if self.tb.is_up():
            nodectl.stop(name)
            self.tb.down()
        self.gen = self.sink = None
        self.base = 10000
        self.tb.up()
        try:
            self.show = self.tb.show()
            self.sink = Sink(self.show["hosts"]["dst"]["netns"], self.show["hosts"]["dst"]["ifname"])
            self.gen = Generator(self.show["hosts"]["src"]["netns"])
        except Exception:
            self.close()
            raise
        self.pids: list[int] = []

    def __enter__(self) -> Bench:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def report(self, benchmark: str, load: dict, **more: Any) -> dict:
        """The head of a benchmark's JSON: what ran, on what machine, with what load."""
        return {"benchmark": benchmark, "machine": self.machine(), "load": load, **more}

    def machine(self) -> dict:
        cpu = platform.processor()
        try:
            with open("/proc/cpuinfo") as f:
                cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
        except OSError:
            pass
        return {"cpus": os.cpu_count(), "kernel": platform.release(), "cpu": cpu}

    def frame(self, tcp: bool) -> bytes:
        return make_frame(self.show, self.size, tcp)

    def new_flows(self, n: int) -> int:
        """Reserve `n` fresh source ports (flows no node has seen); the first."""
        base = self.base
        self.base += n
        return base

    def node_up(self, runtimes: int, bypass: bool = False, max_migrations: int | None = None,
                snapshot_every: int | None = None) -> None:
        nodectl.stop(self.name)
        cores = [1] if runtimes == 1 else []  # one runtime: keep it off the generator's CPU
        extra = {} if max_migrations is None else {"max_migrations": max_migrations}
        if snapshot_every is not None:
            extra["snapshot_every"] = snapshot_every
        cfg = NodeConfig(name=self.name, netns=self.show["namespaces"]["node"], runtimes=runtimes, cores=cores,
                         batch=self.batch, **extra)
        nodectl.put_policy(self.name, Policy())
        state = nodectl.start(cfg)
        self.pids = [r["pid"] for r in state["runtimes"]]
        with NodeMaps(self.name) as maps:
            maps.write_config(mode=L.C["NFX_MODE_BYPASS" if bypass else "NFX_MODE_FLOWS"])

    def set_chain(self, chain: list[str]) -> None:
        """New flows (a fresh source-port range) get this chain."""
        p = Policy(default_chain=parse_chain(chain))
        nodectl.put_policy(self.name, p)
        self.base += self.flows

    def node_with_chain(self, runtimes: int, chain: list[str], *, max_migrations: int | None = None,
                        snapshot_every: int | None = None, timeout: float = 10.0) -> None:
        """A fresh node (no flows of earlier trials), `chain` in force on every
        runtime and every runtime registered in the controller's view (so a
        migration target or a replica peer)."""
        self.node_up(runtimes, max_migrations=max_migrations, snapshot_every=snapshot_every)
        ids = range(runtimes)
        before = [rt_status(self.name, i).get("policy_version") or 0 for i in ids]
        self.set_chain(chain)
        deadline = time.monotonic() + timeout
        while True:
            sts = [rt_status(self.name, i) for i in ids]
            if all((st.get("policy_version") or 0) > v and st.get("registered") for st, v in zip(sts, before)):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"runtimes did not take the policy within {timeout}s: {sts}")
            time.sleep(POLL)

    def trial(self, rate: float, seconds: float, tcp: bool) -> dict:
        """`seconds` of traffic at `rate` frames/s (0: as fast as the generator
        goes) on the current flows; what was offered and what reached the sink."""
        frame = self.frame(tcp)
        c0 = self.sink.count()
        u0, s0 = _cpu_times(self.pids)
        g = self.gen.run(frame, rate=rate, seconds=seconds, base=self.base, flows=self.flows, tcp=tcp)
        got = self.sink.settle() - c0
        u1, s1 = _cpu_times(self.pids)
        return {"offered": g["sent"], "forwarded": got, "seconds": g["seconds"],
                "offered_mpps": g["sent"] / g["seconds"] / 1e6, "forwarded_mpps": got / g["seconds"] / 1e6,
                "lost": g["sent"] - got,
                "runtime_cpu_user_s": round(u1 - u0, 3), "runtime_cpu_system_s": round(s1 - s0, 3)}

    def zero_loss(self, tcp: bool, seconds: float = 1.0, steps: int = 7) -> dict:
        """Binary search of the highest offered rate with no loss."""
        top = self.trial(0, seconds, tcp)  # as fast as possible: an upper bound
        lo, hi = 0.0, top["forwarded"] / top["seconds"] * 1.3
        best = None
        for _ in range(steps):
            mid = (lo + hi) / 2
            t = self.trial(mid, seconds, tcp)
            if t["lost"] == 0:
                lo, best = mid, t
            else:
                hi = mid
        return {"zero_loss_mpps": (best["offered_mpps"] if best else 0.0), "max_forwarded_mpps":
                top["forwarded_mpps"], "search_steps": steps, "trial_seconds": seconds}

    def ceiling(self, seconds: float, tcp: bool = False, steps: int | None = None) -> dict:
        """The XDP-only ceiling: the switch in bypass mode (ext0 -> ext1 in XDP,
        no runtime in the path); one trial, or with `steps` the zero-loss search."""
        self.node_up(1, bypass=True)
        m = self.trial(0, seconds, tcp) if steps is None else self.zero_loss(tcp, seconds, steps)
        m.update(label="xdp-ceiling (bypass)", runtimes=0)
        return m

    def status(self) -> dict:
        st = nodectl.status(self.name)
        return {"socket_full": st["switch"]["socket_full"], "redirect_err": st["switch"]["redirect_err"],
                "xmit_drop": st["switch"]["xmit_drop"],
                "switch_drops": {k: v for k, v in st["switch"].items() if k.startswith("drop_") and v},
                "runtime_idle_waits": sum(r.get("idle_waits") or 0 for r in st["runtimes"]),
                "nf_errors": sum((r.get("nf_errors") or 0) for r in st["runtimes"])}

    def close(self) -> None:
        if self.gen:
            self.gen.close()
        if self.sink:
            self.sink.close()
        nodectl.stop(self.name)
        self.tb.down()
