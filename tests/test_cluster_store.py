"""The controller's store in a real etcd cluster (three members on free
loopback ports): one leader at a time, a deposed leader cannot write, the
state a leader wrote is what the next one reads, a standby takes over when
the leader's lease runs out, and losing one member loses nothing."""
from __future__ import annotations

import time

import pytest

from nfactor_xdp.control.cluster_store import EtcdStore, LeadershipLost, StoreError, forget
from nfactor_xdp.tools.etcd_cluster import EtcdCluster
from tests.helpers import wait_for

STATE = {"view": {"0": {"id": 0, "state": "running"}}, "policy": {"default_chain": ["flow_monitor"]},
         "view_version": 7}


@pytest.fixture(scope="module")
def etcd():
    with EtcdCluster(3, name="store") as c:
        yield c


@pytest.fixture
def node(etcd):
    name = f"t{time.monotonic_ns() % 10**9}"
    stores = []

    def store(ttl=2, me=None):
        s = EtcdStore(etcd.endpoints, name, ttl=ttl)
        if me:
            s.me = me
        stores.append(s)
        return s
    yield store
    for s in stores:
        s.close()
    forget(etcd.endpoints, name)


def test_one_leader_at_a_time_and_its_state_is_the_next_ones(node):
    a, b = node(me="a"), node(me="b")
    assert a.replay() == (None, [], [])  # a new node
    assert a.try_lead() and not b.try_lead()
    assert a.leader() == b.leader() == "a"
    a.state_changed(lambda: STATE)
    with pytest.raises(LeadershipLost):
        b.compact({"view": {}})  # not the leader: refused before it reaches etcd
    a.close()  # a clean stop gives the lead up at once
    assert b.try_lead() and b.leader() == "b"
    assert b.replay()[0] == STATE


def test_a_deposed_leader_cannot_write_over_its_successor(node, etcd):
    a, b = node(me="a"), node(me="b")
    assert a.try_lead()
    a.state_changed(lambda: STATE)
    # a's lease ends behind its back (as when it stalled past its TTL): b leads
    a.members.call(a.lease.revoke)
    assert b.try_lead()
    b.state_changed(lambda: {**STATE, "view_version": 8})
    with pytest.raises(LeadershipLost):
        a.state_changed(lambda: {**STATE, "view_version": 99})
    with pytest.raises(LeadershipLost):
        a.keep(time.monotonic() + 10)  # its refresh finds the lease gone
    assert b.replay()[0]["view_version"] == 8


def test_a_standby_leads_once_a_dead_leaders_lease_runs_out(node):
    a, b = node(ttl=1, me="a"), node(ttl=1, me="b")
    assert a.try_lead()
    a.lease = None  # a dies: it never refreshes nor revokes
    t0 = time.monotonic()
    assert b.campaign(lambda: time.monotonic() - t0 > 10, poll=0.05)
    took = time.monotonic() - t0
    assert b.leader() == "b" and took < 5, took
    print(f"\nMEASURED standby led {took:.2f}s after the leader's last refresh (lease ttl 1 s)")


def test_losing_one_member_of_three_loses_nothing(node, etcd):
    a = node(me="a")
    assert a.try_lead()
    a.state_changed(lambda: STATE)
    talking = a.members.current
    etcd.kill(talking)
    try:
        a.state_changed(lambda: {**STATE, "view_version": 9})  # to another member
        a.keep(time.monotonic() + 10)
        assert a.members.current != talking and a.stats()["member_switches"] >= 1
        assert node(me="c").replay()[0]["view_version"] == 9
    finally:
        etcd.start(talking)
        etcd.wait_healthy()
    wait_for(lambda: node(me="d").replay()[0]["view_version"] == 9, timeout=10, what="the member back in sync")


def test_no_member_answering_is_a_clear_error():
    s = EtcdStore(["127.0.0.1:1", "127.0.0.1:2"], "nobody")
    with pytest.raises(StoreError, match="no etcd member answers"):
        s.replay()
