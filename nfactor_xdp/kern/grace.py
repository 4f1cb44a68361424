"""An RCU grace period from user space: membarrier(MEMBARRIER_CMD_GLOBAL)
runs synchronize_rcu(), which returns only after every NAPI poll that was
running when it was called has finished (NAPI runs inside an RCU read-side
section with bottom halves off).  Flow migration waits for one between the
switch table update and the marker, so that no frame looked up with the old
entry can still be queued behind the marker."""
from __future__ import annotations

import ctypes
import errno
import os
import platform
import time

from ..errors import NFactorError
from .libc import libc

_SYS_MEMBARRIER = {"x86_64": 324, "aarch64": 283}
MEMBARRIER_CMD_QUERY = 0
MEMBARRIER_CMD_GLOBAL = 1


class GracePeriodError(NFactorError):
    pass


def _membarrier(cmd: int) -> int:
    nr = _SYS_MEMBARRIER.get(platform.machine())
    if nr is None:
        raise GracePeriodError(f"membarrier: syscall number unknown on {platform.machine()}")
    ret = libc.syscall(ctypes.c_long(nr), ctypes.c_int(cmd), ctypes.c_uint(0), ctypes.c_int(0))
    if ret < 0:
        err = ctypes.get_errno()
        if err == errno.EINVAL:
            why = "the kernel refuses it (EINVAL: nohz_full CPUs, or the command is unknown)"
        elif err == errno.ENOSYS:
            why = "no membarrier syscall (kernel built without CONFIG_MEMBARRIER)"
        else:
            why = os.strerror(err)
        raise GracePeriodError(f"membarrier(cmd={cmd}): {why}; without it migration markers "
                               f"cannot be ordered behind the flow's frames")
    return ret


def check() -> None:
    """Fail early (and cheaply) if this kernel has no MEMBARRIER_CMD_GLOBAL."""
    if not _membarrier(MEMBARRIER_CMD_QUERY) & MEMBARRIER_CMD_GLOBAL:
        raise GracePeriodError("the kernel does not offer MEMBARRIER_CMD_GLOBAL "
                               "(nohz_full CPUs?); migration markers cannot be ordered")


def wait() -> float:
    """Wait until every NAPI poll running now has finished; returns the seconds it took."""
    t0 = time.perf_counter()
    _membarrier(MEMBARRIER_CMD_GLOBAL)
    return time.perf_counter() - t0


class Background:
    """Grace periods waited by a thread of their own, so that a packet loop
    asks for one and goes on forwarding.  request() returns a ticket;
    done(ticket) says whether a grace period that began after the request
    has ended.  Requests made while one is being waited for share the next
    one.  fileno() is an eventfd that becomes readable when one ends (for a
    poll loop); the thread is a daemon and calls wait() with the GIL released
    (ctypes), so it costs the loop nothing while the kernel waits."""

    def __init__(self, wait_fn=wait):
        import threading
        self._wait = wait_fn
        self._cond = threading.Condition()
        self.requested = self.completed = 0
        self.error: Exception | None = None
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="grace", daemon=True)
        self._thread.start()

    def fileno(self) -> int:
        return self._efd

    def request(self) -> int:
        with self._cond:
            self.requested += 1
            self._cond.notify()
            return self.requested

    def done(self, ticket: int) -> bool:
        return self.completed >= ticket

    def wait_for(self, ticket: int) -> None:
        """Block until `ticket` is done (rarely needed: see the callers)."""
        with self._cond:
            while self.completed < ticket and self.error is None:
                self._cond.wait(1.0)
        if self.error is not None:
            raise self.error

    def drain_event(self) -> None:
        try:
            os.eventfd_read(self._efd)
        except BlockingIOError:
            pass

    def _run(self) -> None:
        while True:
            with self._cond:
                while self.requested == self.completed and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                target = self.requested  # every request up to here was made before the wait begins
            try:
                self._wait()
            except Exception as e:  # no membarrier: reported by whoever waits next
                with self._cond:
                    self.error = e
                    self._cond.notify_all()
                return
            with self._cond:
                self.completed = target
                self._cond.notify_all()
            os.eventfd_write(self._efd, 1)

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(2.0)
        os.close(self._efd)


class Inline:
    """The same interface, each grace period waited at once (unit tests,
    and code that must not go on before it has passed)."""

    def __init__(self, wait_fn=wait):
        self._wait = wait_fn
        self.requested = self.completed = 0
        self.error = None

    def request(self) -> int:
        self.requested += 1
        self._wait()
        self.completed = self.requested
        return self.requested

    def done(self, ticket: int) -> bool:
        return self.completed >= ticket

    def wait_for(self, ticket: int) -> None:
        pass

    def fileno(self) -> int | None:
        return None

    def drain_event(self) -> None:
        pass

    def close(self) -> None:
        pass
