"""`nfactorctl up --config FILE`: a TOML file of NodeConfig's settings under
the options typed on the command line, over the defaults; clear errors; the
example file is generated from the fields (no root)."""
from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from nfactor_xdp.cli import EXIT_ERROR, EXIT_USAGE, main
from nfactor_xdp.control import node_client as nodectl
from nfactor_xdp.formats import config_file
from nfactor_xdp.formats.config import ConfigError, NodeConfig

EXAMPLE = Path(__file__).resolve().parent.parent / "vm" / "nfactor.toml.example"


@pytest.fixture
def started(monkeypatch):
    """The NodeConfig `up` would start the node with."""
    got = []
    monkeypatch.setattr(nodectl, "start", lambda cfg: got.append(cfg) or {"runtimes": []})
    return got


def _up(tmp_path, text: str, *args: str):
    path = tmp_path / "node.toml"
    path.write_text(text)
    return CliRunner().invoke(main, ["up", "--config", str(path), *args])


def test_defaults_then_file_then_command_line(tmp_path, started):
    r = _up(tmp_path, 'runtimes = 3\nother_action = "drop"\nflow_table_size = 4096\ncores = [0]\n'
                      'idle_timeout = 7\nname = "fromfile"\n',
            "--runtimes", "1", "--name", "t1")
    assert r.exit_code == 0, r.output
    assert started == [NodeConfig(name="t1", runtimes=1, other_action="drop", flow_table_size=4096, cores=[0],
                                  idle_timeout=7.0)]  # everything else: the defaults


def test_an_option_typed_with_its_default_value_still_overrides_the_file(tmp_path, started):
    # not "left at its default": typed, so it wins (Click's parameter source, not the value)
    r = _up(tmp_path, "runtimes = 3\nreplace_xdp = true\n", "--runtimes", "2", "--no-replace-xdp")
    assert r.exit_code == 0, r.output
    assert (started[0].runtimes, started[0].replace_xdp) == (2, False)


def test_a_relative_policy_path_is_the_files_directory(tmp_path, started):
    (tmp_path / "p.json").write_text('{"rules": [], "default_chain": []}')
    r = _up(tmp_path, 'policy = "p.json"\n')
    assert r.exit_code == 0, r.output
    assert started[0].policy == str(tmp_path / "p.json")


@pytest.mark.parametrize("text,error", [
    ('runtimes = 2\nflow-table-size = 4096\n', ":2: unknown key 'flow-table-size' (did you mean 'flow_table_size'?)"),
    ('other = "drop"\n', ":1: unknown key 'other' (did you mean 'other_action'?)"),
    ('\n\nrumtimes = 2\n', ":3: unknown key 'rumtimes' (did you mean 'runtimes'?)"),
    ('runtimes = "2"\n', ":1: runtimes: expected an integer, got a string '2'"),
    ('runtimes = true\n', ":1: runtimes: expected an integer, got true or false True"),
    ('idle_timeout = "1s"\n', ":1: idle_timeout: expected a number, got a string '1s'"),
    ('cores = [0, "1"]\n', ":1: cores: expected a list of integers, e.g. [0, 1]"),
    ('xdp_mode = "fast"\n', ":1: xdp_mode: 'fast' is not one of native, generic, auto"),
    ('[node]\nruntimes = 2\n', ":1: unknown key 'node'"),
])
def test_bad_keys_and_types_name_the_file_line_and_key(tmp_path, text, error):
    path = tmp_path / "node.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        config_file.read(str(path))
    assert str(e.value).startswith(f"{path}{error}"), str(e.value)
    r = CliRunner().invoke(main, ["up", "--config", str(path)])
    assert r.exit_code == EXIT_ERROR and r.stderr.startswith(f"error: {path}{error}")


def test_toml_syntax_error_names_the_file_and_line(tmp_path):
    r = _up(tmp_path, "runtimes = 2\nbatch = \n")
    assert r.exit_code == EXIT_ERROR
    assert r.stderr.startswith(f"error: config file {tmp_path / 'node.toml'}: ") and "line 2" in r.stderr


def test_range_errors_come_from_validate(tmp_path, started):
    r = _up(tmp_path, "runtimes = 0\n")
    assert r.exit_code == EXIT_ERROR and "runtimes must be" in r.stderr and not started


def test_a_missing_file_is_a_usage_error(tmp_path):
    r = CliRunner().invoke(main, ["up", "--config", str(tmp_path / "nope.toml")])
    assert r.exit_code == EXIT_USAGE


def test_the_example_lists_every_setting_with_its_default():
    text = EXAMPLE.read_text()
    assert text == config_file.example(), \
        "vm/nfactor.toml.example is stale: python -m nfactor_xdp.formats.config_file > vm/nfactor.toml.example"
    parsed = tomllib.loads(text)
    for f in dataclasses.fields(NodeConfig):
        if not f.metadata["cli"]:
            assert f.name not in parsed
            continue
        default = config_file.default(f)
        if default is None:  # no TOML null: shown commented out
            assert f.name not in parsed and f"# {f.name} = " in text
        else:
            assert parsed[f.name] == default and type(parsed[f.name]) is type(default), f.name
        assert f.metadata["help"].split()[0] in text
    # and read() takes it: the example as a file gives the defaults
    assert NodeConfig(**config_file.read(str(EXAMPLE))) == NodeConfig()
