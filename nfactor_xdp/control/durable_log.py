"""The controller's durable log (NFActor paper 4.1).

The controller writes each change it means to make (`intend`) before making
it, and a success mark (`done`) once it is made, or `abandon` if it was rolled
back; changes that cannot half-happen go in with `record` (intent and mark in
one transaction).  On restart `replay` gives back the latest snapshot, the
committed changes after it in the order their success marks were written, and
the pending intents; `compact` swaps the committed history for a snapshot of
the caller's full state (the cluster view: runtimes, chain rules...).

Pending intents: a pending intent at replay means the controller died between
the intent and its mark, so the change may or may not have happened.  This log
does not guess: the caller either re-applies it (changes must be idempotent)
and calls `done`, or undoes it and calls `abandon`.  Compaction keeps pending
intents; if one is marked done later, it is replayed after the snapshot, so a
snapshot that already contains its effect sees it applied again (idempotent).

Storage: SQLite in WAL mode with synchronous=FULL, so a transaction that has
returned is in the fsynced WAL and survives kill -9 and power loss.  We chose
it over an fsynced append-only file because it gives atomic multi-row
transactions (record, snapshot-and-truncate), checksummed torn-write recovery
and an integrity check without our own framing or rename dance, at the same
one fsync per commit.

Schema (PRAGMA application_id marks the file as ours, user_version is the
schema version):
  ops(seq INTEGER PRIMARY KEY AUTOINCREMENT, op TEXT,      -- op: JSON
      status TEXT ('pending'|'done'|'abandoned'),
      committed INTEGER UNIQUE,   -- order of success marks, NULL until done
      t_intent REAL, t_end REAL)  -- wall-clock times; index on status
  snapshot(id INTEGER PRIMARY KEY CHECK (id = 1), state TEXT, -- state: JSON
           last_seq INTEGER, taken REAL)
AUTOINCREMENT keeps seqs from being reused after compaction deletes the
newest rows.  One ControllerLog is meant to be used from one thread.
"""
from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from ..errors import NFactorError

APPLICATION_ID = 0x4E464354  # "NFCT"
SCHEMA_VERSION = 1

_SCHEMA = [
    """CREATE TABLE ops (
        seq       INTEGER PRIMARY KEY AUTOINCREMENT,
        op        TEXT    NOT NULL,
        status    TEXT    NOT NULL CHECK (status IN ('pending', 'done', 'abandoned')),
        committed INTEGER UNIQUE,
        t_intent  REAL    NOT NULL,
        t_end     REAL)""",
    "CREATE INDEX ops_status ON ops (status)",
    """CREATE TABLE snapshot (
        id       INTEGER PRIMARY KEY CHECK (id = 1),
        state    TEXT    NOT NULL,
        last_seq INTEGER NOT NULL,
        taken    REAL    NOT NULL)""",
    f"PRAGMA application_id = {APPLICATION_ID}",
    f"PRAGMA user_version = {SCHEMA_VERSION}",
]


class LogError(NFactorError):
    """The log file cannot be used (corrupt, unreadable, not a controller log...)."""

    def __init__(self, path: str, message: str):
        super().__init__(f"controller log {path}: {message}")
        self.path = path


def _to_json(value, what: str) -> str:
    """Serialise `value`, refusing anything that would not come back equal."""
    try:
        text = json.dumps(value, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} is not JSON-serialisable: {e}") from None
    if json.loads(text) != value:
        # tuples, non-string keys...: replay would hand back something else
        raise ValueError(f"{what} does not survive a JSON round trip (tuples? non-string keys?): {value!r}")
    return text


class ControllerLog:
    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self._db: sqlite3.Connection | None = None
        directory = os.path.dirname(self.path)
        try:
            if not os.path.isdir(directory):
                os.makedirs(directory, mode=0o700)
            if not os.path.exists(self.path):
                self._create_file()
            self._db = sqlite3.connect(self.path, isolation_level=None, timeout=10.0)
        except OSError as e:
            raise LogError(self.path, f"cannot create or open: {e}") from e
        except sqlite3.Error as e:
            raise LogError(self.path, f"cannot open: {e}") from e
        try:
            self._open()
        except BaseException:
            self._db.close()
            self._db = None
            raise

    def _create_file(self) -> None:
        """An empty file with mode 0600 (SQLite gives the -wal and -shm files the same mode)."""
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.fchmod(fd, 0o600)  # exactly 0600, whatever the umask
        finally:
            os.close(fd)
        dfd = os.open(os.path.dirname(self.path), os.O_RDONLY)
        try:
            os.fsync(dfd)  # the new directory entry is durable too
        finally:
            os.close(dfd)

    def _open(self) -> None:
        with self._guard("cannot open"):
            db = self._db
            # An empty database (a new or zero-length file) gets the schema;
            # anything else must be a sound controller log, checked before we
            # change its journal mode.
            tables = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            if tables:
                self._check_existing()
            if db.execute("PRAGMA journal_mode = WAL").fetchone()[0].lower() != "wal":
                raise LogError(self.path, "cannot switch to WAL mode")
            db.execute("PRAGMA synchronous = FULL")
            if not tables:
                with self._tx():  # schema and version marks all at once, or not at all
                    for statement in _SCHEMA:
                        db.execute(statement)

    def _check_existing(self) -> None:
        db = self._db
        app = db.execute("PRAGMA application_id").fetchone()[0]
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if app != APPLICATION_ID:
            raise LogError(self.path, "is an SQLite database but not a controller log")
        if version != SCHEMA_VERSION:
            raise LogError(self.path, f"schema version {version}, this code reads {SCHEMA_VERSION}")
        problems = [row[0] for row in db.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            raise LogError(self.path, "corrupt: " + "; ".join(problems[:5]))

    # -- helpers ------------------------------------------------------------

    @contextlib.contextmanager
    def _guard(self, what: str):
        """Turn SQLite errors into LogError naming the file."""
        if self._db is None:
            raise LogError(self.path, "log is closed")
        try:
            yield
        except sqlite3.Error as e:
            if getattr(e, "sqlite_errorname", "") in ("SQLITE_CORRUPT", "SQLITE_NOTADB"):
                what = f"corrupt, {what}"
            raise LogError(self.path, f"{what}: {e}") from e

    @contextlib.contextmanager
    def _tx(self):
        """One write transaction: BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on error."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _insert(self, db, text: str, status: str) -> int:
        committed = self._next_commit(db) if status == "done" else None
        now = time.time()
        cur = db.execute("INSERT INTO ops (op, status, committed, t_intent, t_end) VALUES (?, ?, ?, ?, ?)",
                         (text, status, committed, now, now if status == "done" else None))
        return cur.lastrowid

    @staticmethod
    def _next_commit(db) -> int:
        # Only the order matters, and only among the ops after the snapshot, so
        # restarting from 1 once compaction has deleted every done op is fine.
        return db.execute("SELECT coalesce(max(committed), 0) + 1 FROM ops").fetchone()[0]

    @staticmethod
    def _check_op(op) -> str:
        if not isinstance(op, dict) or not isinstance(op.get("op"), str) or not op["op"]:
            raise ValueError(f"an op must be a dict with a non-empty string 'op' key, got {op!r}")
        return _to_json(op, "op")

    def _finish(self, seq: int, status: str) -> None:
        with self._guard(f"cannot mark {seq} {status}"), self._tx() as db:
            row = db.execute("SELECT status FROM ops WHERE seq = ?", (seq,)).fetchone()
            if row is None:
                raise ValueError(f"no intent {seq} in the log (never logged, or compacted after its mark)")
            if row[0] != "pending":
                raise ValueError(f"intent {seq} is already {row[0]}")
            committed = self._next_commit(db) if status == "done" else None
            db.execute("UPDATE ops SET status = ?, committed = ?, t_end = ? WHERE seq = ?",
                       (status, committed, time.time(), seq))

    # -- API ----------------------------------------------------------------

    def intend(self, op: dict) -> int:
        """Log a change about to be made; returns its seq."""
        text = self._check_op(op)
        with self._guard("cannot log intent"), self._tx() as db:
            return self._insert(db, text, "pending")

    def done(self, seq: int) -> None:
        """The change logged as `seq` has been made."""
        self._finish(seq, "done")

    def abandon(self, seq: int) -> None:
        """The change logged as `seq` was not made (rolled back)."""
        self._finish(seq, "abandoned")

    def record(self, op: dict) -> int:
        """Intent and success mark in one transaction; returns the seq."""
        text = self._check_op(op)
        with self._guard("cannot record"), self._tx() as db:
            return self._insert(db, text, "done")

    def state_changed(self, snapshot) -> None:
        """(etcd's store writes the new state here; this log has it as the op)"""

    def keep(self, now: float) -> None:
        """(etcd's store keeps its leadership here; a file has one writer)"""

    def replay(self) -> tuple[dict | None, list[dict], list[tuple[int, dict]]]:
        """(latest snapshot or None, committed ops after it in commit order,
        pending intents as (seq, op) in seq order)."""
        with self._guard("cannot replay"), self._tx() as db:  # one consistent read
            row = db.execute("SELECT state FROM snapshot WHERE id = 1").fetchone()
            committed = db.execute("SELECT seq, op FROM ops WHERE status = 'done' ORDER BY committed").fetchall()
            pending = db.execute("SELECT seq, op FROM ops WHERE status = 'pending' ORDER BY seq").fetchall()
        try:
            snapshot = json.loads(row[0]) if row else None
            ops = [json.loads(text) for _, text in committed]
            intents = [(seq, json.loads(text)) for seq, text in pending]
        except ValueError as e:
            raise LogError(self.path, f"corrupt entry (bad JSON): {e}") from e
        return snapshot, ops, intents

    def compact(self, snapshot: dict) -> None:
        """Store `snapshot` (the caller's full state, including every committed
        op) and delete every done or abandoned op, in one transaction; pending
        intents stay.  Then shrink the file."""
        if not isinstance(snapshot, dict):
            raise ValueError(f"a snapshot must be a dict, got {type(snapshot).__name__}")
        text = _to_json(snapshot, "snapshot")
        with self._guard("cannot compact"), self._tx() as db:
            last = db.execute("SELECT coalesce(max(seq), 0) FROM ops").fetchone()[0]
            db.execute("INSERT OR REPLACE INTO snapshot (id, state, last_seq, taken) VALUES (1, ?, ?, ?)",
                       (text, last, time.time()))
            db.execute("DELETE FROM ops WHERE status != 'pending'")
        with self._guard("snapshot stored, but cannot shrink the file"):
            # Rewrite the file without the freed pages (it now holds little more
            # than the snapshot, so this is cheap), then empty the WAL.
            self._db.execute("VACUUM")
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

    def stats(self) -> dict:
        with self._guard("cannot read stats"):
            entries, pending = self._db.execute(
                "SELECT count(*), count(*) FILTER (WHERE status = 'pending') FROM ops").fetchone()
            row = self._db.execute("SELECT taken FROM snapshot WHERE id = 1").fetchone()
        wal = self.path + "-wal"
        return {
            "entries": entries,
            "pending": pending,
            "snapshot_age_s": None if row is None else max(0.0, time.time() - row[0]),
            "file_bytes": os.path.getsize(self.path),
            "wal_bytes": os.path.getsize(wal) if os.path.exists(wal) else 0,
        }

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def __enter__(self) -> ControllerLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
