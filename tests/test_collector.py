"""The runtime's garbage collector policy (dataplane/collector.py): what
exists at start is frozen, full collections are rarer, one runs in quiet
moments when due, and every collection's pause is measured."""
from __future__ import annotations

import gc

import pytest

from nfactor_xdp.dataplane import collector as col


@pytest.fixture
def restored():
    thresholds = gc.get_threshold()
    yield
    for cb in [c for c in gc.callbacks if getattr(c, "__self__", None).__class__ is col.Collector]:
        gc.callbacks.remove(cb)
    gc.unfreeze()
    gc.set_threshold(*thresholds)


def test_start_freezes_what_exists_and_makes_full_collections_rarer(restored):
    c = col.Collector()
    c.start()
    assert gc.get_threshold() == col.THRESHOLDS and gc.get_freeze_count() > 0
    assert c.status()["frozen"] == gc.get_freeze_count()
    gc.collect(0)
    assert c.status()["collections"][0] >= 1 and c.status()["max_pause_ms"][0] >= 0


def test_a_full_collection_runs_in_a_quiet_moment_only_when_due(restored, monkeypatch):
    c = col.Collector()
    c.start()
    full = []
    monkeypatch.setattr(col.gc, "collect", lambda *a: full.append(a))
    t = c._last_full
    c.quiet(t + col.FULL_EVERY / 2)
    assert not full
    c.quiet(t + col.FULL_EVERY + 1)
    c.quiet(t + col.FULL_EVERY + 2)
    assert len(full) == 1 and c.status()["quiet_full"] == 1
