"""`nfactorctl bench costs`: per-frame costs of the runtime's Python path, a
result only if every NF did its work on every frame (no root)."""
from __future__ import annotations

from nfactor_xdp.tools.bench.costs import run_costs_bench


def test_costs_are_measured_on_nfs_that_did_their_work():
    r = run_costs_bench(frames=300, rounds=2)
    assert r["valid"] and r["problems"] == []
    ns = r["ns_per_frame"]
    assert all(v > 0 for k, v in ns.items() if isinstance(v, float))
    assert set(ns["nfs"]) == {"flow_monitor", "firewall", "http_parser", "rate_limiter"}


def test_a_parser_that_stopped_parsing_makes_the_result_invalid(monkeypatch):
    from nfs.http_parser import HttpParser
    monkeypatch.setattr(HttpParser, "process_packet", lambda self, pkt, state: True)
    r = run_costs_bench(frames=300, rounds=2)
    assert not r["valid"]
    assert any("http_parser parsed 0 requests" in p for p in r["problems"])
