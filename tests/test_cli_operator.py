"""nfactorctl for an operator: --version, --json wherever a command reports
something, one line (what happened, what to do) for an expected failure,
progress on a terminal only, and `status --watch` (no root)."""
from __future__ import annotations

import json
import time

import pytest
from click.testing import CliRunner

from nfactor_xdp import __version__
from nfactor_xdp.cli import EXIT_ERROR, common, main
from nfactor_xdp.control import node_client as nodectl
from nfactor_xdp.dataplane.rules import Policy
from nfactor_xdp.formats import config as nodeconf
from nfactor_xdp.formats.messages import MessageTimeout
from nfactor_xdp.kern import layouts as L
from nfactor_xdp.kern import loader


def _one_error_line(r) -> str:
    assert r.exit_code == EXIT_ERROR, r.output
    assert "Traceback" not in r.output and r.stdout == ""
    (line,) = r.stderr.splitlines()
    assert line.startswith("error: ")
    return line


def test_version_names_the_package_and_the_bpf_abi():
    r = CliRunner().invoke(main, ["--version"])
    assert r.exit_code == 0
    assert r.stdout == f"nfactorctl {__version__}, BPF ABI {L.C['NFX_ABI_VERSION']}\n"


# --- --json on every command that reports something ----------------------------------

@pytest.fixture
def fake_node(monkeypatch):
    """A node whose client calls answer from here; what each was asked."""
    asked = []

    def control_call(name, to, msg_type, body, timeout=1.0):
        asked.append((to, msg_type.name, body))
        return {"ok": True, "id": body.get("id", 2)}
    monkeypatch.setattr(nodectl, "control_call", control_call)
    monkeypatch.setattr(nodectl, "start", lambda cfg: {"phase": "running", "supervisor_pid": 9,
                                                       "runtimes": [{"id": 0, "core": 0, "pid": 10}]})
    monkeypatch.setattr(nodectl, "stop", lambda name, purge=False: [])
    monkeypatch.setattr(nodectl, "get_policy", lambda name: Policy())
    monkeypatch.setattr(nodectl, "put_policy", lambda name, policy: [0, 1])
    monkeypatch.setattr(nodeconf, "LIB_ROOT", "/nonexistent-lib")  # only named in the output
    return asked


@pytest.mark.parametrize("args,expect", [
    (["up", "--name", "j1"], {"phase": "running"}),
    (["down", "--name", "j1"], {"node": "j1", "down": True}),
    (["runtime", "add", "--name", "j1"], {"done": "added", "id": 2}),
    (["runtime", "stop", "--name", "j1", "--id", "1"], {"done": "stopped", "id": 1}),
    (["runtime", "kill", "--name", "j1", "--id", "1"], {"done": "killed", "id": 1}),
    (["runtime", "drain", "--name", "j1", "--id", "1"], {"done": "draining", "id": 1}),
    (["rules", "add", "--name", "j1", "--proto", "udp", "--chain", "firewall"],
     {"pushed_to": [0, 1], "saved": "/nonexistent-lib/j1/policy.json"}),
    (["rules", "default", "--name", "j1", "--chain", "flow_monitor"], {"default_chain": ["flow_monitor"]}),
    (["rules", "fragments", "--name", "j1", "drop"], {"fragments": "drop"}),
    (["rules", "list", "--name", "j1"], {"rules": []}),
])
def test_json_output(fake_node, args, expect):
    r = CliRunner().invoke(main, [*args, "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)  # the whole of stdout is one JSON document
    for k, v in expect.items():
        assert out[k] == v, (k, out)


def test_rules_del_json(fake_node, monkeypatch):
    policy = Policy()
    rule = policy.add({"proto": "udp", "chain": "firewall"})
    monkeypatch.setattr(nodectl, "get_policy", lambda name: policy)
    r = CliRunner().invoke(main, ["rules", "del", "--name", "j1", str(rule.id), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["deleted"] == rule.id


def test_rules_load_json(fake_node, tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"rules": [{"proto": "tcp", "chain": ["firewall"]}], "default_chain": []}))
    r = CliRunner().invoke(main, ["rules", "load", "--name", "j1", str(path), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) | {"saved": None} == {"node": "j1", "loaded": str(path), "rules": 1,
                                                      "saved": None, "pushed_to": [0, 1]}


# --- one line for an expected failure -------------------------------------------------

@pytest.fixture
def run_root(tmp_path, monkeypatch):
    monkeypatch.setattr(nodeconf, "RUN_ROOT", str(tmp_path / "run"))
    return tmp_path


def test_controller_that_does_not_answer(run_root, monkeypatch):
    nodeconf.write_state("q1", {"phase": "running", "runtimes": []})

    class Silent:
        def call(self, addr, msg_type, body, timeout, retries):
            raise MessageTimeout(f"no reply from {addr} to STATUS after 4 attempts 2.0s apart")

        def close(self):
            pass
    monkeypatch.setattr(nodectl, "_endpoint", lambda name: Silent())
    line = _one_error_line(CliRunner().invoke(main, ["runtime", "drain", "--name", "q1", "--id", "0"]))
    assert line.startswith("error: node 'q1': the controller does not answer: no reply from ")
    assert line.endswith("`nfactorctl status --name q1` shows the node, /var/log/nfactor/q1/ has its logs")


def test_node_whose_supervisor_is_gone(run_root):
    nodeconf.write_state("q2", {"phase": "running", "supervisor": {"pid": 2**22 + 5, "start": 1}, "runtimes": []})
    assert _one_error_line(CliRunner().invoke(main, ["runtime", "add", "--name", "q2"])) == (
        "error: node 'q2' is not running: its supervisor is gone (`nfactorctl down --name q2` cleans up what it "
        "left, then `nfactorctl up`)")


@pytest.mark.parametrize("args", [["migrate", "--from", "0", "--to", "1", "--all"], ["flows"], ["status"],
                                  ["status", "--watch"], ["runtime", "kill", "--id", "0"]])
def test_node_that_is_not_up(run_root, args):
    line = _one_error_line(CliRunner().invoke(main, [*args, "--name", "q3"]))
    assert line == (f"error: node 'q3' is not up (no {run_root}/run/q3/node.json): start it with "
                    f"`nfactorctl up --name q3`")


def test_up_without_bpffs_or_bcc(monkeypatch):
    monkeypatch.setattr(nodectl.os, "geteuid", lambda: 0)
    monkeypatch.setattr(nodectl, "supervisor_alive", lambda name: pytest.fail("went past the checks"))
    monkeypatch.setattr(loader.os.path, "ismount", lambda path: False)
    assert _one_error_line(CliRunner().invoke(main, ["up", "--name", "q4"])) == \
        "error: bpffs is not mounted on /sys/fs/bpf: mount -t bpf bpf /sys/fs/bpf"
    monkeypatch.setattr(loader.os.path, "ismount", lambda path: True)
    monkeypatch.setitem(__import__("sys").modules, "bcc", None)
    line = _one_error_line(CliRunner().invoke(main, ["up", "--name", "q4"]))
    assert line.startswith("error: BCC is not importable: install python3-bpfcc") and "vm/provision.sh" in line


# --- progress: on a terminal only ---------------------------------------------------------

def _reports(total):
    for done in range(0, total + 1, 50):
        yield {"total": total, "succeeded": done, "failed": 0, "in_progress": total - done, "done": done == total,
               "seconds": 0.5, "batch_us_per_flow": 2500.0, "flow_latency_us": {}, "retried": 0}


@pytest.mark.parametrize("terminal,as_json", [(True, []), (True, ["--json"]), (False, [])])
def test_migrate_progress_only_on_a_terminal_without_json(monkeypatch, terminal, as_json):
    def migrate(name, src, dst, count=None, keys=None, progress=None):
        *polls, last = _reports(200)
        for r in polls:
            if progress:
                progress(r)
        return last
    monkeypatch.setattr(nodectl, "migrate", migrate)
    monkeypatch.setattr(common, "on_terminal", lambda: terminal)
    r = CliRunner().invoke(main, ["migrate", "--from", "0", "--to", "1", "--all", *as_json])
    assert r.exit_code == 0, r.output
    shown = terminal and not as_json
    assert ("\rmigrating: 150/200 flows done, 0 failed" in r.stderr) == shown
    assert r.stderr == "" or shown
    if as_json:
        assert json.loads(r.stdout)["succeeded"] == 200
    else:
        assert r.stdout.startswith("200 migrated, 0 failed, 0 retried, of 200 flows from runtime 0 to 1")


def test_bench_prints_a_line_per_trial_on_a_terminal(monkeypatch, tmp_path):
    from nfactor_xdp.tools import bench as benchmarks

    def fake_bench(progress=None, **kw):
        for i, role in enumerate(("full speed", "search", "confirmation"), 1):
            if progress:
                progress({"trial": i, "elapsed_s": 61.0 * i, "measuring": "1 runtime: firewall", "role": role,
                          "requested_pps": 250000.0 if i > 1 else None, "offered_mpps": 0.2498, "lost": 0,
                          "valid": i != 2})
        return {"benchmark": "chains", "measurements": []}
    monkeypatch.setattr(benchmarks, "run_chain_bench", fake_bench, raising=False)
    monkeypatch.setattr(common, "on_terminal", lambda: True)
    r = CliRunner().invoke(main, ["bench", "chains", "-o", str(tmp_path / "b.json")])
    assert r.exit_code == 0, r.output
    lines = r.stderr.splitlines()
    assert len(lines) == 3 and lines[1].startswith("[trial   2,   2:02] 1 runtime: firewall")
    assert "search" in lines[1] and "asked 0.2500 Mpps, offered 0.2498: lost 0, INVALID" in lines[1]
    assert "asked    max Mpps" in lines[0]
    r = CliRunner().invoke(main, ["bench", "chains", "-o", "-"])  # JSON on stdout: quiet
    assert r.exit_code == 0 and r.stderr == "" and json.loads(r.stdout)["benchmark"] == "chains"


# --- status --watch ------------------------------------------------------------------------

def _status(frames):
    return {"phase": "running", "switch_flows": 12, "switch": {"to_runtime": frames, "drop_bad_ip": 1},
            "runtimes": [{"id": 0, "state": "running", "core": 1, "pid": 99, "load": {"cpu": 0.25}, "flows": 12,
                          "frames": frames, "switch": {"flows_placed": 12}, "restarts": 0}]}


@pytest.mark.parametrize("as_json", [False, True])
def test_status_watch_refreshes_until_ctrl_c(monkeypatch, as_json):
    frames = iter([1000, 3000, 6000])
    monkeypatch.setattr(nodectl, "status", lambda name: _status(next(frames)))
    sleeps = []
    clock = iter(range(100))
    monkeypatch.setattr(time, "monotonic", lambda: float(next(clock)))

    def sleep(s):
        sleeps.append(s)
        if len(sleeps) == 3:
            raise KeyboardInterrupt
    monkeypatch.setattr(time, "sleep", sleep)
    r = CliRunner().invoke(main, ["status", "--watch", "--interval", "0.5", *(["--json"] if as_json else [])])
    assert r.exit_code == 0 and "Traceback" not in r.output and r.stderr == ""
    assert sleeps == [0.5, 0.5, 0.5]
    if as_json:
        assert [json.loads(ln)["runtimes"][0]["frames"] for ln in r.stdout.splitlines()] == [1000, 3000, 6000]
        return
    tables = r.stdout.split("\n\n")  # not a terminal: one table after another
    assert len(tables) == 3 and all("switch: 12 flows" in t and "dropped" in t for t in tables)
    rows = [t.splitlines()[2].split() for t in tables]
    assert rows[0][:7] == ["rt0", "running", "1", "99", "25%", "12", "1000"]
    assert [row[7] for row in rows] == ["-", "2000", "3000"]  # frames/s from the second table on


def test_a_bench_killed_with_sigterm_takes_its_testbed_down(monkeypatch, tmp_path):
    """kill (SIGTERM) ends a benchmark as Ctrl-C does: its testbed and node
    are taken down on the way out (the harness's `with`), not left running."""
    import os
    import signal
    from nfactor_xdp.tools import bench as benchmarks
    cleaned = []

    def fake_bench(progress=None, **kw):
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # its handler runs before the next line
            raise AssertionError("SIGTERM did not stop the benchmark")
        finally:
            cleaned.append(True)
    monkeypatch.setattr(benchmarks, "run_chain_bench", fake_bench, raising=False)
    before = signal.signal(signal.SIGTERM, lambda *a: None)  # (without the CLI's own: ignored, the test fails)
    try:
        r = CliRunner().invoke(main, ["bench", "chains", "-o", str(tmp_path / "b.json")])
    finally:
        signal.signal(signal.SIGTERM, before)
    assert cleaned == [True] and r.exit_code == 128 + signal.SIGTERM, r.output
    assert not (tmp_path / "b.json").exists()


def test_bench_hosts_prints_its_table(monkeypatch, tmp_path):
    from nfactor_xdp.tools import bench as benchmarks
    acc = {"offered": 100, "forwarded": 90, "drops": {"runtime_socket_full": 10}, "unaccounted": 0,
           "valid": True, "invalid_because": [], "markers": {}, "sent": 100, "generator_veth_dropped": 0,
           "requested_pps": None, "lost": 10, "offered_mpps": 1.0}
    ratio = {"ratio_to_lookup_ceiling": 0.05, "ratio_to_bypass_ceiling": 0.04}
    rates = [{"label": f"1 runtime on the {w} host", "forward": {**acc, **ratio, "forwarded_mpps": f},
              "full_chain": {**ratio, "zero_loss_mpps": c}} for w, f, c in (("ingress", 0.4, 0.1), ("worker", 0.28, 0.095))]
    rates[1]["forward"]["of_ingress_host"], rates[1]["full_chain"]["of_ingress_host"] = 0.7, 0.95
    result = {"benchmark": "hosts", "ceilings": {}, "rates": rates,
              "migration": [{"label": "100 flows x 50 pps, one host", "migrated": 50, "total": 50, "failed": 0,
                             "flow_latency_us": {"avg": 37000.0, "p99": 40000.0}, "batch_seconds": 0.04,
                             "trial": acc},
                            {"label": "x", "error": "runtime 8: gone"}],
              "failure": [{"label": "host 1 fails, 1000 flows", "fenced_s": 0.52, "taken_s": 0.53,
                           "actors_before": {"rt0": 500, "rt8": 500}, "actors_taken": 500, "lost_across_failure": 10,
                           "lost_with_host": 12, "died_counted_by_host": 2, "trial": acc},
                          {"label": "host 1 fails, 99999 flows", "skipped": True, "reason": "too long"}]}
    monkeypatch.setattr(benchmarks, "run_hosts_bench", lambda progress=None, **kw: result, raising=False)
    monkeypatch.setattr(common, "on_terminal", lambda: False)
    r = CliRunner().invoke(main, ["bench", "hosts", "-o", str(tmp_path / "h.json")])
    assert r.exit_code == 0, r.output
    assert "= 70% of the ingress host's" in r.output and "= 95% of the ingress host's" in r.output
    assert "fenced after 0.52 s, 500 of 500 flows taken after 0.53 s" in r.output
    assert "error: runtime 8: gone" in r.output and "too long" in r.output
