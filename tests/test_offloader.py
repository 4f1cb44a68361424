"""The runtime's offload bookkeeping (dataplane/offloader.py) over a stand-in
for the kernel's offloads array: when a chain is asked, slots handed out and
taken back, the switch's counts folded into the actor exactly once, one grace
period per revoked batch, and a recovering runtime taking its slots back."""
from __future__ import annotations

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from nfactor_xdp.dataplane import nf
from nfactor_xdp.dataplane.actor import Actor
from nfactor_xdp.dataplane.nf import encode_chain
from nfactor_xdp.dataplane.offloader import Offloads
from nfactor_xdp.dataplane.packet import classify
from nfactor_xdp.kern import grace
from nfactor_xdp.kern.offloads import SlotCounts


class FakeSlots:
    """The offloads array as kern/offloads.OffloadSlots offers it: 4 slots per runtime."""

    def __init__(self):
        self.slots = {i: {"action": 0, "runtime": 0, "counts": SlotCounts()} for i in range(16)}

    def range(self, rt_id):
        return range(rt_id * 4, rt_id * 4 + 4)

    def zero(self, slot):
        assert self.slots[slot]["action"] == 0, "zeroed while the switch may count into it"
        self.slots[slot]["counts"] = SlotCounts()

    def write(self, slot, spec, runtime):
        assert self.slots[slot]["action"] == 0
        self.slots[slot].update(action=int(spec.action), runtime=runtime)

    def clear_action(self, slot):
        self.slots[slot]["action"] = 0

    def action(self, slot):
        return self.slots[slot]["action"]

    def owner(self, slot):
        return self.slots[slot]["runtime"]

    def read(self, slot):
        return self.slots[slot]["counts"]

    def count(self, slot, orig=0, reply=0, orig_dir=1, size=100, at=5_000_000_000, old_action=False):
        """The switch handles frames of the slot's flow (if its action is set,
        or a CPU still acts on the action it read before: old_action),
        counting them per canonical direction (the flows here go hi -> lo first)."""
        if not self.slots[slot]["action"] and not old_action:
            return
        lo_hi, hi_lo = (orig, reply) if orig_dir == 0 else (reply, orig)
        c = self.slots[slot]["counts"]
        self.slots[slot]["counts"] = SlotCounts(packets=(c.packets[0] + lo_hi, c.packets[1] + hi_lo),
                                                bytes=(c.bytes[0] + lo_hi * size, c.bytes[1] + hi_lo * size),
                                                last_seen_ns=at)


class FakeEntries:
    def __init__(self, gone=()):
        self.offload, self.gone = {}, set(gone)

    def set_offload(self, key, value, runtime):
        if key in self.gone:
            return False
        self.offload[key] = value
        return True


def frame(i=0):
    return bytes(Ether() / IP(src="10.1.0.5", dst="10.0.0.2") / UDP(sport=40000 + i, dport=9000) / b"x")


def actor(chain=("flow_monitor",), i=0):
    f = frame(i)
    _kind, key, d, l4 = classify(f)
    nfs = []
    for name in chain:
        inst = nf.by_name(name)()
        inst.init({})
        nfs.append(inst)
    a = Actor(key, d, 0.0, encode_chain(list(chain)), nfs)
    return a, f, l4


def run(offloads, a, f, l4, n=2, at=1.0):
    """n frames of the flow at time `at`, then the batch ends with the ring drained, the flow quiet."""
    for _ in range(n):
        a.on_packet(memoryview(bytearray(f)), a.orig_dir, l4, at)
        if a.ask_at:
            offloads.after_packet(a, f, l4)
    offloads.flush(lambda actor: True, at + 0.01, drained=True)


@pytest.fixture
def kernel():
    graces = []
    slots, entries = FakeSlots(), FakeEntries()
    return slots, entries, graces, Offloads(1, slots, entries, grace.Inline(lambda: graces.append(1) or 0.0))


def test_a_decided_flow_is_offloaded_after_its_second_packet(kernel):
    slots, entries, _, offloads = kernel
    a, f, l4 = actor()
    offloads.watch(a)
    run(offloads, a, f, l4, n=1)
    assert a.offload is None  # a flow of one packet (a scan's, a flood's) takes no slot
    run(offloads, a, f, l4, n=1)
    assert a.offload is not None and entries.offload[a.key] == 4 + 1  # runtime 1's first slot, + 1
    assert slots.owner(4) == 1 and slots.action(4) == 1 and len(offloads) == 1


def test_the_switch_counts_are_folded_once(kernel):
    slots, _, _, offloads = kernel
    a, f, l4 = actor()
    offloads.watch(a)
    run(offloads, a, f, l4)
    slots.count(4, orig=7, reply=3)
    assert offloads.fold(a)
    assert not offloads.fold(a)  # nothing new
    slots.count(4, orig=2)
    offloads.fold(a)
    state = a.states[0]
    assert a.packets == [2 + 9, 3] and a.bytes[1] == 300
    assert nf.by_name("flow_monitor")().summary(state)["packets"] == {"orig": 11, "reply": 3}
    assert a.last_seen == 5.0  # the switch's clock, in seconds


def test_revoking_a_batch_waits_one_grace_period_and_frees_the_slots(kernel):
    slots, entries, graces, offloads = kernel
    actors = []
    for i in range(3):
        a, f, l4 = actor(i=i)
        offloads.watch(a)
        run(offloads, a, f, l4)
        actors.append(a)
    for s in (4, 5, 6):
        slots.count(s, orig=5)
    assert offloads.revoke(actors) == 3 and graces == [1]
    assert all(a.offload is None and a.packets[0] == 7 for a in actors)
    assert all(entries.offload[a.key] == 0 for a in actors) and len(offloads) == 0
    assert sorted(offloads.free) == [4, 5, 6, 7]
    assert actors[0].ask_at <= actors[0].packets[0] + 1  # decided again on its next packet
    slots.count(4, orig=100)  # revoked: the switch no longer counts
    assert actors[0].packets[0] == 7


class HeldGrace(grace.Inline):
    """A grace period that passes only when the test says so."""

    def request(self):
        self.requested += 1
        return self.requested

    def wait_for(self, ticket):
        self.completed = max(self.completed, ticket)


def test_a_revoked_flow_is_inline_at_once_and_its_last_counts_come_after_the_grace_period():
    slots, entries, held = FakeSlots(), FakeEntries(), HeldGrace()
    offloads = Offloads(1, slots, entries, held)
    a, f, l4 = actor()
    offloads.watch(a)
    run(offloads, a, f, l4)
    slots.count(4, orig=5)
    ended = []
    assert offloads.revoke([a], then=ended.extend) == 1
    assert a.offload is None and entries.offload[a.key] == 0 and slots.action(4) == 0
    slots.count(4, orig=1, old_action=True)  # a frame that read the old action on another CPU: still counts
    run(offloads, a, f, l4, n=1)  # a frame handled here meanwhile; asked again, but its slot is not free
    assert a.offload is None and a.key in offloads.candidates and 4 not in offloads.free and not ended
    offloads.poll()
    assert not ended  # the grace period has not passed
    held.completed = held.requested
    offloads.poll()
    assert ended == [a] and 4 in offloads.free and not offloads.returning
    assert a.packets[0] == 2 + 6 + 1 and offloads.stats["revoked"] == 1  # every frame counted once
    offloads.flush(lambda actor: True, a.last_seen + 0.01, drained=True)
    assert a.offload is not None  # offloaded again once its last slot was free


def test_settle_makes_a_taken_back_flows_counts_final_before_its_state_leaves():
    slots, entries, held = FakeSlots(), FakeEntries(), HeldGrace()
    offloads = Offloads(1, slots, entries, held)
    a, f, l4 = actor()
    offloads.watch(a)
    run(offloads, a, f, l4)
    offloads.revoke_keys([a.key])
    slots.count(4, orig=3, old_action=True)
    offloads.settle([a.key])
    assert a.packets[0] == 2 + 3 and offloads.stats["settled_early"] == 1 and not offloads.pending


def test_background_grace_periods_are_shared_and_signalled():
    import select
    import threading
    gate = threading.Event()
    calls = []

    def slow_wait():
        calls.append(1)
        gate.wait(5)
        return 0.0
    bg = grace.Background(slow_wait)
    try:
        first = bg.request()
        second = bg.request()  # made while the first may be waiting: shares the next one at most
        assert not bg.done(first)
        gate.set()
        bg.wait_for(second)
        assert bg.done(first) and bg.done(second) and len(calls) <= 2
        assert select.select([bg.fileno()], [], [], 5)[0], "the eventfd did not say a grace period passed"
        bg.drain_event()
        assert not select.select([bg.fileno()], [], [], 0)[0]
    finally:
        bg.close()


def test_background_grace_reports_a_failed_wait():
    def broken():
        raise grace.GracePeriodError("no membarrier")
    bg = grace.Background(broken)
    try:
        with pytest.raises(grace.GracePeriodError):
            bg.wait_for(bg.request())
    finally:
        bg.close()


def test_a_chain_that_needs_every_packet_stays_inline_and_is_asked_less_and_less(kernel):
    _, _, _, offloads = kernel
    a, f, l4 = actor(chain=("flow_monitor", "http_parser"))
    offloads.watch(a)
    asked = []
    for n in range(1, 17):
        before = offloads.stats["not_offloadable"]
        run(offloads, a, f, l4, n=1)
        if offloads.stats["not_offloadable"] > before:
            asked.append(n)
    assert asked == [2, 4, 8, 16] and a.offload is None and "http_parser" in a.offload_reason


def test_a_flow_whose_switch_entry_is_gone_is_not_offloaded(kernel):
    slots, entries, graces, offloads = kernel
    a, f, l4 = actor()
    entries.gone.add(a.key)
    offloads.watch(a)
    run(offloads, a, f, l4)
    assert a.offload is None and offloads.stats["entry_gone"] == 1 and 4 in offloads.free
    assert slots.action(4) == 0 and graces == [1]


def test_slots_run_out_counted(kernel):
    _, _, _, offloads = kernel
    for i in range(5):
        a, f, l4 = actor(i=i)
        offloads.watch(a)
        run(offloads, a, f, l4)
    assert len(offloads) == 4 and offloads.stats["no_slot"] == 1


def test_frames_after_the_offload_are_counted_late(kernel):
    _, _, _, offloads = kernel
    a, f, l4 = actor()
    offloads.watch(a)
    run(offloads, a, f, l4, n=3)  # the 3rd came before the batch ended
    run(offloads, a, f, l4, n=1)
    assert offloads.stats["late"] == 1


def test_a_recovering_runtime_takes_back_the_slots_of_flows_snapshotted_offloaded(kernel):
    slots, entries, graces, offloads = kernel
    a, f, l4 = actor(i=1)
    b, fb, l4b = actor(i=2)
    for x, fx, lx in ((a, f, l4), (b, fb, l4b)):
        offloads.watch(x)
        run(offloads, x, fx, lx)
    slots.count(4, orig=10)
    wire_a = a.to_wire(2.0)    # a snapshot with 10 of a's switch-handled frames in it
    wire_b = dict(b.to_wire(2.0), offload=None)  # b's last snapshot is from before its offload
    slots.count(4, orig=5)    # then the runtime dies; the switch goes on
    # a new process of runtime 1 recovers both from their snapshots
    fresh = Offloads(1, slots, entries, grace.Inline(lambda: graces.append(1) or 0.0))
    ra, rb = actor(i=1)[0], actor(i=2)[0]
    ra.load_wire(wire_a, 3.0)
    rb.load_wire(wire_b, 3.0)
    fresh.adopt({ra.key: ra, rb.key: rb}, [(ra.key, 5), (rb.key, 6)])
    assert ra.offload is not None and ra.packets[0] == 2 + 15  # 10 in the snapshot, 5 folded now
    assert rb.offload is None and slots.action(5) == 0 and entries.offload[rb.key] == 0
    assert fresh.stats["adopted"] == 1 and fresh.stats["dropped_slots"] == 1
    assert sorted(fresh.free) == [5, 6, 7]


def test_a_frame_the_switch_handles_as_soon_as_the_entry_names_the_slot_is_counted(kernel):
    slots, entries, _, offloads = kernel
    a, f, l4 = actor()
    offloads.watch(a)
    real = entries.set_offload

    def set_and_count(key, value, runtime):
        ok = real(key, value, runtime)
        if value:
            slots.count(value - 1, orig=1)  # a frame on another CPU, right after the entry changed
        return ok
    entries.set_offload = set_and_count
    run(offloads, a, f, l4)
    offloads.fold(a)
    assert a.packets[0] == 2 + 1


def test_the_hand_over_waits_for_an_empty_ring_and_a_quiet_flow(kernel):
    _, _, _, offloads = kernel
    a, f, l4 = actor()
    offloads.watch(a)
    for _ in range(2):
        a.on_packet(memoryview(bytearray(f)), a.orig_dir, l4, 1.0)
        offloads.after_packet(a, f, l4)
    offloads.flush(lambda actor: True, 1.002, drained=False)    # quiet, but frames still in the ring
    offloads.flush(lambda actor: True, 1.0005, drained=True)    # ring empty, its last frame 0.5 ms ago
    assert a.offload is None and a.key in offloads.candidates
    offloads.flush(lambda actor: True, 1.002, drained=True)     # both
    assert a.offload is not None and not offloads.candidates


def test_a_flow_that_is_never_quiet_is_handed_over_after_a_while(kernel):
    _, _, _, offloads = kernel
    a, f, l4 = actor()
    offloads.watch(a)
    t = 1.0
    while a.offload is None and t < 2.0:
        a.on_packet(memoryview(bytearray(f)), a.orig_dir, l4, t)
        offloads.after_packet(a, f, l4)
        offloads.flush(lambda actor: True, t + 0.0001, drained=True)
        t += 0.0002
    assert a.offload is not None and 0.09 < t - 1.0 < 0.12 and offloads.stats["busy"] == 1


class FakeRing:
    """The observe ring: copies (slot, direction, frame) the switch made, read in order."""

    def __init__(self):
        self.copies = []

    def producer(self):
        return len(self.copies)

    def skip_to(self, mark):
        del self.copies[:mark]
        return mark

    def drain(self, handle, limit=1 << 30):
        n = 0
        while self.copies and n < limit:
            handle(*self.copies.pop(0))
            n += 1
        return n


def observed_actor(i=0):
    a, f, l4 = actor(chain=("flow_monitor", "http_parser"), i=i)
    a.rule_id = 7
    return a, f, l4


def test_an_observed_flow_gets_its_copies_and_they_are_all_read_before_its_slot_is_freed():
    slots, entries, held = FakeSlots(), FakeEntries(), HeldGrace()
    offloads = Offloads(1, slots, entries, held)
    offloads.ring = ring = FakeRing()
    a, f, l4 = observed_actor()
    offloads.watch(a)
    run(offloads, a, f, l4)
    assert a.offload is None and "observe mode" in a.offload_reason  # rule 7 does not ask for it
    offloads.observe_rules = frozenset({7})
    run(offloads, a, f, l4, n=2)
    assert a.offload is not None and a.observing == (1,) and offloads.watching == {4: a}
    seen = []
    a.nfs[1].process_packet = lambda pkt, state: seen.append(pkt.direction) or True
    ring.copies += [(4, a.orig_dir, f)] * 3
    offloads.drain(2.0)
    assert seen == [0, 0, 0] and a.copies == 3 and a.packets[0] == 4  # copies are not counted twice
    ring.copies += [(4, a.orig_dir, f)] * 2  # made before the revocation, not read yet
    offloads.revoke([a])
    held.completed = held.requested
    offloads.poll()
    assert len(seen) == 5 and a.observing is None and not offloads.watching and 4 in offloads.free


def test_a_recovering_runtime_counts_the_copies_its_dead_process_never_read_as_gaps():
    slots, entries = FakeSlots(), FakeEntries()
    offloads = Offloads(1, slots, entries, grace.Inline(lambda: 0.0))
    offloads.ring, offloads.observe_rules = FakeRing(), frozenset({7})
    a, f, l4 = observed_actor()
    offloads.watch(a)
    run(offloads, a, f, l4)
    wire = a.to_wire(2.0)
    c = slots.slots[4]["counts"]
    slots.slots[4]["counts"] = SlotCounts(packets=(0, 6), bytes=(0, 600), observed=(0, 4), observe_lost=(0, 2),
                                          last_seen_ns=c.last_seen_ns)
    fresh = Offloads(1, slots, entries, grace.Inline(lambda: 0.0))
    fresh.ring = FakeRing()
    fresh.ring.copies = [(4, a.orig_dir, f)]  # in the new process's ring already: counted in observed (4)
    ra = observed_actor()[0]
    ra.load_wire(wire, 3.0)
    fresh.adopt({ra.key: ra}, [(ra.key, 5)])
    assert ra.observing == (1,) and fresh.watching == {4: ra}
    assert ra.states[1]["observe_gaps"] == 6 and ra.packets[0] == 2 + 6
    assert not fresh.ring.copies and fresh.stats["copies_before_recovery"] == 1  # never read as well
