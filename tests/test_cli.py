"""nfactorctl: help texts, and clear errors for bad input (no root needed
for most; errors must come out as messages, never tracebacks)."""
import pytest
from click.testing import CliRunner

from nfactor_xdp.cli import main
from nfactor_xdp.formats.config import ConfigError, NodeConfig

COMMANDS = [[], ["up"], ["down"], ["status"], ["flows"], ["probe"], ["demo"], ["testbed"],
            ["testbed", "up"], ["testbed", "down"], ["testbed", "show"], ["bench"], ["bench", "forward"],
            ["bench", "chains"], ["bench", "migration"], ["bench", "replication"], ["bench", "hosts"], ["bench", "plot"],
            ["migrate"],
            ["rules"],
            ["rules", "add"], ["rules", "del"], ["rules", "list"], ["rules", "default"], ["rules", "load"],
            ["runtime"], ["runtime", "add"], ["runtime", "stop"], ["runtime", "kill"], ["runtime", "drain"],
            ["restart"]]


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c) or "top")
def test_help(cmd):
    r = CliRunner().invoke(main, cmd + ["--help"])
    assert r.exit_code == 0
    assert "Usage:" in r.output
    assert len(r.output.splitlines()) > 3


def test_up_rejects_bad_config_clearly():
    r = CliRunner().invoke(main, ["up", "--runtimes", "0", "--name", "x"])
    assert r.exit_code == 1
    assert "runtimes must be" in r.output
    assert "Traceback" not in r.output


def test_status_of_a_node_that_is_not_up():
    r = CliRunner().invoke(main, ["status", "--name", "nosuchnode"])
    assert r.exit_code == 1
    assert "not up" in r.output


def test_up_rejects_bad_cores():
    r = CliRunner().invoke(main, ["up", "--cores", "a,b"])
    assert r.exit_code != 0
    assert "comma-separated" in r.output


@pytest.mark.parametrize("kw,msg", [
    ({"name": "Bad Name"}, "node name"),
    ({"ext0": "a", "ext1": "a"}, "different"),
    ({"ext0": "x" * 16}, "interface name"),
    ({"other_action": "explode"}, "other_action"),
    ({"flow_table_size": 10}, "flow_table_size"),
    ({"cores": [999]}, "core 999"),
    ({"xdp_mode": "turbo"}, "xdp_mode"),
])
def test_node_config_validation(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        NodeConfig(**kw).validate()


def test_node_config_round_trip():
    cfg = NodeConfig(name="a1", runtimes=3, cores=[0])
    assert NodeConfig.from_dict(cfg.to_dict()) == cfg
    assert [cfg.core_of(i) for i in range(3)] == [0, 0, 0]
