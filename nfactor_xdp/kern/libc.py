"""The one handle on the C library, for the few calls Python's standard
library lacks (setns, mount, bind on AF_XDP, syscall for bpf and membarrier).
Every call sets errno for ctypes.get_errno()."""
from __future__ import annotations

import ctypes
import ctypes.util
import os

libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
libc.syscall.restype = ctypes.c_long
# bind() takes a packed sockaddr (AF_XDP's sockaddr_xdp has no Python form)
libc.bind.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
libc.bind.restype = ctypes.c_int


def errno_text() -> tuple[int, str]:
    """(errno, its message) of the last failed call."""
    err = ctypes.get_errno()
    return err, os.strerror(err)
