"""Logs: text or JSON lines with time, level and role; each process's own
file rotated at its size bound; standard error kept apart for what does not
pass through logging; the journal's prefix only on the journal (no root)."""
from __future__ import annotations

import datetime
import json
import logging
import os
import sys

import pytest

from nfactor_xdp import logs
from nfactor_xdp.control import node_client as nodectl
from nfactor_xdp.control import processes
from nfactor_xdp.formats import config as nodeconf
from nfactor_xdp.formats.config import ConfigError, NodeConfig


@pytest.fixture(autouse=True)
def restore_logger(monkeypatch):
    """setup() replaces the package logger's handlers and sys.excepthook: put them back."""
    log = logging.getLogger(logs.LOGGER)
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    before = list(log.handlers), log.level, log.propagate
    yield
    for h in log.handlers:
        h.close()
    log.handlers[:], log.level, log.propagate = before


@pytest.fixture
def log_root(tmp_path, monkeypatch):
    monkeypatch.setattr(nodeconf, "LOG_ROOT", str(tmp_path))
    return tmp_path


def test_json_lines_parse_with_every_field(log_root):
    cfg = NodeConfig(name="lj", log_format="json")
    logs.setup("rt3", **cfg.log_options("rt3"))
    logs.get("migration").info("moved %d flows", 7)
    try:
        raise ValueError("boom")
    except ValueError:
        logs.get().exception("failed")
    lines = (log_root / "lj" / "rt3.log").read_text().splitlines()
    first, second = (json.loads(ln) for ln in lines)  # one JSON object a line, the traceback inside
    assert first["msg"] == "moved 7 flows" and first["level"] == "INFO" and first["role"] == "rt3"
    assert first["pid"] == os.getpid() and first["logger"] == "nfactor.migration"
    assert datetime.datetime.fromisoformat(first["ts"]).tzinfo is not None
    assert second["level"] == "ERROR" and "ValueError: boom" in second["exc"]


def test_text_lines_have_time_level_role_and_pid(log_root):
    logs.setup("controller", **NodeConfig(name="lt").log_options("controller"))
    logs.get("controller").warning("view v%d", 3)
    (line,) = (log_root / "lt" / "controller.log").read_text().splitlines()
    stamp, level, who, message = line.split(None, 3)
    datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%f")
    assert (level, who, message) == ("WARNING", f"controller[{os.getpid()}]:", "view v3")


def test_rotation_at_the_size_bound_keeps_n_files(tmp_path):
    path = tmp_path / "rt0.log"
    logs.setup("rt0", file=str(path), max_bytes=4096, backups=3)
    line = "x" * 100
    for i in range(400):  # ~60 KB of lines: many rotations
        logs.get().info("%04d %s", i, line)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["rt0.log", "rt0.log.1", "rt0.log.2", "rt0.log.3"]  # N backups, no more
    for p in tmp_path.iterdir():
        assert os.path.getsize(p) <= 4096
    # nothing lost between the files kept: the newest lines, in order, across them
    kept = [ln for name in ("rt0.log.3", "rt0.log.2", "rt0.log.1", "rt0.log")
            for ln in (tmp_path / name).read_text().splitlines()]
    numbers = [int(ln.split(": ", 1)[1].split()[0]) for ln in kept]
    assert numbers == list(range(400 - len(numbers), 400)) and len(numbers) > 100


def test_a_dead_process_stderr_file_is_rotated_before_the_next_start(log_root):
    cfg = NodeConfig(name="ls", log_max_bytes=1 << 16)
    path = nodeconf.stderr_log_path("ls", "x")
    with open(path, "w") as f:
        f.write("old crash\n" * 7000)  # over the bound
    child = processes.Child(cfg, "x", "json.tool")  # refuses --config-json: a usage error on stderr
    child.spawn()
    child.proc.wait(timeout=30)
    assert open(path + ".1").read().startswith("old crash")
    new = open(path).read()
    assert "usage" in new and "old crash" not in new
    logs.rotate_if_over(path, 1 << 16, 1)  # under the bound: left alone
    assert open(path).read() == new


def test_journal_prefix_only_when_stderr_is_the_journal(tmp_path, monkeypatch):
    stream = open(tmp_path / "stream", "w+")
    st = os.fstat(stream.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    assert logs.on_journal(stream)
    logs.setup("supervisor", stream=stream, file=str(tmp_path / "supervisor.log"))
    logs.get().error("no bpffs")
    stream.seek(0)
    assert stream.read() == "<3>supervisor: no bpffs\n"  # journald stamps time and pid itself
    assert " ERROR " in (tmp_path / "supervisor.log").read_text()
    # inherited by a child whose stderr is a file: the variable alone is not the journal
    other = open(tmp_path / "other", "w")
    assert not logs.on_journal(other)
    monkeypatch.delenv("JOURNAL_STREAM")
    assert not logs.on_journal(stream)


def test_stderr_gets_the_lines_unless_it_is_a_file(tmp_path):
    """`up --foreground` in a pipe or on a terminal shows its lines; a child,
    whose standard error is its ROLE.stderr.log, does not repeat them there."""
    r, w = os.pipe()
    with open(w, "w") as pipe, open(tmp_path / "x.stderr.log", "w") as file:
        for stream in (pipe, file):
            logs.setup("supervisor", stream=stream, file=str(tmp_path / "supervisor.log"))
            logs.get().info("node down")
    with open(r) as got:
        assert got.read().endswith(f"supervisor[{os.getpid()}]: node down\n")
    assert (tmp_path / "x.stderr.log").read_text() == ""
    assert (tmp_path / "supervisor.log").read_text().count("node down") == 2


def test_log_settings_are_validated():
    for bad in ({"log_format": "xml"}, {"log_max_bytes": 10}, {"log_backups": 0}):
        with pytest.raises(ConfigError, match="log_"):
            NodeConfig(**bad).validate()


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_failed_start_is_said_in_one_line(tmp_path, fmt):
    """What `up` says when the supervisor gave up: its last error, from its log."""
    log, err = tmp_path / "supervisor.log", tmp_path / "supervisor.stderr.log"
    log.write_text("an old error from an earlier run ERROR x\n")
    err.write_text("")
    since = {str(log): log.stat().st_size, str(err): 0}
    logs.setup("supervisor", fmt=fmt, file=str(log))
    logs.get().info("loading")
    logs.get().error("XDP native mode not supported on eth9: use --xdp-mode auto")
    assert nodectl._last_error(since) == "XDP native mode not supported on eth9: use --xdp-mode auto"
    # nothing logged: the last line of what it wrote to stderr (an uncaught exception)
    log.write_text("")
    err.write_text("Traceback (most recent call last):\n  ...\nModuleNotFoundError: No module named 'x'\n")
    assert nodectl._last_error({str(log): 0, str(err): 0}) == "ModuleNotFoundError: No module named 'x'"
