"""The controller's hang watchdog (no root, a controller without sockets): a
failed runtime silent past the hang timeout is killed (that pid), asked again
if it is still there, and at most one per HANG_KILL_SPACING node-wide, so an
NF looping on one flow cannot take every runtime down in turn."""
from __future__ import annotations

from nfactor_xdp.control import controller as ctlmod
from nfactor_xdp.control.controller import HANG_KILL_SPACING, Controller
from nfactor_xdp.formats.messages import MsgType


class Sent:
    def __init__(self):
        self.kills = []

    def send(self, addr, msg_type, body):
        assert msg_type == MsgType.RUNTIME_KILL
        self.kills.append((body["id"], body["pid"]))


def controller(view: dict, last: dict, hang: float = 2.0) -> Controller:
    c = Controller.__new__(Controller)
    c.view, c.live, c.hang_timeout = view, {rt: {"last": t} for rt, t in last.items()}, hang
    c.kills, c.last_hang_kill, c.hang_spared = {}, -HANG_KILL_SPACING, set()
    c.stats = {"hung_killed": 0, "hung_spared": 0}
    c.ep, c.supervisor_addr = Sent(), lambda rt=None: "supervisor"
    return c


def test_a_silent_failed_runtime_is_killed_once_then_asked_again():
    c = controller({0: {"state": "failed", "pid": 10}, 1: {"state": "running", "pid": 11}}, {0: 0.0, 1: 0.0})
    c.kill_hung(1.0)
    assert c.ep.kills == []  # silent 1 s: not yet
    c.kill_hung(2.5)
    assert c.ep.kills == [(0, 10)]
    c.kill_hung(3.0)
    assert c.ep.kills == [(0, 10)]  # asked, give it time
    c.kill_hung(5.0)
    assert c.ep.kills == [(0, 10), (0, 10)]  # still there: asked again


def test_exited_stopping_or_running_runtimes_are_never_killed():
    view = {0: {"state": "failed", "pid": 10, "exited": True}, 1: {"state": "failed", "pid": 11, "stopping": True},
            2: {"state": "running", "pid": 12}, 3: {"state": "failed"}}
    c = controller(view, {0: 0.0, 1: 0.0, 2: 0.0, 3: 0.0})
    c.kill_hung(100.0)
    assert c.ep.kills == []


def test_a_second_hang_soon_after_is_left_alone(caplog):
    c = controller({0: {"state": "failed", "pid": 10}, 1: {"state": "running", "pid": 11}}, {0: 0.0, 1: 0.0})
    c.kill_hung(3.0)
    assert c.ep.kills == [(0, 10)]
    c.view[0] = {"state": "running", "pid": 20}  # restarted
    c.view[1] = {"state": "failed", "pid": 11}   # the runtime that took its flows hangs in turn
    c.kill_hung(10.0)
    c.kill_hung(20.0)
    assert c.ep.kills == [(0, 10)] and c.stats["hung_spared"] == 1
    assert "hung too" in caplog.text
    c.kill_hung(3.0 + HANG_KILL_SPACING)
    assert c.ep.kills == [(0, 10), (1, 11)]
    assert ctlmod.HANG_KILL_SPACING >= 10 * 2.0  # far longer than the default hang timeout
