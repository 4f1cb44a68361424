"""The controller's durable log: intents and success marks, replay after
reopen, compaction into a snapshot, surviving SIGKILL, refusing a corrupt file."""
import os
import select
import signal
import sqlite3
import stat
import subprocess
import sys
import time

import pytest

from nfactor_xdp.control.durable_log import ControllerLog, LogError


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "ctl" / "controller.log")


@pytest.fixture
def log(path):
    log = ControllerLog(path)
    yield log
    log.close()


def op(name, **kw):
    return {"op": name, **kw}


class Clock:
    """Stands in for the `time` module inside durable_log: a wall clock the
    test sets, so ages are exact and no real time has to pass."""

    def __init__(self, now: float):
        self.now = now

    def time(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    from nfactor_xdp.control import durable_log
    c = Clock(1_700_000_000.0)
    monkeypatch.setattr(durable_log, "time", c)
    return c


def statuses(path):
    """seq -> status, read straight from the file."""
    db = sqlite3.connect(path)
    try:
        return dict(db.execute("SELECT seq, status FROM ops"))
    finally:
        db.close()


# -- intents, marks, replay ----------------------------------------------------

def test_new_log_replays_empty(log):
    assert log.replay() == (None, [], [])
    st = log.stats()
    assert st["entries"] == 0 and st["pending"] == 0 and st["snapshot_age_s"] is None


def test_seqs_increase_and_replay_follows_success_marks(log):
    a = log.intend(op("add_runtime", id=1, addr="10.0.0.1:7000"))
    b = log.record(op("add_rule", rule=7, chain=["firewall"]))
    c = log.intend(op("set_state", id=1, state="draining"))
    d = log.intend(op("add_runtime", id=2))
    assert a < b < c < d
    log.done(c)        # marked before a: it took effect before a
    log.done(a)
    log.abandon(d)     # rolled back: never replayed
    e = log.intend(op("remove_rule", rule=7))
    snapshot, ops, pending = log.replay()
    assert snapshot is None
    assert [o["op"] for o in ops] == ["add_rule", "set_state", "add_runtime"]
    assert ops[2] == {"op": "add_runtime", "id": 1, "addr": "10.0.0.1:7000"}
    assert pending == [(e, {"op": "remove_rule", "rule": 7})]
    assert log.stats()["entries"] == 5 and log.stats()["pending"] == 1


def test_replay_after_reopen(path):
    with ControllerLog(path) as log:
        seqs = [log.record(op("set", i=i)) for i in range(5)]
        p = log.intend(op("set", i=99))
    with ControllerLog(path) as log:
        snapshot, ops, pending = log.replay()
        assert snapshot is None
        assert ops == [op("set", i=i) for i in range(5)]
        assert pending == [(p, op("set", i=99))]
        # the caller decides about the pending intent: here it re-applies it
        log.done(p)
        assert log.replay()[1][-1] == op("set", i=99)
        assert log.record(op("next")) > max(seqs + [p])


def test_marks_only_on_pending_intents(log):
    a = log.intend(op("x"))
    log.done(a)
    with pytest.raises(ValueError, match="already done"):
        log.done(a)
    with pytest.raises(ValueError, match="already done"):
        log.abandon(a)
    b = log.intend(op("y"))
    log.abandon(b)
    with pytest.raises(ValueError, match="already abandoned"):
        log.done(b)
    with pytest.raises(ValueError, match="no intent 12345"):
        log.done(12345)


@pytest.mark.parametrize("bad,msg", [
    ({"op": "x", "members": {1, 2}}, "not JSON-serialisable"),
    ({"op": "x", "obj": object()}, "not JSON-serialisable"),
    ({"op": "x", "rate": float("nan")}, "not JSON-serialisable"),
    ({"op": "x", "pair": (1, 2)}, "round trip"),
    ({"op": "x", "by_id": {1: "a"}}, "round trip"),
    ({"id": 1}, "'op' key"),
    ("add_runtime", "'op' key"),
])
def test_bad_op_refused_at_intend(log, bad, msg):
    with pytest.raises(ValueError, match=msg):
        log.intend(bad)
    with pytest.raises(ValueError, match=msg):
        log.record(bad)
    assert log.stats()["entries"] == 0


def test_closed_log_raises(path):
    log = ControllerLog(path)
    log.close()
    log.close()  # twice is fine
    with pytest.raises(LogError, match="closed"):
        log.record(op("x"))


# -- compaction ----------------------------------------------------------------

def test_compact_replaces_history_and_keeps_pending(path, clock):
    with ControllerLog(path) as log:
        for i in range(3):
            log.record(op("set", i=i))
        p = log.intend(op("pending"))
        gone = log.intend(op("rolled_back"))
        log.abandon(gone)
        clock.now += 100.0  # the ops above are 100 s old when the snapshot is taken
        log.compact({"runtimes": {"1": {"state": "running"}}, "upto": 2})
        assert log.stats()["snapshot_age_s"] == 0.0  # taken now, by this compaction
        assert log.replay() == ({"runtimes": {"1": {"state": "running"}}, "upto": 2}, [], [(p, op("pending"))])
        later = log.record(op("set", i=3))
        assert later > gone   # seqs are not reused once compaction deleted the newest rows
    with ControllerLog(path) as log:
        snapshot, ops, pending = log.replay()
        assert snapshot["upto"] == 2
        assert ops == [op("set", i=3)]
        assert pending == [(p, op("pending"))]
        log.done(p)  # marked after compaction: replayed after the snapshot, in mark order
        assert log.replay()[1] == [op("set", i=3), op("pending")]
        clock.now += 42.5
        # the snapshot's own time, kept across the reopen and the ops after it
        assert log.stats()["snapshot_age_s"] == 42.5
        log.compact({"upto": 4})  # a new snapshot restarts the age
        assert log.stats()["snapshot_age_s"] == 0.0
        assert log.replay() == ({"upto": 4}, [], [])


def test_two_compactions_in_a_row(log):
    log.record(op("a"))
    log.compact({"v": 1})
    log.compact({"v": 2})
    assert log.replay() == ({"v": 2}, [], [])
    log.record(op("b"))
    log.compact({"v": 3})
    log.compact({"v": 4})
    assert log.replay() == ({"v": 4}, [], [])
    assert log.stats()["entries"] == 0


def test_compaction_while_intent_pending_then_abandoned(log):
    log.record(op("a"))
    p = log.intend(op("migrate", flow=5))
    log.compact({"v": 1})
    assert log.replay() == ({"v": 1}, [], [(p, op("migrate", flow=5))])
    log.abandon(p)
    assert log.replay() == ({"v": 1}, [], [])
    log.compact({"v": 2})
    assert log.stats()["entries"] == 0


def test_bad_snapshot_refused_and_nothing_lost(log):
    log.record(op("a"))
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        log.compact({"v": {1, 2}})
    with pytest.raises(ValueError, match="must be a dict"):
        log.compact([1, 2])
    assert log.replay() == (None, [op("a")], [])


def test_ten_thousand_entries_compact_to_a_snapshot(path):
    with ControllerLog(path) as log:
        for i in range(10_000):
            log.record(op("set", i=i, pad="x" * 50))
        p = log.intend(op("pending"))
        before = log.stats()
        assert before["entries"] == 10_001
        log.compact({"count": 10_000})
        after = log.stats()
        assert after["entries"] == 1 and after["pending"] == 1
        assert after["file_bytes"] < before["file_bytes"] / 4  # vacuumed
        assert after["wal_bytes"] == 0                       # and checkpointed
    with ControllerLog(path) as log:
        assert log.replay() == ({"count": 10_000}, [], [(p, op("pending"))])


# -- crash safety --------------------------------------------------------------

CHILD = r"""
import sys
from nfactor_xdp.control.durable_log import ControllerLog
log = ControllerLog(sys.argv[1])
mode = sys.argv[2]
i = 0
while True:
    if mode == "record":
        print("D", log.record({"op": "set", "i": i}), flush=True)
    else:
        seq = log.intend({"op": "set", "i": i})
        print("I", seq, flush=True)
        log.done(seq)
        print("D", seq, flush=True)
    i += 1
"""


def run_and_kill(tmp_path, path, mode, lines_wanted=300, timeout=30.0):
    """Run the writer, SIGKILL it once it has printed `lines_wanted` lines;
    return every complete line it printed."""
    script = tmp_path / "writer.py"
    script.write_text(CHILD)
    child = subprocess.Popen([sys.executable, str(script), path, mode],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while out.count(b"\n") < lines_wanted:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"writer printed {len(out.splitlines())} lines in {timeout}s")
            ready, _, _ = select.select([child.stdout], [], [], left)
            if ready:
                chunk = os.read(child.stdout.fileno(), 65536)
                if not chunk:
                    raise AssertionError(f"writer died: {child.stderr.read().decode()}")
                out += chunk
        child.send_signal(signal.SIGKILL)
        rest, _ = child.communicate(timeout=10)  # whatever it printed before dying counts too
        out += rest
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL
    complete = out[:out.rfind(b"\n") + 1].decode()
    return [(kind, int(seq)) for kind, seq in (line.split() for line in complete.splitlines())]


@pytest.mark.parametrize("mode", ["record", "intend_done"])
def test_sigkill_loses_nothing_that_returned(tmp_path, path, mode):
    printed = run_and_kill(tmp_path, path, mode)
    done = {seq for kind, seq in printed if kind == "D"}
    intended = {seq for kind, seq in printed if kind == "I"}
    assert len(done) >= 100

    db = sqlite3.connect(path)  # recovers from the WAL like any reader would
    try:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        db.close()

    in_file = statuses(path)
    assert all(in_file.get(seq) == "done" for seq in done)
    assert all(in_file.get(seq) in ("done", "pending") for seq in intended)
    with ControllerLog(path) as log:
        snapshot, ops, pending = log.replay()
    assert snapshot is None
    # the committed ops are exactly the first n the writer made, in order
    assert [o["i"] for o in ops] == list(range(len(ops)))
    assert len(done) <= len(ops) <= len(done) + 1  # at most the one in flight when killed
    assert len(pending) <= 1


# -- bad files, permissions ----------------------------------------------------

def test_garbage_file_raises_with_path(path):
    with ControllerLog(path) as log:
        log.record(op("a"))
    with open(path, "wb") as f:
        f.write(os.urandom(8192))
    with pytest.raises(LogError, match="corrupt") as err:
        ControllerLog(path)
    assert path in str(err.value) and err.value.path == path
    assert os.path.getsize(path) == 8192  # left alone, not replaced by an empty log


def test_garbage_after_the_header_raises(path):
    with ControllerLog(path) as log:
        for i in range(200):
            log.record(op("set", i=i, pad="x" * 100))
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(4096)  # keep page 1 (header and schema), ruin the rest
        f.write(os.urandom(size - 4096))
    with pytest.raises(LogError, match="corrupt") as err:
        ControllerLog(path)
    assert path in str(err.value)


def test_foreign_sqlite_database_raises(path):
    os.makedirs(os.path.dirname(path))
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE users (name TEXT)")
    db.commit()
    db.close()
    with pytest.raises(LogError, match="not a controller log"):
        ControllerLog(path)


def test_path_that_is_a_directory_raises(path):
    os.makedirs(path)
    with pytest.raises(LogError) as err:
        ControllerLog(path)
    assert path in str(err.value)


def test_new_log_permissions(path):
    old = os.umask(0)  # even with a permissive umask
    try:
        with ControllerLog(path) as log:
            log.record(op("a"))
            for name in (path, path + "-wal", path + "-shm"):
                assert stat.S_IMODE(os.stat(name).st_mode) == 0o600, name
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    finally:
        os.umask(old)


def test_opened_in_wal_mode_with_full_sync(log):
    assert log._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert log._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
