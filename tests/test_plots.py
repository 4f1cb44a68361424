"""The paper's figures drawn from benchmark JSON: PNG files of the right
figures, from small synthetic results (no root), and from real results
when a run left them in /tmp (bc.json, bm.json, br.json)."""
from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from nfactor_xdp.cli import EXIT_ERROR, main
from nfactor_xdp.tools.bench import plots

PNG = b"\x89PNG\r\n\x1a\n"
MACHINE = {"cpus": 2, "kernel": "6.18", "cpu": "test CPU"}


def _zero_loss(label, runtimes, chain, mpps, confirmed=True):
    return {"label": label, "runtimes": runtimes, "chain": chain, "zero_loss_mpps": mpps,
            "max_forwarded_mpps": mpps * 1.5, "confirmed": confirmed}


def chains_result():
    ms = [_zero_loss(f"{n} runtimes: {'->'.join(c) or 'no NF'}", n, c, v * n, confirmed=v > 0.1)
          for n in (1, 2) for c, v in (([], 0.5), (["flow_monitor"], 0.4), (["http_parser"], 0.1))]
    return {"benchmark": "chains", "machine": MACHINE, "measurements": ms,
            "ceilings": {"bypass": {"zero_loss_mpps": 7.3}, "lookup": {"zero_loss_mpps": 6.2}}}


def _migration(label, flows, rate, cap, ms, skipped=False):
    if skipped:
        return {"label": label, "flows": flows, "rate_per_flow_pps": rate, "max_migrations": cap, "skipped": True,
                "reason": "too much"}
    return {"label": label, "flows": flows, "rate_per_flow_pps": rate, "max_migrations": cap, "skipped": False,
            "batch_seconds": ms / 1e3, "batch_us_per_flow": ms * 1e3 / flows,
            "flow_latency_us": {"avg": ms * 500, "p50": ms * 450, "p99": ms * 900}}


def migration_result():
    fig7 = [_migration(f"{n} flows x {r} pps", n, r, 1000, n / 10 + r, skipped=n * r > 50000)
            for n in (100, 1000) for r in (10, 100)]
    caps = [_migration(f"2000 flows, cap {c}", 2000, 10, c, 300 - c / 10) for c in (100, 500, 1000)]
    return {"benchmark": "migration", "machine": MACHINE, "paper_reference": {"flow_latency_us": 636},
            "fig7_flows_rates": fig7,
            "fig8_caps": {"flows": 2000, "rate_per_flow_pps": 10, "measurements": caps}}


def replication_result():
    tp = [{"label": f"{n} runtimes, K={k or 'off'}", "runtimes": n, "snapshot_every": k,
           "zero_loss_mpps": 0.4 - (0.1 if k else 0), "max_forwarded_mpps": 0.6,
           **({"zero_loss_lost_ratio": 0.25} if k and n > 1 else {})} for n in (1, 2) for k in (0, 10)]
    rec = [{"label": f"{n} flows", "flows": n, "skipped": False, "detected_s": 0.02, "running_again_s": 0.2 + n / 1e5,
            "recovery_seconds": n / 1e5} for n in (1000, 10000)]
    rec += [{"label": f"{n} flows, takeover on", "flows": n, "takeover": "on", "skipped": False, "detected_s": 0.02,
             "taken_s": 0.03 + n / 1e6} for n in (1000, 10000)]
    rec.append({"label": "50000 flows", "flows": 50000, "skipped": True, "reason": "too long"})
    return {"benchmark": "replication", "machine": MACHINE, "paper_reference": {"recovery_total_s": 3.3},
            "throughput": tp, "recovery": rec}


def _check_png(path):
    with open(path, "rb") as f:
        data = f.read()
    assert data.startswith(PNG), path
    assert len(data) > 5000, (path, len(data))  # a drawn figure, not an empty canvas


@pytest.mark.parametrize("make,names", [
    (chains_result, ["fig6a-chains.png"]),
    (migration_result, ["fig7-migration.png", "fig8-migration-caps.png"]),
    (replication_result, ["fig10-replication.png"]),
])
def test_each_benchmark_draws_its_figures(tmp_path, make, names):
    paths = plots.plot(make(), str(tmp_path / "figs"))
    assert [os.path.basename(p) for p in paths] == names
    for p in paths:
        _check_png(p)


def test_bench_plot_command_draws_every_file_and_names_duplicates(tmp_path):
    files = []
    for name, result in (("a", chains_result()), ("b", chains_result()), ("m", migration_result())):
        files.append(str(tmp_path / f"{name}.json"))
        with open(files[-1], "w") as f:
            json.dump(result, f)
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["bench", "plot", *files, "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    drawn = json.loads(r.stdout)
    assert sorted(os.listdir(out)) == ["a-fig6a-chains.png", "b-fig6a-chains.png", "fig7-migration.png",
                                       "fig8-migration-caps.png"]
    assert drawn[files[2]] == [str(out / "fig7-migration.png"), str(out / "fig8-migration-caps.png")]


def test_a_result_without_a_figure_is_refused_in_one_line(tmp_path):
    path = tmp_path / "f.json"
    path.write_text(json.dumps({"benchmark": "forward", "measurements": []}))
    r = CliRunner().invoke(main, ["bench", "plot", str(path), "--out", str(tmp_path)])
    assert r.exit_code == EXIT_ERROR and "Traceback" not in r.output
    assert r.stderr.startswith(f"error: {path}: no figure for a 'forward' benchmark result")


def test_missing_matplotlib_says_how_to_install_it(tmp_path, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as when not installed
    path = tmp_path / "c.json"
    path.write_text(json.dumps(chains_result()))
    for args in (["bench", "plot", str(path)], ["bench", "chains", "--plot", str(tmp_path)]):
        r = CliRunner().invoke(main, args)
        assert r.exit_code == EXIT_ERROR, r.output
        assert r.stderr.splitlines() == ["error: matplotlib is not installed: pip install 'nfactor-xdp[plot]' (or "
                                         ".venv/bin/pip install matplotlib; vm/provision.sh installs it)"]


@pytest.mark.parametrize("path", ["/tmp/bc.json", "/tmp/bm.json", "/tmp/br.json"])
def test_real_results_when_present(tmp_path, path):
    """A real run's JSON (left in /tmp by `nfactorctl bench ... -o`) draws too."""
    if not os.path.exists(path):
        return  # no run here: the synthetic results above cover the drawing
    with open(path) as f:
        result = json.load(f)
    for p in plots.plot(result, str(tmp_path)):
        _check_png(p)
