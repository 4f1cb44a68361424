"""Logging for every process of the node: one line per event with its time,
level and the process's role (`rt0`, `controller`, `switch-agent`,
`supervisor`), as text or as JSON lines (NodeConfig.log_format).

A process of the node writes its own log file, /var/log/nfactor/<node>/<role>.log,
through a RotatingFileHandler (NodeConfig.log_max_bytes, log_backups: ROLE.log.1
.. ROLE.log.N).  The process itself rotates: only the writer of a file can
rename it and reopen the new one, so rotation never loses a line and needs
no signal (the supervisor that would rotate for it may be dead: the runtimes
outlive it).  Its standard error goes to <role>.stderr.log, kept for what
does not pass through logging: an interpreter's fatal error (faulthandler),
a C library's message; the supervisor rotates that file before each start,
when its writer is dead.

The lines go to standard error too when it is not a file (`up --foreground`
on a terminal or a pipe).  Under systemd the journal stamps time and pid
itself: a process whose standard error is the journal (JOURNAL_STREAM names
it) writes there with the syslog priority prefix (`<3>`...) journald turns
into the entry's level.  Without a file (a tool, a test), lines go to
standard error only.
"""
from __future__ import annotations

import datetime
import faulthandler
import json
import logging
import os
import stat
import sys
from logging.handlers import RotatingFileHandler

LOGGER = "nfactor"
FORMATS = ("text", "json")
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class _JsonFormatter(logging.Formatter):
    """One JSON object a line: ts, level, role, pid, logger, msg (and exc)."""

    def __init__(self, role: str):
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": datetime.datetime.fromtimestamp(record.created).astimezone().isoformat(timespec="milliseconds"),
                 "level": record.levelname, "role": self.role, "pid": record.process, "logger": record.name,
                 "msg": record.getMessage()}
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def _formatter(role: str, fmt: str) -> logging.Formatter:
    if fmt == "json":
        return _JsonFormatter(role)
    return logging.Formatter(f"%(asctime)s.%(msecs)03d %(levelname)-7s {role}[%(process)d]: %(message)s",
                             "%Y-%m-%dT%H:%M:%S")


class _JournalFormatter(logging.Formatter):
    def __init__(self, role: str, fmt: str):
        super().__init__(f"{role}: %(message)s")
        self.inner = _JsonFormatter(role) if fmt == "json" else None

    def format(self, record: logging.LogRecord) -> str:
        text = self.inner.format(record) if self.inner else super().format(record)
        return f"<{_PRIORITY.get(record.levelno, 6)}>" + text


def on_journal(stream=None) -> bool:
    """True if `stream` (standard error) is the journal's: JOURNAL_STREAM is
    inherited by every child, so the variable alone says nothing about a
    child whose standard error goes to a file."""
    stream = stream or sys.stderr
    try:
        dev, ino = (int(x) for x in os.environ.get("JOURNAL_STREAM", "").split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def _is_file(stream) -> bool:
    """True if `stream` is a regular file: a child's ROLE.stderr.log, where
    the lines would only repeat its log file."""
    try:
        return stat.S_ISREG(os.fstat(stream.fileno()).st_mode)
    except (AttributeError, ValueError, OSError):
        return False


def setup(role: str, level: int = logging.INFO, stream=None, *, fmt: str = "text", file: str | None = None,
          max_bytes: int = 0, backups: int = 0) -> logging.Logger:
    """Configure the package's logger for this process; returns it.  `file`:
    the process's own log, rotated at `max_bytes` keeping `backups` files
    (NodeConfig.log_options gives all of these); standard error gets the lines
    too unless it is a regular file (a terminal, a pipe, the journal do)."""
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: one of {', '.join(FORMATS)}")
    stream = stream or sys.stderr
    handlers: list[logging.Handler] = []
    if file:
        handler = RotatingFileHandler(file, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
        handler.setFormatter(_formatter(role, fmt))
        handlers.append(handler)
    if on_journal(stream):
        handler = logging.StreamHandler(stream)
        handler.setFormatter(_JournalFormatter(role, fmt))
        handlers.append(handler)
    elif not file or not _is_file(stream):
        handler = logging.StreamHandler(stream)
        handler.setFormatter(_formatter(role, fmt))
        handlers.append(handler)
    log = logging.getLogger(LOGGER)
    for old in log.handlers:
        old.close()
    log.handlers[:] = handlers
    log.setLevel(level)
    log.propagate = False
    if file:
        sys.excepthook = _log_uncaught
        try:
            if not faulthandler.is_enabled():
                faulthandler.enable()  # a fatal signal's traceback: standard error, the last words
        except (AttributeError, ValueError, OSError):
            pass  # no usable standard error
    return log


def _log_uncaught(kind, value, tb) -> None:
    """An exception nobody caught goes to the log file too, with its traceback."""
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value, tb)
        return
    logging.getLogger(LOGGER).critical("uncaught %s: %s", kind.__name__, value, exc_info=(kind, value, tb))


def rotate_if_over(path: str, max_bytes: int, backups: int) -> None:
    """Rotate a file nobody writes now (a dead process's standard error) as its
    writer would: PATH -> PATH.1 -> ... -> PATH.N, when it holds `max_bytes`."""
    try:
        if max_bytes <= 0 or os.path.getsize(path) < max_bytes:
            return
    except OSError:
        return
    handler = RotatingFileHandler(path, maxBytes=max_bytes, backupCount=max(1, backups), delay=True)
    try:
        handler.doRollover()
    finally:
        handler.close()


def get(name: str | None = None) -> logging.Logger:
    """The package's logger, or a child of it (`get("migration")`)."""
    return logging.getLogger(f"{LOGGER}.{name}" if name else LOGGER)
