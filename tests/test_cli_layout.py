"""nfactorctl's layout: command modules loaded lazily, `up`'s options made
from NodeConfig's fields, and exit codes decided in one place (no root)."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

import nfactor_xdp.cli as cli
from nfactor_xdp.cli import EXIT_ERROR, EXIT_PARTIAL, EXIT_USAGE, main
from nfactor_xdp.control import node_client as nodectl
from nfactor_xdp.dataplane.rules import Policy
from nfactor_xdp.formats.config import NodeConfig

UP_EXTRAS = {"--testbed", "--worker", "--foreground", "--config", "--json", "--help"}  # up's options that are not NodeConfig fields


def _up():
    return main.get_command(click.Context(main), "up")


def test_up_options_are_node_config_fields():
    up = _up()
    ctx = click.Context(up)
    params = up.get_params(ctx)
    cli_fields = [f for f in dataclasses.fields(NodeConfig) if f.metadata["cli"]]
    for f in cli_fields:
        (p,) = [p for p in params if p.name == f.name]  # exactly one option per field
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        assert p.get_default(ctx) == default, f.name
        assert p.help == f.metadata["help"]
        assert (f.metadata["option"] or "--" + f.name.replace("_", "-")) in p.opts
        if f.metadata["short"]:
            assert f.metadata["short"] in p.opts
        if f.metadata["choices"]:
            assert tuple(p.type.choices) == f.metadata["choices"]
    field_names = {f.name for f in cli_fields}
    for p in params:
        assert p.name in field_names or set(p.opts) & UP_EXTRAS, p.opts
    assert {o for p in params for o in p.opts} >= UP_EXTRAS


def test_up_makes_the_config_from_its_options(monkeypatch, tmp_path):
    (tmp_path / "p.json").write_text(json.dumps({"rules": [], "default_chain": []}))
    monkeypatch.chdir(tmp_path)
    started = []
    monkeypatch.setattr(nodectl, "start", lambda cfg: started.append(cfg) or {"runtimes": []})
    r = CliRunner().invoke(main, ["up", "--name", "t1", "--cores", "0", "--policy", "p.json", "--other", "drop"])
    assert r.exit_code == 0, r.output
    assert started == [NodeConfig(name="t1", cores=[0], other_action="drop", policy=str(tmp_path / "p.json"))]


def test_commands_are_the_modules():
    """Every command resolves to its module's attribute of the same name, and
    every module of the package (but the shared ones) holds commands."""
    ctx = click.Context(main)
    assert main.list_commands(ctx) == sorted(cli.COMMANDS)
    for name, module in cli.COMMANDS.items():
        cmd = main.get_command(ctx, name)
        assert isinstance(cmd, click.Command) and cmd.name == name
        assert cmd.callback.__module__ == f"nfactor_xdp.cli.{module}"
    modules = {f[:-3] for f in os.listdir(os.path.dirname(cli.__file__)) if f.endswith(".py")}
    assert modules - {"__init__", "__main__", "common"} == set(cli.COMMANDS.values())
    assert main.get_command(ctx, "nosuchcommand") is None


def test_help_loads_no_heavy_layer():
    code = ("import sys\nfrom nfactor_xdp.cli import main\n"
            "assert not [m for m in sys.modules if m.startswith('nfactor_xdp.cli.')]\n"
            "main(['--help'], standalone_mode=False)\n"
            "print(sorted(m for m in sys.modules if m.startswith('nfactor_xdp.')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    loaded = eval(r.stdout.strip().splitlines()[-1])
    assert "nfactor_xdp.cli.bench" in loaded  # help lists every command
    assert not [m for m in loaded if m.split(".")[1] in ("tools", "control", "dataplane")], loaded


def test_exit_codes_are_documented():
    r = CliRunner().invoke(main, ["--help"])
    assert "Exit codes:" in r.output
    for code in (EXIT_ERROR, EXIT_USAGE, EXIT_PARTIAL):
        assert f"  {code}  " in r.output
    assert (EXIT_ERROR, EXIT_USAGE, EXIT_PARTIAL) == (1, 2, 3)


def _error_line(r, code=EXIT_ERROR):
    assert r.exit_code == code, r.output
    assert isinstance(r.exception, SystemExit)
    assert "Traceback" not in r.output and r.stdout == ""
    (line,) = r.stderr.splitlines()
    assert line.startswith("error: ")
    return line


def test_nfactor_error_is_exit_1():
    assert _error_line(CliRunner().invoke(main, ["status", "--name", "doesnotexist"])) == \
        "error: node 'doesnotexist' is not up (no /run/nfactor/doesnotexist/node.json): start it with " \
        "`nfactorctl up --name doesnotexist`"


@pytest.mark.parametrize("args", [["status", "--bogus"], ["nosuchcommand"], ["runtime", "stop"],
                                  ["up", "--other", "explode"], ["bench", "forward", "--runtimes", "x"]])
def test_usage_error_is_exit_2(args):
    r = CliRunner().invoke(main, args)
    assert r.exit_code == EXIT_USAGE
    assert "Error:" in r.stderr and "error: " not in r.stderr


def test_rules_add_while_the_controller_does_not_answer(monkeypatch):
    def no_answer(name, policy):
        raise nodectl.NodeCtlError("no reply from 127.0.0.1:4000 after 3 tries")
    monkeypatch.setattr(nodectl, "get_policy", lambda name: Policy())
    monkeypatch.setattr(nodectl, "put_policy", no_answer)
    r = CliRunner().invoke(main, ["rules", "add", "--name", "t1", "--proto", "udp", "--chain", "firewall"])
    assert _error_line(r) == "error: no reply from 127.0.0.1:4000 after 3 tries"


def test_os_error_is_exit_1_without_errno(monkeypatch):
    def denied(name):
        raise PermissionError(13, "Permission denied", "/run/nfactor/t1/node.json")
    monkeypatch.setattr(nodectl, "status", denied)
    assert _error_line(CliRunner().invoke(main, ["status", "--name", "t1"])) == \
        "error: /run/nfactor/t1/node.json: Permission denied"


@pytest.mark.parametrize("args,msg", [([], "say which flows"), (["--flow", "gre 1:1 2:2"], "tcp|udp"),
                                      (["--all", "--count", "3"], "say which flows")])
def test_migrate_refuses_clearly(args, msg):
    assert msg in _error_line(CliRunner().invoke(main, ["migrate", "--from", "0", "--to", "1", *args]))


@pytest.mark.parametrize("failed,code", [(0, 0), (2, EXIT_PARTIAL)])
@pytest.mark.parametrize("as_json", [[], ["--json"]])
def test_migrate_partly_done_is_exit_3(monkeypatch, failed, code, as_json):
    lat = {"avg": 900.0, "p50": 800.0, "p99": 1500.0, "max": 1500.0, "flows": 5 - failed}
    report = {"succeeded": 5 - failed, "failed": failed, "retried": 0, "total": 5, "seconds": 0.01,
              "batch_us_per_flow": 2000.0, "flow_latency_us": lat,
              "last_error": "runtime 1 refused" if failed else None}
    monkeypatch.setattr(nodectl, "migrate", lambda *a, **kw: report)
    r = CliRunner().invoke(main, ["migrate", "--from", "0", "--to", "1", "--all", *as_json])
    assert r.exit_code == code, r.output
    if as_json:
        assert json.loads(r.stdout) == report
    else:
        assert ("last error: runtime 1 refused" in r.stdout) == bool(failed)
        # the batch's time per flow and one flow's latency, each named
        assert "10.0 ms (2000 us per flow of the batch)" in r.stdout
        assert "one flow's migration took 900 us on average, p99 1500 us" in r.stdout


@pytest.mark.parametrize("rc,code", [(0, 0), (1, EXIT_ERROR), (2, EXIT_PARTIAL), (130, 130)])
def test_demo_lost_traffic_is_exit_3(monkeypatch, rc, code):
    from nfactor_xdp.tools import demo
    monkeypatch.setattr(demo, "run_demo", lambda **kw: rc)
    assert CliRunner().invoke(main, ["demo"]).exit_code == code


def test_python_m_runs_the_same_main():
    r = subprocess.run([sys.executable, "-m", "nfactor_xdp.cli", "status", "--name", "doesnotexist"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == EXIT_ERROR and r.stderr.startswith("error: node 'doesnotexist' is not up")
    assert "Traceback" not in r.stderr
