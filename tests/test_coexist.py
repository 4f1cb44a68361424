"""Coexistence with other XDP tools: a node attaches to a port carrying
another tool's program only if told to replace it, and `down` removes only
the programs the node attached (by program id), so a program another tool
put on a port meanwhile stays.  The other tool here is the testbed's XDP_PASS
program (bpf/host_pass.c, kern.loader.attach_pass)."""
from __future__ import annotations

import os
import signal
import subprocess
import uuid

import pytest
from pyroute2 import IPRoute

from nfactor_xdp.control import coexist
from nfactor_xdp.control import node_client as nodectl
from nfactor_xdp.control.processes import pid_alive
from nfactor_xdp.errors import NFactorError
from nfactor_xdp.formats.config import NodeConfig
from nfactor_xdp.kern import netns, xdp
from nfactor_xdp.kern.loader import attach_pass
from tests.helpers import PY, wait_for

pytestmark = [pytest.mark.root, pytest.mark.netns]


def _progs(ns: str, port: str) -> dict[str, int]:
    with netns.entered(ns), IPRoute() as ipr:
        return xdp.programs(ipr, port)


def _foreign(ns: str, port: str) -> int:
    """Another tool's program on `port`: its id."""
    attach_pass(port, ns)
    (prog_id,) = _progs(ns, port).values()
    return prog_id


def _links(ns: str) -> str:
    return netns.run(ns, ["ip", "-o", "link", "show"]).stdout


@pytest.fixture
def scratch_port():
    ns = f"nfxc-{uuid.uuid4().hex[:6]}"
    netns.create(ns)
    try:
        with netns.entered(ns), IPRoute() as ipr:
            ipr.link("add", ifname="xa", kind="veth", peer="xb")
        yield ns, "xa"
    finally:
        netns.remove(ns)


def test_detach_removes_a_program_only_if_it_is_still_the_one_named(scratch_port):
    ns, port = scratch_port
    prog_id = _foreign(ns, port)
    with netns.entered(ns), IPRoute() as ipr:
        assert not xdp.detach(ipr, port, "native", prog_id + 100000)  # another program: left alone
        assert not xdp.detach(ipr, port, "generic", prog_id)  # not in that mode
        assert xdp.programs(ipr, port) == {"native": prog_id}
        assert xdp.detach(ipr, port, "native", prog_id)
        assert xdp.programs(ipr, port) == {}


def test_attach_refuses_a_taken_port_unless_allowed(scratch_port):
    from bcc import BPF

    from nfactor_xdp.kern.layouts import BPF_DIR
    ns, port = scratch_port
    theirs = _foreign(ns, port)
    mod = BPF(src_file=str(BPF_DIR / "host_pass.c"), cflags=[f"-I{BPF_DIR}"])
    try:
        fn = mod.load_func("nfx_host_pass", BPF.XDP)
        with netns.entered(ns), IPRoute() as ipr:
            with pytest.raises(xdp.PortTaken, match=f'port {port} carries XDP program {theirs} "nfx_host_pass"'):
                xdp.attach(ipr, port, fn.fd, "native")
            assert xdp.programs(ipr, port) == {"native": theirs}
            seen = []
            assert xdp.attach(ipr, port, fn.fd, "generic", lambda p, i: seen.append((p, i)) or True) == "generic"
            # native and generic cannot be attached at once: theirs went first
            (mine,) = xdp.programs(ipr, port).values()
            assert seen == [(port, theirs)] and xdp.programs(ipr, port) == {"generic": mine} and mine != theirs
    finally:
        mod.cleanup()


def _cfg(testbed, **settings) -> NodeConfig:
    return NodeConfig(name=f"c{uuid.uuid4().hex[:5]}", netns=testbed.show()["namespaces"]["node"], runtimes=1,
                      **settings)


def test_up_refuses_a_port_carrying_another_tools_program(testbed):
    cfg = _cfg(testbed)
    theirs = _foreign(cfg.netns, "ext0")
    want = f'ext0 carries XDP program {theirs} "nfx_host_pass" (native)'
    try:
        with pytest.raises(NFactorError) as e:
            nodectl.start(cfg)
        assert want in str(e.value) and "--replace-xdp" in str(e.value), str(e.value)
        # under systemd (--foreground) the supervisor itself refuses, before anything changes
        r = subprocess.run([PY, "-m", "nfactor_xdp.cli", "up", "--foreground", "--name", cfg.name, "--netns",
                            cfg.netns, "--runtimes", "1"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and want in r.stderr, r.stderr
        assert _progs(cfg.netns, "ext0") == {"native": theirs}
        assert "sw-rt0" not in _links(cfg.netns) and not os.path.exists(f"/sys/fs/bpf/nfactor/{cfg.name}")
    finally:
        nodectl.stop(cfg.name)


def test_the_probe_names_programs_on_ports(testbed):
    from nfactor_xdp.tools.probe import _xdp_on_ports
    ns = testbed.show()["namespaces"]["node"]
    with netns.entered(ns):
        assert _xdp_on_ports() == "no port carries an XDP program in this namespace"
    theirs = _foreign(ns, "ext1")
    with netns.entered(ns):
        found = _xdp_on_ports()
    assert found.startswith(f'ext1 carries XDP program {theirs} "nfx_host_pass" (native): `up` refuses')
    assert "--replace-xdp" in found


def test_replace_xdp_takes_the_port_and_down_then_removes_the_nodes_program(testbed, node_factory):
    ns = testbed.show()["namespaces"]["node"]
    theirs = _foreign(ns, "ext0")
    n = node_factory(1, replace_xdp=True)
    ours = coexist.pinned_prog_ids(n.name)
    assert set(_progs(ns, "ext0").values()) <= ours and theirs not in ours
    n.stop()
    assert _progs(ns, "ext0") == {} and _progs(ns, "ext1") == {}


@pytest.mark.parametrize("supervisor", ["running", "killed"])
def test_down_leaves_a_program_another_tool_attached_meanwhile(testbed, node_factory, supervisor):
    """The node runs on ext0/ext1; another tool then puts its program on ext1
    (replacing the node's).  `down` removes the node's program from ext0 and
    leaves the other tool's on ext1, whether the supervisor does it or the
    CLI cleans up after a dead one."""
    n = node_factory(1)
    ns = n.cfg.netns
    ours = coexist.pinned_prog_ids(n.name)
    assert set(_progs(ns, "ext1").values()) <= ours
    theirs = _foreign(ns, "ext1")
    assert theirs not in ours
    if supervisor == "killed":
        pid = n.status()["supervisor_pid"]
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not pid_alive(pid), timeout=10, what="the supervisor to die")
    n.stop()
    assert _progs(ns, "ext1") == {"native": theirs}
    assert _progs(ns, "ext0") == {}
    links = _links(ns)
    assert "sw-rt" not in links and " rt0" not in links
    assert not os.path.exists(f"/sys/fs/bpf/nfactor/{n.name}")
