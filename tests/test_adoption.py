"""Adoption without a data path: a process a previous supervisor started is
watched through a pidfd whether or not it is our child, a reused pid is
never adopted, and a new supervisor takes over only the runtimes of a node
whose supervisor is gone, on the same ports.  Root: writes under /run/nfactor."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import uuid

import pytest

from nfactor_xdp.control import adoption, processes
from nfactor_xdp.formats import config as nodeconf
from nfactor_xdp.formats.config import NodeConfig
from tests.helpers import wait_for

pytestmark = pytest.mark.root


@pytest.fixture
def name():
    n = f"a{uuid.uuid4().hex[:6]}"
    yield n
    shutil.rmtree(nodeconf.run_dir(n), ignore_errors=True)


@pytest.fixture
def orphan():
    """A `sleep` that is not our child (its parent exited at once), as a
    runtime is after its supervisor was killed."""
    out = subprocess.run(["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"], capture_output=True, text=True)
    pid = int(out.stdout)
    yield pid
    processes.signal_process(processes.identity(pid), signal.SIGKILL)


def _child(cfg=None) -> processes.Child:
    return processes.Child(cfg or NodeConfig(name="x"), "rt0", "nowhere")


def test_an_adopted_process_that_is_not_our_child_is_seen_to_exit(orphan):
    c = _child()
    ident = processes.identity(orphan)
    assert c.adopt(ident) and c.adopted and c.pid == orphan and not c.exited()
    os.kill(orphan, signal.SIGKILL)
    wait_for(c.exited, timeout=5, what="the adopted process's exit, through its pidfd")
    assert c.returncode is None  # not ours to reap: its code is unknown
    assert c.info()["adopted"]


def test_an_adopted_child_of_ours_is_reaped_with_its_code():
    """After a re-exec the runtimes are still our children."""
    p = subprocess.Popen(["sleep", "60"])
    c = _child()
    assert c.adopt(processes.identity(p.pid))
    os.kill(p.pid, signal.SIGTERM)
    wait_for(c.exited, timeout=5, what="the child's exit")
    assert c.returncode == -signal.SIGTERM
    assert not processes.pid_alive(p.pid)  # reaped, no zombie left


def test_a_reused_pid_is_never_adopted(orphan):
    ident = processes.identity(orphan)
    c = _child()
    assert not c.adopt(dict(ident, start=ident["start"] - 1)) and not c.adopted
    assert not c.adopt({"pid": orphan}) and not c.adopt(None)


def _state(name: str, phase: str, runtime: dict | None, supervisor: dict | None, **cfg) -> None:
    rec = {"id": 0, "pid": runtime and runtime["pid"], "identity": runtime, "restarts": 2}
    nodeconf.write_state(name, {"phase": phase, "supervisor": supervisor,
                                "config": NodeConfig(name=name, **cfg).to_dict(), "runtimes": [rec],
                                "controller": {"pid": None, "identity": None}})


def test_the_runtimes_of_a_node_whose_supervisor_died_are_taken_over(name, orphan):
    ident = processes.identity(orphan)
    dead = {"pid": 2**22 + 11, "start": 1, "boot": None}
    _state(name, "running", ident, dead)
    found = adoption.leftovers(NodeConfig(name=name))
    assert found.runtimes[0]["identity"] == ident and found.how == "dead supervisor"
    # the same, with this process recorded as the supervisor: a re-exec
    _state(name, "adopting", ident, processes.identity(os.getpid()))
    assert adoption.leftovers(NodeConfig(name=name)).how == "exec"
    # ports elsewhere: refused, nothing stopped
    _state(name, "running", ident, dead, ext0="eth7")
    with pytest.raises(adoption.AdoptionError, match="ext0"):
        adoption.leftovers(NodeConfig(name=name))
    assert processes.is_same(ident)


def test_another_live_supervisor_is_never_taken_over(name, orphan):
    ident = processes.identity(orphan)
    _state(name, "running", None, ident)
    with pytest.raises(adoption.AdoptionError, match="running supervisor"):
        adoption.leftovers(NodeConfig(name=name))
    assert processes.is_same(ident)


def test_a_node_caught_stopping_is_started_afresh(name, orphan):
    """Not adoptable: what it left is stopped, as before adoption existed."""
    ident = processes.identity(orphan)
    _state(name, "stopping", ident, {"pid": 2**22 + 11, "start": 1, "boot": None})
    assert adoption.leftovers(NodeConfig(name=name)) is None
    wait_for(lambda: not processes.is_same(ident), timeout=10, what="the leftover stopped")
