"""Logging for every process of the node: one line per event with its time,
level and the process's role (`rt0`, `controller`, `switch-agent`,
`supervisor`), to standard error.

The supervisor sends each process's standard error to its log file under
/var/log/nfactor/<node>/.  Under systemd (JOURNAL_STREAM set) the journal
stamps time and pid itself, so lines carry the syslog priority prefix
(`<3>`...) instead, which journald turns into the entry's level.
"""
from __future__ import annotations

import logging
import os
import sys

LOGGER = "nfactor"
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class _JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"<{_PRIORITY.get(record.levelno, 6)}>" + super().format(record)


def setup(role: str, level: int = logging.INFO, stream=None) -> logging.Logger:
    """Configure the package's logger for this process; returns it."""
    handler = logging.StreamHandler(stream or sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(_JournalFormatter(f"{role}: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter(
            f"%(asctime)s.%(msecs)03d %(levelname)-7s {role}[%(process)d]: %(message)s", "%Y-%m-%dT%H:%M:%S"))
    log = logging.getLogger(LOGGER)
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False
    return log


def get(name: str | None = None) -> logging.Logger:
    """The package's logger, or a child of it (`get("migration")`)."""
    return logging.getLogger(f"{LOGGER}.{name}" if name else LOGGER)
