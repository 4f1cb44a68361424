"""Taking a crashed peer's flows over (no root, runtimes without sockets): the
peer's snapshots become actors here before their entries move, only a death
the supervisor saw starts it, what the agent leaves goes back for the
peer's recovery, and the restarted peer neither gets its snapshots while
they are being taken nor makes a second actor from a frame it held."""
from __future__ import annotations

from nfactor_xdp.formats.messages import Message, MsgType
from tests.runtime_fakes import AGENT, flow, runtime, set_view, udp

K = 4
PEER1 = ("127.0.0.1", 2)
PEER2 = ("127.0.0.1", 3)


def three(peer1="running", exited=False, pid=100) -> dict:
    """Runtime 0 (under test), 1 (the one that dies) and 2 (a third, running)."""
    one = {"id": 1, "state": peer1, "addr": list(PEER1), "pid": pid}
    if exited:
        one["exited"] = True
    return {"version": 1, "runtimes": [{"id": 0, "state": "running", "addr": ["127.0.0.1", 1]}, one,
                                       {"id": 2, "state": "running", "addr": list(PEER2)}]}


def holding(n=10, packets=6):
    """Runtime 0 holding the snapshots of `n` flows of runtime 1 (made by a
    runtime 1 of its own, each flow after `packets` packets)."""
    rt1, ep1 = runtime(snapshot_every=K)
    set_view(rt1, {"version": 1, "runtimes": [
        {"id": 1, "state": "running", "addr": list(PEER1)},
        {"id": 0, "state": "running", "addr": ["127.0.0.1", 1]}]})
    rt1.view.me = rt1.replicator.view.me = 1
    actors = []
    for i in range(n):
        a = flow(rt1, 6000 + i)
        for _ in range(packets - 1):
            rt1.handle(udp(6000 + i))
        actors.append(a)
    rt1.replicator.flush()
    rt0, ep0 = runtime(snapshot_every=K)
    set_view(rt0, three())
    for _, t, body in ep1.sent:
        if t == MsgType.SNAPSHOT:
            rt0.on_control(Message(MsgType.SNAPSHOT, 1, "rt1", body, 0), PEER1)
    assert len(rt0.replicator.stores[1]) == n
    rt0.takeover.attach(ep0, AGENT)
    return rt0, ep0, actors


def takes(ep) -> list[dict]:
    return [b for _, b in ep.to(MsgType.FLOW_TAKE, AGENT)]


def all_moved(body):
    return {"ok": True, "moved": list(range(len(body["keys"]))), "kept": {}}


def test_a_peer_that_exited_has_its_flows_taken_with_their_state():
    rt, ep, theirs = holding()
    set_view(rt, three("failed", exited=True))
    assert not rt.replicator.stores.get(1) and rt.takeover.busy(1)
    rt.takeover.step(0.0)
    (req,) = takes(ep)
    assert req["from"] == 1 and req["to"] == 0 and sorted(req["keys"]) == sorted(a.key.hex() for a in theirs)
    for a in theirs:  # the actors exist before the agent moves anything: the first frame finds one
        mine = rt.flows.get(a.key)
        assert mine is not None and mine.packets == a.packets and mine.states == a.states
    ep.answer(all_moved, only=MsgType.FLOW_TAKE)
    assert not rt.takeover.busy(1)
    st = rt.takeover.status()
    assert st["taken"] == len(theirs) and st["peers"] == 1 and st["working"] == []
    # they replicate from here, to the runtime still running (1 is dead)
    rt.replicator.flush()
    sent = {s["key"] for _, b in ep.to(MsgType.SNAPSHOT, PEER2) for s in b["snaps"]}
    assert sent == {a.key.hex() for a in theirs}
    # and handle their next frame with the state they had
    assert rt.handle(udp(6000))
    assert rt.flows.get(theirs[0].key).packets[0] == theirs[0].packets[0] + 1


def test_a_missed_heartbeat_is_not_a_death_and_takes_nothing():
    rt, ep, theirs = holding()
    set_view(rt, three("failed", exited=False))  # maybe only starved of CPU, still forwarding
    rt.takeover.step(0.0)
    assert not takes(ep) and len(rt.replicator.stores[1]) == len(theirs)
    assert all(rt.flows.get(a.key) is None for a in theirs)


def test_one_death_is_acted_on_once_and_a_later_one_again():
    rt, ep, theirs = holding(n=3)
    set_view(rt, three("failed", exited=True, pid=100))
    rt.takeover.step(0.0)
    ep.answer(all_moved, only=MsgType.FLOW_TAKE)
    set_view(rt, three("failed", exited=True, pid=100))  # the same view again (a load push)
    rt.takeover.step(0.0)
    assert len(takes(ep)) == 1 and rt.takeover.status()["peers"] == 1
    assert (1, 100) in rt.takeover.seen


def test_flows_the_agent_leaves_go_back_or_go_away():
    """Offloaded flows stay with the dead runtime (their snapshots back, for
    its recovery); one another runtime took first is let go, quietly."""
    rt, ep, theirs = holding(n=4)
    set_view(rt, three("failed", exited=True))
    rt.takeover.step(0.0)
    (req,) = takes(ep)
    order = [bytes.fromhex(k) for k in req["keys"]]
    ep.answer({"ok": True, "moved": [0], "kept": {"offloaded": [1], "elsewhere": [2], "gone": [3]}},
              only=MsgType.FLOW_TAKE)
    assert rt.flows.get(order[0]) is not None
    assert all(rt.flows.get(k) is None for k in order[1:])
    assert set(rt.replicator.stores[1]) == {order[1].hex()}
    st = rt.takeover.status()
    assert (st["taken"], st["offloaded"], st["elsewhere"], st["gone"]) == (1, 1, 1, 1)


def test_without_an_answer_the_switch_entries_say_which_flows_are_ours():
    rt, ep, theirs = holding(n=4)
    set_view(rt, three("failed", exited=True))
    rt.takeover.step(0.0)
    (req,) = takes(ep)
    order = [bytes.fromhex(k) for k in req["keys"]]
    rt.takeover.entry_runtime = lambda key: 0 if key in order[:2] else 1
    ep.time_out(only=MsgType.FLOW_TAKE)
    assert [rt.flows.get(k) is not None for k in order] == [True, True, False, False]
    assert set(rt.replicator.stores[1]) == {k.hex() for k in order[2:]}
    assert rt.takeover.status()["agent_timeouts"] == 1 and not rt.takeover.busy(1)


def test_a_refusal_moves_nothing_and_the_snapshots_go_back():
    rt, ep, theirs = holding(n=3)
    set_view(rt, three("failed", exited=True))
    rt.takeover.step(0.0)
    ep.answer({"ok": False, "error": "runtime 1 is running: its flows are its own"}, only=MsgType.FLOW_TAKE)
    assert all(rt.flows.get(a.key) is None for a in theirs)
    assert len(rt.replicator.stores[1]) == 3 and rt.takeover.status()["refused"] == 1


def test_a_flow_with_an_actor_here_keeps_it():
    rt, ep, theirs = holding(n=2)
    mine = flow(rt, 6000)  # (its frames came here meanwhile)
    set_view(rt, three("failed", exited=True))
    rt.takeover.step(0.0)
    (req,) = takes(ep)
    assert req["keys"] == [theirs[1].key.hex()] and rt.flows.get(mine.key) is mine
    assert rt.takeover.status()["had_actor"] == 1


def test_large_stores_are_taken_in_slices_and_the_restarted_peer_waits():
    from nfactor_xdp.dataplane import takeover
    rt, ep, theirs = holding(n=takeover.SLICE * takeover.IN_FLIGHT + 10, packets=1)
    set_view(rt, three("failed", exited=True))
    fetch = Message(MsgType.SNAPSHOT_FETCH, 7, "rt1", {"id": 1, "after": None}, 0)
    for _ in range(takeover.IN_FLIGHT + 1):
        rt.takeover.step(0.0)
    assert len(takes(ep)) == takeover.IN_FLIGHT  # at most that many requests at once
    rt.on_control(fetch, PEER1)  # the restarted runtime 1 asks for its snapshots meanwhile
    assert ep.sent[-1][2] == {"ok": True, "busy": True, "snaps": [], "more": True}
    ep.answer(all_moved, only=MsgType.FLOW_TAKE)
    rt.takeover.step(0.0)
    ep.answer(all_moved, only=MsgType.FLOW_TAKE)
    assert not rt.takeover.busy(1) and rt.takeover.status()["taken"] == len(theirs)
    rt.on_control(fetch, PEER1)
    assert ep.sent[-1][2]["snaps"] == [] and not ep.sent[-1][2]["more"]  # nothing left for it


def test_a_restarted_runtime_asks_a_busy_peer_again_and_drops_frames_of_taken_flows():
    rt, ep = runtime(snapshot_every=K)
    rt.replicator.recovering = True
    rt.register = lambda recovering=False: None
    taken = udp(7000)
    rt.handle(taken)  # held while recovering
    rt.handle(udp(7001))
    rt.replicator.start_recovery()
    ep.answer({"ok": True, "busy": True, "snaps": [], "more": True}, only=MsgType.SNAPSHOT_FETCH)
    assert rt.replicator.recovering and 1 in rt.replicator.later
    rt.replicator.tick(rt.replicator.later[1][2])
    assert not rt.replicator.later and len(ep.to(MsgType.SNAPSHOT_FETCH)) == 2

    class Entries:  # the switch's entries: flow 7000 now on runtime 1, 7001 still here
        def flow_runtime(self, key):
            from nfactor_xdp.dataplane.packet import classify
            return 1 if key == classify(taken)[1] else 0
    rt.maps = Entries()
    ep.answer({"ok": True, "snaps": [], "more": False}, only=MsgType.SNAPSHOT_FETCH)
    rec = rt.replicator.recovery
    assert not rt.replicator.recovering and rec["peers_busy"] == 1
    assert rec["taken_over"] == 1 and rec["replayed"] == 2
    assert len(rt.flows) == 1 and len(rt.xsk.sent) == 1  # only the flow still placed here
    rt.xsk.statistics = lambda: {"rx_packets": 2, "tx_packets": 1, "dropped_by_handler": 2, "frames_injected": 1,
                                 "handler_error_frames": 0, "tx_dropped_ring_full": 0}
    later = rt.packet_counts()["later"]
    assert later["taken_over"] == 1 and later["dropped_by_chain"] == 0
    rt.maps = None


def test_a_dead_processes_late_snapshots_are_not_kept_for_its_successor():
    """A snapshot the dead runtime sent just before dying, arriving after the
    takeover began, would give its restarted process an actor for a flow that
    lives here now: it is dropped (the sender's pid names the dead process)."""
    rt, ep, theirs = holding(n=2)
    set_view(rt, three("failed", exited=True, pid=100))
    rt.takeover.step(0.0)
    late = {"from": 1, "pid": 100, "snaps": [{"key": theirs[0].key.hex(), "v": 99, "actor": {}}], "drop": []}
    rt.on_control(Message(MsgType.SNAPSHOT, 5, "rt1", late, 0), PEER1)
    assert not rt.replicator.stores.get(1) and rt.replicator.stats["from_dead"] == 1
    fresh = {**late, "pid": 200}  # its successor's snapshots are kept as any
    rt.on_control(Message(MsgType.SNAPSHOT, 6, "rt1", fresh, 0), PEER1)
    assert set(rt.replicator.stores[1]) == {theirs[0].key.hex()}


def test_a_recovered_flow_placed_elsewhere_is_let_go():
    rt0, ep0, theirs = holding(n=2)  # runtime 0 holds runtime 1's snapshots
    rt1, ep1 = runtime(snapshot_every=K)  # runtime 1, restarted, recovering from runtime 0
    rt1.view.me = rt1.replicator.view.me = 1
    set_view(rt1, {"version": 1, "runtimes": [{"id": 1, "state": "starting", "addr": list(PEER1)},
                                              {"id": 0, "state": "running", "addr": ["127.0.0.1", 1]}]})
    rt1.replicator.recovering = True
    rt1.register = lambda recovering=False: None
    moved = theirs[0].key  # its entry names runtime 2 now (taken over there, or migrated)
    rt1.replicator.owner = lambda key: 2 if key == moved else 1
    rt1.replicator.start_recovery()
    (fetch,) = [b for _, b in ep1.to(MsgType.SNAPSHOT_FETCH)]

    def answer(body):
        msg = Message(MsgType.SNAPSHOT_FETCH, 9, "rt1", body, 0)
        rt0.replicator.on_fetch(msg, PEER1)
        return ep0.sent[-1][2]
    ep1.answer(answer, only=MsgType.SNAPSHOT_FETCH)
    assert not rt1.replicator.recovering and len(rt1.replicator.unverified) == 2
    rt1.replicator.verify()  # (housekeeping, after the recovery)
    assert rt1.flows.get(moved) is None and rt1.flows.get(theirs[1].key) is not None
    assert rt1.replicator.recovery["placed_elsewhere"] == 1


def test_a_flow_the_dead_runtime_was_migrating_here_is_completed_from_its_snapshot():
    """Runtime 1 dies between the migration's create and its state: the flow's
    arrival here holds its frames; the takeover installs the snapshot instead
    of the state that will never come, and replays them after it, in order."""
    rt, ep, theirs = holding(n=2)
    a = theirs[0]
    create = {"key": a.key.hex(), "chain": a.chain, "rule": a.rule_id, "orig_dir": a.orig_dir}
    rt.on_control(Message(MsgType.MIGRATE_CREATE, 3, "rt1", create, 0), PEER1)
    arriving = rt.flows.get(a.key)
    assert arriving is not None and arriving.migration is not None
    sent = len(rt.xsk.sent)
    assert not rt.handle(udp(6000)) and not rt.handle(udp(6000))  # held: its state has not come
    set_view(rt, three("failed", exited=True))
    rt.takeover.step(0.0)
    assert rt.flows.get(a.key) is arriving and arriving.migration is None
    assert arriving.packets[0] == a.packets[0] + 2 and len(rt.xsk.sent) == sent + 2  # replayed, after the state
    (req,) = takes(ep)
    assert a.key.hex() in req["keys"]  # its entry still names the dead runtime if the move had not happened
    ep.answer(all_moved, only=MsgType.FLOW_TAKE)
    assert rt.takeover.status()["arrivals_completed"] == 1 and rt.takeover.status()["taken"] == 2
