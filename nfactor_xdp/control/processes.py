"""The node's child processes as the supervisor sees them: how each is
started (with the node's whole configuration, isolated from the caller's
working directory), whether it lives, how soon it is restarted when it keeps
dying, and how it is stopped: only ever a process whose identity (pid and
start time) is the one recorded, never whoever has the pid now."""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

from .. import logs
from ..formats import config as nodeconf
from ..formats.config import NodeConfig

STOP_TIMEOUT = 5.0
_POLL = 0.02  # polling a process's exit, always with a deadline
BACKOFF_MAX = 30.0  # seconds: the longest wait before restarting a child that keeps dying
RESTART_BACKOFF = 0.1  # seconds before a dead runtime is started again (doubling while it keeps dying)
RUNTIME_MODULE = "nfactor_xdp.dataplane.runtime"
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


def _reap_pidfd(fd: int) -> int | None:
    """Reap the exited process behind `fd` if it is our child (adopted
    across an exec) and return its code as Popen would; None if it is not."""
    try:
        res = os.waitid(os.P_PIDFD, fd, os.WEXITED | os.WNOHANG)
    except ChildProcessError:
        return None  # not our child: its new parent reaps it, and its code is not ours to know
    if res is None:
        return None
    return res.si_status if res.si_code == os.CLD_EXITED else -res.si_status


class Child:
    """One process of the node: `python -m MODULE --config-json CONFIG ARGS`.
    It writes its log file itself (logs.py); its standard output and error
    go to ROLE.stderr.log, or to the journal when the supervisor's own
    standard error is the journal (under systemd)."""

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
        self.adopted = False      # started by a previous supervisor (adopt): watched through a pidfd
        self.pidfd: int | None = None
        self._gone, self._code = False, None  # an adopted process exited; its code, when it can be known

    def spawn(self) -> None:
        self._close_pidfd()
        cmd = module_command(self.module, "--config-json", self.cfg.to_json(), *self.args)
        if logs.on_journal():
            self.proc = subprocess.Popen(cmd, cwd=ISOLATED_CWD, stdin=subprocess.DEVNULL)
        else:
            path = nodeconf.stderr_log_path(self.cfg.name, self.role)
            logs.rotate_if_over(path, self.cfg.log_max_bytes, 1)  # its last writer is dead
            with open(path, "ab") as out:
                self.proc = subprocess.Popen(cmd, cwd=ISOLATED_CWD, stdout=out, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL)
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
        self.last_exit = {"code": self.returncode, "ran_s": round(ran, 3),
                          "why": nodeconf.take_exit_reason(self.cfg.name, self.role), "at": time.time()}

    def restart_due(self, now: float) -> bool:
        return self.exited_at is not None and now - self.exited_at >= self.delay

    def adopt(self, ident: dict | None) -> bool:
        """Take over the live process `ident` names, which a previous
        supervisor started.  It may not be our child (Popen.poll cannot see
        it die): a pidfd can, and names that very process whatever happens to
        its pid.  False if it is not that process any more."""
        try:
            fd = os.pidfd_open(ident["pid"])
        except (OSError, KeyError, TypeError):
            return False
        if not is_same(ident):  # checked once the pidfd holds it: a reused pid is never adopted
            os.close(fd)
            return False
        self._close_pidfd()
        self.proc, self.pidfd, self.identity, self.adopted = None, fd, ident, True
        self._gone, self._code = False, None
        self.started_at, self.exited_at = time.monotonic(), None
        return True

    def _close_pidfd(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
        self.pidfd, self.adopted = None, False

    @property
    def pid(self) -> int | None:
        if self.proc:
            return self.proc.pid
        return self.identity["pid"] if self.identity else None

    @property
    def returncode(self) -> int | None:
        """Its exit code (negative: the signal), None while it runs or when
        it is unknown (an adopted process that is not our child)."""
        return self.proc.returncode if self.proc else self._code

    def exited(self) -> bool:
        if self.pidfd is None:
            return self.proc is not None and self.proc.poll() is not None
        if not self._gone:
            poller = select.poll()
            poller.register(self.pidfd, select.POLLIN)  # readable once the process has exited
            if not poller.poll(0):
                return False
            self._gone, self._code = True, _reap_pidfd(self.pidfd)
        return True

    def stop(self) -> None:
        if self.identity is not None:
            stop_processes([self.identity])

    def info(self) -> dict:
        return {"pid": self.pid, "identity": self.identity, "restarts": self.restarts,
                "quick_exits": self.quick_exits, "restart_delay_s": self.delay if self.exited_at else 0.0,
                "last_exit": self.last_exit, "adopted": self.adopted}


class RuntimeProc(Child):
    """The supervisor's record of a runtime process.  `process` is the
    process's own life (started; ready: registered with the controller;
    exited); the runtime's state in the node is the controller's view."""

    def __init__(self, cfg: NodeConfig, rt_id: int):
        super().__init__(cfg, f"rt{rt_id}", RUNTIME_MODULE, "--id", str(rt_id), backoff=RESTART_BACKOFF)
        self.id, self.core = rt_id, cfg.core_of(rt_id)
        self.sw, self.port = nodeconf.runtime_ports(rt_id)
        self.process = "started"

    def spawn(self) -> None:
        super().spawn()
        self.process = "started"

    def info(self) -> dict:
        return {"id": self.id, "core": self.core, "port": self.port, "switch_port": self.sw,
                "process": self.process, **super().info()}
