"""Network namespaces: create, remove and enter them from Python.

Python 3.11 has no os.setns, so entering goes through libc.  setns() moves
only the calling thread; every process of the node is single-threaded, and
tests use `entered()` to step in and back out again.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
from typing import Iterator

from pyroute2 import netns as _pr_netns
from ..errors import NFactorError
from .libc import libc

NETNS_RUN_DIR = "/var/run/netns"
CLONE_NEWNET = 0x40000000



class NetnsError(NFactorError):
    pass


def path(name: str) -> str:
    return os.path.join(NETNS_RUN_DIR, name)


def exists(name: str) -> bool:
    return os.path.exists(path(name))


def listing() -> list[str]:
    try:
        return sorted(os.listdir(NETNS_RUN_DIR))
    except FileNotFoundError:
        return []


def create(name: str) -> None:
    if exists(name):
        raise NetnsError(f"network namespace {name!r} already exists")
    _pr_netns.create(name)


def remove(name: str) -> None:
    """Remove a namespace; a missing one is not an error (cleanup is idempotent)."""
    if exists(name):
        _pr_netns.remove(name)


def _setns_fd(fd: int) -> None:
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetnsError(f"setns failed: {os.strerror(err)}")


def enter(name: str) -> None:
    """Move the calling thread into namespace `name` for good."""
    if not exists(name):
        raise NetnsError(f"network namespace {name!r} does not exist")
    fd = os.open(path(name), os.O_RDONLY)
    try:
        _setns_fd(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def entered(name: str | None) -> Iterator[None]:
    """Run a block inside namespace `name` (None: stay where we are)."""
    if name is None:
        yield
        return
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        enter(name)
        try:
            yield
        finally:
            _setns_fd(home)
    finally:
        os.close(home)


def exec_argv(name: str | None, argv: list[str]) -> list[str]:
    """The argv that runs `argv` inside namespace `name` (with its own /sys)."""
    return argv if name is None else ["ip", "netns", "exec", name, *argv]


def run(name: str | None, argv: list[str], **kw) -> subprocess.CompletedProcess:
    kw.setdefault("check", True)
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    return subprocess.run(exec_argv(name, argv), **kw)
