"""The node's child processes as the supervisor sees them: how each is
started (with the node's whole configuration), whether it lives, and how
it is stopped."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from ..formats import config as nodeconf
from ..formats.config import NodeConfig

STOP_TIMEOUT = 5.0
_POLL = 0.02  # polling a process's exit, always with a deadline


def pid_alive(pid: int | None) -> bool:
    """True if `pid` runs (a zombie counts as dead)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stop_processes(pids: list[int], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM, wait up to `timeout`, then SIGKILL what is left; reap our children."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    for pid in pids:
        while pid_alive(pid) and time.monotonic() < deadline:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(_POLL)
        if pid_alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


class Child:
    """One process of the node: `python -m MODULE --config-json CONFIG ARGS`,
    its standard output and error appended to its log file."""

    def __init__(self, cfg: NodeConfig, role: str, module: str, *args: str):
        self.cfg, self.role, self.module, self.args = cfg, role, module, list(args)
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self.started_at = 0.0

    def spawn(self) -> None:
        with open(nodeconf.log_path(self.cfg.name, self.role), "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", self.module, "--config-json", self.cfg.to_json(), *self.args],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.started_at = time.monotonic()

    def respawn(self) -> None:
        self.restarts += 1
        self.spawn()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def stop(self) -> None:
        if self.proc is not None:
            stop_processes([self.proc.pid])

    def info(self) -> dict:
        return {"pid": self.pid, "restarts": self.restarts}
