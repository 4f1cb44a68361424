"""The supervisor's side of hardening, without a data path: a bad policy
stops a node from starting (and a controller from running) with a clear
error; a child that keeps dying is restarted ever later, and a controller
whose log cannot be replayed says why; processes are only ever signalled
after their identity (pid and start time) is checked.  Root: these write
under /run/nfactor and /var/lib/nfactor."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid

import pytest

from nfactor_xdp.control import node_client as nodectl
from nfactor_xdp.control import processes, supervisor
from nfactor_xdp.control.durable_log import ControllerLog
from nfactor_xdp.formats import config as nodeconf
from nfactor_xdp.formats.config import NodeConfig
from tests.helpers import PY, wait_for

pytestmark = pytest.mark.root


@pytest.fixture
def name():
    """A node name whose files are all gone afterwards."""
    n = f"h{uuid.uuid4().hex[:6]}"
    yield n
    for d in (nodeconf.run_dir(n), os.path.dirname(nodeconf.policy_path(n)), nodeconf.log_dir(n)):
        shutil.rmtree(d, ignore_errors=True)


def _write_policy(name: str, text: str) -> str:
    path = nodeconf.policy_path(name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return path


# --- a bad policy fails closed ----------------------------------------------------

def test_up_refuses_a_corrupt_saved_policy_naming_the_file(name):
    path = _write_policy(name, '{"default_chain": ["flow_monitor"], ')
    r = subprocess.run([PY, "-m", "nfactor_xdp.cli", "up", "--name", name, "--ext0", "nope0", "--ext1", "nope1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert f"policy file {path}: not valid JSON" in r.stderr and "not starting node" in r.stderr, r.stderr
    assert nodeconf.read_state(name) is None  # nothing was started


def test_a_controller_never_runs_without_the_policy(name):
    path = _write_policy(name, '{"rules": [{"chain": ["no_such_nf"]}]}')
    p = subprocess.run([PY, "-m", "nfactor_xdp.control.controller", "--config-json", NodeConfig(name=name).to_json()],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 2, p.stderr
    why = nodeconf.take_exit_reason(name, "controller")
    assert why and f"policy file {path}" in why and "no_such_nf" in why, why


def test_a_controller_whose_replay_fails_says_why_and_is_restarted_ever_later(name):
    log = ControllerLog(nodeconf.controller_log_path(name))
    log.done(log.intend({"op": "policy", "policy": {"rulez": []}}))  # a logged op this version cannot apply
    log.close()
    node = supervisor.Node(NodeConfig(name=name))
    ctl = node.controller
    ctl.spawn()
    try:
        wait_for(ctl.exited, timeout=30, what="the controller to give up")
        assert ctl.proc.returncode == 2
        node._reap()
        why = ctl.info()["last_exit"]["why"]
        assert "replaying the log" in why and "unknown keys ['rulez']" in why, why
        assert log.path in why
        delays = []
        deadline = time.monotonic() + 4.0
        while time.monotonic() < deadline:  # the supervisor's loop, children only
            node._reap()
            if ctl.exited_at is not None and (not delays or delays[-1] != ctl.delay):
                delays.append(ctl.delay)
            time.sleep(0.005)
    finally:
        ctl.stop()
    # doubling from 20 ms: a handful of restarts in 4 s, not one every 20 ms
    assert 3 <= ctl.restarts <= 9, (ctl.restarts, delays)
    assert delays == sorted(delays) and delays[-1] >= 8 * delays[0], delays
    assert ctl.info()["quick_exits"] in (ctl.restarts, ctl.restarts + 1)  # the last one may still run
    assert ctl.info()["last_exit"]["code"] == 2


def test_restart_backoff_doubles_is_capped_and_resets_after_a_good_run():
    c = processes.Child(NodeConfig(name="unused"), "x", "json.tool", backoff=0.1)
    c.proc = subprocess.Popen([sys.executable, "-c", "pass"])
    c.proc.wait()
    c.started_at = 100.0
    for i in range(12):  # each exit a second after its start
        c.note_exit(c.started_at + 1.0)
        assert c.delay == min(processes.BACKOFF_MAX, 0.1 * 2 ** i)
        c.started_at += 2.0
    assert c.delay == processes.BACKOFF_MAX and c.quick_exits == 12
    c.note_exit(c.started_at + processes.STABLE_AFTER + 1)  # ran long enough: back to the base delay
    assert c.delay == 0.1 and c.quick_exits == 1
    assert c.restart_due(c.exited_at + 0.11) and not c.restart_due(c.exited_at + 0.05)


# --- identities before signals ---------------------------------------------------------

def _fake_state(name: str, pid: int, ident: dict | None) -> None:
    """A node.json left by a dead node whose pids now belong to someone else."""
    child = {"pid": pid, "identity": ident, "restarts": 0}
    nodeconf.write_state(name, {"phase": "running", "supervisor_pid": pid, "supervisor": ident,
                                "config": NodeConfig(name=name).to_dict(),
                                "runtimes": [{"id": 0, **child}], "controller": child, "switch_agent": child})


@pytest.mark.parametrize("recorded", ["pid only", "another start time"])
def test_down_and_up_never_signal_a_process_that_reuses_a_recorded_pid(name, monkeypatch, recorded):
    monkeypatch.setattr(supervisor, "teardown", lambda cfg: [])  # this node has no programs or ports
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        real = processes.identity(sleeper.pid)
        ident = None if recorded == "pid only" else dict(real, start=real["start"] - 1)
        _fake_state(name, sleeper.pid, ident)
        assert not nodectl.supervisor_alive(name)
        nodectl.stop(name, timeout=1.0)  # `down`: the supervisor's pid, then force_down's
        _fake_state(name, sleeper.pid, ident)
        supervisor.stop_leftovers(nodeconf.read_state(name))  # what `up` does with a dead node's state
        time.sleep(0.2)
        assert sleeper.poll() is None, "a process that merely has a recorded pid was killed"
        # the very process recorded is stopped
        _fake_state(name, sleeper.pid, real)
        assert nodectl.supervisor_alive(name)
        nodectl.stop(name, timeout=5.0)
        assert sleeper.wait(timeout=5) is not None
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()


def test_identity_is_the_pid_and_its_start_time():
    me = processes.identity(os.getpid())
    assert me["pid"] == os.getpid() and isinstance(me["start"], int) and me["boot"]
    assert processes.is_same(me)
    assert not processes.is_same(dict(me, start=me["start"] + 1))
    assert not processes.is_same(dict(me, boot="another boot"))
    assert not processes.is_same({"pid": os.getpid()}) and not processes.is_same(None)
    # signal 0: delivered (checked) only to the very process
    assert processes.signal_process(me, 0) and not processes.signal_process(dict(me, start=me["start"] + 1), 0)
    assert not processes.signal_process({"pid": 2**22 + 7, "start": 1}, 0)  # no such pid
