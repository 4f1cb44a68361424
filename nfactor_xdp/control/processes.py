"""The node's child processes as the supervisor sees them: how each is
started (with the node's whole configuration, isolated from the caller's
working directory), whether it lives, how soon it is restarted when it keeps
dying, and how it is stopped: only ever a process whose identity (pid and
start time) is the one recorded, never whoever has the pid now."""
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
BACKOFF_MAX = 30.0  # seconds: the longest wait before restarting a child that keeps dying
STABLE_AFTER = 10.0  # seconds: a child that ran this long before dying starts again at its base backoff
ISOLATED_CWD = "/"   # children start here, away from whatever directory the caller stood in


def module_command(module: str, *args: str) -> list[str]:
    """How the node starts one of its Python processes (run it with
    cwd=ISOLATED_CWD): -P keeps the working directory off sys.path, so a
    module planted there (a msgpack.py) is never imported, as root."""
    return [sys.executable, "-P", "-m", module, *args]


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def start_time(pid: int) -> int | None:
    """When `pid` started (clock ticks since boot, /proc/PID/stat field 22)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])  # the fields after "comm)" start at 3
    except (OSError, ValueError, IndexError):
        return None


def identity(pid: int | None) -> dict | None:
    """What tells this process from a later one that reuses its pid."""
    if not pid:
        return None
    return {"pid": pid, "start": start_time(pid), "boot": _boot_id()}


def is_same(ident: dict | None) -> bool:
    """True if the process `ident` names still runs: its pid lives and
    started when recorded (a state without a start time proves nothing)."""
    if not isinstance(ident, dict) or not isinstance(ident.get("pid"), int) or ident.get("start") is None:
        return False
    if ident.get("boot") and ident["boot"] != _boot_id():
        return False
    return pid_alive(ident["pid"]) and start_time(ident["pid"]) == ident["start"]


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


def signal_process(ident: dict | None, sig: int) -> bool:
    """Send `sig` to the process `ident` names, never to another: a pidfd
    holds on to the process whose start time is then checked, so a pid
    reused even between the check and the signal is not hit."""
    if not isinstance(ident, dict) or not isinstance(ident.get("pid"), int):
        return False
    try:
        fd = os.pidfd_open(ident["pid"])
    except OSError:
        return False  # no such process
    try:
        if not is_same(ident):
            return False
        signal.pidfd_send_signal(fd, sig)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(fd)


def stop_processes(idents: list[dict | None], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM the processes named (identity()), wait up to `timeout`, then
    SIGKILL what is left; reap our children.  A process that is not the one
    recorded (dead, its pid reused) is never signalled."""
    live = [i for i in idents if is_same(i)]
    for ident in live:
        signal_process(ident, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for ident in live:
        while is_same(ident) and time.monotonic() < deadline:
            _reap(ident["pid"], os.WNOHANG)
            time.sleep(_POLL)
        signal_process(ident, signal.SIGKILL)
        _reap(ident["pid"], 0)
    for ident in idents:
        if ident and ident not in live and isinstance(ident.get("pid"), int):
            _reap(ident["pid"], os.WNOHANG)  # our child that died already (a zombie)


def _reap(pid: int, flags: int) -> None:
    try:
        os.waitpid(pid, flags)
    except ChildProcessError:
        pass  # not our child, or reaped already


class Child:
    """One process of the node: `python -m MODULE --config-json CONFIG ARGS`,
    its standard output and error appended to its log file."""

    def __init__(self, cfg: NodeConfig, role: str, module: str, *args: str, backoff: float = 0.1):
        """backoff: seconds before the first restart; doubled for each exit in a
        row that came less than STABLE_AFTER after its start, up to BACKOFF_MAX."""
        self.cfg, self.role, self.module, self.args = cfg, role, module, list(args)
        self.proc: subprocess.Popen | None = None
        self.identity: dict | None = None
        self.restarts = 0
        self.started_at = 0.0
        self.base_backoff = backoff
        self.quick_exits = 0      # exits in a row, each soon after its start
        self.delay = backoff      # before the next restart
        self.exited_at: float | None = None
        self.last_exit: dict | None = None

    def spawn(self) -> None:
        with open(nodeconf.log_path(self.cfg.name, self.role), "ab") as log:
            self.proc = subprocess.Popen(
                module_command(self.module, "--config-json", self.cfg.to_json(), *self.args), cwd=ISOLATED_CWD,
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.identity = identity(self.proc.pid)
        self.started_at = time.monotonic()
        self.exited_at = None

    def respawn(self) -> None:
        self.restarts += 1
        self.spawn()

    def note_exit(self, now: float) -> None:
        """Once per exit: how long until the restart, and why it exited (what
        the child wrote with write_exit_reason, if anything)."""
        ran = now - self.started_at
        self.quick_exits = self.quick_exits + 1 if ran < STABLE_AFTER else 1
        self.delay = min(BACKOFF_MAX, self.base_backoff * 2 ** (self.quick_exits - 1))
        self.exited_at = now
        self.last_exit = {"code": self.proc.returncode, "ran_s": round(ran, 3),
                          "why": nodeconf.take_exit_reason(self.cfg.name, self.role), "at": time.time()}

    def restart_due(self, now: float) -> bool:
        return self.exited_at is not None and now - self.exited_at >= self.delay

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def stop(self) -> None:
        if self.proc is not None:
            stop_processes([self.identity])

    def info(self) -> dict:
        return {"pid": self.pid, "identity": self.identity, "restarts": self.restarts,
                "quick_exits": self.quick_exits, "restart_delay_s": self.delay if self.exited_at else 0.0,
                "last_exit": self.last_exit}
