"""The control plane of a live node against local users and replays: its
sockets are out of reach of anyone but root, a flood at the controller's
socket does not fire the failure detector, a request retried or replayed
acts once, and a module planted where the node is started from never runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from nfactor_xdp.formats import config as nodeconf
from nfactor_xdp.formats.messages import ClusterKey, Endpoint, MsgType, encode
from tests.helpers import PY, wait_for

pytestmark = [pytest.mark.root, pytest.mark.netns]

NOBODY = 65534

# Sends a frame to each path given; prints {path: "sent" or the errno's name}.
_SEND_EACH = r"""
import errno, json, socket, sys
out = {}
for path in sys.argv[1:]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            s.sendto(b"NX\x01" + bytes(60), path)
            out[path] = "sent"
        except OSError as e:
            out[path] = errno.errorcode.get(e.errno, str(e))
print(json.dumps(out))
"""

# Floods a socket with frames of a good magic and version and a bad MAC (each
# costs the receiver an HMAC) for some seconds; prints how many it sent.
_FLOOD = r"""
import os, socket, sys, time
path, seconds = sys.argv[1], float(sys.argv[2])
frames = [b"NX\x01\x01" + os.urandom(8) + os.urandom(n) for n in (40, 80, 200, 400)]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sent, end = 0, time.monotonic() + seconds
while time.monotonic() < end:
    for f in frames * 64:
        s.sendto(f, path)  # blocking: waits while the controller's queue is full
    sent += 256
print(sent)
"""


def _client(name: str) -> Endpoint:
    return Endpoint(nodeconf.control_socket(name, f"test-{os.getpid()}"),
                    ClusterKey.load_or_create(nodeconf.cluster_key_path()), "test")


def _rt(node, rt_id: int) -> dict:
    return next(r for r in node.status()["runtimes"] if r["id"] == rt_id)


def test_other_users_cannot_reach_the_control_sockets(node_factory):
    n = node_factory(1)
    before = n.status()["controller"]["rejected"]  # (the CLI's own socket is gone after the call)
    ctl = nodeconf.control_dir(n.name)
    paths = sorted(os.path.join(ctl, f) for f in os.listdir(ctl))
    names = {os.path.basename(p) for p in paths}
    assert names == {"controller.sock", "heartbeat.sock", "supervisor.sock", "switch.sock", "rt0.sock"}
    # the system's Python: the venv's files need not be readable by nobody
    r = subprocess.run(["/usr/bin/python3", "-c", _SEND_EACH, *paths], user=NOBODY, group=NOBODY, extra_groups=[],
                       cwd="/", capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {p: "EACCES" for p in paths}
    for d in (nodeconf.run_dir(n.name), ctl):
        assert os.stat(d).st_mode & 0o777 == 0o700 and os.stat(d).st_uid == 0
    # root can (and nothing of the above reached the controller)
    r = subprocess.run([sys.executable, "-c", _SEND_EACH, os.path.join(ctl, "controller.sock")],
                       capture_output=True, text=True, timeout=30)
    assert list(json.loads(r.stdout).values()) == ["sent"]
    rejected = wait_for(lambda: n.status()["controller"]["rejected"].get("bad_mac", 0)
                        > before.get("bad_mac", 0) and n.status()["controller"]["rejected"], what="root's frame")
    assert sum(rejected.values()) == sum(before.values()) + 1


def test_a_flood_at_the_controllers_socket_does_not_fire_the_failure_detector(node_factory):
    n = node_factory(2)
    path = nodeconf.control_socket(n.name, "controller")
    floods = [subprocess.Popen([sys.executable, "-c", _FLOOD, path, "4"], stdout=subprocess.PIPE, text=True)
              for _ in range(2)]
    sent = sum(int(p.communicate(timeout=60)[0]) for p in floods)
    ctl = wait_for(lambda: (c := n.status()["controller"]).get("alive") and c, timeout=20, what="controller")
    print(f"\nMEASURED flood of {sent} frames in 4 s at the controller's socket: "
          f"{ctl['rejected'].get('bad_mac', 0)} rejected so far")
    assert sent > 10_000 and ctl["rejected"].get("bad_mac", 0) > 10_000
    assert ctl["stats"]["failures_detected"] == 0 and ctl["restarts"] == 0
    assert [r["state"] for r in n.status()["runtimes"]] == ["running", "running"]


def test_runtime_add_sent_twice_with_one_request_id_adds_one_runtime(node_factory):
    n = node_factory(1)
    sup = nodeconf.control_socket(n.name, "supervisor")
    replies = []
    with _client(n.name) as ep:
        rid = ep.request(sup, MsgType.RUNTIME_ADD, {}, on_reply=replies.append, timeout=30, retries=0)
        ep.send(sup, MsgType.RUNTIME_ADD, {}, rid=rid)  # a copy while the first is handled: dropped
        wait_for(lambda: ep.receive() == [] and replies, timeout=30, what="the answer")
        ep.send(sup, MsgType.RUNTIME_ADD, {}, rid=rid)  # a copy after: answered again, from the cache
        wait_for(lambda: ep.receive() == [] and ep.counters["duplicate_reply"] == 1, timeout=10,
                 what="the answer again")
    assert replies[0].body == {"ok": True, "id": 1}
    wait_for(lambda: len(n.status()["runtimes"]) == 2 and _rt(n, 1)["state"] == "running", timeout=20,
             what="runtime 1 running")
    time.sleep(1.0)  # a second runtime would be on its way by now
    assert [r["id"] for r in n.status()["runtimes"]] == [0, 1]


def test_a_replayed_runtime_kill_kills_once(node_factory):
    n = node_factory(1)
    pid = _rt(n, 0)["pid"]
    frame = encode(MsgType.RUNTIME_KILL, 424242, "test", {"id": 0}, ClusterKey.load_or_create(nodeconf.cluster_key_path()))
    sup = nodeconf.control_socket(n.name, "supervisor")
    with _client(n.name) as ep:  # a bound socket, so the supervisor can answer
        ep.sock.sendto(frame, sup)
        wait_for(lambda: _rt(n, 0)["restarts"] == 1 and _rt(n, 0)["state"] == "running", timeout=20,
                 what="runtime 0 killed and back")
        again = _rt(n, 0)["pid"]
        assert again != pid
        ep.sock.sendto(frame, sup)  # the same frame again, well within the timestamp window
        wait_for(lambda: ep.receive() == [] and ep.rejected["unexpected_reply"] == 2, timeout=10,
                 what="the answer to each copy")
    time.sleep(1.0)
    assert _rt(n, 0)["restarts"] == 1 and _rt(n, 0)["pid"] == again


def test_a_module_planted_in_the_working_directory_is_never_imported(node_factory, tmp_path, monkeypatch):
    marker = tmp_path / "planted-module-ran"
    (tmp_path / "msgpack.py").write_text(f"open({str(marker)!r}, 'w').write(str(__import__('os').getpid()))\n"
                                         "raise ImportError('a planted module')\n")
    monkeypatch.chdir(tmp_path)
    n = node_factory(1)  # started from that directory
    assert _rt(n, 0)["state"] == "running"
    assert not marker.exists(), f"the planted module ran in pid {marker.read_text()}"
    # the check itself works: a child that does import from its working directory runs it
    subprocess.run([PY, "-c", "import msgpack"], cwd=tmp_path, capture_output=True)
    assert marker.exists()
