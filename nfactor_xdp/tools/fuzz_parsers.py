"""Fuzzing the frame parsers: random and mutated frames (tools/fuzz_frames.py)
through the switch's XDP parser (bpf/nfactor_parse.h) and the runtime's
Python parser (dataplane/packet.py), which must agree on every frame, and
neither may fail.

    nfactorctl fuzz parsers --count 1000000     (the full run; the suite runs a sample; root)

The switch runs in a scratch namespace with its own pins (a node's setup
without runtime processes), each frame once with BPF_PROG_TEST_RUN on ext0,
"other" traffic set to pass so that the verdict alone tells the classes
apart: a flow is redirected to a runtime (XDP_REDIRECT), other traffic
passed (XDP_PASS), a malformed frame dropped (XDP_DROP).  For a flow, the
switch's flow table must hold exactly the key packet.classify gave, with the
same direction; the entry is removed after each frame.  Frames shorter than
an Ethernet header are refused by the kernel (EINVAL) and must be DROP for
Python.  At the end, the switch's class counters must match what Python
found in total (fragments, other protocols, drops, other traffic).
"""
from __future__ import annotations

import os
import time
import traceback
import uuid
from collections import Counter

from ..control.supervisor import Node, teardown
from ..dataplane.packet import DROP, FLOW, OTHER, classify
from ..formats.config import NodeConfig
from ..formats.flowkey import PORTED
from ..kern import layouts as L
from ..kern import netns
from ..kern.bpfsys import BpfError, prog_test_run, xdp_md
from .fuzz_frames import FrameSource

XDP_DROP, XDP_PASS, XDP_REDIRECT = 1, 2, 4
VERDICT = {FLOW: XDP_REDIRECT, OTHER: XDP_PASS, DROP: XDP_DROP}
NAMES = {FLOW: "flow", OTHER: "other", DROP: "drop"}
OTHER_COUNTERS = ("cls_arp", "cls_icmp", "cls_non_ip")
DROP_COUNTERS = ("drop_short_eth", "drop_bad_ip", "drop_bad_l4", "drop_bad_ipv6_ext", "drop_vlan_deep")
MAX_EXAMPLES = 20


class ScratchSwitch:
    """The node's switch alone, in a namespace of its own, for test runs."""

    def __init__(self):
        tag = uuid.uuid4().hex[:6]
        self.ns, self.name = f"nfxfuzz-{tag}", f"fz{tag}"
        self.node = None

    def __enter__(self) -> "ScratchSwitch":
        netns.create(self.ns)
        try:
            with netns.entered(self.ns):
                from pyroute2 import IPRoute
                with IPRoute() as ipr:
                    ipr.link("add", ifname="ext0", kind="veth", peer="h0")
                    ipr.link("add", ifname="ext1", kind="veth", peer="h1")
                    self.ifindex = ipr.link_lookup(ifname="ext0")[0]
                self.node = Node(NodeConfig(name=self.name, runtimes=2, other_action="pass"))
                self.node.setup_switch()
                for rt in range(2):
                    self.node.maps.set_runtime_state(rt, L.C["NFX_RT_RUNNING"])
        except BaseException:
            self.__exit__()
            raise
        self.fd = self.node.progs.fns["vswitch"].fd
        self.flows = self.node.maps["flows"]
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self.node is not None:
                self.node.maps.close()
                self.node.progs.close()
                with netns.entered(self.ns):
                    teardown(self.node.cfg)
        finally:
            netns.remove(self.ns)

    def run(self, frame: bytes) -> int:
        return prog_test_run(self.fd, frame, ctx=xdp_md(len(frame), self.ifindex), data_out_size=0)["retval"]

    def take(self, key: bytes):
        """The flow entry of `key` (None if there is none), removed."""
        k = L.FlowKeyStruct.from_buffer_copy(key)
        entry = self.flows.get(k)
        if entry is not None:
            self.flows.delete(k)
        return entry

    def clear(self) -> None:
        for k in list(self.flows.keys()):
            self.flows.delete(k)

    def counters(self) -> dict:
        return self.node.maps.counters()


def _python(frame: bytes):
    try:
        return classify(frame), None
    except Exception as e:  # a finding, never the end of the run
        return None, f"{type(e).__name__}: {e}"


def run(frames: int, seed: int = 0, *, progress=None) -> dict:
    """Run `frames` frames; the report (see the module's doc), "ok" when
    nothing was found."""
    source = FrameSource(seed)
    classes, how_made, findings = Counter(), Counter(), Counter()
    expect = Counter()  # what the switch's counters must show, from Python's answers
    examples: list[dict] = []

    def finding(kind: str, frame: bytes, how: str, **detail) -> None:
        findings[kind] += 1
        if len(examples) < MAX_EXAMPLES:
            examples.append({"finding": kind, "made_by": how, "frame": frame.hex(), **detail})

    t0 = time.monotonic()
    with ScratchSwitch() as sw:
        before, started = sw.counters(), time.monotonic()
        for i in range(frames):
            how, frame = next(source)
            how_made.update(how.split("+"))
            got, error = _python(frame)
            if error:
                finding("python_raised", frame, how, error=error)
                continue
            kind, key, direction, l4 = got
            classes[NAMES[kind]] += 1
            if len(frame) < 14:
                try:
                    sw.run(frame)
                    finding("xdp_took_a_runt", frame, how)
                except BpfError as e:
                    if e.errno != 22 or kind != DROP:
                        finding("runt", frame, how, python=NAMES[kind], error=str(e))
                continue
            try:
                verdict = sw.run(frame)
            except Exception as e:
                finding("xdp_run_failed", frame, how, error=f"{type(e).__name__}: {e}",
                        trace=traceback.format_exc(limit=2))
                continue
            if kind == FLOW:
                expect["fragment"] += l4 < 0
                expect["other_proto"] += key[36] not in PORTED
            expect[NAMES[kind]] += 1
            if verdict != VERDICT[kind]:
                finding("verdict", frame, how, python=NAMES[kind], xdp=verdict)
                sw.clear()
                continue
            if kind == FLOW:
                entry = sw.take(key)
                if entry is None:
                    finding("key", frame, how, python_key=key.hex())
                    sw.clear()
                elif entry.orig_dir != direction:
                    finding("direction", frame, how, python=direction, xdp=entry.orig_dir)
            if progress and (i + 1) % 100_000 == 0:
                progress(i + 1, time.monotonic() - started, sum(findings.values()))
        after, seconds = sw.counters(), time.monotonic() - started
    moved = {k: after[k] - before[k] for k in after}
    switch = {"flow": moved["flow_new"], "fragment": moved["cls_fragment"],
              "other_proto": moved["cls_other_proto"], "other": sum(moved[k] for k in OTHER_COUNTERS),
              "drop": sum(moved[k] for k in DROP_COUNTERS)}
    wanted = {k: expect[k] for k in switch}
    if not findings and switch != wanted:  # per-frame answers agreed: the counters must too
        findings["counters"] += 1
    return {"frames": frames, "seed": seed, "seconds": round(seconds, 1),
            "setup_seconds": round(started - t0, 1),
            "frames_per_second": round(frames / seconds) if seconds else None,
            "classes": dict(classes), "made_by": dict(how_made),
            "switch_counters": switch, "expected_counters": wanted,
            "ok": not findings, "findings": dict(findings), "examples": examples,
            "kernel": os.uname().release}
