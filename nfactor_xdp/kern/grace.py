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
