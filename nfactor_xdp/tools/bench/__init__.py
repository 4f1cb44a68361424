"""Benchmarks on the built-in testbed, each with the XDP-only ceilings measured
in the same run (machines here are noisy: compare ratios).

  forward   pass-through rate (no NF) with 1 and 2 runtimes, offered as fast
            as one CPU can generate                         (forward.py)
  chains    zero-loss rate per service chain (each NF alone, the three
            together) with 1 and 2 runtimes, found by a binary search over
            the offered rate and confirmed (paper Fig. 6a)   (chains.py)
  migration every flow of runtime 0 migrated to runtime 1 under live traffic,
            per flow count and per-flow rate, and per cap on concurrent
            migrations (paper Fig. 7-8)                      (migration.py)
  replication  zero-loss rate with and without snapshots, and the recovery
            of a runtime killed with -9 (paper Fig. 10)       (replication.py)
  hosts     runtimes on a worker host against the ingress host: rates,
            migration, a worker host's failure               (hosts.py)

Load: an XDP program (bpf/bench_gen.c) on the source host's eth0, run with
BPF_PROG_TEST_RUN in live-frames mode (XDP_TX) on CPU 0, rotating the source
port over each trial's own flows; in TCP mode every frame carries a complete
HTTP request with the flow's next sequence number (each packet is a new
request to parse: the parser's worst case).  Count: an XDP program
(bpf/bench_sink.c) on the sink's eth0 that counts the trial's flows and drops.
Both live in load.py.  Ceilings: the switch in bypass mode (ext0 -> ext1 in
XDP) and in lookup mode (its flow path, no runtime).  Every trial is
accounted for frame by frame and checked against the NFs' own counts
(accounting.py), with the CPU time of every CPU and process (cpu.py); the
testbed, the node per configuration, trials, the zero-loss search and the
ceilings are in harness.py.
"""
from __future__ import annotations

import importlib

# The entry points are imported on first use, not here: the generator process
# runs `python -m nfactor_xdp.tools.bench.load`, which imports this package
# first, and should neither pull in the whole harness nor find load.py
# imported already (runpy warns, and the module would exist twice).
_ENTRY_POINTS = {
    "run_forward_bench": "forward",
    "run_chain_bench": "chains",
    "run_migration_bench": "migration",
    "run_replication_bench": "replication",
    "run_hosts_bench": "hosts",
}
__all__ = list(_ENTRY_POINTS)


def __getattr__(name: str):
    if name in _ENTRY_POINTS:
        return getattr(importlib.import_module(f".{_ENTRY_POINTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
